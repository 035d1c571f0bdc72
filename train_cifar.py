"""
Train a diffusion transformer (DiT, U-ViT, DiffiT, GenViT) on CIFAR-10, an image folder or pre-extracted latents
on one GPU (or the CPU) with each paper's recipe; resumable, with an EMA model, sample grids and logs.

  python train_cifar.py --backbone uvit                 # U-ViT-S/2, U-ViT's CIFAR-10 recipe (unconditional)
                                                        # (no GPU: U-ViT-Tiny's CPU recipe, ~10 min; --paper-recipe)
  python train_cifar.py --backbone dit --class-cond     # DiT-S/2, class-conditional with label dropout for CFG
  python train_cifar.py --backbone genvit --hybvit      # HybViT: GenViT + its classifier, test accuracy logged
  python train_cifar.py --backbone dit --dataset folder --data-dir ~/pets --image-size 64 --model DiT-S/4
  python sample.py --ckpt runs/uvit-U-ViT-S-2-cifar10/latest.pt --num-samples 50000 --npz uvit.npz

Many GPUs (or CPU processes): torchrun --nproc_per_node N train_cifar.py ... trains the same run with
DistributedDataParallel; --batch-size stays the global batch (README, "Many GPUs").

Rerunning the same command resumes from <out-dir>/latest.pt (--resume auto, the default), saved every --ckpt-every
steps and every --ckpt-minutes. Everything a run writes goes into --out-dir: latest.pt, ckpt_XXXXXXX.pt,
log.jsonl, loss.png, samples/step_XXXXXXX_ema.png.
"""
import argparse
import ast
import copy
import json
import math
import os
import random

import numpy as np
import torch

from backbones import BACKBONES, build_model
from checkpoints import check_compatible, load_checkpoint, plain
from data import Batches, LatentFolder, latents_provenance, load_dataset
from devices import autocast_forward, check_batch_memory, check_precision, default_precision, out_of_memory
from devices import start_processes
from diffusion import FORMULATIONS, LOSS_TYPES, PREDICTIONS, SCHEDULES, make_diffusion
from errors import RunError
from evaluation import evaluate, fid_evaluator
from files import atomic_write, check_dir
from finetune import init_weights
from hybvit import HybViT
from recipes import CPU_COMMAND, TEXT_RECIPES, note_recipe, resolve  # noqa: F401 (CPU_COMMAND: re-exported)
from runs import Run, StopOnSignal, TrainLog, default_out_dir, prepare_folder, resume_path
from text_runs import Captioned, TextRun, load_text_data
from training import ema_decay, learning_rate, step_draws, train_step, update_ema
from vae import latent_decoder



# ----- Arguments -----

def model_arg(text):
    """KEY=VALUE with VALUE a python literal (int, float, bool, tuple) or a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. depth=6), got {text!r}")
    if key in OWN_FLAGS:  # else passed twice, or silently at odds with the diffusion or the data
        raise argparse.ArgumentTypeError(f"{key} is set by {OWN_FLAGS[key]}, not --model-arg")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


OWN_FLAGS = {"attention": "--attention sdpa|math", "grad_checkpoint": "--grad-checkpoint",
             "learn_sigma": "--learn-sigma", "num_classes": "the data's classes (--class-cond)",
             "class_dropout_prob": "--class-dropout"}
RECIPE = "default: the backbone's recipe"  # flags left unset (None) take the backbone's recipe (recipes.py)
BOOL = argparse.BooleanOptionalAction
# Every flag, in --help order: flag -> add_argument keywords.
FLAGS = {
    # model and data
    "--backbone": dict(required=True, choices=list(BACKBONES), help="model family"),
    "--model": dict(help="name in the backbone's MODELS registry (default: the recipe's)"),
    "--paper-recipe": dict(action="store_true", help="the paper's recipe even where no GPU is visible (default "
                                                    "there for CIFAR-10: the CPU-sized recipe, recipes.py)"),
    "--model-arg": dict(type=model_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="constructor override, repeatable (e.g. --model-arg depth=6)"),
    "--dataset": dict(default="cifar10", choices=["cifar10", "folder", "latents", "captions", "cifar10-captions"],
                      help="captions: images or extract_latents.py latents with captions (text-to-image U-ViT); "
                           "cifar10-captions: CIFAR-10 captioned from templates (the CPU text-to-image demo)"),
    "--data-dir": dict(default="data", help="cifar10: download folder; folder: image root; latents: an "
                                            "extract_latents.py folder or a .npz/.pt file"),
    "--captions": dict(help="captions: the caption file (default: DATA_DIR/metadata.jsonl; or COCO captions_*.json)"),
    "--clip": dict(help="captions: the CLIP text tower folder (openai/clip-vit-large-patch14, or "
                        "clip.write_small_clip's for the CPU demo)"),
    "--cifar-url": dict(help="override the CIFAR-10 tarball URL (a mirror or file://)"),
    "--image-size": dict(type=int, default=32),
    "--no-flip": dict(dest="flip", action="store_false", help="no random horizontal flips"),
    "--class-cond": dict(action=BOOL, help="class-conditional (default: on for extract_latents.py folders with "
                                           "classes, off otherwise, as the papers' CIFAR-10)"),
    "--vae": dict(help="latents: the SD-VAE that decodes grids and FID samples (default: the latents' meta.json)"),
    "--class-dropout": dict(type=float, default=0.1, help="label dropout probability for classifier-free guidance"),
    # diffusion
    "--learn-sigma": dict(action=BOOL, help="learned variance, hybrid loss"),
    "--schedule": dict(choices=SCHEDULES, help="default: the recipe's (linear; U-ViT latents: scaled_linear; "
                                               "GenViT: cosine)"),
    "--prediction": dict(choices=PREDICTIONS, help="ddpm: what the network predicts (default: the recipe's, eps; "
                                                   "U-ViT's CPU recipes: v)"),
    "--fixed-variance": dict(choices=["large", "small"], help="ddpm without --learn-sigma: sampling variance "
                                                              "beta_t (large) or the posterior's (small, GenViT)"),
    "--loss-type": dict(choices=LOSS_TYPES, help="squared (l2) or absolute (l1, GenViT) error; default: the "
                                                 "recipe's"),
    "--formulation": dict(choices=FORMULATIONS, help="ddpm (discrete DDPM), edm (Karras et al. 2022) or flow "
                                                     "(linear flow matching); default: the recipe's"),
    # optimization
    "--steps": dict(type=int, help=RECIPE),
    "--batch-size": dict(type=int, help=RECIPE),
    "--lr": dict(type=float, help=RECIPE),
    "--weight-decay": dict(type=float, help=RECIPE),
    "--warmup": dict(type=int, help=RECIPE),
    "--grad-clip": dict(type=float, help=RECIPE),
    "--ema-decay": dict(type=float, help=RECIPE),
    "--ema-rampup": dict(type=float, help="EDM's EMA ramp-up: the EMA half-life is at most this fraction of the "
                                          "images seen (0 = off; default 0.05, EDM's)"),
    "--betas": dict(type=float, nargs=2, help="AdamW betas (default: the recipe's)"),
    "--lr-schedule": dict(choices=["constant", "cosine"], help="after the linear warm-up: constant (DiT, U-ViT) or "
                                                               "cosine decay to --min-lr (GenViT)"),
    "--min-lr": dict(type=float, help="cosine schedule: the first and last LR (GenViT: 1e-6)"),
    # HybViT
    "--hybvit": dict(action="store_true", help="genvit: HybViT's joint objective, --px-weight x diffusion loss + "
                                               "--ce-weight x cross-entropy of the classifier on another batch"),
    "--px-weight": dict(type=float, default=100.0, help="HybViT: weight of the diffusion loss (paper: 100)"),
    "--ce-weight": dict(type=float, default=1.0, help="HybViT: weight of the cross-entropy (paper: 1)"),
    "--label-smoothing": dict(type=float, default=0.1, help="HybViT: label smoothing of the cross-entropy"),
    # machine
    "--seed": dict(type=int, default=0),
    "--precision": dict(choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPUs with it, else fp32 (on a "
                                                               "CPU bf16 pays off only with AMX)"),
    "--device": dict(help="default: cuda if available, else cpu"),
    "--compile": dict(action="store_true", help="torch.compile the model"),
    "--grad-checkpoint": dict(action="store_true", help="recompute block activations in backward (saves memory)"),
    "--attention": dict(default="sdpa", choices=["sdpa", "math"]),
    # outputs
    "--out-dir": dict(help="default: runs/<backbone>-<model>-<dataset>"),
    "--init-from": dict(help="start a new run from these weights (not their optimizer or step): an official release "
                              "or a train_cifar.py checkpoint (finetune.py; README, \"Fine-tuning a release\")"),
    "--class-map": dict(help="--init-from: the old classes the data's classes take, in order, e.g. 3,7,12 "
                             "(default: the same rows if as many classes, else new rows)"),
    "--resume": dict(default="auto", help="auto (latest.pt in --out-dir if any), never, or a checkpoint path"),
    "--log-every": dict(type=int, default=100),
    "--sample-every": dict(type=int, help="0 = no sample grids (default: 5000; the CPU recipes': half the run)"),
    "--sampler": dict(help="sampler for grids and FID: ddpm / ddim / dpm++2m (ddpm), heun / euler (edm), "
                           "euler / heun / sde (flow); default: the recipe's"),
    "--sample-steps": dict(type=int, help="default: the recipe's, else the sampler's usual count"),
    "--grid-cfg-scale": dict(type=float, help="classifier-free guidance of class-conditional grids (default 1: none; "
                                              "the CPU recipes' 3)"),
    "--ckpt-every": dict(type=int, help="latest.pt every this many steps (default: 5000; CPU recipes: fewer)"),
    "--ckpt-minutes": dict(type=float, default=10.0, help="also save latest.pt after this many minutes of training "
                                                          "since the last checkpoint (0 = by steps only)"),
    "--keep-every": dict(type=int, help="also keep ckpt_XXXXXXX.pt every this many steps (0 = never; default 10 x "
                                        "--ckpt-every)"),
    "--fid-every": dict(type=int, default=0, help="FID of the EMA model every this many steps (0 = never)"),
    "--fid-samples": dict(type=int, default=10_000, help="samples per FID (U-ViT selects checkpoints by FID-10k)"),
    "--fid-ref": dict(default="cifar10-train", help="cifar10-train, cifar10-test or a stats .npz (mu, sigma)"),
}


def parse_args(argv=None, gpu=True):
    """FLAGS parsed, unset ones from the backbone's recipe (recipes.resolve; gpu False: the CPU one), range-checked."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for flag, kwargs in FLAGS.items():
        p.add_argument(flag, **kwargs)
    try:
        args = resolve(p.parse_args(argv), gpu)
    except RunError as e:
        p.error(str(e))
    for ok, msg in [  # in this order: the first failing check is reported
            (args.batch_size >= 1, "--batch-size must be >= 1"), (args.steps >= 0, "--steps must be >= 0"),
            (args.lr > 0 and math.isfinite(args.lr), "--lr must be a finite number > 0"),
            (all(0 <= b < 1 for b in args.betas), "--betas must both lie in [0, 1), e.g. --betas 0.9 0.999"),
            (args.weight_decay >= 0, "--weight-decay must be >= 0"),
            (args.grad_clip >= 0, "--grad-clip must be >= 0 (0 = no clipping)"),
            (0 <= args.ema_decay < 1, "--ema-decay must be in [0, 1)"),
            (0 <= args.class_dropout <= 1, "--class-dropout must be in [0, 1]"),
            (0 <= args.min_lr <= args.lr, "--min-lr must lie in [0, --lr]"),
            (args.px_weight >= 0 and args.ce_weight >= 0, "--px-weight and --ce-weight must be >= 0"),
            (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (args.image_size >= 1, "--image-size must be >= 1"), (args.warmup >= 0, "--warmup must be >= 0"),
            (min(args.log_every, args.ckpt_every) >= 1, "--log-every and --ckpt-every must be >= 1"),
            (min(args.sample_every, args.keep_every, args.fid_every, args.ema_rampup, args.ckpt_minutes) >= 0,
             "--sample-every, --keep-every, --fid-every, --ema-rampup and --ckpt-minutes must be >= 0"),
            (args.fid_samples >= 2, "--fid-samples must be >= 2"),
            (args.keep_every % args.ckpt_every == 0, f"--keep-every {args.keep_every} must be a multiple of "
             f"--ckpt-every {args.ckpt_every} (kept checkpoints are copies of a checkpoint step)"),
            (1 <= args.sample_steps <= 1000, "--sample-steps must be in 1..1000")]:
        if not ok:
            p.error(msg)
    return args


def load_data(args):
    """-> (args completed by the data, images or latents (N, C, H, W), labels (N,) or None, class names)."""
    x, y, names = load_text_data(args) if args.dataset in TEXT_RECIPES else load_dataset(
        args.dataset, args.data_dir, args.image_size, args.cifar_url)  # captions: labels are caption rows
    latents = {"image_size": x.shape[-1], "flip": False} if getattr(x, "dtype", None) != torch.uint8 else {}
    class_cond = isinstance(x, LatentFolder) and bool(names) if args.class_cond is None else args.class_cond
    args = argparse.Namespace(**{**vars(args), **latents, "class_cond": class_cond})
    labelled = args.class_cond or args.hybvit
    if labelled and not names and not isinstance(y, Captioned):
        raise RunError(f"{'--class-cond' if args.class_cond else '--hybvit'} needs labels: one sub-folder per class "
                       f"in {args.data_dir} (or labels in the latents file)")
    kind = "memory-mapped moments" if isinstance(x, LatentFolder) else x.dtype
    print(f"data: {args.dataset} {tuple(x.shape)} {kind}, {len(names) if labelled else 'no'} classes")
    return args, x, (y if labelled else None), names


# ----- Setup: everything checked and built before anything is written -----

def setup(args, procs, device):
    """-> (Run, its Batches, FID function or None, HybViT or None); procs, device: from start_processes."""
    out_dir = args.out_dir or default_out_dir(args)
    check_dir(out_dir, "--out-dir")  # before any download or model build
    if procs.world > 1:
        check_processes(args, procs)
    args = argparse.Namespace(**{**vars(args), "precision": args.precision or default_precision(device)})
    check_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 (DiT train.py)
    if device.type == "cpu" and (args.recipe == "cpu" or args.steps >= 100_000):
        note_recipe(args)
    ckpt_path = resume_path(args.resume, out_dir)
    ckpt = load_checkpoint(ckpt_path, resume=True) if ckpt_path else None  # before any download or decoding
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    args, x, labels, names = load_data(args)
    num_classes = len(names) if args.class_cond else 0
    text = TextRun(args.clip, labels, device) if isinstance(labels, Captioned) else None  # CLIP, captions' contexts
    meta = {"dataset": args.dataset, "image_size": args.image_size, "channels": x.shape[1], "num_classes": num_classes,
            "class_names": names if args.class_cond else [], "pixels": getattr(x, "dtype", None) == torch.uint8}
    if not meta["pixels"]:
        meta.update(latent_meta(args, x))
    head = len(names) if args.backbone == "genvit" else num_classes  # GenViT: its classifier head's classes
    kwargs = {"input_size": args.image_size, "in_channels": x.shape[1], "num_classes": head,
              "class_dropout_prob": args.class_dropout if args.class_cond else 0.0, "learn_sigma": args.learn_sigma,
              **(text.model_kwargs if text else {}), **args.model_arg}
    model = build_model(args.backbone, args.model, attention=args.attention, grad_checkpoint=args.grad_checkpoint,
                        **kwargs)
    if args.model_arg:  # only an override can make the model disagree with the data
        check_geometry(model, x, args.model)
    if args.batch_size > 1024:  # beyond every recipe's batch: measured first (on a CPU an OOM kill says nothing)
        check_batch_memory(model, (args.batch_size // procs.world, *x.shape[1:]), device, args.precision)
    recorded = {"formulation": args.formulation, "loss_type": args.loss_type}  # what make_diffusion rebuilds it from
    if args.formulation == "ddpm":
        recorded.update(schedule=args.schedule, timesteps=1000, prediction=args.prediction,
                        learn_sigma=args.learn_sigma, fixed_variance=args.fixed_variance)
    diffusion = make_diffusion(**recorded)
    config = {"backbone": args.backbone, "model_name": args.model, "model_kwargs": plain(kwargs), "data": meta,
              "diffusion": recorded, **(text.config if text else {})}  # captions: the CLIP folder and prompts
    if args.init_from or ckpt and "init_from" in ckpt:  # a fine-tuning run: the weights it started from
        config["init_from"] = init_weights(model, args, config, ckpt)
    if ckpt is not None:
        args = as_trained(args, ckpt, config, ckpt_path)
    decode = None if meta["pixels"] else latent_decode(args, meta, device)
    fid_score = fid_evaluator(args, meta, diffusion, device, decode, procs, text) if args.fid_every else None
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # the EMA starts as a copy (DiT train.py)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 only
    run = Run(args, model, ema, opt, scaler, diffusion, meta, config, out_dir, device, procs, decode, text)
    if ckpt is not None:
        run.restore(ckpt, ckpt_path)
    batches = Batches(x, labels if args.class_cond else None, args.batch_size, args.seed, device, args.flip,
                      procs.part(args.batch_size))
    hybvit = HybViT(model, batches.x, labels, args, device) if args.hybvit else None
    return run, batches, fid_score, hybvit


def check_processes(args, procs):
    """torchrun: the global batch splits evenly; HybViT's classifier pass stays in one process."""
    if args.batch_size % procs.world:
        raise RunError(f"--batch-size {args.batch_size} (the global batch) must be divisible by the {procs.world} "
                       "processes")
    if args.hybvit:
        raise RunError("--hybvit runs in one process (its classifier pass is outside DDP's forward); drop torchrun")


def as_trained(args, ckpt, config, path):
    """args for continuing ckpt's run: the same config and HybViT objective (else a one-line refusal); a checkpoint
    written before the EMA ramp-up existed continues without one, as it was trained."""
    check_compatible({**ckpt, "hybvit": bool(ckpt["args"].get("hybvit"))}, {**config, "hybvit": args.hybvit}, path)
    if "ema_rampup" in ckpt["args"]:
        return args
    print(f"note: {path} predates the EMA ramp-up (--ema-rampup); it continues with a constant --ema-decay, as before")
    return argparse.Namespace(**{**vars(args), "ema_rampup": 0.0})


def check_geometry(model, x, name):
    if (model.in_channels, model.input_size) != (x.shape[1], x.shape[-1]):  # e.g. a --model-arg override
        raise RunError(f"the data are {x.shape[1]} x {x.shape[-1]} x {x.shape[-1]} but {name} was built "
                       f"for {model.in_channels} x {model.input_size} x {model.input_size}; drop the in_channels / "
                       "input_size override (they follow the data)")


def latent_meta(args, x):
    """What decodes the latents' samples (sample.py reads it too): the VAE, and a latent folder's pixel size; and
    what the latents are and what made them (data.latents_provenance), which a resume must match."""
    if isinstance(x, LatentFolder):
        return {"vae": args.vae or x.meta.get("vae"), "pixel_size": x.meta["image_size"],
                **latents_provenance(args.data_dir, x)}
    return {"vae": args.vae, **latents_provenance(args.data_dir, x)}


def latent_decode(args, meta, device):
    """Latents: the VAE decoder for grids and FID, or None (with a note) when no VAE is known."""
    if meta.get("vae"):
        return latent_decoder(meta["vae"], meta["channels"], meta["image_size"], device, latents=meta)[0]
    if args.sample_every:
        print("note: no VAE is known for these latents (--vae), so no sample grids are drawn")
    return None


# ----- Training -----

def train(run, batches, fid_score=None, hybvit=None):
    """The loop, DDPM Alg. 1 with AdamW and an EMA; log records, grids, FID and checkpoints when due; under torchrun
    each process trains its part of every global batch. A signal stops it after a checkpoint: returns False then."""
    args, model, procs = run.args, run.model, run.procs
    net = procs.wrap(model, run.device, find_unused_parameters=args.backbone == "genvit")  # GenViT's classifier
    fwd = autocast_forward(torch.compile(net) if args.compile else net, run.device, args.precision)
    fwd = run.text.wrap(fwd, model) if run.text else fwd  # captions: caption rows -> CLIP contexts
    params = list(model.parameters())
    keys = ["loss", "mse"] + ["vb"] * run.diffusion.learn_sigma + ["l1"] * (args.loss_type == "l1")
    model.train()
    log = TrainLog(run, keys + (HybViT.KEYS if hybvit else []))
    with log.bar, StopOnSignal() as stop:  # the progress bar closes on the way out
        stopping = False
        while run.step < args.steps and not stopping:
            lr = learning_rate(args, run.step)
            for g in run.opt.param_groups:
                g["lr"] = lr
            draws = step_draws(run.diffusion, run.step, args.seed, batches.shape, batches.part, run.device,
                               args.class_dropout * args.class_cond, latent_noise=batches.latents)  # label dropout
            x, y = batches(run.step, draws.flip, draws.latent_noise)
            joint = hybvit.joint(run.step) if hybvit else None  # HybViT: + cross-entropy on a second batch
            terms, gnorm = train_step(fwd, run.diffusion, run.opt, run.scaler, params, x, y, args.grad_clip, joint,
                                      t=draws.t, noise=draws.noise, drop=draws.drop)
            update_ema(run.ema, model, ema_decay(args, run.step))
            run.step += 1
            log.add(terms, gnorm)
            stopping = procs.any(stop.signum is not None)  # a signal on any process stops all after this step
            timed = procs.any(0 < 60 * args.ckpt_minutes <= log.elapsed() - run.saved_at)  # by time, on all ranks
            if run.step % args.log_every == 0 or run.step == args.steps or stopping or timed:
                log.write(lr)
            if not stopping and (args.sample_every or fid_score):
                evaluate(run, log, stop, fid_score)  # the grid / FID when due; a stop request abandons them
            if hybvit:
                hybvit.evaluate(run, log)  # test accuracy at checkpoint steps
            stopping = stopping or (procs.world == 1 and stop.signum is not None)  # e.g. during the grid
            if run.step % args.ckpt_every == 0 or run.step == args.steps or stopping or timed:
                run.check_finite(log.unlogged(), weights=True)
                run.save(log.elapsed())
    if run.step < args.steps:
        return False
    grids = ", samples/" if os.path.isdir(os.path.join(run.out_dir, "samples")) else ""
    if procs.main:
        print(f"done: {run.step} steps; checkpoints, log.jsonl, loss.png{grids} are in {run.out_dir}")
    return True


def main(argv=None):
    args = parse_args(argv, gpu=torch.cuda.is_available())
    procs = training = lock = None
    try:
        procs, device = start_processes(args.device)
        run, batches, fid_score, hybvit = setup(args, procs, device)
        if procs.main:  # the folder (locked: one writer), config.json; then every process trains
            lock = prepare_folder(run.out_dir)
            n_params = sum(p.numel() for p in run.model.parameters())
            print(f"model: {run.args.backbone} {run.args.model}, {n_params:,} parameters; precision "
                  f"{run.args.precision} on {run.device}\nrun directory: {os.path.abspath(run.out_dir)}")
            config = json.dumps({"args": plain(vars(run.args)), "parameters": n_params, **run.config}, indent=1)
            atomic_write(os.path.join(run.out_dir, "config.json"), lambda f: f.write(config.encode()))
        training = True  # from here a first Ctrl-C saves a checkpoint and a second one stops at once
        finished = train(run, batches, fid_score, hybvit)
    except RunError as e:
        raise SystemExit(f"error: {e}")
    except (MemoryError, RuntimeError) as e:  # out of memory (CUDA's or the CPU allocator's): one line
        raise SystemExit(out_of_memory(e, args.batch_size)) if out_of_memory(e, args.batch_size) else e
    except KeyboardInterrupt:  # before training: the first Ctrl-C; while training: a second one
        raise SystemExit("stopped at once (second Ctrl-C); rerun the command to resume from the last checkpoint"
                         if training else "stopped before training began (Ctrl-C); rerun the command to start")
    finally:
        if procs is not None:
            procs.close()
        if lock is not None:  # the run folder's lock (files.lock_folder): released with its descriptor
            os.close(lock)
    if not finished:
        raise SystemExit(f"interrupted at step {run.step}; checkpoint saved to {run.latest}; rerun the command to "
                         "resume")


if __name__ == "__main__":
    main()

"""
Train a diffusion transformer (DiT, U-ViT, DiffiT, GenViT) on CIFAR-10, an image folder or pre-extracted latents
on one GPU (or the CPU) with each paper's recipe; resumable, with an EMA model, sample grids and logs.

  python train_cifar.py --backbone uvit                 # U-ViT-S/2, U-ViT's CIFAR-10 recipe (unconditional)
  python train_cifar.py --backbone dit --class-cond     # DiT-S/2, class-conditional with label dropout for CFG
  python train_cifar.py --backbone genvit --hybvit      # HybViT: GenViT + its classifier, test accuracy logged
  python train_cifar.py --backbone dit --dataset folder --data-dir ~/pets --image-size 64 --model DiT-S/4
  python sample.py --ckpt runs/uvit-U-ViT-S-2-cifar10/latest.pt --num-samples 50000 --npz uvit.npz

Many GPUs (or CPU processes): torchrun --nproc_per_node N train_cifar.py ... trains the same run with
DistributedDataParallel; --batch-size stays the global batch (README, "Many GPUs").

Rerunning the same command resumes from <out-dir>/latest.pt (--resume auto, the default). Everything a run
writes goes into --out-dir: latest.pt, ckpt_XXXXXXX.pt, log.jsonl, loss.png, samples/step_XXXXXXX_ema.png.
"""
import argparse
import ast
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

import fid
from backbones import BACKBONES, build_model
from checkpoints import check_compatible, load_checkpoint, plain, rng_state, save_checkpoint, set_rng_state
from devices import Processes, autocast_forward, check_precision, default_precision, start_processes
from errors import RunError
from files import atomic_link, atomic_write, check_dir, make_dir, remove_stale_temps
from images import plot_losses, save_grid, to_uint8
from recipes import LATENT_RECIPES, RECIPES, RECIPE_DEFAULTS
from runs import Interrupted, StopOnSignal
from sampling import generate
from data import BatchIndices, LatentBatches, LatentFolder, get_batch, load_cifar10, load_dataset, random_crop
from diffusion import FORMULATIONS, LOSS_TYPES, PREDICTIONS, SCHEDULES, make_diffusion
from vae import latent_decoder

# What 2 CPU cores train in about 30 minutes (measured: README, "What a CPU can do").
CPU_COMMAND = ("python train_cifar.py --backbone dit --model DiT-Tiny --batch-size 32 --lr 3e-4 --steps 800 "
               "--ema-decay 0.995 --sample-every 400")


# ----- Arguments -----

def model_arg(text):
    """KEY=VALUE with VALUE a python literal (int, float, bool, tuple) or a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. depth=6), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--backbone", required=True, choices=list(BACKBONES), help="model family")
    a("--model", help="name in the backbone's MODELS registry (default: the recipe's)")
    a("--model-arg", type=model_arg, action="append", default=[], metavar="KEY=VALUE",
      help="constructor override, repeatable (e.g. --model-arg depth=6)")
    a("--dataset", default="cifar10", choices=["cifar10", "folder", "latents"])
    a("--data-dir", default="data",
      help="cifar10: download folder; folder: image root; latents: an extract_latents.py folder or a .npz/.pt file")
    a("--cifar-url", default=None, help="override the CIFAR-10 tarball URL (a mirror or file://)")
    a("--image-size", type=int, default=32)
    a("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    a("--class-cond", action=argparse.BooleanOptionalAction, default=None,
      help="class-conditional (default: on for extract_latents.py folders with classes, off otherwise, as the "
           "papers' CIFAR-10)")
    a("--vae", default=None, help="latents: the SD-VAE that decodes grids and FID samples (default: the one in "
                                  "the latents' meta.json)")
    a("--class-dropout", type=float, default=0.1, help="label dropout probability for classifier-free guidance")
    a("--learn-sigma", action=argparse.BooleanOptionalAction, default=None, help="learned variance, hybrid loss")
    a("--schedule", default=None, choices=SCHEDULES,
      help="default: the recipe's (linear; U-ViT latents: scaled_linear; GenViT: cosine)")
    a("--prediction", default="eps", choices=PREDICTIONS, help="ddpm: what the network predicts")
    a("--fixed-variance", default=None, choices=["large", "small"],
      help="ddpm without --learn-sigma: sampling variance beta_t (large) or the posterior's (small, GenViT)")
    a("--loss-type", default=None, choices=LOSS_TYPES, help="squared (l2) or absolute (l1, GenViT) error; "
                                                            "default: the recipe's")
    a("--formulation", default=None, choices=FORMULATIONS,
      help="ddpm (discrete DDPM), edm (Karras et al. 2022) or flow (linear flow matching); default: the recipe's")
    for flag, typ in [("--steps", int), ("--batch-size", int), ("--lr", float), ("--weight-decay", float),
                      ("--warmup", int), ("--grad-clip", float), ("--ema-decay", float)]:
        a(flag, type=typ, default=None, help="default: the backbone's recipe")
    a("--betas", type=float, nargs=2, default=None, help="AdamW betas (default: the recipe's)")
    a("--lr-schedule", default=None, choices=["constant", "cosine"],
      help="after the linear warm-up: constant (DiT, U-ViT) or cosine decay to --min-lr (GenViT)")
    a("--min-lr", type=float, default=None, help="cosine schedule: the first and last LR (GenViT: 1e-6)")
    a("--hybvit", action="store_true", help="genvit: HybViT's joint objective, --px-weight x diffusion loss + "
                                             "--ce-weight x cross-entropy of the classifier on another batch")
    a("--px-weight", type=float, default=100.0, help="HybViT: weight of the diffusion loss (paper: 100)")
    a("--ce-weight", type=float, default=1.0, help="HybViT: weight of the cross-entropy (paper: 1)")
    a("--label-smoothing", type=float, default=0.1, help="HybViT: label smoothing of the cross-entropy")
    a("--seed", type=int, default=0)
    a("--precision", choices=["bf16", "fp16", "fp32"], default=None,
      help="default: bf16 on GPUs with it, else fp32 (on a CPU bf16 pays off only with AMX)")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad-checkpoint", action="store_true", help="recompute block activations in backward (saves memory)")
    a("--attention", default="sdpa", choices=["sdpa", "math"])
    a("--out-dir", default=None, help="default: runs/<backbone>-<model>-<dataset>")
    a("--resume", default="auto", help="auto (latest.pt in --out-dir if any), never, or a checkpoint path")
    a("--log-every", type=int, default=100)
    a("--sample-every", type=int, default=5000, help="0 = no sample grids")
    a("--sampler", default=None, help="sampler for grids and FID: ddpm / ddim / dpm++2m (ddpm), heun / euler (edm), "
                                      "euler / heun / sde (flow); default: the recipe's")
    a("--sample-steps", type=int, default=None, help="default: the recipe's, else the sampler's usual count")
    a("--ckpt-every", type=int, default=5000)
    a("--keep-every", type=int, default=None,
      help="also keep ckpt_XXXXXXX.pt every this many steps (0 = never; default 10 x --ckpt-every)")
    a("--fid-every", type=int, default=0, help="FID of the EMA model every this many steps (0 = never)")
    a("--fid-samples", type=int, default=10_000, help="samples per FID (U-ViT selects checkpoints by FID-10k)")
    a("--fid-ref", default="cifar10-train", help="cifar10-train, cifar10-test or a stats .npz (mu, sigma)")
    args = p.parse_args(argv)
    if args.formulation not in (None, "ddpm") and args.learn_sigma is None:
        args.learn_sigma = False  # learned variances are DDPM's (Improved DDPM); EDM and flows have none
    recipe = {**RECIPE_DEFAULTS, **(LATENT_RECIPES if args.dataset == "latents" else RECIPES)[args.backbone]}
    own_sampler = args.formulation in (None, recipe["formulation"])  # another formulation has other samplers
    for k, v in recipe.items():  # flags left unset take the backbone's recipe
        if getattr(args, k) is None and (own_sampler or k not in ("sampler", "sample_steps", "fixed_variance")):
            setattr(args, k, v)
    if args.fixed_variance is None:
        args.fixed_variance = RECIPE_DEFAULTS["fixed_variance"]
    if args.backbone == "genvit" and args.class_cond:
        p.error("GenViT's denoiser is unconditional (Yang et al. 2022): drop --class-cond; --hybvit trains its "
                "classifier head on the labels")
    if args.backbone == "genvit":
        args.class_cond = False
    if args.hybvit and args.backbone != "genvit":
        p.error("--hybvit is HybViT's objective: it needs --backbone genvit")
    if args.hybvit and args.dataset == "latents":
        p.error("--hybvit trains a classifier on images: use --dataset cifar10 or folder")
    if args.keep_every is None:
        args.keep_every = 10 * args.ckpt_every
    samplers = make_diffusion(formulation=args.formulation).SAMPLERS
    if args.sampler is not None and args.sampler not in samplers:
        p.error(f"--sampler {args.sampler} is not a {args.formulation} sampler; choose one of {', '.join(samplers)}")
    if args.sampler is None:
        args.sampler = "dpm++2m" if args.formulation == "ddpm" else samplers[0]
    if args.sample_steps is None:
        args.sample_steps = make_diffusion(formulation=args.formulation).DEFAULT_STEPS[args.sampler]
    if args.formulation != "ddpm" and (args.learn_sigma or args.prediction != "eps"):
        p.error(f"--learn-sigma and --prediction are DDPM options; --formulation {args.formulation} has its own "
                "parameterisation (add --no-learn-sigma)")
    args.betas, args.model_arg = list(args.betas), dict(args.model_arg)
    for ok, msg in [
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
            (min(args.sample_every, args.keep_every, args.fid_every) >= 0,
             "--sample-every, --keep-every and --fid-every must be >= 0"),
            (args.fid_samples >= 2, "--fid-samples must be >= 2"),
            (args.keep_every % args.ckpt_every == 0,
             f"--keep-every {args.keep_every} must be a multiple of --ckpt-every {args.ckpt_every} (kept "
             "checkpoints are copies of a checkpoint step)"),
            (1 <= args.sample_steps <= 1000, "--sample-steps must be in 1..1000")]:
        if not ok:
            p.error(msg)
    return args


def default_out_dir(args):
    """runs/<backbone>-<model>-<data>[-cond]."""
    data_name = "cifar10"
    if args.dataset != "cifar10":
        data_name = os.path.splitext(os.path.basename(os.path.normpath(args.data_dir)))[0]
    cond = "-cond" if args.class_cond else ""
    return os.path.join("runs", f"{args.backbone}-{args.model.replace('/', '-')}-{data_name}{cond}")


# ----- Data -----

def load_data(args):
    """-> (uint8 images or float latents (N, C, H, W), int64 labels (N,) or None, class names)."""
    x, y, names = load_dataset(args.dataset, args.data_dir, args.image_size, args.cifar_url)
    if args.dataset == "latents":
        args.image_size, args.flip = x.shape[-1], False  # flipping a latent is not flipping the image (folders
        # hold both flips' latents, picked at random per sample)
    if args.class_cond is None:
        args.class_cond = isinstance(x, LatentFolder) and bool(names)  # ImageNet latents: class-conditional
    for flag, on in (("--class-cond", args.class_cond), ("--hybvit", args.hybvit)):
        if on and not names:
            raise RunError(f"{flag} needs labels: one sub-folder per class in {args.data_dir} "
                           "(or labels in the latents file)")
    kind = "memory-mapped moments" if isinstance(x, LatentFolder) else x.dtype
    classes = len(names) if args.class_cond or args.hybvit else "no"
    print(f"data: {args.dataset} {tuple(x.shape)} {kind}, {classes} classes")
    return x, (y if args.class_cond or args.hybvit else None), names


def load_test_set(args):
    """HybViT's held-out images for the test accuracy: CIFAR-10's test split (None for other datasets)."""
    if args.dataset != "cifar10" or not args.hybvit:
        return None
    return load_cifar10(args.data_dir, train=False, url=args.cifar_url)


# ----- The log -----

def read_log(path, max_step):
    """Records of an earlier run up to the resumed step (later ones were not checkpointed). The file is
    rewritten atomically, so a kill here leaves the old log, never a truncated one."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(r, dict) and r.get("step", math.inf) <= max_step:
                records.append(r)
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
    return records


def append_log(path, record):
    try:
        with open(path, "a") as f:  # a kill mid-line leaves a partial last line, which read_log drops
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise RunError(f"cannot write {path} ({e}); free disk space, then rerun to resume from the last "
                       "checkpoint") from None


# ----- Checkpoints: what to resume, where -----

def resume_path(args, out_dir):
    """The checkpoint to resume from (None = a fresh run). Refuses whatever would overwrite another run."""
    latest, log = os.path.join(out_dir, "latest.pt"), os.path.join(out_dir, "log.jsonl")
    if args.resume == "auto":
        return latest if os.path.exists(latest) else None
    if os.path.exists(latest) and not (args.resume != "never" and os.path.exists(args.resume)
                                       and os.path.samefile(args.resume, latest)):
        hint = "use --resume auto to continue it" if args.resume == "never" else \
            f"resuming {args.resume} there would overwrite it: use --resume auto to continue that run"
        raise RunError(f"{out_dir} already holds a run (latest.pt); {hint}, or pick a new --out-dir")
    own = args.resume != "never" and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(out_dir)
    if args.resume != "never" and not own and not os.path.exists(latest) and os.path.exists(log) \
            and os.path.getsize(log):
        raise RunError(f"{out_dir} holds the log.jsonl of another run; resume {args.resume} into a new --out-dir")
    return None if args.resume == "never" else args.resume  # a kept ckpt of this run: a rollback (log trimmed)


# ----- The run: model, EMA, optimizer and where it is -----

@dataclass
class Run:
    args: argparse.Namespace
    model: torch.nn.Module
    diffusion: object              # GaussianDiffusion, EDM or FlowMatching (diffusion.make_diffusion)
    meta: dict                    # data geometry and classes (also in the checkpoint)
    config: dict                  # what a resume must match (check_compatible)
    out_dir: str
    device: torch.device
    ema: torch.nn.Module = None
    opt: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None
    step: int = 0
    elapsed: float = 0.0          # seconds of training before this process
    last_good: Optional[tuple] = None  # (path, step) of the newest checkpoint written or resumed from
    decode: Optional[object] = None  # latents -> images in [-1, 1] (the VAE decoder), None for pixel runs
    procs: Processes = None       # rank / world under torchrun (one process: rank 0 of 1)

    def __post_init__(self):
        self.procs = self.procs or Processes()
        self.model.to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()  # EMA starts as a copy (DiT train.py)
        a = self.args
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=a.lr, betas=tuple(a.betas),
                                     weight_decay=a.weight_decay, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=a.precision == "fp16")

    @property
    def latest(self):
        return os.path.join(self.out_dir, "latest.pt")

    def restore(self, ckpt, path):
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step, self.elapsed, self.last_good = ckpt["step"], ckpt.get("elapsed", 0.0), (path, ckpt["step"])
        if not self.procs.main:  # every rank resumes from the same file; only the main one writes
            return
        print(f"resumed from {path} at step {self.step}")
        keep = self.kept_path()
        if path == self.latest and keep and not os.path.exists(keep):  # a kept copy an older version lost
            atomic_link(path, keep)

    def kept_path(self):
        k = self.args.keep_every
        return os.path.join(self.out_dir, f"ckpt_{self.step:07d}.pt") if k and self.step % k == 0 else None

    def save(self, elapsed):
        """latest.pt (and, every --keep-every steps, ckpt_XXXXXXX.pt). The kept file is written first and
        latest.pt then linked to it, so a kill at any moment loses no kept checkpoint: until latest.pt moves
        on, a resumed run repeats this step and writes it again. Under torchrun only the main process writes."""
        if not self.procs.main:
            self.last_good = (self.latest, self.step)
            return
        state = {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "args": plain(vars(self.args)),
                 "rng": rng_state(), "elapsed": elapsed, **self.config}
        keep = self.kept_path()
        save_checkpoint(state, keep or self.latest)
        if keep:
            atomic_link(keep, self.latest)
        self.last_good = (self.latest, self.step)


# ----- Stopping: non-finite values -----

def first_nonfinite(window, step):
    """Step of the first non-finite loss term in `window` (per-step stats ending at `step`), or None. The last
    column, the grad norm, is skipped: an fp16 overflow there is the loss scaler's to handle."""
    if not window:
        return None
    ok = torch.isfinite(torch.stack(window)[:, :-1]).all(1).tolist()
    return step - len(window) + 1 + ok.index(False) if False in ok else None


def weights_finite(*modules):
    return bool(torch.isfinite(torch.stack(torch._foreach_norm([p for m in modules for p in m.parameters()]))).all())


def check_finite(run, window, weights_too=False):
    """Stop with a one-line error, writing nothing, at a non-finite loss (or weights); the last good checkpoint
    stays as it was."""
    at = first_nonfinite(window, run.step)
    if at is None and weights_too and not weights_finite(run.model, run.ema):
        at = run.step
    if at is not None:
        where = f"{run.last_good[0]} (step {run.last_good[1]})" if run.last_good else "none written yet"
        raise RunError(f"non-finite loss/weights at step {at}; run stopped, last good checkpoint: {where}; "
                       "resume from it with a lower --lr, --grad-clip 1 or --precision fp32")


# ----- Training -----

def learning_rate(args, step):
    """LR of the optimizer step `step` (0-based). constant: linear warm-up to --lr, then --lr (DiT, U-ViT). cosine:
    GenViT's utils/scheduler.py per step, warm-up from --min-lr to --lr over --warmup steps, then a half cosine
    back to --min-lr at --steps."""
    if args.lr_schedule == "cosine":
        if step < args.warmup:
            return args.min_lr + (args.lr - args.min_lr) * step / args.warmup
        frac = min((step - args.warmup) / max(args.steps - args.warmup, 1), 1.0)
        return args.min_lr + (args.lr - args.min_lr) * (1 + math.cos(math.pi * frac)) / 2
    return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr


def train_step(fwd, diffusion, opt, scaler, params, x, y, grad_clip, joint=None, draws=None):
    """One optimizer step on the hybrid / simple loss; returns (loss terms, grad norm before clipping).
    draws = (t, noise, force_drop_ids) fixes the step's randomness (else training_losses and the model draw it).
    joint = (classify, x_cls, y_cls, px, pyx, smoothing) is HybViT's objective (Yang et al. 2022 §3.2):
    px * diffusion loss + pyx * cross-entropy of classify(x_cls), adding the terms 'ce' and 'train_acc'."""
    t, noise, drop = draws or (None, None, None)
    kwargs = {} if y is None else {"y": y} if drop is None else {"y": y, "force_drop_ids": drop}
    terms = diffusion.training_losses(fwd, x, t, noise, model_kwargs=kwargs or None)
    loss = terms["loss"].mean()
    if joint is not None:
        classify, x_cls, y_cls, px, pyx, smoothing = joint
        logits = classify(x_cls).float()
        terms["ce"] = torch.nn.functional.cross_entropy(logits, y_cls, label_smoothing=smoothing, reduction="none")
        terms["train_acc"] = (logits.argmax(1) == y_cls).float()
        loss = px * loss + pyx * terms["ce"].mean()
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # true gradients for the norm / clipping (a no-op unless fp16)
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else \
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None])))
    scaler.step(opt)
    scaler.update()
    return terms, gnorm


@torch.no_grad()
def update_ema(ema, model, decay):
    """EMA of the weights with one foreach lerp (ema += (1 - decay)(w - ema)); buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    buffers = list(model.buffers())
    if buffers:
        torch._foreach_copy_(list(ema.buffers()), buffers)


@torch.no_grad()
def test_accuracy(model, images, labels, device, precision, batch_size=500):
    """Top-1 accuracy (%) of model.classify on uint8 images (N, C, H, W) scaled to [-1, 1], in eval mode."""
    was_training, correct = model.training, 0
    model.eval()
    classify = autocast_forward(model.classify, device, precision)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1.0
        correct += int((classify(x).argmax(1).cpu() == labels[i:i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(images)


@torch.no_grad()
def sample_grid(fwd, run, path):
    """EMA samples from fixed noise (same every time): 8x8, or one row of 8 per class (first 10 classes)."""
    args, meta, device = run.args, run.meta, run.device
    n_cls = min(meta["num_classes"], 10)
    y = torch.arange(n_cls, device=device).repeat_interleave(8) if n_cls else None
    shape = (len(y) if n_cls else 64, meta["channels"], meta["image_size"], meta["image_size"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    x = run.diffusion.sample(fwd, shape, sampler=args.sampler, steps=args.sample_steps,
                             model_kwargs={"y": y} if n_cls else None, noise=noise, device=device,
                             generator=torch.Generator(device).manual_seed(args.seed), clip_denoised=run.decode is None)
    save_grid(to_uint8(x if run.decode is None else run.decode(x)), path, nrow=8)


def fid_evaluator(args, meta, diffusion, device, decode, procs=None):
    """fwd -> (FID, IS) of --fid-samples samples (decoded by the VAE for latent runs) vs --fid-ref. The Inception
    weights and reference statistics are loaded now, before training, so a missing file fails at once."""
    if not meta["pixels"] and decode is None:
        raise RunError("--fid-every on latents needs the VAE that decodes them: pass --vae")
    if args.fid_ref.startswith("cifar10") and (args.dataset != "cifar10" or args.image_size != 32):
        raise RunError(f"--fid-ref {args.fid_ref} only fits CIFAR-10 at 32x32; pass a stats .npz made with fid.py")
    try:
        inception, ref = fid.fid_setup(args.fid_ref, args.data_dir, device)
    except RunError as e:
        raise RunError(f"cannot compute FID against {args.fid_ref!r}: {e}") from None
    shape = (meta["channels"], meta["image_size"], meta["image_size"])

    def evaluate(fwd):  # unguided samples, uniform labels when class-conditional; (None, None) off the main rank
        batches = generate(fwd, diffusion, shape, args.fid_samples, min(2 * args.batch_size, 256),
                           num_classes=meta["num_classes"], sampler=args.sampler, steps=args.sample_steps,
                           seed=args.seed, device=device, progress=False, decode=decode, procs=procs)
        if procs is not None and not procs.main:
            for _ in batches:  # this rank's share of the sampling; the main process gathers and scores
                pass
            return None, None
        return fid.fid_score((x for x, _ in batches), inception, ref, device, args.fid_samples)
    return evaluate


def evaluate(run, stop, evaluate_fid, log_path, records):
    """The step's sample grid and FID of the EMA model; a stop request abandons them (Interrupted)."""
    args, step, done = run.args, run.step, run.step == run.args.steps
    can_draw = run.meta["pixels"] or run.decode is not None  # latents need a VAE to become a picture
    grid_due = args.sample_every and can_draw and (step % args.sample_every == 0 or done)
    fid_due = evaluate_fid and (step % args.fid_every == 0 or done)
    if not (grid_due or fid_due):
        return
    check_finite(run, [], weights_too=True)  # never spend minutes sampling NaN weights
    fwd = autocast_forward(run.ema, run.device, args.precision)
    if run.procs.world == 1:  # one process: a stop request abandons the grid / FID (many: all finish it together)
        fwd = stop.guard(fwd)
    if grid_due and run.procs.main:
        sample_grid(fwd, run, os.path.join(run.out_dir, "samples", f"step_{step:07d}_ema.png"))
    if fid_due:
        score, is_mean = evaluate_fid(fwd)  # sampled by every process, scored by the main one
        if not run.procs.main:
            return
        records.append({"step": step, "fid": round(score, 4), "inception_score": is_mean,
                        "fid_samples": args.fid_samples, "sampler": f"{args.sampler}-{args.sample_steps}"})
        append_log(log_path, records[-1])
        tqdm.write(f"step {step}: FID {score:.2f} ({args.fid_samples} EMA samples, {args.sampler} "
                   f"{args.sample_steps} steps, vs {args.fid_ref})")


def step_draws(run, step, shape, with_labels, stored_latents):
    """The randomness of a training step for the whole global batch, from one generator seeded by (seed, step):
    flips (or the stored flip of latents), the latents' noise, t, the noise, label dropout. Every process draws
    the same and takes its own part, so a run gives the same losses and weights for any number of processes."""
    args, device = run.args, run.device
    part = run.procs.part(args.batch_size)
    g = torch.Generator(device).manual_seed(args.seed * 2 ** 32 + step)
    B = args.batch_size
    flip = torch.rand(B, generator=g, device=device)[part] < 0.5
    eps_z = torch.randn((B, *shape), generator=g, device=device)[part] if stored_latents else None
    t, noise = run.diffusion.training_noise((B, *shape), g, device)
    drop = None
    if with_labels and args.class_cond and args.class_dropout > 0:
        drop = (torch.rand(B, generator=g, device=device)[part] < args.class_dropout).long()
    return flip, eps_z, (t[part], noise[part], drop)


def train(run, data, labels, evaluate_fid=None, test_set=None):
    """The training loop: step, EMA, logs every --log-every, grids / FID, checkpoints every --ckpt-every (with
    HybViT's test accuracy when test_set = (images, labels) is given). Under torchrun every process trains on
    its part of each global batch (DDP averages the gradients) and only the main one writes. Returns False when a
    stop request ended it early (after saving a checkpoint)."""
    args, model, device, procs = run.args, run.model, run.device, run.procs
    log_path = os.path.join(run.out_dir, "log.jsonl")
    records = read_log(log_path, run.step) if procs.main else []
    shape = (run.meta["channels"], run.meta["image_size"], run.meta["image_size"])
    if isinstance(data, LatentFolder):  # moments memory-mapped: on the device if they fit, else streamed
        source = LatentBatches(data, device)
        next_batch = lambda idx, flip, eps: source(idx, labels is not None, flip.long(), eps)  # noqa: E731
    else:  # images (or a latents tensor): the whole set on the device, gathered by index
        data, labels = data.to(device), None if labels is None else labels.to(device)
        next_batch = lambda idx, flip, eps: get_batch(data, labels, idx, flip if args.flip else False)  # noqa: E731
    batches = BatchIndices(len(data), args.batch_size, args.seed)
    net = model
    if procs.world > 1:  # GenViT's classifier head gets no gradient from the diffusion loss alone
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.backbone == "genvit")
    fwd = autocast_forward(torch.compile(net) if args.compile else net, device, args.precision)
    params = list(model.parameters())
    keys = ["loss", "mse"] + ["vb"] * run.diffusion.learn_sigma + ["l1"] * (args.loss_type == "l1")
    joint = None
    if args.hybvit:  # the classifier's batches: their own order, flips and 4-pixel crops (the paper's base aug.)
        cls_batches, keys = BatchIndices(len(data), args.batch_size, args.seed + 1), keys + ["ce", "train_acc"]
        classify = autocast_forward(model.classify, device, args.precision)
    window, t_start, t_window, step_window = [], time.time(), time.time(), run.step
    model.train()
    bar = tqdm(total=args.steps, initial=run.step, desc=f"{args.backbone} {args.model}", dynamic_ncols=True,
               disable=not procs.main)
    with bar, StopOnSignal() as stop:
        stopping = False
        while run.step < args.steps and not stopping:
            lr = learning_rate(args, run.step)
            for g in run.opt.param_groups:
                g["lr"] = lr
            flip, eps_z, draws = step_draws(run, run.step, shape, labels is not None, isinstance(data, LatentFolder))
            x, y = next_batch(batches(run.step)[procs.part(args.batch_size)], flip, eps_z)
            if args.hybvit:
                x_cls, y_cls = get_batch(data, labels, cls_batches(run.step), args.flip)
                joint = (classify, random_crop(x_cls, 4), y_cls, args.px_weight, args.ce_weight, args.label_smoothing)
            terms, gnorm = train_step(fwd, run.diffusion, run.opt, run.scaler, params, x,
                                      y if args.class_cond else None, args.grad_clip, joint, draws)
            update_ema(run.ema, model, args.ema_decay)
            run.step += 1
            bar.update(1)
            window.append(torch.stack([terms[k].detach().float().mean() for k in keys] + [gnorm.float()]))
            stopping = procs.any(stop.signum is not None)  # a signal on any process stops all at this step
            last = run.step == args.steps or stopping
            if run.step % args.log_every == 0 or last:  # the only per-window host sync
                window = list(procs.mean(torch.stack(window)))  # the global batch's statistics
                check_finite(run, window)
                now, vals = time.time(), torch.stack(window).mean(0).tolist()
                ips = (run.step - step_window) * args.batch_size / max(now - t_window, 1e-9)
                if procs.main:
                    records.append({"step": run.step, **dict(zip(keys, vals)), "lr": lr, "grad_norm": vals[-1],
                                    "img_per_s": round(ips, 1), "elapsed": round(run.elapsed + now - t_start, 1)})
                    append_log(log_path, records[-1])
                    plot_losses(records, os.path.join(run.out_dir, "loss.png"))
                bar.set_postfix(loss=f"{vals[0]:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")
                window, t_window, step_window = [], now, run.step
            if not stopping:
                try:
                    evaluate(run, stop, evaluate_fid, log_path, records)
                except Interrupted:  # the grid / FID of this step is dropped, the checkpoint below is not
                    pass
            if test_set is not None and (run.step % args.ckpt_every == 0 or run.step == args.steps):
                accs = [test_accuracy(m, *test_set, device, args.precision) for m in (model, run.ema)]
                records.append({"step": run.step, "test_acc": accs[0], "test_acc_ema": accs[1]})
                append_log(log_path, records[-1])
                tqdm.write(f"step {run.step}: test accuracy {accs[0]:.2f}% (EMA {accs[1]:.2f}%)")
            stopping = stopping or (procs.world == 1 and stop.signum is not None)  # e.g. during the grid
            if run.step % args.ckpt_every == 0 or run.step == args.steps or stopping:
                check_finite(run, list(procs.mean(torch.stack(window))) if window else [], weights_too=True)
                run.save(run.elapsed + time.time() - t_start)
    if run.step < args.steps:
        return False
    grids = ", samples/" if os.path.isdir(os.path.join(run.out_dir, "samples")) else ""
    if procs.main:
        print(f"done: {run.step} steps; checkpoints, log.jsonl, loss.png{grids} are in {run.out_dir}")
    return True


def setup(args, procs=None, device=None):
    """Everything checked and built before anything is written: -> (Run, data, labels, FID function or None,
    HybViT's test set or None). procs, device: from start_processes (default: one process on --device)."""
    out_dir = args.out_dir or default_out_dir(args)
    check_dir(out_dir, "--out-dir")  # before any download or model build
    if procs is None:
        procs, device = start_processes(args.device)
    if args.batch_size % procs.world:
        raise RunError(f"--batch-size {args.batch_size} (the global batch) must be divisible by the {procs.world} "
                       "processes")
    if args.hybvit and procs.world > 1:
        raise RunError("--hybvit runs in one process (its classifier pass is outside DDP's forward); drop torchrun")
    args.precision = args.precision or default_precision(device)
    check_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 (DiT train.py)
    paper_model = (LATENT_RECIPES if args.dataset == "latents" else RECIPES)[args.backbone]["model"]
    if device.type == "cpu" and args.model == paper_model and args.steps >= 100_000:
        print(f"note: {args.model} for {args.steps:,} steps at batch {args.batch_size} is the paper's GPU recipe "
              f"and would run for months on a CPU. A CPU-sized run (about 30 min on 2 cores):\n  {CPU_COMMAND}")
    ckpt_path = resume_path(args, out_dir)
    ckpt = load_checkpoint(ckpt_path, resume=True) if ckpt_path else None  # before any download or decoding
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    data, labels, names = load_data(args)
    num_classes = len(names) if args.class_cond else 0
    test_set = load_test_set(args)
    meta = {"dataset": args.dataset, "image_size": args.image_size, "channels": data.shape[1],
            "num_classes": num_classes, "class_names": names if args.class_cond else [],
            "pixels": args.dataset != "latents"}
    if isinstance(data, LatentFolder):  # what decodes the samples (sample.py reads it too)
        meta.update(vae=args.vae or data.meta.get("vae"), pixel_size=data.meta["image_size"])
    elif args.dataset == "latents":
        meta.update(vae=args.vae)
    head = len(names) if args.backbone == "genvit" else num_classes  # GenViT: its classifier head's classes
    kwargs = {"input_size": args.image_size, "in_channels": data.shape[1], "num_classes": head,
              "class_dropout_prob": args.class_dropout if args.class_cond else 0.0, "learn_sigma": args.learn_sigma,
              **args.model_arg}
    model = build_model(args.backbone, args.model, attention=args.attention, grad_checkpoint=args.grad_checkpoint,
                        **kwargs)
    if (model.in_channels, model.input_size) != (data.shape[1], data.shape[-1]):  # e.g. a --model-arg override
        raise RunError(f"the data are {data.shape[1]} x {data.shape[-1]} x {data.shape[-1]} but {args.model} was built "
                       f"for {model.in_channels} x {model.input_size} x {model.input_size}; drop the in_channels / "
                       "input_size override (they follow the data)")
    # what make_diffusion rebuilds it from (the checkpoint keeps it)
    recorded = {"formulation": args.formulation, "loss_type": args.loss_type}
    if args.formulation == "ddpm":
        recorded.update(schedule=args.schedule, timesteps=1000, prediction=args.prediction,
                        learn_sigma=args.learn_sigma, fixed_variance=args.fixed_variance)
    diffusion = make_diffusion(**recorded)
    config = {"backbone": args.backbone, "model_name": args.model, "model_kwargs": plain(kwargs), "data": meta,
              "diffusion": recorded}
    if ckpt is not None:
        check_compatible(ckpt, config, ckpt_path)
    decode = None
    if not meta["pixels"] and meta.get("vae"):
        decode, _ = latent_decoder(meta["vae"], meta["channels"], meta["image_size"], device)
    elif not meta["pixels"] and args.sample_every:
        print("note: no VAE is known for these latents (--vae), so no sample grids are drawn")
    evaluate_fid = fid_evaluator(args, meta, diffusion, device, decode, procs) if args.fid_every else None
    run = Run(args, model, diffusion, meta, config, out_dir, device, decode=decode, procs=procs)
    if ckpt is not None:
        run.restore(ckpt, ckpt_path)
    return run, data, labels, evaluate_fid, test_set


def main(argv=None):
    args = parse_args(argv)
    procs = None
    try:
        procs, device = start_processes(args.device)
        if not procs.main:  # under torchrun one process reports; the others' errors still reach stderr
            sys.stdout = open(os.devnull, "w")
        run, data, labels, evaluate_fid, test_set = setup(args, procs, device)
        finished = run_main(run, data, labels, evaluate_fid, test_set)
    except RunError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, the last checkpoint stays as it was
        raise SystemExit("stopped at once (second Ctrl-C); rerun the command to resume from the last checkpoint")
    finally:
        if procs is not None:
            procs.close()
    if not finished:
        raise SystemExit(f"interrupted at step {run.step}; checkpoint saved to {run.latest}; rerun the command to "
                         "resume")


def run_main(run, data, labels, evaluate_fid, test_set):
    """The main process prepares --out-dir (stale temporaries removed, config.json); then every process trains."""
    args = run.args
    if run.procs.main:
        make_dir(run.out_dir, "--out-dir")
        for folder in (run.out_dir, os.path.join(run.out_dir, "samples")):
            removed = remove_stale_temps(folder)
            if removed:
                print(f"removed {len(removed)} temporary file(s) of an interrupted run in {folder}")
        n_params = sum(p.numel() for p in run.model.parameters())
        print(f"model: {args.backbone} {args.model}, {n_params:,} parameters; precision {args.precision} on "
              f"{run.device}\nrun directory: {os.path.abspath(run.out_dir)}")
        config = json.dumps({"args": plain(vars(args)), "parameters": n_params, **run.config}, indent=1)
        atomic_write(os.path.join(run.out_dir, "config.json"), lambda f: f.write(config.encode()))
    return train(run, data, labels, evaluate_fid, test_set)


if __name__ == "__main__":
    main()

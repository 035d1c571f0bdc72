"""
Sample from a train_cifar.py checkpoint or an official DiT / U-ViT / DiffiT / GenViT release file: a PNG grid, and
optionally an .npz in the ADM evaluation format (arr_0 uint8 (N, H, W, 3), arr_1 int64 labels (N,) when
class-conditional), with FID in the same pass.

  python sample.py --ckpt runs/uvit-U-ViT-S-2-cifar10/latest.pt                          # 64-image grid
  python sample.py --ckpt runs/.../latest.pt --num-samples 50000 --npz uvit.npz --fid-ref cifar10-train
  python sample.py --ckpt runs/dit-DiT-S-2-cifar10-cond/latest.pt --cfg-scale 1.5 --class-label 3
  python sample.py --ckpt DiT-XL-2-256x256.pt --image-size 256 --vae sd-vae-ft-ema --class-label 207 --cfg-scale 4
  torchrun --nproc_per_node 8 sample.py --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema --num-samples 50000 --npz x.npz
  python sample.py --ckpt diffit_256.safetensors --vae sd-vae-ft-ema --cfg-scale 4.4 --cfg-schedule power-cosine
  python sample.py --ckpt imagenet256_uvit_huge.pth --vae autoencoder_kl_ema.pth --sampler dpm++2m  # not dpm++3s

A train_cifar.py checkpoint records its model and its run's grid sampler; any other file goes to official.py, which
recognises a release by its keys and shapes and gives it its paper's settings (sampler, steps, guidance; for U-ViT
its official script's DPM-Solver, dpm++3s or dpm3s). Flags override both; --cfg-schedule sets the guidance schedule
of --cfg-scale (else of the paper's strength). Latent models decode through --vae (a diffusers folder or one file).
"""
import argparse
import collections
import math
import os

import numpy as np
import torch

import fid
import official
from backbones import load_model
from captions import read_prompts
from clip import FrozenCLIPEmbedder, prompt_conditioning
from checkpoints import code_refusal, load_reason, validate_checkpoint
from devices import Processes, autocast_forward, check_precision, start_processes
from diffusion import make_diffusion
from errors import RunError
from files import atomic_write, check_writable
from formulations import GUIDANCE_SCHEDULES, guidance_schedule
from images import save_grid
from sampling import generate
from vae import latent_decoder

KINDS = "train_cifar.py checkpoint or an official release file"  # what --ckpt takes
# One run's sampling settings, resolved once from the flags and the file's defaults (see resolve).
Settings = collections.namedtuple("Settings", "sampler steps cfg_scale cfg_channels cfg_label")
# Text-to-image models (U-ViT's MS-COCO release): the prompts and the CLIP that encodes them (see text_prompts).
FLAGS = {  # flag -> argparse settings, in --help order
    "--ckpt": dict(required=True, help="a train_cifar.py checkpoint, or an official DiT / U-ViT / DiffiT / GenViT "
                                       "file"),
    "--out": dict(default=None, help="grid PNG path (default: next to the checkpoint)"),
    "--num-samples": dict(type=int, default=64),
    "--npz": dict(default=None, help="also write all samples here in the ADM .npz format"),
    "--batch-size": dict(type=int, default=256),
    "--sampler": dict(default=None, help="ddpm/ddim/dpm++2m, heun/euler (edm), euler/heun/sde (flow); default: the "
                                         "run's"),
    "--steps": dict(type=int, default=None, help="default: the run's --sample-steps (its sampler), else the usual "
                                                 "count"),
    "--eta": dict(type=float, default=0.0, help="DDIM eta"),
    "--cfg-scale": dict(type=float, default=None, help="CFG eps_u + s (eps_c - eps_u); default 1 (off), or the "
                                                       "paper's"),
    "--cfg-schedule": dict(choices=GUIDANCE_SCHEDULES, help="constant or power-cosine (DiffiT §5.8); default: the "
                                                            "paper's"),
    "--class-label": dict(type=int, default=None, help="sample only this class (default: uniform random labels)"),
    "--seed": dict(type=int, default=0),
    "--no-ema": dict(dest="ema", action="store_false", help="use the raw weights instead of the EMA"),
    "--vae": dict(default=None, help="SD-VAE for latent models: a diffusers folder (e.g. sd-vae-ft-ema) or one file"),
    "--image-size": dict(type=int, default=None, help="official latent models: the image size (checked against the "
                                                      "file)"),
    "--model": dict(default=None, help="official files: the registry name for what shapes cannot tell, e.g. "
                                       "DiT-XL/2"),
    "--prompt": dict(action="append", help="text-to-image: a prompt (repeat for more; samples draw among them); "
                                           "guidance --cfg-scale 2 = the official scale 1"),
    "--prompts": dict(help="text-to-image: a text file with one prompt per line, or the captions of a metadata.jsonl "
                           "or COCO captions_*.json"),
    "--clip": dict(help="text-to-image: the Hugging Face openai/clip-vit-large-patch14 folder"),
    "--device": dict(default=None, help="default: cuda if available, else cpu"),
    "--precision": dict(choices=["bf16", "fp16", "fp32"], default="fp32", help="fp16 needs a CUDA GPU"),
    "--nrow": dict(type=int, default=None, help="images per grid row (default: ~sqrt of the grid size)"),
    "--fid-ref": dict(default=None, help="also FID (and IS) against cifar10-train, cifar10-test or a stats .npz"),
    "--data-dir": dict(default="data", help="CIFAR-10 folder for building a named --fid-ref the first time"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for flag, kwargs in FLAGS.items():
        p.add_argument(flag, **kwargs)
    args = p.parse_args(argv)
    for ok, msg in [(args.num_samples >= 1 and args.batch_size >= 1, "--num-samples and --batch-size must be >= 1"),
                    (args.steps is None or 1 <= args.steps <= 1000, "--steps must be in 1..1000"),
                    (args.cfg_scale is None or math.isfinite(args.cfg_scale),
                     "--cfg-scale must be a finite number (1 = no guidance)"),
                    (0 <= args.eta <= 1, "--eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like)"),
                    (args.nrow is None or args.nrow >= 1, "--nrow must be >= 1"),
                    (args.image_size is None or args.image_size >= 1, "--image-size must be >= 1"),
                    (args.fid_ref is None or args.num_samples >= 2, "--fid-ref needs --num-samples >= 2")]:
        if not ok:
            p.error(msg)
    return args


def read(path):
    """torch.load(weights_only=True) of the file (never unpickles code); None for .safetensors (official.load)."""
    if not os.path.isfile(path):
        raise RunError(f"checkpoint {path} does not exist; check the path")
    try:
        return None if path.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes: all "not a checkpoint"
        raise code_refusal(path, e, f"pass a {KINDS}") or RunError(f"cannot read checkpoint {path} ({load_reason(e)}); "
                                                                  f"it is truncated or not a {KINDS}") from None


def load(args, device):
    """(model, net to sample, diffusion, meta, defaults, title) of our checkpoint, or official.load's of a release."""
    ckpt = read(args.ckpt)
    if not (isinstance(ckpt, dict) and ("backbone" in ckpt or "model_kwargs" in ckpt)):
        return official.load(args.ckpt, ckpt, args.model, device)
    validate_checkpoint(ckpt, args.ckpt)
    model = load_model(ckpt, args.ema, device, args.ckpt)
    diffusion = make_diffusion(**ckpt["diffusion"])  # the checkpoint's formulation (ddpm, edm or flow)
    trained = ckpt.get("args", {})  # the run's grid / FID sampler (e.g. the DiT latent recipe's 250-step DDPM)
    own = trained.get("sampler") in diffusion.SAMPLERS
    cfg = trained.get("grid_cfg_scale", 1.0) if "text" in ckpt else 1.0  # text-to-image: the run's grid guidance
    defaults = dict(sampler=trained["sampler"] if own else diffusion.default_sampler, cfg_scale=cfg,
                    steps=trained.get("sample_steps") if own else None, cfg_channels=None, cfg_label=f"{cfg:g}")
    head = f"{ckpt['backbone']} {ckpt['model_name']} at step {ckpt['step']} ({'EMA' if args.ema else 'raw'} weights)"
    return model, model, diffusion, {**ckpt["data"], "text": ckpt.get("text", {})}, defaults, head


def resolve(args, diffusion, defaults, null_label):
    """Settings: the flags, else the file's defaults (its steps only with its own sampler, else the sampler's)."""
    sampler = args.sampler or defaults["sampler"]
    if sampler not in diffusion.SAMPLERS:
        raise RunError(f"--sampler {sampler} is not a {diffusion.formulation} sampler; choose one of "
                       f"{', '.join(diffusion.SAMPLERS)}")
    own = sampler == defaults["sampler"] and defaults["steps"]
    steps = args.steps or (defaults["steps"] if own else diffusion.default_steps(sampler))
    cfg_scale = defaults["cfg_scale"] if args.cfg_scale is None else args.cfg_scale
    cfg_label = (defaults["cfg_label"] or "1") if args.cfg_scale is None else f"{args.cfg_scale:g}"
    if getattr(args, "cfg_schedule", None):  # --cfg-scale (else the file's strength) under that schedule
        cfg_scale, cfg_label = scheduled_guidance(args, diffusion, defaults)
    if cfg_label != "1" and null_label is None:  # guidance needs a model trained with label dropout
        raise RunError("--cfg-scale needs a class-conditional model trained with label dropout (--class-cond, "
                       "--class-dropout)")
    return Settings(sampler, steps, cfg_scale, defaults["cfg_channels"], cfg_label)


def scheduled_guidance(args, diffusion, defaults):
    """(cfg_scale, label) for --cfg-schedule: --cfg-scale, else the file's guidance strength, on that schedule."""
    scale = defaults.get("cfg_strength", defaults["cfg_scale"]) if args.cfg_scale is None else args.cfg_scale
    if args.cfg_schedule == "power-cosine" and diffusion.formulation == "edm":
        raise RunError("--cfg-schedule power-cosine follows the network time 999..0 (DDPM, flow, U-ViT releases); "
                       "EDM's is ln(sigma)/4: use a constant --cfg-scale")
    tag = "powcos" if args.cfg_schedule == "power-cosine" and scale != 1 else ""
    return guidance_schedule(args.cfg_schedule, scale), f"{tag}{scale:g}"


def grid_path(args, s):
    """--out, else sample_<ckpt>_<ema|raw>_<sampler>_<K>steps_cfg<s>.png next to the checkpoint."""
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    name = f"sample_{stem}_{'ema' if args.ema else 'raw'}_{s.sampler}_{s.steps}steps_cfg{s.cfg_label}.png"
    return args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), name)


def check_class_label(label, num_classes):
    if not 0 <= label < num_classes:
        raise RunError(f"--class-label must be in 0..{num_classes - 1}" if num_classes else
                       "--class-label needs a class-conditional model")


def vae_decoder(args, meta, device):
    """Latent models: decode through --vae (else the one the checkpoint names), checked against what made the latents
    where the checkpoint records it (vae.check_vae_fits)."""
    decode = latent_decoder(args.vae or meta.get("vae"), meta["channels"], meta["image_size"], device,
                            args.image_size, latents=meta)[0]
    scale = meta.get("latent_scale")  # U-ViT's MS-COCO latents are z * 0.23010; the SD-VAE divides by 0.18215
    return decode if scale is None else (lambda z: decode(z * (0.18215 / scale)))


def text_prompts(args, model, net, meta, device):
    """Text-to-image: the prompts of --prompt and --prompts FILE (a text file, metadata.jsonl or COCO captions_*.json;
    our checkpoints default to their run's held-out prompts), encoded batch by batch by the CLIP text tower of --clip
    (ours default to the run's); sampling sees them as labels 0..P-1 and the empty prompt as the null label P
    (clip.prompt_conditioning), so guidance, --class-label (a prompt's index) and the npz labels (arr_1) work as for
    classes. Up to 16 prompts (and no --class-label) make a grid with a captioned row per prompt (prompt_rows)."""
    if not getattr(model, "text_cond", False):
        raise RunError("--prompt / --prompts need a text-to-image model (e.g. the official mscoco_uvit_small.pth)")
    run = meta.get("text", {})  # what a train_cifar.py text-to-image run recorded
    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    prompts, clip_dir = prompts or run.get("prompts", []), args.clip or run.get("clip")
    if not prompts or not clip_dir:
        raise RunError("a text-to-image model needs --prompt TEXT (or --prompts FILE) and --clip DIR, the Hugging "
                       "Face openai/clip-vit-large-patch14 folder")
    encoder = FrozenCLIPEmbedder(clip_dir, device, width=model.clip_dim)
    for i, p in enumerate(prompts[:8]):
        print(f"prompt {i}: {p!r}")
    rows = prompts if len(prompts) <= 16 and args.class_label is None else None
    return prompt_conditioning(net, encoder, prompts, model), {**meta, "num_classes": len(prompts),
                                                               "prompt_rows": rows}, len(prompts)


def fid_setup(args, meta, device):
    """(Inception, reference stats) for --fid-ref, loaded before minutes of sampling."""
    if args.fid_ref.startswith("cifar10") and (meta["dataset"] not in ("cifar10", "cifar10-captions")
                                               or meta["image_size"] != 32):
        raise RunError(f"--fid-ref {args.fid_ref} only fits CIFAR-10 at 32x32; pass a stats .npz made with fid.py")
    if args.num_samples < 10_000:
        print(f"note: FID from {args.num_samples} samples is biased upwards; papers use 50,000 (--num-samples)")
    try:
        return fid.fid_setup(args.fid_ref, args.data_dir, device)
    except RunError as e:
        raise RunError(f"cannot compute FID against {args.fid_ref!r}: {e}") from None


def write_npz(path, images, labels):
    """All samples in ADM's format: arr_0 uint8 (N, H, W, 3), arr_1 int64 labels when class-conditional."""
    arrays = [images.permute(0, 2, 3, 1).numpy()] + ([labels.numpy().astype(np.int64)] if labels is not None else [])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, *arrays))  # a file object: np.savez appends no .npz
    print(f"{len(images)} samples in ADM format: {path} (arr_0 {tuple(arrays[0].shape)} uint8"
          f"{', arr_1 labels' if labels is not None else ''})")


def report_fid(args, setup, batches, s, device):
    """FID (and IS) of the samples against --fid-ref, printed with the settings that made them."""
    score = fid.fid_score((x for x, _ in batches), *setup, device, args.num_samples)
    print(f"FID {score[0]:.3f}" + (f", IS {score[1]:.2f}" if score[1] else "") + f" ({args.num_samples} samples vs "
          f"{args.fid_ref}; pytorch-fid Inception, {s.sampler} {s.steps} steps, cfg {s.cfg_label})")
    return score


def run(args, procs=None, device=None):
    """Sample (under torchrun each process its share; the main one writes) -> (FID, IS or None) with --fid-ref."""
    if procs is None:
        procs, device = start_processes(args.device)
    check_precision(args.precision, device)
    model, net, diffusion, meta, defaults, head = load(args, device)
    text = getattr(model, "text_cond", False) or args.prompt or args.prompts  # text-to-image: prompts as labels
    net, meta, null_label = text_prompts(args, model, net, meta, device) if text else (net, meta, model.null_label)
    s = resolve(args, diffusion, defaults, null_label)
    decode = None if meta["pixels"] else vae_decoder(args, meta, device)
    print(f"{head}, {s.sampler} {s.steps} steps, cfg {s.cfg_label}, {args.num_samples} samples on {device}")
    n_cls, rows = meta["num_classes"], meta.get("prompt_rows")  # rows: a captioned grid row per prompt
    labels = torch.arange(n_cls).repeat_interleave(-(-args.num_samples // n_cls))[:args.num_samples] if rows else None
    if args.class_label is not None:
        check_class_label(args.class_label, n_cls)
    path = grid_path(args, s)
    check_writable(path, "--out")  # outputs checked before minutes of sampling
    if args.npz:
        check_writable(args.npz, "--npz")
    fid_ref = fid_setup(args, meta, device) if args.fid_ref else None

    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    batches = list(generate(autocast_forward(net, device, args.precision), diffusion, shape, args.num_samples,
                            args.batch_size, num_classes=n_cls, class_label=args.class_label if labels is None
                            else labels, sampler=s.sampler,
                            steps=s.steps, eta=args.eta, cfg_scale=s.cfg_scale, cfg_channels=s.cfg_channels,
                            null_label=null_label, seed=args.seed, device=device, decode=decode, procs=procs))
    if not procs.main:  # this process sampled its share; the main process gathered them all in order
        return None
    images = torch.cat([x for x, _ in batches])                               # (N, C, H, W) uint8
    grid = images[:256]
    per_row = -(-args.num_samples // n_cls) if rows and args.num_samples <= 256 and not args.nrow else None
    save_grid(grid, path, nrow=args.nrow or per_row or math.ceil(math.sqrt(len(grid))),
              captions=per_row and rows[:math.ceil(len(grid) / per_row)])  # the prompts that have a row
    print(f"grid of {len(grid)} samples: {path}")
    if args.npz:
        write_npz(args.npz, images, torch.cat([y for _, y in batches]) if n_cls else None)
    return report_fid(args, fid_ref, batches, s, device) if fid_ref else None


def main(argv=None):
    args = parse_args(argv)
    procs = Processes()  # replaced by start_processes, closed at the end
    try:
        procs, device = start_processes(args.device)
        return run(args, procs, device)
    except RunError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("interrupted; nothing was written (the grid and npz are written at the end)")
    finally:
        procs.close()


if __name__ == "__main__":
    main()

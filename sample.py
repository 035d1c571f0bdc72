"""
Sample from a train_cifar.py checkpoint: a PNG grid, and optionally an .npz in the ADM evaluation format
(arr_0 uint8 (N, H, W, 3), arr_1 int64 labels (N,) when class-conditional).

  python sample.py --ckpt runs/uvit-U-ViT-S-2-cifar10/latest.pt                          # 64-image grid
  python sample.py --ckpt runs/.../latest.pt --num-samples 50000 --npz uvit.npz --batch-size 500
  python sample.py --ckpt runs/dit-DiT-S-2-cifar10-cond/latest.pt --cfg-scale 1.5 --class-label 3
  python sample.py --ckpt runs/.../latest.pt --num-samples 50000 --npz uvit.npz --fid-ref cifar10-train  # + FID

The model is rebuilt from the backbone, model name and constructor kwargs stored in the checkpoint; the EMA
weights are used unless --no-ema.
"""
import argparse
import math
import os

import numpy as np
import torch

import fid
from common import (RunError, atomic_write, autocast_forward, check_precision, check_writable, generate,
                    load_checkpoint, load_model, resolve_device, save_grid)
from diffusion import SAMPLERS, GaussianDiffusion

DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm++2m": 25}  # DiT's 250-step DDPM; DPM-Solver README's 20-25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="a train_cifar.py checkpoint (latest.pt or ckpt_XXXXXXX.pt)")
    a("--out", default=None, help="grid PNG path (default: next to the checkpoint)")
    a("--num-samples", type=int, default=64)
    a("--npz", default=None, help="also write all samples here in the ADM .npz format")
    a("--batch-size", type=int, default=256)
    a("--sampler", default="dpm++2m", choices=SAMPLERS)
    a("--steps", type=int, default=None, help=f"sampler steps (default {DEFAULT_STEPS})")
    a("--eta", type=float, default=0.0, help="DDIM eta")
    a("--cfg-scale", type=float, default=1.0, help="classifier-free guidance eps_u + s (eps_c - eps_u); 1 = off")
    a("--class-label", type=int, default=None, help="sample only this class (default: uniform random labels)")
    a("--seed", type=int, default=0)
    a("--no-ema", dest="ema", action="store_false", help="use the raw weights instead of the EMA")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--precision", choices=["bf16", "fp16", "fp32"], default="fp32", help="fp16 needs a CUDA GPU")
    a("--nrow", type=int, default=None, help="images per grid row (default: ~sqrt of the grid size)")
    a("--fid-ref", default=None, help="also compute FID (and IS) in the same pass against this reference: "
                                      "cifar10-train, cifar10-test or a stats .npz (mu, sigma)")
    a("--data-dir", default="data", help="CIFAR-10 folder for building a named --fid-ref the first time")
    args = p.parse_args(argv)
    args.steps = DEFAULT_STEPS[args.sampler] if args.steps is None else args.steps
    for ok, msg in [(args.num_samples >= 1 and args.batch_size >= 1, "--num-samples and --batch-size must be >= 1"),
                    (1 <= args.steps <= 1000, "--steps must be in 1..1000"),
                    (math.isfinite(args.cfg_scale), "--cfg-scale must be a finite number (1 = no guidance)"),
                    (0 <= args.eta <= 1, "--eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like)"),
                    (args.nrow is None or args.nrow >= 1, "--nrow must be >= 1"),
                    (args.fid_ref is None or args.num_samples >= 2, "--fid-ref needs --num-samples >= 2")]:
        if not ok:
            p.error(msg)
    return args


def grid_path(args):
    """--out, else sample_<ckpt>_<ema|raw>_<sampler>_<K>steps_cfg<s>.png next to the checkpoint."""
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    name = f"sample_{stem}_{'ema' if args.ema else 'raw'}_{args.sampler}_{args.steps}steps_cfg{args.cfg_scale:g}.png"
    return args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), name)


def run(args):
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    ckpt = load_checkpoint(args.ckpt)
    meta, n_cls = ckpt["data"], ckpt["data"]["num_classes"]
    if not meta["pixels"]:
        raise RunError("not yet: sampling a latent-space checkpoint needs the VAE decoder, which this project "
                       "lacks so far")
    if args.class_label is not None and not 0 <= args.class_label < n_cls:
        raise RunError(f"--class-label must be in 0..{n_cls - 1}" if n_cls else
                       "--class-label needs a class-conditional model")
    if args.fid_ref and args.fid_ref.startswith("cifar10") and (meta["dataset"], meta["image_size"]) != ("cifar10", 32):
        raise RunError(f"--fid-ref {args.fid_ref} only fits CIFAR-10 at 32x32; pass a stats .npz made with fid.py")
    path = grid_path(args)
    check_writable(path, "--out")  # outputs checked before minutes of sampling
    if args.npz:
        check_writable(args.npz, "--npz")
    model = load_model(ckpt, args.ema, device, args.ckpt)
    if args.cfg_scale != 1.0 and model.null_label is None:
        raise RunError("--cfg-scale needs a class-conditional model trained with label dropout (--class-cond, "
                       "--class-dropout)")
    inception = None
    if args.fid_ref:
        if args.num_samples < 10_000:
            print(f"note: FID from {args.num_samples} samples is biased upwards; papers use 50,000 (--num-samples)")
        try:
            inception, ref = fid.fid_setup(args.fid_ref, args.data_dir, device)
        except RunError as e:
            raise RunError(f"cannot compute FID against {args.fid_ref!r}: {e}") from None
    diffusion = GaussianDiffusion(**ckpt["diffusion"])
    fwd = autocast_forward(model, device, args.precision)
    print(f"{ckpt['backbone']} {ckpt['model_name']} at step {ckpt['step']} ({'EMA' if args.ema else 'raw'} weights), "
          f"{args.sampler} {args.steps} steps, cfg {args.cfg_scale}, {args.num_samples} samples on {device}")

    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    batches = generate(fwd, diffusion, shape, args.num_samples, args.batch_size, num_classes=n_cls,
                       class_label=args.class_label, sampler=args.sampler, steps=args.steps, eta=args.eta,
                       cfg_scale=args.cfg_scale, null_label=model.null_label, seed=args.seed, device=device)
    out, labels = [], []

    def keep(batches):  # hold every batch for the grid / npz while FID streams through them
        for x, y in batches:
            out.append(x)
            labels.append(y)
            yield x
    score = None
    if inception is not None:
        score = fid.fid_score(keep(batches), inception, ref, device, args.num_samples)
    else:
        for _ in keep(batches):
            pass
    images = torch.cat(out)                                                    # (N, C, H, W) uint8
    labels = torch.cat(labels) if n_cls else None

    grid = images[:256]
    save_grid(grid, path, nrow=args.nrow or math.ceil(math.sqrt(len(grid))))
    print(f"grid of {len(grid)} samples: {path}")
    if args.npz:
        arrays = [images.permute(0, 2, 3, 1).numpy()] + ([labels.numpy().astype(np.int64)] if n_cls else [])
        atomic_write(args.npz, lambda f: np.savez(f, *arrays))  # a file object: np.savez appends no .npz
        print(f"{len(images)} samples in ADM format: {args.npz} (arr_0 {tuple(arrays[0].shape)} uint8"
              f"{', arr_1 labels' if n_cls else ''})")
    if score is not None:
        print(f"FID {score[0]:.3f}" + (f", IS {score[1]:.2f}" if score[1] else "") + f" ({len(images)} samples vs "
              f"{args.fid_ref}; pytorch-fid Inception, {args.sampler} {args.steps} steps, cfg {args.cfg_scale:g})")
    return score


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except RunError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()

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
from tqdm.auto import tqdm

from diffusion import SAMPLERS, GaussianDiffusion
from train_cifar import autocast_forward, build_model, die, load_checkpoint, save_grid, to_uint8

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
    a("--precision", choices=["bf16", "fp16", "fp32"], default="fp32")
    a("--nrow", type=int, default=None, help="images per grid row (default: ~sqrt of the grid size)")
    a("--fid-ref", default=None, help="also compute FID (and IS) in the same pass against this reference: "
                                      "cifar10-train, cifar10-test or a stats .npz (mu, sigma)")
    a("--data-dir", default="data", help="CIFAR-10 folder for building a named --fid-ref the first time")
    args = p.parse_args(argv)
    args.steps = args.steps or DEFAULT_STEPS[args.sampler]
    if args.num_samples < 1 or args.batch_size < 1:
        p.error("--num-samples and --batch-size must be >= 1")
    if not 1 <= args.steps <= 1000:
        p.error("--steps must be in 1..1000")
    return args


def load_model(ckpt, use_ema, device):
    """Rebuild the checkpoint's model (eval mode) on device with its EMA or raw weights."""
    model = build_model(ckpt["backbone"], ckpt["model_name"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    return model.to(device).eval()


def generate(fwd, diffusion, shape, num_samples, batch_size, num_classes=0, class_label=None, sampler="dpm++2m",
             steps=25, eta=0.0, cfg_scale=1.0, null_label=None, seed=0, device="cpu", progress=True):
    """Yield (uint8 (n, C, H, W) CPU images, int64 labels or None) batches of samples. The initial noise and the
    labels come from a CPU generator (the same for a seed on any device); the per-step noise of ddpm / ddim with
    eta > 0 comes from a generator on the device. Labels: class_label, else uniform."""
    gen = torch.Generator().manual_seed(seed)
    labels = None
    if num_classes:
        labels = torch.full((num_samples,), class_label) if class_label is not None \
            else torch.randint(num_classes, (num_samples,), generator=gen)
    for i in tqdm(range(0, num_samples, batch_size), desc="sampling", disable=not progress):
        n = min(batch_size, num_samples - i)
        noise = torch.randn((n, *shape), generator=gen)
        y = None if labels is None else labels[i:i + n]
        x = diffusion.sample(fwd, (n, *shape), sampler=sampler, steps=steps, eta=eta,
                             model_kwargs=None if y is None else {"y": y.to(device)}, cfg_scale=cfg_scale,
                             null_label=null_label, noise=noise, device=device, clip_denoised=True,
                             generator=torch.Generator(device).manual_seed(seed + i))
        yield to_uint8(x).cpu(), y


def fid_setup(fid_ref, data_dir, device):
    """(Inception network, reference (mu, sigma)) for a named set (its statistics are computed once and cached
    by fid.py) or a stats .npz; a missing weights file or dataset exits with one line."""
    import fid  # lazy: the Inception weights are only needed when FID is asked for
    try:
        inception = fid.build_inception(device=device)
        ref = fid.load_stats(fid_ref) if fid_ref.endswith(".npz") else \
            fid.reference_stats(fid_ref, data_dir, model=inception, device=device)[:2]
    except (OSError, ValueError, RuntimeError) as e:
        die(f"cannot compute FID against {fid_ref!r}: {e}")
    return inception, ref


def fid_score(batches, inception, ref, device, num_samples):
    """(FID, IS mean or None) of a stream of uint8 image batches; IS (10 splits) needs >= 10 samples."""
    import fid
    stats = fid.compute_statistics(batches, model=inception, device=device, inception_score=num_samples >= 10)
    return fid.frechet_distance(*stats[:2], *ref), (stats[2][0] if len(stats) == 3 else None)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = load_checkpoint(args.ckpt)
    meta = ckpt["data"]
    if not meta["pixels"]:
        die("not yet: sampling a latent-space checkpoint needs the VAE decoder, which this project lacks so far")
    n_cls = meta["num_classes"]
    if args.class_label is not None and not 0 <= args.class_label < n_cls:
        die(f"--class-label must be in 0..{n_cls - 1}" if n_cls else "--class-label needs a class-conditional model")
    if args.fid_ref and args.fid_ref.startswith("cifar10") and (meta["dataset"] != "cifar10" or
                                                                meta["image_size"] != 32):
        die(f"--fid-ref {args.fid_ref} only fits CIFAR-10 at 32x32; pass a stats .npz made with fid.py")
    if args.fid_ref and args.num_samples < 10_000:
        print(f"note: FID from {args.num_samples} samples is biased upwards; papers use 50,000 (--num-samples)")
    model = load_model(ckpt, args.ema, device)
    if args.cfg_scale != 1.0 and model.null_label is None:
        die("--cfg-scale needs a class-conditional model trained with label dropout (--class-cond, --class-dropout)")
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
    if args.fid_ref:
        score = fid_score(keep(batches), *fid_setup(args.fid_ref, args.data_dir, device), device, args.num_samples)
    else:
        for _ in keep(batches):
            pass
    images = torch.cat(out)                                                    # (N, C, H, W) uint8
    labels = torch.cat(labels) if n_cls else None

    grid = images[:256]
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                    f"sample_{stem}_{args.sampler}_{args.steps}steps_cfg{args.cfg_scale:g}.png")
    save_grid(grid, path, nrow=args.nrow or math.ceil(math.sqrt(len(grid))))
    print(f"grid of {len(grid)} samples: {path}")
    if args.npz:
        arrays = [images.permute(0, 2, 3, 1).numpy()] + ([labels.numpy().astype(np.int64)] if n_cls else [])
        tmp = args.npz + ".tmp"
        with open(tmp, "wb") as f:  # a file object keeps the exact name (np.savez would append .npz)
            np.savez(f, *arrays)
        os.replace(tmp, args.npz)
        print(f"{len(images)} samples in ADM format: {args.npz} (arr_0 {tuple(arrays[0].shape)} uint8"
              f"{', arr_1 labels' if n_cls else ''})")
    if args.fid_ref:
        print(f"FID {score[0]:.3f}" + (f", IS {score[1]:.2f}" if score[1] else "") + f" ({len(images)} samples vs "
              f"{args.fid_ref}; pytorch-fid Inception, {args.sampler} {args.steps} steps, cfg {args.cfg_scale:g})")
    return score if args.fid_ref else None


if __name__ == "__main__":
    main()

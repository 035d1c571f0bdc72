"""What training evaluates along the way, with the EMA model: sample grids (samples/step_XXXXXXX_ema.png) and FID
against reference statistics (fid.py), logged to log.jsonl; both with a progress bar in sampler steps."""
import os
import re

import torch
from tqdm.auto import tqdm

import fid
from devices import autocast_forward
from errors import RunError
from images import save_grid, to_uint8
from runs import Interrupted
from sampling import generate, ticking


def evaluate(run, log, stop, fid_score=None):
    """The step's sample grid (every --sample-every steps) and FID (every --fid-every, with fid_score from
    fid_evaluator) of the EMA model; with one process a stop request abandons them."""
    args, step, done = run.args, run.step, run.step == run.args.steps
    can_draw = run.meta["pixels"] or run.decode is not None  # latents need a VAE to become a picture
    grid_due = args.sample_every and can_draw and (step % args.sample_every == 0 or done)
    fid_due = fid_score and (step % args.fid_every == 0 or done)
    if not (grid_due or fid_due):
        return
    run.check_finite(weights=True)  # never spend minutes sampling NaN weights
    fwd = autocast_forward(run.ema, run.device, args.precision)
    if run.procs.world == 1:  # one process: a stop request abandons the grid / FID (many: all finish it together)
        fwd = stop.guard(fwd)
    try:
        if grid_due and run.procs.main:
            sample_grid(fwd, run, os.path.join(run.out_dir, "samples", f"step_{step:07d}_ema.png"))
        if fid_due:
            score, is_mean = fid_score(fwd)  # sampled by every process, scored by the main one
    except Interrupted:  # the grid / FID of this step is dropped, the checkpoint after it is not
        return
    if fid_due and run.procs.main:
        log.append({"step": step, "fid": round(score, 4), "inception_score": is_mean,
                    "fid_samples": args.fid_samples, "sampler": f"{args.sampler}-{args.sample_steps}"})
        tqdm.write(f"step {step}: FID {score:.2f} ({args.fid_samples} EMA samples, {args.sampler} "
                   f"{args.sample_steps} steps, vs {args.fid_ref})")


@torch.no_grad()
def sample_grid(fwd, run, path):
    """EMA samples from fixed noise (same every time): 8x8, or one row of 8 per class (first 10 classes) or per
    held-out prompt (text-to-image: the first 10, written above their rows), guided by --grid-cfg-scale where the
    model has a null label, with a progress bar over the sampler's network calls."""
    args, meta, device = run.args, run.meta, run.device
    prompts = run.text.held[:10] if run.text else None
    fwd, null = (run.text.prompts(fwd, prompts), len(prompts)) if run.text else (fwd, run.ema.null_label)
    n_cls = len(prompts) if run.text else min(meta["num_classes"], 10)
    y = torch.arange(n_cls, device=device).repeat_interleave(8) if n_cls else None
    shape = (len(y) if n_cls else 64, meta["channels"], meta["image_size"], meta["image_size"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    guided = n_cls and null is not None  # a model trained with label (or context) dropout
    guide = {"cfg_scale": args.grid_cfg_scale, "null_label": null} if guided else {}
    with tqdm(total=run.diffusion.nfe(args.sampler, args.sample_steps), desc=f"grid at step {run.step}", unit="step",
              leave=False) as bar:
        x = run.diffusion.sample(ticking(fwd, bar), shape, sampler=args.sampler, steps=args.sample_steps,
                                 model_kwargs={"y": y} if n_cls else None, noise=noise, device=device,
                                 generator=torch.Generator(device).manual_seed(args.seed),
                                 clip_denoised=run.decode is None, **guide)
    save_grid(to_uint8(x if run.decode is None else run.decode(x)), path, nrow=8, captions=prompts)


def fid_evaluator(args, meta, diffusion, device, decode, procs=None, text=None):
    """fwd -> (FID, IS) of --fid-samples samples (decoded by the VAE for latent runs; text-to-image: each of a
    held-out prompt drawn at random) vs --fid-ref. The Inception weights and reference statistics are loaded now,
    before training, so a missing file fails at once."""
    if not meta["pixels"] and decode is None:
        raise RunError("--fid-every on latents needs the VAE that decodes them: pass --vae")
    if args.fid_ref.startswith("cifar10") and (args.dataset not in ("cifar10", "cifar10-captions")
                                               or args.image_size != 32):
        raise RunError(f"--fid-ref {args.fid_ref} only fits CIFAR-10 at 32x32; pass a stats .npz made with fid.py")
    try:
        inception, ref = fid.fid_setup(args.fid_ref, args.data_dir, device)
    except RunError as e:
        raise RunError(f"cannot compute FID against {args.fid_ref!r}: {without_weights_flag(e)}") from None
    shape = (meta["channels"], meta["image_size"], meta["image_size"])

    def score(fwd):  # unguided samples, uniform labels when class-conditional; (None, None) off the main rank
        batches = generate(text.prompts(fwd, text.held) if text else fwd, diffusion, shape, args.fid_samples,
                           min(2 * args.batch_size, 256), num_classes=len(text.held) if text else meta["num_classes"],
                           sampler=args.sampler, steps=args.sample_steps, seed=args.seed, device=device, decode=decode,
                           procs=procs)  # a bar in sampler steps
        if procs is not None and not procs.main:
            for _ in batches:  # this rank's share of the sampling; the main process gathers and scores
                pass
            return None, None
        return fid.fid_score((x for x, _ in batches), inception, ref, device, args.fid_samples)
    return score


def without_weights_flag(message):
    """fid.py's advice with its --weights flag, which train_cifar.py has not, left out ($FID_WEIGHTS does the same)."""
    return re.sub(r"(pass )?--weights( PATH)? / (set )?", "set ", str(message)).replace("point set ", "point ")

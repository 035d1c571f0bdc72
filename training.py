"""One training step and what it needs: the learning rate, the step's random draws, the loss and optimizer step,
the EMA and its ramp-up, and the non-finite checks (train_cifar.py's loop; bench.py times the same step)."""
import math
from dataclasses import dataclass
from typing import Optional

import torch


def learning_rate(args, step):
    """LR of the optimizer step `step` (0-based): linear warm-up to --lr, then constant (DiT, U-ViT) or cosine."""
    if args.lr_schedule == "cosine":
        return cosine_lr(args, step)
    return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr


def cosine_lr(args, step):
    """GenViT's utils/scheduler.py per step: warm-up from --min-lr to --lr over --warmup steps, then a half cosine
    back to --min-lr at --steps."""
    if step < args.warmup:
        return args.min_lr + (args.lr - args.min_lr) * step / args.warmup
    frac = min((step - args.warmup) / max(args.steps - args.warmup, 1), 1.0)
    return args.min_lr + (args.lr - args.min_lr) * (1 + math.cos(math.pi * frac)) / 2


@dataclass
class Draws:
    """This process's part of one step's randomness."""
    flip: torch.Tensor                    # (b,) bool: flip these images (latent folders: take the stored flip)
    latent_noise: Optional[torch.Tensor]  # (b, C, H, W): z = mean + std * latent_noise (latent folders only)
    t: torch.Tensor                       # (b,) timesteps (EDM / flows: sigmas / times)
    noise: torch.Tensor                   # (b, C, H, W) the noise of the forward process
    drop: Optional[torch.Tensor]          # (b,) 1 = replace the label by the null label (classifier-free guidance)


def step_draws(diffusion, step, seed, shape, part, device, label_dropout=0.0, latent_noise=False):
    """Step `step`'s flips, latents' noise, t, noise and label dropout for the global batch `shape`, from a generator
    seeded by (seed, step), sliced to this process's `part`: any number of processes gives the same run."""
    g = torch.Generator(device).manual_seed(seed * 2 ** 32 + step)
    B = shape[0]
    flip = torch.rand(B, generator=g, device=device)[part] < 0.5
    eps_z = torch.randn(shape, generator=g, device=device)[part] if latent_noise else None
    t, noise = diffusion.training_noise(shape, g, device)
    drop = (torch.rand(B, generator=g, device=device)[part] < label_dropout).long() if label_dropout > 0 else None
    return Draws(flip, eps_z, t[part], noise[part], drop)


def train_step(fwd, diffusion, opt, scaler, params, x, y=None, grad_clip=0.0, joint=None, t=None, noise=None,
               drop=None):
    """One optimizer step on the diffusion loss (DDPM Alg. 1) -> (loss terms, grad norm before clipping); t, noise,
    drop: the step's draws; joint(loss, terms) -> loss adds HybViT's objective (hybvit.py)."""
    kwargs = {} if y is None else {"y": y} if drop is None else {"y": y, "force_drop_ids": drop}
    terms = diffusion.training_losses(fwd, x, t, noise, model_kwargs=kwargs or None)
    loss = terms["loss"].mean()
    if joint is not None:
        loss = joint(loss, terms)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # true gradients for the norm / clipping (a no-op unless fp16)
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else \
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None])))
    scaler.step(opt)
    scaler.update()
    return terms, gnorm


def ema_decay(args, step):
    """EDM's EMA ramp-up (training_loop.py @ 008a4e5): min(--ema-decay, 0.5 ^ (1 / (--ema-rampup x step)))."""
    if not args.ema_rampup:
        return args.ema_decay
    return min(args.ema_decay, 0.5 ** (1 / (args.ema_rampup * step))) if step else 0.0


@torch.no_grad()
def update_ema(ema, model, decay):
    """EMA of the weights with one foreach lerp (ema += (1 - decay)(w - ema)); buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    buffers = list(model.buffers())
    if buffers:
        torch._foreach_copy_(list(ema.buffers()), buffers)


def first_nonfinite(window, step):
    """Step of the first non-finite loss term in `window` (per-step stats ending at `step`), or None. The last
    column, the grad norm, is skipped: an fp16 overflow there is the loss scaler's to handle."""
    if not window:
        return None
    ok = torch.isfinite(torch.stack(window)[:, :-1]).all(1).tolist()
    return step - len(window) + 1 + ok.index(False) if False in ok else None


def weights_finite(*modules):
    return bool(torch.isfinite(torch.stack(torch._foreach_norm([p for m in modules for p in m.parameters()]))).all())

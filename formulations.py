"""
What the three diffusion formulations (diffusion.GaussianDiffusion, edm.EDM, flow.FlowMatching) share: the
interface base class, classifier-free guidance, the Euler/Heun ODE integrator, per-sample broadcasting and checks.

Every formulation exposes
  formulation             'ddpm' | 'edm' | 'flow'
  SAMPLERS                its sampler names; default_sampler, the one used when a caller names none
  default_steps(sampler)  the sampler's usual step count; nfe(sampler, steps): network calls per sample (no CFG)
  training_noise(shape, generator, device) -> (time, noise); training_losses(model, x0, time, noise, model_kwargs)
  network_t(time)         the time the network is fed
  sample(model, shape, sampler=None, steps=None, ...): None means default_sampler / default_steps(sampler)
  learn_sigma             False but for a learned-variance DDPM (Improved DDPM Eq. 15)
A model is any callable model(x, network_t(time), **model_kwargs).
"""
import math

import torch
from tqdm.auto import tqdm

# The regression loss of every formulation: squared error (the papers' default) or absolute error (GenViT's
# L1 noise loss, lucidrains-style loss_type='l1'), on what the network itself regresses.
LOSS_TYPES = ("l2", "l1")


class Formulation:
    """The interface above; subclasses set formulation, SAMPLERS, default_sampler and _STEPS and define nfe."""

    formulation, SAMPLERS, default_sampler, _STEPS, learn_sigma = None, (), None, {}, False

    @property
    def DEFAULT_STEPS(self):
        """Old name of the default_steps table, kept until every caller uses default_steps()."""
        return dict(self._STEPS)

    def _check_sampler(self, sampler):
        if sampler not in self.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} for {self.formulation}; choose one of {self.SAMPLERS}")
        return sampler

    def default_steps(self, sampler=None):
        """The sampler's usual step count (the papers' settings; see the subclass)."""
        return self._STEPS[self._check_sampler(self.default_sampler if sampler is None else sampler)]

    def _resolve(self, sampler=None, steps=None):
        """(sampler, steps) with None filled in by default_sampler / default_steps(sampler), both checked."""
        sampler = self._check_sampler(self.default_sampler if sampler is None else sampler)
        steps = self._STEPS[sampler] if steps is None else steps
        check_steps(steps)
        return sampler, steps

    def _draws(self, x0, t, noise):
        """(t, noise) for training_losses: those not given come from one training_noise draw."""
        if t is None or noise is None:
            t_drawn, noise_drawn = self.training_noise(x0.shape, device=x0.device)
            t, noise = t_drawn if t is None else t, noise_drawn.to(x0.dtype) if noise is None else noise
        return t, noise

    def _start_sampling(self, model, shape, sampler, steps, noise, generator, device):
        """Checks shared by every sampler -> (sampler, steps, device, the standard-normal start noise)."""
        sampler, steps = self._resolve(sampler, steps)
        device = model_device(model, device)
        noise = torch.randn(shape, generator=generator, device=device) if noise is None else noise.to(device)
        check_eval(model)
        return sampler, steps, device, noise


def check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampler steps must be a positive integer, got {steps!r}")


def check_loss_type(loss_type):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def check_output(out, x, name):
    if out.shape[1] != x.shape[1]:
        raise ValueError(f"model returned {out.shape[1]} channels for {x.shape[1]}-channel inputs; {name} has no "
                         "learned variance (learn_sigma is DDPM-only): build the model with learn_sigma=False")
    return out


def model_device(model, device):
    if device is None and isinstance(model, torch.nn.Module):
        return next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.device("cpu" if device is None else device)


def check_eval(model):
    if isinstance(model, torch.nn.Module) and model.training:
        raise ValueError("sampling a model in training mode (label and feature dropout on): call model.eval()")


def mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


def per_sample(v, x):
    """A float, 0-d or (B,) tensor -> (B,) tensor in at least float32 on x's device."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    v = torch.as_tensor(v, dtype=dtype, device=x.device)
    return v.expand(x.shape[0]) if v.ndim == 0 else v.to(dtype)


def bcast(v, x):
    """(B,) -> (B, 1, 1, ...) to broadcast against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------------

def classifier_free_guidance(model, x, t_model, model_kwargs, cfg_scale=1.0, null_label=None, cfg_channels=None):
    """model(x, t_model, **model_kwargs), guided (Ho & Salimans 2022; see guided_output) when cfg_scale != 1."""
    if callable(cfg_scale) or cfg_scale != 1.0:
        return guided_output(model, x, t_model, model_kwargs, cfg_scale, null_label, cfg_channels)
    return model(x, t_model, **model_kwargs)


def guided_output(model, x, t_model, model_kwargs, cfg_scale, null_label, cfg_channels):
    """Classifier-free guidance (Ho & Salimans 2022): one batched call on [x, x] with labels [y, null], then
    out_u + s (out_c - out_u) on the first `cfg_channels` output channels (all by default; 3 reproduces the official
    DiT); the remaining channels (and a learned sigma) come from the conditional half. cfg_scale is a float or a
    callable of the network time t_model. Whatever the model predicts (eps, x0, v, EDM's F, a velocity), the
    prediction of every formulation is affine in it with coefficients that do not depend on the label, so guiding
    the raw output guides eps, x0, the denoiser D and the velocity alike."""
    if null_label is None or model_kwargs.get("y") is None:
        raise ValueError("classifier-free guidance needs labels model_kwargs['y'] and the null_label")
    y = model_kwargs["y"]
    kwargs = {**model_kwargs, "y": torch.cat([y, torch.full_like(y, null_label)])}
    out = model(torch.cat([x, x]), torch.cat([t_model, t_model]), **kwargs)
    cond, uncond = out.chunk(2)
    scale = cfg_scale(t_model) if callable(cfg_scale) else cfg_scale
    if torch.is_tensor(scale):
        scale = scale.to(out.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    k = x.shape[1] if cfg_channels is None else cfg_channels
    if not 1 <= k <= x.shape[1]:  # never guide the variance channels of a learned-sigma model
        raise ValueError(f"cfg_channels must be in 1..{x.shape[1]} (the prediction channels), got {k}")
    guided_part = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided_part, cond[:, k:]], dim=1)


def power_cosine_guidance(scale, power=4.0, timesteps=1000):
    """MDT/DiffiT guidance schedule (DiffiT §5.8): s(t) = 1 + (s_max - 1) (1 - cos(pi ((T - t)/T)^power)) / 2.
    About 1 at the start of sampling (t near T), s_max at t = 0. Pass it as `cfg_scale` to any sampler."""
    def schedule(t):
        frac = (1.0 - t.float() / timesteps) ** power
        return 1.0 + (scale - 1.0) * 0.5 * (1.0 - torch.cos(math.pi * frac))
    return schedule


GUIDANCE_SCHEDULES = ("constant", "power-cosine")


def guidance_schedule(name, scale):
    """cfg_scale of guidance strength `scale` under a GUIDANCE_SCHEDULES name: the float itself ('constant') or
    power_cosine_guidance(scale) ('power-cosine'); strength 1 is no guidance under either."""
    if name not in GUIDANCE_SCHEDULES:
        raise ValueError(f"unknown guidance schedule {name!r}; choose one of {GUIDANCE_SCHEDULES}")
    return power_cosine_guidance(scale) if name == "power-cosine" and scale != 1 else float(scale)


# ----------------------------------------------------------------------------------------------------
# The Euler / Heun integrator of EDM and flow matching
# ----------------------------------------------------------------------------------------------------

def euler_heun(f, x, ts, heun, euler_last=False, churn=None, progress=False, desc=None):
    """Integrate dx/dt = f(x, t) over the grid ts[0] -> ts[-1] (EDM Alg. 1-2): an Euler step per interval and,
    when `heun`, the trapezoidal correction with f at the step's end; euler_last skips it on the last interval
    (EDM: f = (x - D)/sigma is undefined at sigma = 0). churn(x, t) -> (x_hat, t_hat) perturbs each step's
    start first (EDM Alg. 2 lines 5-6). Network calls: len(ts) - 1, twice that for Heun (minus 1 if euler_last)."""
    last = len(ts) - 2
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc=desc):
        t, t_next = ts[i], ts[i + 1]
        if churn is not None:
            x, t = churn(x, t)
        d = f(x, t)
        x_next = x + (t_next - t) * d
        if heun and not (euler_last and i == last):
            x_next = x + (t_next - t) * (0.5 * d + 0.5 * f(x_next, t_next))
        x = x_next
    return x

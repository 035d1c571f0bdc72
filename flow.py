"""
Flow matching / rectified flow with the linear path and velocity prediction. Read beside the papers:
  Flow matching  Lipman et al. 2023, arXiv 2210.02747  conditional flow matching, linear (OT) path
  Rectified flow Liu et al. 2023, 2209.03003           x_t = (1 - t) x_0 + t eps, velocity eps - x_0
  SiT            Ma et al. 2024, 2401.08740            velocity models on DiT backbones, Euler-Maruyama SDE sampling
  SD3            Esser et al. 2024, 2403.03206         t = 0 data / t = 1 noise convention, logit-normal t (§3.1)
"""
import math

import torch
from tqdm.auto import tqdm

from formulations import (Formulation, bcast, check_loss_type, check_output, classifier_free_guidance, euler_heun,
                          mean_flat, per_sample)


class FlowMatching(Formulation):
    """x_t = (1 - t) x0 + t eps,  t in [0, 1],  target v = dx_t/dt = eps - x0,  loss ||v_theta(x_t, t) - v||^2.
    t = 0 is data, t = 1 noise: the SiT paper's and SD3's convention. Lipman et al. and SiT's code run the other way
    (willisma/SiT @ 947f95b transport/path.py:23-29: x_t = t x1 + (1 - t) x0, data x1 at t = 1) and feed the network
    that raw t (transport.py:133): here t = 1 - t_SiT, v = -u_SiT, and network_t = 999 t grows with the noise level as
    the DDPM index does, so the backbones' time embeddings and time-dependent guidance (power_cosine_guidance) apply
    unchanged. Sampling integrates dx/dt = v from t = 1 to t = 0.
    t_sampling: training times 'uniform' U(0, 1) (SiT) or 'logit_normal' t = sigmoid(m + s n), n ~ N(0, 1)
    (SD3 §3.1, m = logit_mean, s = logit_std; SD3's best setting is m = 0, s = 1).
    Samplers over the uniform grid t_i = i / steps (BENCHMARKS.md, "How the flow samplers end", measures them):
      euler  one velocity per step
      heun   euler_heun with the correction on every step: v is regular at t = 0 (v(x, 0) = -x)
      sde    SiT's Euler-Maruyama sampler of the reverse SDE with the same marginals (w_t = t),
             dx = [v - w_t s] dt + sqrt(2 w_t) dW, s = -E[eps | x_t] / t: x <- x - h (v + eps_hat) + sqrt(2 t h) z,
             eps_hat = x + (1 - t) v; the last step, from 1/steps to 0, is the denoising step x0_hat = x - t v:
             SiT's SDE with --last-step Tweedie --last-step-size 1/steps (its default, Mean 0.04, makes 249 steps
             over [1, 0.04], then one noise-free drift step to 0: train_utils.py:29-32, transport.py:89-95, 260-263).
    Default steps: euler 50, heun 25 (the same 50 evaluations), sde 250 (SiT's SDE default count, 250 evaluations).
    SiT's --num-sampling-steps N counts grid points (integrators.py:23, 91), N - 1 fixed steps: our euler K is its
    ODE --sampling-method euler --num-sampling-steps K + 1; its Sampler.sample_ode default num_steps=50
    (transport.py:345) makes 49 Euler steps (our --steps 49), and its scripts default to adaptive dopri5.
    """

    formulation = "flow"
    SAMPLERS = ("euler", "heun", "sde")
    default_sampler = "euler"
    _STEPS = {"euler": 50, "heun": 25, "sde": 250}
    T_SAMPLING = ("uniform", "logit_normal")

    def __init__(self, t_sampling="uniform", logit_mean=0.0, logit_std=1.0, loss_type="l2"):
        check_loss_type(loss_type)
        self.loss_type = loss_type
        if t_sampling not in self.T_SAMPLING:
            raise ValueError(f"unknown t_sampling {t_sampling!r}; choose one of {self.T_SAMPLING}")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        self.t_sampling, self.logit_mean, self.logit_std = t_sampling, float(logit_mean), float(logit_std)

    def config(self):
        """Constructor kwargs plus 'formulation' (JSON-serialisable); make_diffusion(**config()) rebuilds it."""
        return {"formulation": self.formulation, "t_sampling": self.t_sampling, "logit_mean": self.logit_mean,
                "logit_std": self.logit_std, "loss_type": self.loss_type}

    def nfe(self, sampler=None, steps=None):
        """Network calls per sample: Heun 2 per step (the correction on every step), euler and sde 1."""
        sampler, steps = self._resolve(sampler, steps)
        return 2 * steps if sampler == "heun" else steps

    def network_t(self, t):
        """t in [0, 1] -> the network's time 999 t (float32): the DDPM index range, 999 = pure noise
        (BENCHMARKS.md, "Network time of EDM and flow matching", compares it with t and 100 t)."""
        return (999 * torch.as_tensor(t)).float()

    def velocity(self, model, x, t, **model_kwargs):
        """v_theta(x, t) = model(x, network_t(t)); t a float or per-sample (B,)."""
        return self._velocity(model, x, t, model_kwargs)

    def _velocity(self, model, x, t, model_kwargs, cfg_scale=1.0, null_label=None, cfg_channels=None, clip=False):
        t = per_sample(t, x)
        out = classifier_free_guidance(model, x, self.network_t(t), model_kwargs, cfg_scale, null_label,
                                       cfg_channels)
        v = check_output(out, x, "flow matching")
        if clip:  # clamp x0_hat = x - t v to [-1, 1] and return the velocity that implies it (t > 0)
            tb = bcast(t, x)
            x0 = (x - tb * v).clamp(-1, 1)
            v = torch.where(tb > 0, (x - x0) / tb.clamp(min=1e-12), v)
        return v

    # ----- training (conditional flow matching, Lipman et al. §4.1, linear path) -----

    def sample_t(self, batch, device=None, generator=None):
        """Training times: U(0, 1) or logit-normal (SD3 §3.1)."""
        if self.t_sampling == "uniform":
            return torch.rand((batch,), generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn((batch,), generator=generator,
                                                                            device=device))

    def training_noise(self, shape, generator=None, device=None):
        """(t, noise) for a training batch of `shape`: t from sample_t, noise ~ N(0, I)."""
        return self.sample_t(shape[0], device, generator), torch.randn(shape, generator=generator, device=device)

    def training_losses(self, model, x0, t=None, noise=None, model_kwargs=None):
        """Per-sample conditional flow matching loss at (t, noise), drawn by training_noise unless given:
        'mse' = mean over dims of (v_theta(x_t, t) - (eps - x0))^2, unweighted ('loss' = 'mse'; SD3's logit-normal
        weighting enters through the density of t); loss_type 'l1': 'loss' = 'l1' = mean |v_theta - (eps - x0)|."""
        model_kwargs = model_kwargs or {}
        t, noise = self._draws(x0, t, noise)
        t = per_sample(t, x0)
        tb = bcast(t, x0)
        x_t = ((1 - tb) * x0 + tb * noise).to(x0.dtype)
        v = self.velocity(model, x_t, t, **model_kwargs)
        err = v.float() - (noise.float() - x0.float())
        mse = mean_flat(err ** 2)
        if self.loss_type == "l1":
            l1 = mean_flat(err.abs())
            return {"loss": l1, "mse": mse, "l1": l1}
        return {"loss": mse, "mse": mse}

    # ----- sampling -----

    @torch.no_grad()
    def sample(self, model, shape, sampler=None, steps=None, *, model_kwargs=None, cfg_scale=1.0, null_label=None,
               cfg_channels=None, noise=None, generator=None, device=None, progress=False, clip_denoised=False):
        """Integrate from x_1 = noise (standard normal, from `generator` when not given) to t = 0 with 'euler',
        'heun' or 'sde' (default default_sampler; see the class docstring) over `steps` uniform steps (default
        default_steps(sampler)). CFG guides the velocity (one batched 2B call per evaluation); a callable cfg_scale
        gets network_t(t). clip_denoised clamps the implied x0 to [-1, 1]."""
        sampler, steps, device, x = self._start_sampling(model, shape, sampler, steps, noise, generator, device)
        model_kwargs = model_kwargs or {}
        V = lambda x, t: self._velocity(model, x, t, model_kwargs, cfg_scale, null_label, cfg_channels, clip_denoised)
        ts = [i / steps for i in range(steps, -1, -1)]  # 1, ..., 1/steps, 0
        if sampler != "sde":
            return euler_heun(V, x, ts, sampler == "heun", progress=progress, desc=f"flow-{sampler}")
        for i in tqdm(range(steps), disable=not progress, desc="flow-sde"):
            t, t_next = ts[i], ts[i + 1]
            v = V(x, t)
            if t_next == 0:  # final denoising step: x0_hat = E[x0 | x_t]
                x = x - t * v
            else:
                h, eps_hat = t - t_next, x + (1 - t) * v
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x - h * (v + eps_hat) + math.sqrt(2 * t * h) * z
        return x

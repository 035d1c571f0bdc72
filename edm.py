"""
EDM (Karras et al. 2022, arXiv 2206.00364): x = y + sigma n, n ~ N(0, I), a preconditioned denoiser and the Heun
sampler. Read beside the paper: preconditioning Table 1 ("Ours"), sigma grid Eq. 5, training Table 1 / §5,
deterministic and stochastic samplers Alg. 1-2; official code: NVlabs/edm training/networks.py (EDMPrecond),
training/loss.py (EDMLoss), generate.py (edm_sampler).
"""
import math

import torch

from formulations import (Formulation, bcast, check_loss_type, check_output, check_steps, classifier_free_guidance,
                          euler_heun, mean_flat, per_sample)


class EDM(Formulation):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)  with (EDM Table 1, "Ours")
        c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,       sd = sigma_data.
    Training: ln sigma ~ N(P_mean, P_std^2), loss lambda(sigma) ||D - y||^2, lambda = (sigma^2 + sd^2)/(sigma sd)^2
    (so that the effective target of F has unit weight, EDM §5). Sampling: Alg. 2 on the rho-grid of Eq. 5.
    The network is fed c_noise itself (network_t), as EDM feeds its ADM network; BENCHMARKS.md ("Network time of
    EDM and flow matching") has the measurement against scaled maps of it.
    """

    formulation = "edm"
    SAMPLERS = ("heun", "euler")
    default_sampler = "heun"
    # EDM Table 2 / Alg. 2: 18 Heun steps = 35 evaluations (CIFAR-10); Euler at the same 35 evaluations
    _STEPS = {"heun": 18, "euler": 35}

    def __init__(self, sigma_data=0.5, P_mean=-1.2, P_std=1.2, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 loss_type="l2"):
        check_loss_type(loss_type)
        self.loss_type = loss_type
        if not (sigma_data > 0 and P_std > 0 and rho > 0 and 0 < sigma_min < sigma_max):
            raise ValueError(f"EDM needs sigma_data, P_std, rho > 0 and 0 < sigma_min < sigma_max; got "
                             f"sigma_data={sigma_data}, P_std={P_std}, rho={rho}, sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}")
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def config(self):
        """Constructor kwargs plus 'formulation' (JSON-serialisable); make_diffusion(**config()) rebuilds it."""
        return {"formulation": self.formulation, "sigma_data": self.sigma_data, "P_mean": self.P_mean,
                "P_std": self.P_std, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho,
                "loss_type": self.loss_type}

    def nfe(self, sampler=None, steps=None):
        """Network calls per sample: Heun corrects every step but the last into sigma = 0 (2 steps - 1: 18 -> 35,
        EDM Table 2); Euler one per step."""
        sampler, steps = self._resolve(sampler, steps)
        return 2 * steps - 1 if sampler == "heun" else steps

    # ----- preconditioning (EDM Table 1) -----

    def preconditioning(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at sigma (a float or tensor), EDM Table 1."""
        sd = self.sigma_data
        sigma = torch.as_tensor(sigma, dtype=torch.float64) if not torch.is_tensor(sigma) else sigma
        norm = torch.sqrt(sigma ** 2 + sd ** 2)
        return sd ** 2 / norm ** 2, sigma * sd / norm, 1 / norm, torch.log(sigma) / 4

    def loss_weight(self, sigma):
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2 (EDM Table 1)."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def network_t(self, sigma):
        """sigma -> the network's time: c_noise = ln(sigma)/4 itself (EDM Table 1; BENCHMARKS.md, "Network time of
        EDM and flow matching", has the measurement behind not rescaling it). Float32, on sigma's device."""
        return (torch.log(torch.as_tensor(sigma)) / 4).float()  # no float64: MPS has none

    def denoise(self, model, x, sigma, **model_kwargs):
        """D(x; sigma) = c_skip x + c_out F(c_in x, network_t(sigma)); sigma a float or per-sample (B,)."""
        return self._denoise(model, x, sigma, model_kwargs)

    def _denoise(self, model, x, sigma, model_kwargs, cfg_scale=1.0, null_label=None, cfg_channels=None,
                 clip=False):
        sigma = per_sample(sigma, x)
        c_skip, c_out, c_in, _ = (bcast(c, x) for c in self.preconditioning(sigma))
        x_in = (c_in * x).to(x.dtype)
        out = classifier_free_guidance(model, x_in, self.network_t(sigma), model_kwargs, cfg_scale, null_label,
                                       cfg_channels)
        d = c_skip * x + c_out * check_output(out, x, "EDM").to(c_out.dtype)
        return d.clamp(-1, 1) if clip else d

    # ----- training (EDM §5, Table 1) -----

    def training_noise(self, shape, generator=None, device=None):
        """(sigma, noise) for a training batch of `shape`: ln sigma ~ N(P_mean, P_std^2), noise ~ N(0, I)."""
        n = torch.randn(shape[:1], generator=generator, device=device)
        return torch.exp(self.P_mean + self.P_std * n), torch.randn(shape, generator=generator, device=device)

    def training_losses(self, model, x0, sigma=None, noise=None, model_kwargs=None):
        """Per-sample EDM loss at (sigma, noise), drawn by training_noise unless given (sigma a float or (B,)):
        'mse' = mean over dims of (D(x0 + sigma eps; sigma) - x0)^2, 'loss' = lambda(sigma) * mse; with loss_type
        'l1', 'l1' = mean |D - x0| and 'loss' = sqrt(lambda) * l1, the absolute error of F's effective target."""
        model_kwargs = model_kwargs or {}
        sigma, noise = self._draws(x0, sigma, noise)
        sigma = per_sample(sigma, x0)
        x = x0 + bcast(sigma, x0).to(x0.dtype) * noise
        err = self.denoise(model, x, sigma, **model_kwargs).float() - x0.float()
        mse, weight = mean_flat(err ** 2), self.loss_weight(sigma).to(torch.float32)
        if self.loss_type == "l1":
            l1 = mean_flat(err.abs())
            return {"loss": weight.sqrt() * l1, "mse": mse, "l1": l1}
        return {"loss": weight * mse, "mse": mse}

    # ----- sampling (EDM Alg. 2) -----

    def sigmas(self, steps):
        """The rho-spaced grid of EDM Eq. 5, sigma_max -> sigma_min in `steps` points, then 0 (steps + 1 values):
        computed in float64, returned as float32."""
        check_steps(steps)
        i = torch.arange(steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        frac = i / (steps - 1) if steps > 1 else i
        grid = (hi + frac * (lo - hi)) ** self.rho
        return torch.cat([grid, torch.zeros(1, dtype=torch.float64)]).float()

    @torch.no_grad()
    def sample(self, model, shape, sampler=None, steps=None, *, model_kwargs=None, cfg_scale=1.0, null_label=None,
               cfg_channels=None, noise=None, generator=None, device=None, progress=False, clip_denoised=False,
               S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0):
        """EDM Alg. 2 ('heun' or 'euler', default default_sampler) over `steps` sigmas (default
        default_steps(sampler)): x = sigma_max * noise (a standard-normal draw, from `generator` when not given);
        at each sigma_i in [S_min, S_max], churn raises it to sigma_hat = (1 + gamma) sigma_i,
        gamma = min(S_churn / steps, sqrt(2) - 1), adding fresh noise of std S_noise sqrt(sigma_hat^2 - sigma_i^2);
        then euler_heun on dx/dsigma = (x - D)/sigma. CFG guides D (one batched 2B call per evaluation); a
        callable cfg_scale gets network_t(sigma). clip_denoised clamps D to [-1, 1]."""
        sampler, steps, device, noise = self._start_sampling(model, shape, sampler, steps, noise, generator, device)
        model_kwargs = model_kwargs or {}
        sig = self.sigmas(steps).tolist()
        D = lambda x, s: self._denoise(model, x, s, model_kwargs, cfg_scale, null_label, cfg_channels, clip_denoised)

        def churn(x, s_cur):  # EDM Alg. 2 lines 5-6
            gamma = min(S_churn / steps, math.sqrt(2) - 1) if S_min <= s_cur <= S_max else 0.0
            s_hat = s_cur * (1 + gamma)
            if gamma > 0:
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + math.sqrt(s_hat ** 2 - s_cur ** 2) * S_noise * eps
            return x, s_hat

        x = euler_heun(lambda x, s: (x - D(x, s)) / s, noise * sig[0], sig, sampler == "heun", euler_last=True,
                       churn=churn, progress=progress, desc=f"edm-{sampler}")
        return x.to(noise.dtype)

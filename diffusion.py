"""
Gaussian diffusion (DDPM) and the entry point to all three formulations shared by every backbone (DiT, U-ViT,
DiffiT, GenViT): GaussianDiffusion ('ddpm') here, EDM ('edm', edm.py) and FlowMatching ('flow', flow.py), with the
interface of formulations.py; make_diffusion(**config) rebuilds any of them from its config().
A model is any callable model(x, network_t(time), **model_kwargs); for DDPM the time is the integer step.

Where each equation lives (read beside the papers):
  DDPM          Ho et al. 2020, arXiv 2006.11239   q(x_t|x_0) Eq. 4, posterior Eqs. 6-7, eps-mean Eq. 11,
                                                   L_simple Eq. 14, ancestral sampling Alg. 2, decoder Eq. 13
  Improved DDPM Nichol & Dhariwal 2021, 2102.09672 cosine schedule Eq. 17, learned-range Sigma Eq. 15,
                                                   L_hybrid Eq. 16, respacing §4
  DDIM          Song et al. 2021, 2010.02502       generalized step Eq. 12
  DPM-Solver++  Lu et al. 2022, 2211.01095         multistep 2M, Alg. 2
  CFG           Ho & Salimans 2022, 2207.12598     eps_u + s (eps_c - eps_u) (formulations.classifier_free_guidance)
  v-prediction  Salimans & Ho 2022, 2202.00512     §4, Appendix D

All schedule arithmetic is float64 numpy; values are gathered per sample and cast to the input's dtype.
GaussianDiffusion: schedule 'linear' | 'cosine' | 'scaled_linear' (or explicit `betas`); prediction 'eps' | 'x0' | 'v';
learn_sigma: 2C output channels, the extra C are v in [-1, 1] (Improved DDPM Eq. 15); else fixed_variance 'large'
(beta_t: DDPM's CIFAR choice, ADM's default) or 'small' (beta~_t); loss_type 'l2' (L_simple) or 'l1' (GenViT's).
Samplers: ddpm (DDPM Alg. 2, the model's variance), ddim (DDIM Eq. 12, eta 0 = deterministic (default), 1 = DDPM-like),
dpm++2m (DPM-Solver++(2M) in lambda = log(alpha/sigma), data prediction); default_steps 250 (DiT App.), 50 (DDIM
Table 1's middle), 25 (DPM-Solver's 20-25); steps=T is the full chain. Step spacing 'uniform' in t (ddpm/ddim) or
'logsnr' (dpm++2m: with linear betas its last uniform-t steps span huge lambda gaps; BENCHMARKS.md, "DPM-Solver++(2M)
step spacing"). cfg_scale: a float or a callable of the original t (e.g. power_cosine_guidance(4.6)).
"""
import inspect
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from edm import EDM
from flow import FlowMatching
from formulations import (LOSS_TYPES, Formulation, check_loss_type, classifier_free_guidance, mean_flat,
                          power_cosine_guidance)

__all__ = ["GaussianDiffusion", "EDM", "FlowMatching", "make_diffusion", "classifier_free_guidance",
           "power_cosine_guidance", "SAMPLERS", "SCHEDULES", "PREDICTIONS", "LOSS_TYPES", "FORMULATIONS",
           "make_betas", "space_timesteps", "logsnr_timesteps", "normal_kl", "discretized_gaussian_log_likelihood"]

# ----------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------

SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTIONS = ("eps", "x0", "v")
SAMPLERS = ("ddpm", "ddim", "dpm++2m")


def make_betas(schedule, timesteps=1000):
    """beta_1..beta_T in float64 for a named schedule."""
    if schedule == "linear":  # DDPM / ADM: 1e-4 -> 0.02 at T=1000, scaled so any T spans the same range
        return np.linspace(1000 / timesteps * 1e-4, 1000 / timesteps * 0.02, timesteps, dtype=np.float64)
    if schedule == "cosine":  # Improved DDPM Eq. 17, with s = 0.008 and betas clipped at 0.999
        f = lambda t: math.cos((t / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(timesteps)], dtype=np.float64)
    if schedule == "scaled_linear":  # LDM / Stable Diffusion (U-ViT's discrete latent models)
        return np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, timesteps, dtype=np.float64) ** 2
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {SCHEDULES}")


def space_timesteps(timesteps, steps):
    """The K of T original steps kept by a respaced sampler: evenly strided, ends included (ADM §4)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampler steps must be in 1..{timesteps}, got {steps}")
    if steps == 1:
        return [timesteps - 1]
    stride, cur, kept = (timesteps - 1) / (steps - 1), 0.0, []
    for _ in range(steps):  # accumulate exactly as ADM's space_timesteps, so DiT's 250 steps match
        kept.append(round(cur))
        cur += stride
    return kept


def logsnr_timesteps(alphas_cumprod, steps, min_lambda=-5.1):
    """`steps` original steps evenly spaced in lambda = log(alpha/sigma) (DPM-Solver's 'logSNR' grid, floored at -5.1
    as DPM-Solver clips it), the first T-1; steps that coincide are merged, then the widest gaps in t split."""
    lam = 0.5 * np.log(alphas_cumprod) - 0.5 * np.log1p(-alphas_cumprod)
    T = len(lam)
    targets = np.linspace(max(lam[-1], min_lambda), lam[0], steps)
    kept = sorted({T - 1} | {int(np.abs(lam - v).argmin()) for v in targets[1:]})  # the noisiest target is T-1
    while len(kept) < steps:
        i = int(np.argmax(np.diff(kept)))
        kept.insert(i + 1, (kept[i] + kept[i + 1]) // 2)
    return kept


# ----------------------------------------------------------------------------------------------------
# Gaussian helpers (ADM's losses, in nats)
# ----------------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    # the tanh approximation ADM (and so DiT) trains with; kept for identical losses
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data in [-1, 1] quantised to 256 bins of width 2/255 (DDPM Eq. 13), edges open-ended."""
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ----------------------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------------------

class GaussianDiffusion(Formulation):
    """Discrete-time Gaussian diffusion over T steps (DDPM), with ADM's learned-range variance (module docstring)."""

    formulation, SAMPLERS, default_sampler = "ddpm", SAMPLERS, "dpm++2m"
    _STEPS = {"ddpm": 250, "ddim": 50, "dpm++2m": 25}

    def __init__(self, schedule="linear", timesteps=1000, prediction="eps", learn_sigma=False,
                 fixed_variance="large", betas=None, timestep_map=None, loss_type="l2"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        check_loss_type(loss_type)
        betas = make_betas(schedule, timesteps) if betas is None else np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must be a 1-D array with values in (0, 1]; the {schedule!r} schedule with "
                             f"T={len(betas)} gives max {betas.max():.3g} (the linear schedule needs T >= 20)")
        self.schedule, self.prediction, self.learn_sigma = schedule, prediction, learn_sigma
        self.fixed_variance, self.loss_type = fixed_variance, loss_type
        self._given = {"timesteps": timesteps, "timestep_map": timestep_map is not None}  # what config() records
        self.num_timesteps = T = len(betas)
        self.timestep_map = np.arange(T) if timestep_map is None else np.asarray(timestep_map)  # respaced: original t
        self.betas, alphas = betas, 1.0 - betas
        self.alphas_cumprod = ac = np.cumprod(alphas)                      # alpha-bar_t
        self.alphas_cumprod_prev = ac_prev = np.append(1.0, ac[:-1])       # alpha-bar_{t-1}
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = np.sqrt(ac), np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1.0)
        # posterior q(x_{t-1} | x_t, x_0), DDPM Eqs. 6-7
        self.posterior_variance = pv = betas * (1.0 - ac_prev) / (1.0 - ac)
        # pv[0] = 0: clip the log at t=0 to pv[1] (as ADM) so it stays finite
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if T > 1 else np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas, self.log_one_minus_alphas_cumprod = np.log(betas), np.log(1.0 - ac)  # learned range: top
        # fixed 'large' variance: beta_t, with the t=0 term set to beta~_1 as ADM does
        self.log_betas_fixed_large = np.log(np.append(pv[1], betas[1:])) if T > 1 else np.log(betas)
        self._tables, self._respaced = {}, {}  # caches: (name, device) -> tensor; (steps, spacing) -> respaced copy

    def config(self):
        """The constructor kwargs plus 'formulation', JSON-serialisable: make_diffusion(**d.config()) rebuilds d
        (betas always, and timestep_map when given, as lists)."""
        cfg = {"formulation": self.formulation, "schedule": self.schedule, "timesteps": int(self._given["timesteps"]),
               "prediction": self.prediction, "learn_sigma": bool(self.learn_sigma),
               "fixed_variance": self.fixed_variance, "loss_type": self.loss_type}
        cfg["betas"] = self.betas.tolist()
        if self._given["timestep_map"]:
            cfg["timestep_map"] = self.timestep_map.tolist()
        return cfg

    def respaced(self, steps, spacing="uniform"):
        """A copy keeping K of the T steps, 'uniform' in t (ADM/DiT) or 'logsnr': betas recomputed from the kept
        alpha-bars so q(x_t | x_0) is unchanged; the model still sees the ORIGINAL t (ADM respace.py)."""
        if spacing not in ("uniform", "logsnr"):
            raise ValueError(f"unknown step spacing {spacing!r}; choose 'uniform' or 'logsnr'")
        kept = space_timesteps(self.num_timesteps, steps)  # also checks 1 <= steps <= T
        if spacing == "logsnr":
            kept = logsnr_timesteps(self.alphas_cumprod, steps)
        ac = self.alphas_cumprod[kept]
        betas = 1.0 - ac / np.append(1.0, ac[:-1])
        return GaussianDiffusion(self.schedule, prediction=self.prediction, learn_sigma=self.learn_sigma,
                                 fixed_variance=self.fixed_variance, betas=betas, loss_type=self.loss_type,
                                 timestep_map=self.timestep_map[kept])

    def _table(self, name, device):
        """A schedule array as a tensor on `device`, copied once: no host sync per call. float64 (MPS: float32)."""
        key = (name, str(device))
        if key not in self._tables:
            arr = getattr(self, name)
            dtype = torch.float32 if device.type == "mps" and arr.dtype == np.float64 else None
            self._tables[key] = torch.from_numpy(arr).to(device, dtype)
        return self._tables[key]

    def _gather(self, name, t, x):
        """Schedule array `name` at t as (B, 1, 1, ...) for x; in >= float32 (x0 = 158 x_t - 158 eps fails in bf16)."""
        out = self._table(name, t.device)[t].to(torch.promote_types(x.dtype, torch.float32))
        return out.reshape(-1, *([1] * (x.ndim - 1)))

    # ----- forward process and posterior -----

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps  (DDPM Eq. 4)."""
        g = lambda a: self._gather(a, t, x0)
        return g("sqrt_alphas_cumprod") * x0 + g("sqrt_one_minus_alphas_cumprod") * noise

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)  (DDPM Eqs. 6-7)."""
        g = lambda a: self._gather(a, t, x_t)
        mean = g("posterior_mean_coef1") * x0 + g("posterior_mean_coef2") * x_t
        return mean, g("posterior_variance"), g("posterior_log_variance_clipped")

    # ----- the model's parameterisations -----

    def predict_x0_eps(self, pred, x_t, t):
        """(x0, eps) implied by the model's prediction of eps, x0 or v."""
        g = lambda a: self._gather(a, t, x_t)
        if self.prediction == "eps":
            return g("sqrt_recip_alphas_cumprod") * x_t - g("sqrt_recipm1_alphas_cumprod") * pred, pred
        a, s = g("sqrt_alphas_cumprod"), g("sqrt_one_minus_alphas_cumprod")
        if self.prediction == "x0":
            return pred, (x_t - a * pred) / s
        return a * x_t - s * pred, a * pred + s * x_t  # v = a eps - s x0  (Salimans & Ho §4)

    def target(self, x0, noise, t):
        if self.prediction != "v":
            return noise if self.prediction == "eps" else x0
        g = lambda a: self._gather(a, t, x0)
        return g("sqrt_alphas_cumprod") * noise - g("sqrt_one_minus_alphas_cumprod") * x0  # v (Salimans & Ho §4)

    def split_output(self, out, channels):
        """Model output -> (prediction, variance values or None)."""
        if out.shape[1] != (2 * channels if self.learn_sigma else channels):
            raise self._channels_error(out, channels)
        if not self.learn_sigma:
            return out, None
        return out[:, :channels], out[:, channels:]

    def _channels_error(self, out, channels):
        if not self.learn_sigma:
            return ValueError(f"model returned {out.shape[1]} channels, expected {channels}; "
                              "a learned-sigma model needs GaussianDiffusion(learn_sigma=True)")
        return ValueError(f"learn_sigma expects 2x{channels} output channels, got {out.shape[1]}; "
                          "build the model with learn_sigma=True or the diffusion with learn_sigma=False")

    def p_mean_variance(self, out, x_t, t, clip_denoised=False):
        """Mean and log variance of p(x_{t-1} | x_t) from the raw model output (DDPM Eq. 11 via x0)."""
        pred, var_values = self.split_output(out, x_t.shape[1])
        if var_values is None:
            log_var = self._fixed_log_variance(x_t, t)
        else:  # learned range, Improved DDPM Eq. 15: between log beta~_t and log beta_t
            frac = (var_values + 1) / 2
            lo, hi = self._gather("posterior_log_variance_clipped", t, x_t), self._gather("log_betas", t, x_t)
            log_var = frac * hi + (1 - frac) * lo
        x0, eps = self.predict_x0_eps(pred, x_t, t)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return mean, log_var, x0, eps

    def _fixed_log_variance(self, x_t, t):
        """'large': log beta_t (DDPM's CIFAR choice); 'small': log beta~_t, the posterior's."""
        name = "log_betas_fixed_large" if self.fixed_variance == "large" else "posterior_log_variance_clipped"
        return self._gather(name, t, x_t)

    # ----- training -----

    def training_noise(self, shape, generator=None, device=None):
        """(t, noise) for a training batch of `shape`: t ~ U{0..T-1}, noise ~ N(0, I) (as training_losses draws)."""
        t = torch.randint(0, self.num_timesteps, shape[:1], generator=generator, device=device)
        return t, torch.randn(shape, generator=generator, device=device)

    def training_losses(self, model, x0, t=None, noise=None, model_kwargs=None):
        """Per-sample 'mse' (L_simple, DDPM Eq. 14), 'l1' with loss_type 'l1' (then the 'loss'), and with learned
        sigma 'vb' (L_vlb in bits/dim, mean detached: Improved DDPM L_hybrid Eq. 16); t, noise drawn unless given."""
        if t is None or noise is None:
            t, noise = self._draws(x0, t, noise)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.network_t(t), **(model_kwargs or {}))
        pred, var_values = self.split_output(out, x0.shape[1])
        err = self.target(x0, noise, t) - pred.float()
        terms = {"mse": mean_flat(err ** 2)}
        if self.loss_type == "l1":
            terms["l1"] = mean_flat(err.abs())
        terms["loss"] = terms[self.loss_type.replace("l2", "mse")]
        if var_values is not None:  # the mean frozen: vb trains only the variance
            terms["vb"] = self._vb_terms_bpd(torch.cat([pred.detach(), var_values], dim=1), x0, x_t, t)
            terms["loss"] = terms["loss"] + terms["vb"]
        return terms

    def _vb_terms_bpd(self, out, x0, x_t, t):
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the decoder NLL L_0 at t = 0; bits."""
        out, x0, x_t = out.float(), x0.float(), x_t.float()
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var, _, _ = self.p_mean_variance(out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def network_t(self, t):
        """The network's time: respaced index t -> the original integer timestep the model was trained on."""
        return self._table("timestep_map", t.device)[t]

    # ----- likelihood -----

    def prior_bpd(self, x0):
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim: the L_T term."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean = self._gather("sqrt_alphas_cumprod", t, x0) * x0
        log_var = self._gather("log_one_minus_alphas_cumprod", t, x0)
        return mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)

    @torch.no_grad()
    def bits_per_dim(self, model, x0, model_kwargs=None, num_t=None, generator=None, progress=False):
        """Variational bound (negative ELBO) in bits/dim per sample: L_T + sum_t L_{t-1} + L_0.
        num_t=None sums all T terms; num_t=k is the unbiased estimate T/k * sum over k random distinct t.
        Needs a learned-sigma model or a fixed variance; eps/x0/v all work."""
        if isinstance(model, torch.nn.Module) and model.training:
            raise ValueError("bits_per_dim of a model in training mode (dropout on): call model.eval()")
        T = self.num_timesteps
        if num_t is None:
            ts, weight = torch.arange(T), 1.0
        else:
            if not 1 <= num_t <= T:
                raise ValueError(f"num_t must be in 1..{T}, got {num_t}")
            ts, weight = torch.randperm(T, generator=generator)[:num_t], T / num_t
        total = self.prior_bpd(x0)
        for t_val in tqdm(ts.tolist(), disable=not progress, desc="bits/dim"):
            t = torch.full((x0.shape[0],), t_val, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator).to(x0) if generator is not None \
                else torch.randn_like(x0)
            x_t = self.q_sample(x0, t, noise)
            out = model(x_t, self.network_t(t), **(model_kwargs or {}))
            total = total + weight * self._vb_terms_bpd(out, x0, x_t, t)
        return total

    # ----- sampling -----

    def nfe(self, sampler=None, steps=None):
        """Network calls per sample: one per step for every DDPM sampler."""
        return self._resolve(sampler, steps)[1]

    @torch.no_grad()
    def sample(self, model, shape, sampler=None, steps=None, *, model_kwargs=None, cfg_scale=1.0, null_label=None,
               cfg_channels=None, noise=None, generator=None, device=None, progress=False, clip_denoised=False,
               spacing=None, eta=None):
        """Samples x_0 of `shape` by the ddpm (DDPM Alg. 2), ddim (DDIM Eq. 12) or dpm++2m (DPM-Solver++ Alg. 2)
        sampler over `steps` respaced steps (None: the defaults); samplers, spacing, cfg_scale: module docstring."""
        sampler, steps, device, x = self._start_sampling(model, shape, sampler, steps, noise, generator, device)
        if eta is not None and sampler != "ddim":
            raise ValueError(f"eta is the DDIM sampler's option (DDIM Eq. 12); the {sampler} sampler takes none")
        model_kwargs = model_kwargs or {}
        key = (steps, spacing or ("logsnr" if sampler == "dpm++2m" else "uniform"))
        if key != (self.num_timesteps, "uniform") and key not in self._respaced:  # the full chain: self, as is
            self._respaced[key] = self.respaced(*key)
        diff = self._respaced.get(key, self)
        x0_prev = lam_prev = None  # carried by dpm++2m only: the previous step's x0 and its lambda
        for i in tqdm(range(diff.num_timesteps - 1, -1, -1), disable=not progress, desc=sampler):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            out = classifier_free_guidance(model, x, diff.network_t(t), model_kwargs, cfg_scale, null_label,
                                           cfg_channels)
            if sampler == "ddpm":
                x = diff._ddpm_step(out, x, t, i, clip_denoised, generator)
            elif sampler == "ddim":
                x = diff._ddim_step(out, x, t, i, eta, clip_denoised, generator)
            else:
                x, x0_prev, lam_prev = diff._dpm_solver_step(out, x, t, i, clip_denoised, x0_prev, lam_prev)
        return x

    def _noise_like(self, x, generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def _ddpm_step(self, out, x, t, i, clip, generator):
        """x_{t-1} = mu(x_t, x0) + sigma_t z, no noise at the last step  (DDPM Alg. 2)."""
        mean, log_var, _, _ = self.p_mean_variance(out, x, t, clip)
        if i == 0:
            return mean
        return mean + torch.exp(0.5 * log_var) * self._noise_like(x, generator)

    def _ddim_step(self, out, x, t, i, eta, clip, generator):
        """x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - c^2) eps + c z,
        c = eta sqrt((1 - ab_t/ab_s)(1 - ab_s)/(1 - ab_t)); the last step lands on ab = 1 (DDIM Eq. 12)."""
        eta = 0.0 if eta is None else eta
        pred, _ = self.split_output(out, x.shape[1])
        x0, eps = self.predict_x0_eps(pred, x, t)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - self._gather("sqrt_alphas_cumprod", t, x) * x0) / \
                self._gather("sqrt_one_minus_alphas_cumprod", t, x)
        ab, ab_prev = self._gather("alphas_cumprod", t, x), self._gather("alphas_cumprod_prev", t, x)
        c = eta * torch.sqrt((1 - ab / ab_prev) * (1 - ab_prev) / (1 - ab))
        x_prev = torch.sqrt(ab_prev) * x0 + torch.sqrt((1 - ab_prev - c ** 2).clamp(min=0)) * eps
        if eta > 0 and i > 0:
            x_prev = x_prev + c * self._noise_like(x, generator)
        return x_prev

    def _lambda(self, t_idx):
        """lambda = log(alpha / sigma) at respaced index t_idx (an int)."""
        ab = self.alphas_cumprod[t_idx]
        return 0.5 * math.log(ab) - 0.5 * math.log1p(-ab)

    def _dpm_solver_step(self, out, x, t, i, clip, x0_prev, lam_prev):
        """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), t -> s = t-1: x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) D
        with h = lambda_s - lambda_t, D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev, r = (lambda_t - lam_prev) / h; first
        order (D = x0_t) at the first and last steps. Returns (x_s, x0_t, lambda_t): the next x0_prev, lam_prev."""
        pred, _ = self.split_output(out, x.shape[1])
        x0, _ = self.predict_x0_eps(pred, x, t)
        if clip:
            x0 = x0.clamp(-1, 1)
        lam_t = self._lambda(i)
        if i == 0:  # sigma_s = 0: the update is exactly x0
            return x0, x0, lam_t
        ab, ab_s = self.alphas_cumprod[i], self.alphas_cumprod[i - 1]
        h = self._lambda(i - 1) - lam_t
        d = x0
        if x0_prev is not None:
            r = (lam_t - lam_prev) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        sigma_ratio = math.sqrt((1 - ab_s) / (1 - ab))
        return sigma_ratio * x - math.sqrt(ab_s) * math.expm1(-h) * d, x0, lam_t



FORMULATIONS = {"ddpm": GaussianDiffusion, "edm": EDM, "flow": FlowMatching}


def make_diffusion(formulation="ddpm", **kwargs):
    """The formulation's class built from a config() dict: make_diffusion(**d.config()) rebuilds d; an unknown
    formulation, or kwargs the class does not take, raise a ValueError naming them."""
    if formulation != "ddpm":
        _check_not_ddpm(formulation, kwargs)
    cls = FORMULATIONS[formulation]
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if not set(kwargs) <= params:
        raise ValueError(f"unknown {formulation!r} diffusion arguments {sorted(set(kwargs) - params)}; "
                         f"{cls.__name__} takes {sorted(params)}")
    return cls(**kwargs)


def _check_not_ddpm(formulation, kwargs):
    """The formulation must exist. Configs of older checkpoints recorded learn_sigma=False for EDM and flow too:
    accepted (popped; they have no learned variance), learn_sigma=True is an error."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose one of {tuple(FORMULATIONS)}")
    if kwargs.pop("learn_sigma", False):
        raise ValueError(f"the {formulation!r} formulation has no learned variance: learn_sigma=True is for 'ddpm' "
                         "only (build the model with learn_sigma=False)")

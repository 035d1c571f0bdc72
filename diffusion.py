"""
Gaussian diffusion shared by every backbone (DiT, U-ViT, DiffiT). Independent of them: a model is any
callable `model(x, t, **model_kwargs)` that takes integer timesteps t in 0..T-1.

Where each equation lives (read beside the papers):
  DDPM          Ho et al. 2020, arXiv 2006.11239   q(x_t|x_0) Eq. 4, posterior Eqs. 6-7, eps-mean Eq. 11,
                                                   L_simple Eq. 14, ancestral sampling Alg. 2, decoder Eq. 13
  Improved DDPM Nichol & Dhariwal 2021, 2102.09672 cosine schedule Eq. 17, learned-range Sigma Eq. 15,
                                                   L_hybrid Eq. 16, respacing §4
  DDIM          Song et al. 2021, 2010.02502       generalized step Eq. 12
  DPM-Solver++  Lu et al. 2022, 2211.01095         multistep 2M, Alg. 2
  CFG           Ho & Salimans 2022, 2207.12598     eps_u + s (eps_c - eps_u)
  v-prediction  Salimans & Ho 2022, 2202.00512     §4, Appendix D
  EDM           Karras et al. 2022, 2206.00364     preconditioning Table 1, sigma grid Eq. 5, training
                                                   Table 1 / §5, Heun + churn sampler Alg. 2
  Flow matching Lipman et al. 2023, 2210.02747     conditional flow matching, linear (OT) path
  Rectified flow Liu et al. 2023, 2209.03003       x_t = (1 - t) x_0 + t eps, velocity eps - x_0
  SiT           Ma et al. 2024, 2401.08740         velocity models on DiT backbones, Euler-Maruyama SDE sampling
  SD3           Esser et al. 2024, 2403.03206      t = 0 data / t = 1 noise convention, logit-normal t (§3.1)

Three formulations share one interface (`formulation`, `SAMPLERS`, `DEFAULT_STEPS`, `learn_sigma`, `config()`,
`training_losses`, `sample`): GaussianDiffusion ('ddpm'), EDM ('edm') and FlowMatching ('flow');
make_diffusion(**config) rebuilds any of them from its config().

All schedule arithmetic is float64 numpy; values are gathered per sample and cast to the input's dtype.
"""
import inspect
import math

import numpy as np
import torch
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------

SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTIONS = ("eps", "x0", "v")
SAMPLERS = ("ddpm", "ddim", "dpm++2m")
# The regression loss of every formulation: squared error (the papers' default) or absolute error (GenViT's
# L1 noise loss, lucidrains-style loss_type='l1'), on what the network itself regresses.
LOSS_TYPES = ("l2", "l1")


def _check_loss_type(loss_type):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def make_betas(schedule, timesteps=1000):
    """beta_1..beta_T in float64 for a named schedule."""
    if schedule == "linear":  # DDPM / ADM: 1e-4 -> 0.02 at T=1000, scaled so any T spans the same range
        scale = 1000 / timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
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
    """`steps` original steps spaced evenly in lambda = log(alpha/sigma) rather than in t: DPM-Solver's 'logSNR'
    grid, recommended for low-resolution pixel models. lambda is floored at -5.1 as DPM-Solver clips it (the
    cosine schedule reaches -9.9); the first step is always T-1. Targets that round to the same integer step
    are merged, then the widest gaps in t are split until exactly `steps` remain."""
    lam = 0.5 * np.log(alphas_cumprod) - 0.5 * np.log1p(-alphas_cumprod)
    T = len(lam)
    targets = np.linspace(max(lam[-1], min_lambda), lam[0], steps)
    kept = sorted({T - 1} | {int(np.abs(lam - v).argmin()) for v in targets[1:]})  # the noisiest target is T-1
    while len(kept) < steps:
        i = int(np.argmax(np.diff(kept)))
        kept.insert(i + 1, (kept[i] + kept[i + 1]) // 2)
    return kept


def power_cosine_guidance(scale, power=4.0, timesteps=1000):
    """MDT/DiffiT guidance schedule (DiffiT §5.8): s(t) = 1 + (s_max - 1) (1 - cos(pi ((T - t)/T)^power)) / 2.
    About 1 at the start of sampling (t near T), s_max at t = 0. Pass it as `cfg_scale` to any sampler."""
    def schedule(t):
        frac = (1.0 - t.float() / timesteps) ** power
        return 1.0 + (scale - 1.0) * 0.5 * (1.0 - torch.cos(math.pi * frac))
    return schedule


# ----------------------------------------------------------------------------------------------------
# Gaussian helpers (ADM's losses, in nats)
# ----------------------------------------------------------------------------------------------------

def mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


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
# Shared by every formulation: device, training-mode guard, classifier-free guidance
# ----------------------------------------------------------------------------------------------------

def _model_device(model, device):
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        return next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.device("cpu")


def _check_eval(model):
    if isinstance(model, torch.nn.Module) and model.training:
        raise ValueError("sampling a model in training mode (label and feature dropout on): call model.eval()")


def classifier_free_guidance(model, x, t_model, model_kwargs, cfg_scale=1.0, null_label=None, cfg_channels=None):
    """model(x, t_model, **model_kwargs), with classifier-free guidance when cfg_scale != 1 (Ho & Salimans 2022):
    one batched call on [x, x] with labels [y, null], then out_u + s (out_c - out_u) on the first `cfg_channels`
    output channels (all by default; 3 reproduces the official DiT); the remaining channels (and a learned
    sigma) come from the conditional half. cfg_scale is a float or a callable of the network time t_model.
    Whatever the model predicts (eps, x0, v, EDM's F, a velocity), the prediction of every formulation is affine
    in it with coefficients that do not depend on the label, so guiding the raw output guides eps, x0, the
    denoiser D and the velocity alike."""
    guided = callable(cfg_scale) or cfg_scale != 1.0
    if not guided:
        return model(x, t_model, **model_kwargs)
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


# ----------------------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """Discrete-time Gaussian diffusion over T steps (DDPM), with ADM's learned-range variance option.

    schedule      'linear' | 'cosine' | 'scaled_linear' (or pass `betas` directly)
    prediction    what the model outputs: 'eps' (default), 'x0' or 'v'
    learn_sigma   the model outputs 2C channels; the extra C are v in [-1, 1] (Improved DDPM Eq. 15)
    fixed_variance  without learned sigma: 'large' (sigma^2 = beta_t, DDPM's CIFAR choice and ADM's
                    default) or 'small' (sigma^2 = posterior variance beta~_t)
    loss_type     'l2' (L_simple) or 'l1' (mean |target - prediction|, GenViT's default)
    formulation   'ddpm' only; accepted so that GaussianDiffusion(**config()) works as make_diffusion(**config())

    DEFAULT_STEPS are the step counts to pass when a caller has none: DiT's 250-step DDPM sampler (DiT App.),
    50 DDIM steps (DDIM Table 1's middle setting), 25 DPM-Solver++(2M) steps (DPM-Solver's recommended 20-25).
    sample(steps=None) keeps its meaning: the full T-step chain.
    """

    formulation = "ddpm"
    SAMPLERS = SAMPLERS
    DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm++2m": 25}

    def __init__(self, schedule="linear", timesteps=1000, prediction="eps", learn_sigma=False,
                 fixed_variance="large", betas=None, timestep_map=None, loss_type="l2", formulation="ddpm"):
        if formulation != "ddpm":
            raise ValueError(f"GaussianDiffusion is the 'ddpm' formulation, got formulation={formulation!r}; "
                             "build other formulations with make_diffusion")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        _check_loss_type(loss_type)
        betas = make_betas(schedule, timesteps) if betas is None else np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must be a 1-D array with values in (0, 1]; the {schedule!r} schedule with "
                             f"T={len(betas)} gives max {betas.max():.3g} (the linear schedule needs T >= 20)")
        self.schedule, self.prediction, self.learn_sigma = schedule, prediction, learn_sigma
        self.fixed_variance, self.loss_type = fixed_variance, loss_type
        self._given = {"timesteps": timesteps, "betas": None if betas is None else betas.tolist(),
                       "timestep_map": None if timestep_map is None else np.asarray(timestep_map).tolist()}
        self.num_timesteps = T = len(betas)
        # the original index of each step; the identity unless this is a respaced copy
        self.timestep_map = np.arange(T) if timestep_map is None else np.asarray(timestep_map)

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = ac = np.cumprod(alphas)                      # alpha-bar_t
        self.alphas_cumprod_prev = ac_prev = np.append(1.0, ac[:-1])       # alpha-bar_{t-1}
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        # posterior q(x_{t-1} | x_t, x_0), DDPM Eqs. 6-7
        self.posterior_variance = pv = betas * (1.0 - ac_prev) / (1.0 - ac)
        # pv[0] = 0: clip the log at t=0 to pv[1] (as ADM) so it stays finite
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if T > 1 else np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)                                     # learned range: the upper end
        # fixed 'large' variance: beta_t, with the t=0 term set to beta~_1 as ADM does
        self.log_betas_fixed_large = np.log(np.append(pv[1], betas[1:])) if T > 1 else np.log(betas)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - ac)
        self._tables = {}  # (name, device) -> tensor, filled lazily by _table
        self._respaced = {}  # (steps, spacing) -> respaced copy, reused by every sample() call

    def config(self):
        """The constructor kwargs plus 'formulation', JSON-serialisable: make_diffusion(**d.config()) and
        GaussianDiffusion(**d.config()) rebuild d (explicit betas and timestep_map as lists, when given)."""
        cfg = {"formulation": self.formulation, "schedule": self.schedule, "timesteps": int(self._given["timesteps"]),
               "prediction": self.prediction, "learn_sigma": bool(self.learn_sigma),
               "fixed_variance": self.fixed_variance, "loss_type": self.loss_type}
        for key in ("betas", "timestep_map"):
            if self._given[key] is not None:
                cfg[key] = self._given[key]
        return cfg

    def respaced(self, steps, spacing="uniform"):
        """A copy that keeps K of the T steps: betas recomputed from the kept alpha-bars so that the
        marginals q(x_t | x_0) are unchanged; the model still sees the ORIGINAL t (ADM respace.py).
        spacing: 'uniform' in t (ADM/DiT) or 'logsnr' (uniform in lambda, see logsnr_timesteps)."""
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
        """A schedule array as a tensor on `device`, copied once and cached: no host-to-device copy (and no
        host sync) per call. float64 (MPS has none: float32)."""
        key = (name, str(device))
        if key not in self._tables:
            arr = getattr(self, name)
            dtype = torch.float32 if device.type == "mps" and arr.dtype == np.float64 else None
            self._tables[key] = torch.from_numpy(arr).to(device, dtype)
        return self._tables[key]

    def _gather(self, name, t, x):
        """Schedule array `name` at t, shaped to broadcast against x: (B,) -> (B, 1, 1, ...). Computed in at
        least float32: at t near T, x0 = 158 x_t - 158 eps cancels catastrophically in bf16."""
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
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        g = lambda a: self._gather(a, t, x0)
        return g("sqrt_alphas_cumprod") * noise - g("sqrt_one_minus_alphas_cumprod") * x0

    def split_output(self, out, channels):
        """Model output -> (prediction, variance values or None)."""
        if not self.learn_sigma:
            if out.shape[1] != channels:
                raise ValueError(f"model returned {out.shape[1]} channels, expected {channels}; "
                                 "a learned-sigma model needs GaussianDiffusion(learn_sigma=True)")
            return out, None
        if out.shape[1] != 2 * channels:
            raise ValueError(f"learn_sigma expects 2x{channels} output channels, got {out.shape[1]}; "
                             "build the model with learn_sigma=True or the diffusion with learn_sigma=False")
        return out[:, :channels], out[:, channels:]

    def p_mean_variance(self, out, x_t, t, clip_denoised=False):
        """Mean and log variance of p(x_{t-1} | x_t) from the raw model output (DDPM Eq. 11 via x0)."""
        pred, var_values = self.split_output(out, x_t.shape[1])
        g = lambda a: self._gather(a, t, x_t)
        if var_values is not None:  # learned range, Improved DDPM Eq. 15
            frac = (var_values + 1) / 2
            log_var = frac * g("log_betas") + (1 - frac) * g("posterior_log_variance_clipped")
        elif self.fixed_variance == "large":
            log_var = g("log_betas_fixed_large")
        else:
            log_var = g("posterior_log_variance_clipped")
        x0, eps = self.predict_x0_eps(pred, x_t, t)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return mean, log_var, x0, eps

    # ----- training -----

    def training_noise(self, shape, generator=None, device=None):
        """(t, noise) for a training batch of `shape`, as training_losses draws them: t ~ U{0..T-1}, noise ~ N(0, I).
        With one generator seeded per step, every process of a multi-process run draws the same global batch."""
        t = torch.randint(0, self.num_timesteps, shape[:1], generator=generator, device=device)
        return t, torch.randn(shape, generator=generator, device=device)

    def training_losses(self, model, x0, t=None, noise=None, model_kwargs=None):
        """Per-sample losses: 'mse' (L_simple, DDPM Eq. 14; with loss_type 'l1' also 'l1', the mean absolute
        error, which then replaces it in 'loss') and, with learned sigma, 'vb' (L_vlb term in bits/dim with the
        mean detached, so it trains only the variance: Improved DDPM L_hybrid Eq. 16)."""
        model_kwargs = model_kwargs or {}
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self._model_t(t), **model_kwargs)
        pred, var_values = self.split_output(out, x0.shape[1])
        err = self.target(x0, noise, t) - pred.float()
        terms = {"mse": mean_flat(err ** 2)}
        if self.loss_type == "l1":
            terms["l1"] = mean_flat(err.abs())
        terms["loss"] = terms[self.loss_type.replace("l2", "mse")]
        if var_values is not None:
            frozen = torch.cat([pred.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x0, x_t, t)
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

    def _model_t(self, t):
        """Respaced index -> the original timestep the model was trained on."""
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
            out = model(x_t, self._model_t(t), **(model_kwargs or {}))
            total = total + weight * self._vb_terms_bpd(out, x0, x_t, t)
        return total

    # ----- sampling -----

    def _guided_output(self, model, x, t, model_kwargs, cfg_scale, null_label, cfg_channels):
        """One model call at respaced step t, with classifier-free guidance when cfg_scale != 1:
        pred = pred_u + s (pred_c - pred_u) on the first `cfg_channels` prediction channels (all by
        default; 3 reproduces the official DiT); the remaining channels and sigma come from the
        conditional half. Guiding x0 or v is the same as guiding eps: they are affine in eps."""
        return classifier_free_guidance(model, x, self._model_t(t), model_kwargs, cfg_scale, null_label,
                                        cfg_channels)

    @torch.no_grad()
    def sample(self, model, shape, sampler="ddpm", steps=None, eta=0.0, model_kwargs=None, cfg_scale=1.0,
               null_label=None, cfg_channels=None, noise=None, generator=None, device=None, progress=False,
               clip_denoised=False, spacing=None):
        """Draw samples x_0 of `shape` by one of three samplers over `steps` respaced steps (default T).

        ddpm     ancestral sampling, DDPM Alg. 2, with the model's (learned or fixed) variance
        ddim     DDIM Eq. 12 with eta (0 = deterministic, 1 = DDPM-like)
        dpm++2m  DPM-Solver++(2M) in lambda = log(alpha/sigma), data prediction, one model call per step
        cfg_scale is a float or a callable of the original t (e.g. power_cosine_guidance(4.6)).
        spacing of the kept steps: 'uniform' in t (default for ddpm/ddim; DiT's 250-step sampler) or
        'logsnr' (default for dpm++2m: with linear betas, uniform-t steps make its last steps span huge
        lambda intervals; on Gaussian data 20 logSNR steps land within 2% of the true std).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        model_kwargs = model_kwargs or {}
        device = _model_device(model, device)
        x = torch.randn(shape, generator=generator, device=device) if noise is None else noise.to(device)
        _check_eval(model)
        spacing = spacing or ("logsnr" if sampler == "dpm++2m" else "uniform")
        if steps is None or (steps == self.num_timesteps and spacing == "uniform"):
            diff = self
        else:
            if (steps, spacing) not in self._respaced:
                self._respaced[(steps, spacing)] = self.respaced(steps, spacing)
            diff = self._respaced[(steps, spacing)]
        x0_prev = lam_prev = None  # carried by dpm++2m only: the previous step's x0 and its lambda
        for i in tqdm(range(diff.num_timesteps - 1, -1, -1), disable=not progress, desc=sampler):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            out = diff._guided_output(model, x, t, model_kwargs, cfg_scale, null_label, cfg_channels)
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
        """lambda = log(alpha / sigma) at respaced index t_idx (an int); +inf past the last step."""
        if t_idx < 0:
            return math.inf
        ab = self.alphas_cumprod[t_idx]
        return 0.5 * math.log(ab) - 0.5 * math.log1p(-ab)

    def _dpm_solver_step(self, out, x, t, i, clip, x0_prev, lam_prev):
        """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), from step t to s = t-1 with h = lambda_s - lambda_t:
        x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) D,  D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,
        r = h_prev / h = (lambda_t - lam_prev) / h. The first step (x0_prev None), and the final one into
        sigma = 0, are first order (D = x0_t). Returns (x_s, x0_t, lambda_t): the next step's x0_prev, lam_prev."""
        pred, _ = self.split_output(out, x.shape[1])
        x0, _ = self.predict_x0_eps(pred, x, t)
        if clip:
            x0 = x0.clamp(-1, 1)
        lam_t = self._lambda(i)
        if i == 0:  # sigma_s = 0: the update is exactly x0
            return x0, x0, lam_t
        ab, ab_s = self.alphas_cumprod[i], self.alphas_cumprod[i - 1]
        lam_s = self._lambda(i - 1)
        h = lam_s - lam_t
        d = x0
        if x0_prev is not None:
            r = (lam_t - lam_prev) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        sigma_ratio = math.sqrt((1 - ab_s) / (1 - ab))
        return sigma_ratio * x - math.sqrt(ab_s) * math.expm1(-h) * d, x0, lam_t


# ----------------------------------------------------------------------------------------------------
# Continuous-time formulations: EDM and flow matching
# ----------------------------------------------------------------------------------------------------

def _per_sample(v, x):
    """A float, 0-d or (B,) tensor -> (B,) tensor in at least float32 on x's device."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    v = torch.as_tensor(v, dtype=dtype, device=x.device)
    return v.expand(x.shape[0]) if v.ndim == 0 else v.to(dtype)


def _bcast(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _check_output(out, x, name):
    if out.shape[1] != x.shape[1]:
        raise ValueError(f"model returned {out.shape[1]} channels for {x.shape[1]}-channel inputs; {name} has no "
                         "learned variance (learn_sigma is DDPM-only): build the model with learn_sigma=False")
    return out


def _start_sampling(diff, model, shape, sampler, steps, noise, generator, device):
    """Checks shared by the EDM and flow samplers -> (steps, device, the standard-normal start noise)."""
    if sampler not in diff.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} for {diff.formulation}; choose one of {diff.SAMPLERS}")
    steps = diff.DEFAULT_STEPS[sampler] if steps is None else steps
    _check_steps(steps)
    device = _model_device(model, device)
    noise = torch.randn(shape, generator=generator, device=device) if noise is None else noise.to(device)
    _check_eval(model)
    return steps, device, noise


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampler steps must be a positive integer, got {steps!r}")


def _no_learned_sigma(learn_sigma, name):
    if learn_sigma:
        raise ValueError(f"{name} has no learned variance: learn_sigma=True is for the 'ddpm' formulation only "
                         "(build the model with learn_sigma=False)")


class EDM:
    """Karras et al. 2022 (EDM): x = y + sigma n, n ~ N(0, I), a preconditioned denoiser and the Heun sampler.

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)  with (EDM Table 1, "Ours")
        c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,       sd = sigma_data.
    Training: ln sigma ~ N(P_mean, P_std^2), loss lambda(sigma) ||D - y||^2, lambda = (sigma^2 + sd^2)/(sigma sd)^2
    (so that the effective target of F has unit weight, EDM §5). Sampling: Alg. 2 on the rho-grid of Eq. 5.

    The network's time (network_t). The backbones embed t with sinusoids cos/sin(t f_k), f_k = 10^(-4k/half),
    built for DDPM indices 0..999; c_noise = ln(sigma)/4 spans only [-1.55, 1.10] over [sigma_min, sigma_max].
    The network is nevertheless given c_noise itself, network_t(sigma) = ln(sigma)/4, exactly as EDM feeds its
    ADM network the same positional embedding (max period 10^4); the ~30 fastest of the 128 frequencies then
    vary smoothly over the whole sigma range. Decided by measurement against four affine maps of c_noise
    (10 c_noise, 100 c_noise, 1000 c_noise = 250 ln sigma, and 1000 (c_noise - c_noise(0.002)) / (c_noise(80) -
    c_noise(0.002)), which puts [0.002, 80] onto [0, 1000]): a 4-layer MLP denoiser (width 128) whose time input
    is the backbones' TimestepEmbedder (256 sinusoids -> Linear-SiLU-Linear), added to the hidden state or as
    DiT-style adaLN scale/shift, trained with this class's loss (Adam, lr 2e-3, batch 512, 3 seeds) on
    6-channel Gaussian data N(mu, s^2), s in [0.05, 0.5]. Excess of the weighted loss over the optimal
    denoiser's, lambda E||D - D*||^2 / dim averaged over the 18 Heun sigmas, mean of 3 seeds:
                          raw c_noise  10 c_noise  100 c_noise  250 ln sigma  onto [0, 1000]
        add,   400 steps     0.0094      0.0169      0.0155       0.0152        0.0220
        adaLN, 400 steps     0.0067      0.0090      0.0110       0.0106        0.0139
        add,  1500 steps     0.0049      0.0087      0.0082       0.0088        0.0113
        adaLN, 1500 steps    0.0049      0.0063      0.0065       0.0068        0.0075
    (the std of 18-step Heun samples differed from the optimal denoiser's by 2.3-3.9% for every map: no
    ranking). With the larger scalings adjacent sigmas of the 18-step grid get nearly orthogonal embeddings
    (smallest distance 10.6 for the [0, 1000] map vs 0.22 raw, embedding norm 11.3): the network must then learn
    its sigma-dependence from the few slow channels. A callable cfg_scale receives this network time (ln sigma/4).
    """

    formulation = "edm"
    SAMPLERS = ("heun", "euler")
    # EDM Table 2 / Alg. 2: 18 Heun steps = 35 evaluations (CIFAR-10); Euler at the same 35 evaluations
    DEFAULT_STEPS = {"heun": 18, "euler": 35}
    learn_sigma = False

    def __init__(self, sigma_data=0.5, P_mean=-1.2, P_std=1.2, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 learn_sigma=False, loss_type="l2", formulation="edm"):
        if formulation != "edm":
            raise ValueError(f"EDM is the 'edm' formulation, got formulation={formulation!r}")
        _no_learned_sigma(learn_sigma, "EDM")
        _check_loss_type(loss_type)
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
                "learn_sigma": False, "loss_type": self.loss_type}

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
        """sigma -> the network's time: c_noise = ln(sigma)/4 itself (EDM Table 1; the class docstring has the
        measurement behind feeding it unscaled). Float32, on sigma's device."""
        return (torch.log(torch.as_tensor(sigma)) / 4).float()  # no float64: MPS has none

    def denoise(self, model, x, sigma, **model_kwargs):
        """D(x; sigma) = c_skip x + c_out F(c_in x, network_t(sigma)); sigma a float or per-sample (B,)."""
        return self._denoise(model, x, sigma, model_kwargs)

    def _denoise(self, model, x, sigma, model_kwargs, cfg_scale=1.0, null_label=None, cfg_channels=None,
                 clip=False):
        sigma = _per_sample(sigma, x)
        c_skip, c_out, c_in, _ = (_bcast(c, x) for c in self.preconditioning(sigma))
        x_in = (c_in * x).to(x.dtype)
        out = classifier_free_guidance(model, x_in, self.network_t(sigma), model_kwargs, cfg_scale, null_label,
                                       cfg_channels)
        d = c_skip * x + c_out * _check_output(out, x, "EDM").to(c_out.dtype)
        return d.clamp(-1, 1) if clip else d

    # ----- training -----

    def training_noise(self, shape, generator=None, device=None):
        """(sigma, noise) for a training batch of `shape`: ln sigma ~ N(P_mean, P_std^2), noise ~ N(0, I)."""
        n = torch.randn(shape[:1], generator=generator, device=device)
        return torch.exp(self.P_mean + self.P_std * n), torch.randn(shape, generator=generator, device=device)

    def training_losses(self, model, x0, sigma=None, noise=None, model_kwargs=None):
        """Per-sample EDM loss: sigma = exp(P_mean + P_std n) unless given (a float or (B,)),
        'mse' = mean over dims of (D(x0 + sigma eps; sigma) - x0)^2, 'loss' = lambda(sigma) * mse; with loss_type
        'l1', 'l1' = mean |D - x0| and 'loss' = sqrt(lambda) * l1, the absolute error of F's effective target."""
        model_kwargs = model_kwargs or {}
        if sigma is None:
            sigma = torch.exp(self.P_mean + self.P_std * torch.randn((x0.shape[0],), device=x0.device))
        sigma = _per_sample(sigma, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        x = x0 + _bcast(sigma, x0).to(x0.dtype) * noise
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
        _check_steps(steps)
        i = torch.arange(steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        frac = i / (steps - 1) if steps > 1 else i
        grid = (hi + frac * (lo - hi)) ** self.rho
        return torch.cat([grid, torch.zeros(1, dtype=torch.float64)]).float()

    @torch.no_grad()
    def sample(self, model, shape, sampler="heun", steps=None, eta=0.0, model_kwargs=None, cfg_scale=1.0,
               null_label=None, cfg_channels=None, noise=None, generator=None, device=None, progress=False,
               clip_denoised=False, spacing=None, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0):
        """EDM Alg. 2 over `steps` sigmas (default DEFAULT_STEPS[sampler]): x = sigma_max * noise (noise a
        standard-normal draw, from `generator` when not given); at each sigma_i with S_min <= sigma_i <= S_max,
        churn raises it to sigma_hat = (1 + gamma) sigma_i, gamma = min(S_churn / steps, sqrt(2) - 1), adding
        fresh noise of std S_noise sqrt(sigma_hat^2 - sigma_i^2); then an Euler step of dx/dsigma = (x - D)/sigma
        to sigma_{i+1}, and for 'heun' the trapezoidal correction, skipped on the last step into sigma = 0:
        2 steps - 1 network evaluations (18 -> 35), 'euler' `steps`. CFG guides D (one batched 2B call per
        evaluation); a callable cfg_scale gets network_t(sigma). clip_denoised clamps D to [-1, 1].
        eta and spacing are accepted (the DDPM samplers' keywords) and ignored."""
        steps, device, noise = _start_sampling(self, model, shape, sampler, steps, noise, generator, device)
        model_kwargs = model_kwargs or {}
        sig = self.sigmas(steps).tolist()
        D = lambda x, s: self._denoise(model, x, s, model_kwargs, cfg_scale, null_label, cfg_channels, clip_denoised)
        x = noise * sig[0]
        for i in tqdm(range(steps), disable=not progress, desc=f"edm-{sampler}"):
            s_cur, s_next = sig[i], sig[i + 1]
            gamma = min(S_churn / steps, math.sqrt(2) - 1) if S_min <= s_cur <= S_max else 0.0
            s_hat = s_cur * (1 + gamma)
            x_hat = x
            if gamma > 0:
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x_hat = x + math.sqrt(s_hat ** 2 - s_cur ** 2) * S_noise * eps
            d = (x_hat - D(x_hat, s_hat)) / s_hat
            x = x_hat + (s_next - s_hat) * d
            if sampler == "heun" and s_next > 0:
                d_next = (x - D(x, s_next)) / s_next
                x = x_hat + (s_next - s_hat) * (0.5 * d + 0.5 * d_next)
        return x.to(noise.dtype)


class FlowMatching:
    """Flow matching / rectified flow with the linear path and velocity prediction (Lipman et al. 2023;
    Liu et al. 2023; SiT, Ma et al. 2024; SD3, Esser et al. 2024):
        x_t = (1 - t) x0 + t eps,  t in [0, 1],  target v = dx_t/dt = eps - x0,  loss ||v_theta(x_t, t) - v||^2.
    Time runs as in diffusion: t = 0 is data, t = 1 is noise (the SiT paper's and SD3's convention; Lipman et al.
    and the SiT code use the reverse). Sampling integrates dx/dt = v from t = 1 to t = 0. Why this end: the
    network time network_t(t) = 999 t then grows with the noise level exactly as the DDPM index does (999 = pure
    noise), so the shared backbones, their embeddings and time-dependent guidance (power_cosine_guidance expects
    ~T at the start of sampling and 0 at the end) apply unchanged, and SD3's logit-normal density is used as written.

    t_sampling  training times: 'uniform' U(0, 1) (SiT) or 'logit_normal' t = sigmoid(m + s n), n ~ N(0, 1)
                (SD3 §3.1, m = logit_mean, s = logit_std; SD3's best setting is m = 0, s = 1)
    network_t   999 t: [0, 1] onto the DDPM index range. Measured as for EDM's network_t (same MLP and data,
                trained with this class's loss and uniform t, 3 seeds): excess velocity loss E||v - v*||^2 / dim
                over the optimum, averaged over 50 t in (0, 1):
                                           raw t    100 t    999 t
                    add,   400 steps      0.0107   0.0092   0.0084
                    adaLN, 400 steps      0.0088   0.0071   0.0073
                    add,  1500 steps      0.0065   0.0053   0.0056
                    adaLN, 1500 steps     0.0063   0.0054   0.0056
                Raw t (SiT's code feeds t in [0, 1]) is 15-25% worse; 100 t and 999 t tie, and 999 t also gives
                the DDPM orientation above.

    Samplers, over the uniform grid t_i = i / steps:
      euler  x <- x + (t_{i-1} - t_i) v: `steps` evaluations
      heun   Euler, then the trapezoidal correction with v at t_{i-1}, on every step: unlike EDM's (x - D)/sigma
             the velocity is regular at t = 0 (v(x, 0) = -x), while an Euler last step (x0_hat from t = 1/steps)
             would limit accuracy on narrow data (25 steps, N(mu, 0.05^2): std -21% with it, +5% without):
             2 steps evaluations
      sde    SiT's Euler-Maruyama sampler of the reverse SDE with the same marginals,
                 dx = [v - w_t s] dt + sqrt(2 w_t) dW  (t decreasing),  s = grad log p_t = -E[eps | x_t] / t,
             with SiT's diffusion coefficient w_t = sigma_t = t (their sampler's default form 'sigma', norm 1), so
             a step of size h is x <- x - h (v + eps_hat) + sqrt(2 t h) z, eps_hat = x + (1 - t) v. The final step,
             from t_1 = 1/steps to 0, is the noiseless denoising step x0_hat = x - t_1 v = E[x0 | x_{t_1}]
             (= the Euler ODE step): `steps` evaluations. SiT stops at t = 0.04 and takes a 'Mean' step of that
             size; on N(mu, s^2) data that shrinks a channel of std 0.05 to 0.013 (x0_hat from 0.04: 0.038; from
             1/250: 0.0498), so the final step here starts from the last grid point instead.
    DEFAULT_STEPS: euler 50 (the fixed-step default of SiT's ODE sampler), heun 25 (the same 50 evaluations) and
    sde 250 (SiT's Euler-Maruyama default, 250 evaluations with the final step).
    """

    formulation = "flow"
    SAMPLERS = ("euler", "heun", "sde")
    DEFAULT_STEPS = {"euler": 50, "heun": 25, "sde": 250}
    T_SAMPLING = ("uniform", "logit_normal")
    learn_sigma = False

    def __init__(self, t_sampling="uniform", logit_mean=0.0, logit_std=1.0, learn_sigma=False, loss_type="l2",
                 formulation="flow"):
        if formulation != "flow":
            raise ValueError(f"FlowMatching is the 'flow' formulation, got formulation={formulation!r}")
        _no_learned_sigma(learn_sigma, "flow matching")
        _check_loss_type(loss_type)
        self.loss_type = loss_type
        if t_sampling not in self.T_SAMPLING:
            raise ValueError(f"unknown t_sampling {t_sampling!r}; choose one of {self.T_SAMPLING}")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        self.t_sampling, self.logit_mean, self.logit_std = t_sampling, float(logit_mean), float(logit_std)

    def config(self):
        """Constructor kwargs plus 'formulation' (JSON-serialisable); make_diffusion(**config()) rebuilds it."""
        return {"formulation": self.formulation, "t_sampling": self.t_sampling, "logit_mean": self.logit_mean,
                "logit_std": self.logit_std, "learn_sigma": False, "loss_type": self.loss_type}

    def network_t(self, t):
        """t in [0, 1] -> the network's time 999 t (float32): the DDPM index range, 999 = pure noise."""
        return (999 * torch.as_tensor(t)).float()

    def velocity(self, model, x, t, **model_kwargs):
        """v_theta(x, t) = model(x, network_t(t)); t a float or per-sample (B,)."""
        return self._velocity(model, x, t, model_kwargs)

    def _velocity(self, model, x, t, model_kwargs, cfg_scale=1.0, null_label=None, cfg_channels=None, clip=False):
        t = _per_sample(t, x)
        out = classifier_free_guidance(model, x, self.network_t(t), model_kwargs, cfg_scale, null_label,
                                       cfg_channels)
        v = _check_output(out, x, "flow matching")
        if clip:  # clamp x0_hat = x - t v to [-1, 1] and return the velocity that implies it (t > 0)
            tb = _bcast(t, x)
            x0 = (x - tb * v).clamp(-1, 1)
            v = torch.where(tb > 0, (x - x0) / tb.clamp(min=1e-12), v)
        return v

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
        """Per-sample conditional flow matching loss: 'mse' = mean over dims of (v_theta(x_t, t) - (eps - x0))^2,
        unweighted ('loss' = 'mse'; SD3's logit-normal weighting enters through the density of t); loss_type 'l1':
        'loss' = 'l1' = mean |v_theta - (eps - x0)|."""
        model_kwargs = model_kwargs or {}
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        t = _per_sample(t, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        tb = _bcast(t, x0)
        x_t = ((1 - tb) * x0 + tb * noise).to(x0.dtype)
        v = self.velocity(model, x_t, t, **model_kwargs)
        err = v.float() - (noise.float() - x0.float())
        mse = mean_flat(err ** 2)
        if self.loss_type == "l1":
            l1 = mean_flat(err.abs())
            return {"loss": l1, "mse": mse, "l1": l1}
        return {"loss": mse, "mse": mse}

    @torch.no_grad()
    def sample(self, model, shape, sampler="euler", steps=None, eta=0.0, model_kwargs=None, cfg_scale=1.0,
               null_label=None, cfg_channels=None, noise=None, generator=None, device=None, progress=False,
               clip_denoised=False, spacing=None):
        """Integrate from x_1 = noise (standard normal, from `generator` when not given) to t = 0 with 'euler',
        'heun' or 'sde' (see the class docstring) over `steps` uniform steps (default DEFAULT_STEPS[sampler]).
        CFG guides the velocity (one batched 2B call per evaluation); a callable cfg_scale gets network_t(t).
        clip_denoised clamps the implied x0 to [-1, 1]. eta and spacing are accepted and ignored."""
        steps, device, x = _start_sampling(self, model, shape, sampler, steps, noise, generator, device)
        model_kwargs = model_kwargs or {}
        V = lambda x, t: self._velocity(model, x, t, model_kwargs, cfg_scale, null_label, cfg_channels, clip_denoised)
        ts = [i / steps for i in range(steps, -1, -1)]  # 1, ..., 1/steps, 0
        for i in tqdm(range(steps), disable=not progress, desc=f"flow-{sampler}"):
            t, t_next = ts[i], ts[i + 1]
            v = V(x, t)
            if sampler == "sde":
                if t_next == 0:  # final denoising step: x0_hat = E[x0 | x_t]
                    x = x - t * v
                else:
                    h, eps_hat = t - t_next, x + (1 - t) * v
                    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                    x = x - h * (v + eps_hat) + math.sqrt(2 * t * h) * z
                continue
            x_next = x + (t_next - t) * v
            if sampler == "heun":  # v is regular at t = 0 (v(x, 0) = -x): no Euler last step needed
                x_next = x + (t_next - t) * 0.5 * (v + V(x_next, t_next))
            x = x_next
        return x


FORMULATIONS = {"ddpm": GaussianDiffusion, "edm": EDM, "flow": FlowMatching}


def make_diffusion(formulation="ddpm", **kwargs):
    """The formulation's class built from a config() dict: make_diffusion(**d.config()) rebuilds d. An unknown
    formulation, or kwargs the class does not take, raise a ValueError naming them."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose one of {tuple(FORMULATIONS)}")
    cls = FORMULATIONS[formulation]
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "formulation"}
    unknown = sorted(set(kwargs) - params)
    if unknown:
        raise ValueError(f"unknown {formulation!r} diffusion arguments {unknown}; {cls.__name__} takes "
                         f"{sorted(params)}")
    return cls(**kwargs)

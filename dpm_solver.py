"""
Singlestep DPM-Solver and DPM-Solver++ in continuous time, the samplers of U-ViT's official evaluation scripts
(baofff/U-ViT at ce55170; official.py gives each U-ViT release its script's sampler). Read beside:
  DPM-Solver    Lu et al. 2022, arXiv 2206.00927   noise prediction, DPM-Solver-1/2/3 (Algs. 1-2), DPM-Solver-fast
  DPM-Solver++  Lu et al. 2022, arXiv 2211.01095   data prediction (§4), singlestep DPM-Solver++(2S) (Alg. 1), (3S)
Samplers (`steps` = network evaluations per sample; both stop at t_end with no final denoising step):
  dpm3s    DPM-Solver-fast as eval.py / eval_ldm.py run dpm_solver_pytorch.py (fast_version=True): K = steps // 3 + 1
           steps on K + 1 times uniform in lambda from t = 1 to t_end, of orders [3] * (K - 1) + [2] (steps % 3 = 2;
           [3] * (K - 1) + [1] for 1, [3] * (K - 2) + [2, 1] for 0), inner times at r = 1/3, 2/3 (order 2: 1/2) of
           each step's lambda span (dpm_solver_pytorch.py:270-299, 509-589)
  dpm++3s  DPM-Solver++ as eval_ldm_discrete.py runs dpm_solver_pp.py (method 'fast', skip_type 'time_uniform',
           order 3): the same order list on steps + 1 times uniform in t, a step of order o spanning o intervals with
           its inner times on the grid, so r = (lambda_inner - lambda_s) / h (dpm_solver_pp.py:929-940)
Schedules: DiscreteVP (a discrete-time model's alphas-cumprod, log alpha interpolated linearly in t, as
dpm_solver_pp.py:98-163) and LinearVP (the VP-SDE beta(t) = 0.1 + 19.9 t of U-ViT's sde.VPSDE). The network gets
time_scale * t: 1000 t for U-ViT's discrete models (eval_ldm_discrete.py:97), 999 t for its continuous ones
(sde.py:174). lambda = log(alpha / sigma). Schedule arithmetic is float64; x keeps its dtype.
"""
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from formulations import check_eval, check_steps, classifier_free_guidance, model_device, per_sample


class VPSchedule:
    """x_t = alpha_t x_0 + sigma_t eps with alpha^2 + sigma^2 = 1; subclasses give log_alpha(t), inverse_lambda."""

    def alpha(self, t):
        return math.exp(self.log_alpha(t))

    def sigma(self, t):
        return math.sqrt(-math.expm1(2.0 * self.log_alpha(t)))

    def lam(self, t):
        """lambda_t = log(alpha_t / sigma_t), the half log-SNR: grows as t falls."""
        la = self.log_alpha(t)
        return la - 0.5 * math.log(-math.expm1(2.0 * la))


class DiscreteVP(VPSchedule):
    """A discrete schedule beta_1..beta_N in continuous t in [1/N, 1]: log alpha is 0.5 log abar_n at t = n/N and linear
    in t between (so the network time N t is fractional between the integer training labels n)."""

    def __init__(self, betas):
        betas = np.asarray(betas, dtype=np.float64)
        self.knots = np.arange(1, len(betas) + 1, dtype=np.float64) / len(betas)
        self.log_alphas = 0.5 * np.cumsum(np.log1p(-betas))

    def log_alpha(self, t):
        return float(np.interp(t, self.knots, self.log_alphas))

    def inverse_lambda(self, lam):
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)  # alpha^2 = sigmoid(2 lambda)
        return float(np.interp(log_alpha, self.log_alphas[::-1], self.knots[::-1]))


class LinearVP(VPSchedule):
    """VP-SDE with beta(t) = beta_0 + t (beta_1 - beta_0), t in [0, 1] (Song et al. 2021, Eq. 11; DDPM's linear
    schedule in continuous time): log alpha_t = -t^2 (beta_1 - beta_0) / 4 - t beta_0 / 2."""

    def __init__(self, beta_0=0.1, beta_1=20.0):
        self.beta_0, self.beta_1 = beta_0, beta_1

    def log_alpha(self, t):
        return -0.25 * t * t * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lam):
        """t >= 0 solving (beta_1 - beta_0) t^2 / 2 + beta_0 t = L, L = -2 log alpha, in a cancellation-free form."""
        L = float(np.logaddexp(0.0, -2.0 * lam))
        return 2.0 * L / (math.sqrt(self.beta_0 ** 2 + 2.0 * (self.beta_1 - self.beta_0) * L) + self.beta_0)


def fast_orders(steps):
    """DPM-Solver-fast's step orders for `steps` evaluations: K = steps // 3 + 1 steps, third order but the last."""
    K = steps // 3 + 1
    return {0: [3] * (K - 2) + [2, 1], 1: [3] * (K - 1) + [1], 2: [3] * (K - 1) + [2]}[steps % 3]


def phi2(z):
    """(e^z - 1) / z - 1, the second-order coefficient of the exponential integrator."""
    return math.expm1(z) / z - 1.0


class VPSolver:
    """dpm3s and dpm++3s (module docstring) for a model of `schedule` fed time_scale * t, from t = 1 to t_end."""

    SAMPLERS = ("dpm++3s", "dpm3s")

    def __init__(self, schedule, time_scale, t_end):
        self.schedule, self.time_scale, self.t_end = schedule, float(time_scale), float(t_end)

    def nfe(self, sampler=None, steps=50):
        return steps

    def spans(self, sampler, steps):
        """[(s, t, inner times, r or None)] of each step, with its order list."""
        sch, orders = self.schedule, fast_orders(steps)
        if sampler == "dpm++3s":  # time-uniform grid; a step's inner times are grid points
            ts, out, i = np.linspace(1.0, self.t_end, steps + 1).tolist(), [], 0
            for o in orders:
                out.append((ts[i], ts[i + o], ts[i + 1:i + o], None))
                i += o
            return out, orders
        lams = np.linspace(sch.lam(1.0), sch.lam(self.t_end), len(orders) + 1)  # logSNR-uniform grid
        ts = [sch.inverse_lambda(v) for v in lams]
        r = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}
        return [(ts[j], ts[j + 1], None, r[o]) for j, o in enumerate(orders)], orders

    @torch.no_grad()
    def sample(self, model, shape, sampler="dpm++3s", steps=50, *, model_kwargs=None, cfg_scale=1.0, null_label=None,
               cfg_channels=None, noise=None, generator=None, device=None, progress=False, clip_denoised=False):
        """x at t_end from noise at t = 1 (model(x, time_scale * t, **model_kwargs) predicts eps; CFG guides eps as
        formulations.classifier_free_guidance). clip_denoised is ignored: the official scripts do not clip."""
        if sampler not in self.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {self.SAMPLERS}")
        check_steps(steps)
        device = model_device(model, device)
        x = torch.randn(shape, generator=generator, device=device) if noise is None else noise.to(device)
        check_eval(model)
        sch, data = self.schedule, sampler == "dpm++3s"
        model_kwargs = model_kwargs or {}

        def predict(x, t):  # the guided eps, or for DPM-Solver++ the x0 it implies
            tau = per_sample(self.time_scale * t, x)
            eps = classifier_free_guidance(model, x, tau, model_kwargs, cfg_scale, null_label, cfg_channels)
            eps = eps[:, :x.shape[1]]  # a learned variance, if any, is not used
            return (x - sch.sigma(t) * eps) / sch.alpha(t) if data else eps

        spans, orders = self.spans(sampler, steps)
        for (s, t, inner, r), order in tqdm(list(zip(spans, orders)), disable=not progress, desc=sampler):
            x = self.step(predict, x, s, t, inner, r, order, data)
        return x

    def step(self, predict, x, s, t, inner, r, order, data):
        """One singlestep update s -> t. DPM-Solver (eps, lambda) and DPM-Solver++ (x0, -lambda, alpha and sigma
        exchanged) are one exponential integrator: x_u = (c_u / c_s) x - m_u (e^{r h} - 1) D_s + corrections, with
        (c, m, l) = (alpha, sigma, lambda) for eps and (sigma, alpha, -lambda) for x0, h = l_t - l_s."""
        sch = self.schedule
        c, m = (sch.sigma, sch.alpha) if data else (sch.alpha, sch.sigma)
        ell = (lambda u: -sch.lam(u)) if data else sch.lam
        h = ell(t) - ell(s)
        if inner is None:  # dpm3s: inner times at fixed fractions r of the lambda span
            inner = [sch.inverse_lambda(sch.lam(s) + rk * (sch.lam(t) - sch.lam(s))) for rk in r]
        else:  # dpm++3s: the r of the inner grid times
            r = [(ell(u) - ell(s)) / h for u in inner]
        d_s = predict(x, s)

        def first_order(u, ru):  # DPM-Solver-1 (DDIM) from s to u, r h of the span
            return c(u) / c(s) * x - m(u) * math.expm1(ru * h) * d_s
        if order == 1:
            return first_order(t, 1.0)
        d_1 = predict(first_order(inner[0], r[0]), inner[0])
        if order == 2:
            return first_order(t, 1.0) - (0.5 / r[0]) * m(t) * math.expm1(h) * (d_1 - d_s)
        x_2 = first_order(inner[1], r[1]) - (r[1] / r[0]) * m(inner[1]) * phi2(r[1] * h) * (d_1 - d_s)
        d_2 = predict(x_2, inner[1])
        return first_order(t, 1.0) - (1.0 / r[1]) * m(t) * phi2(h) * (d_2 - d_s)

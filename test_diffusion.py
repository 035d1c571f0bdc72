"""diffusion.py (GaussianDiffusion, make_diffusion) against closed forms, and every sampler against an exact oracle.

The oracle: for data x0 ~ N(mu, s^2) independently per dimension, x_t ~ N(a mu, a^2 s^2 + sigma^2) with
a = sqrt(ab_t), sigma = sqrt(1 - ab_t), and the optimal noise predictor is
E[eps | x_t] = sigma (x_t - a mu) / (a^2 s^2 + sigma^2). Samplers driven by it must return N(mu, s^2).
"""
import json
import math

import numpy as np
import pytest
import torch

from diffusion import (EDM, FlowMatching, GaussianDiffusion, discretized_gaussian_log_likelihood, make_betas,
                       make_diffusion, normal_kl, power_cosine_guidance, space_timesteps)
from conftest import MU, SHAPE, STD, TimeIgnoring, TwoOracles, moments, view

T = 1000


class GaussianOracle:
    """Exact eps (or x0 / v) predictor for data N(mu, std^2) per channel; optional exact reverse variance."""

    def __init__(self, diffusion, mu=MU, std=STD, learn_sigma=False, prediction="eps"):
        self.d, self.mu, self.std = diffusion, mu.double(), std.double()
        self.learn_sigma, self.prediction = learn_sigma, prediction
        self.respaced = None  # the respaced diffusion whose variance range the sampler uses

    def __call__(self, x, t, mu=None):
        """mu: (C,) or per-sample (B, C) data means; defaults to self.mu."""
        x = x.double()
        mu = self.mu if mu is None else mu.double()
        mu = mu.reshape(-1, x.shape[1], *([1] * (x.ndim - 2)))
        ab = torch.from_numpy(self.d.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
        a, sig, var = ab.sqrt(), (1 - ab).sqrt(), view(self.std ** 2, x)
        x0_mean = mu + a * var * (x - a * mu) / (a * a * var + sig * sig)  # E[x0 | x_t]
        eps = (x - a * x0_mean) / sig
        pred = {"eps": eps, "x0": x0_mean, "v": a * eps - sig * x0_mean}[self.prediction]
        if not self.learn_sigma:
            return pred.float()
        return torch.cat([pred, self._exact_v(t, x)], 1).float()

    def _exact_v(self, t_orig, x):
        """Learned-range value giving the exact reverse variance Var[x_{t-1} | x_t] of the respaced chain."""
        r = self.respaced
        i = torch.from_numpy(np.searchsorted(r.timestep_map, t_orig.numpy()))
        ab, ab_prev = torch.from_numpy(r.alphas_cumprod)[i], torch.from_numpy(r.alphas_cumprod_prev)[i]
        var = view(self.std ** 2, x)
        v_t = ab.reshape(-1, 1, 1, 1) * var + 1 - ab.reshape(-1, 1, 1, 1)
        v_prev = ab_prev.reshape(-1, 1, 1, 1) * var + 1 - ab_prev.reshape(-1, 1, 1, 1)
        alpha = (ab / ab_prev).reshape(-1, 1, 1, 1)
        log_true = torch.log(v_prev - alpha * v_prev ** 2 / v_t)
        lo = torch.from_numpy(r.posterior_log_variance_clipped)[i].reshape(-1, 1, 1, 1)
        hi = torch.from_numpy(np.log(r.betas))[i].reshape(-1, 1, 1, 1)
        return (2 * (log_true - lo) / (hi - lo) - 1).expand_as(x)


# ------------------------------------------------------------------ schedules and closed forms

def test_linear_schedule_alphabar_closed_form():
    d = GaussianDiffusion("linear", T)
    betas = np.linspace(1e-4, 0.02, T)
    assert d.betas.dtype == np.float64
    np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    np.testing.assert_allclose(make_betas("linear", 500)[[0, -1]], [2e-4, 0.04])  # scaled by 1000/T


def test_cosine_schedule_alphabar_closed_form():
    d = GaussianDiffusion("cosine", T)
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(T)
    unclipped = d.betas < 0.999
    np.testing.assert_allclose(d.alphas_cumprod[unclipped], (f(t + 1) / f(0))[unclipped], rtol=1e-9)
    assert d.betas.max() == pytest.approx(0.999)


def test_scaled_linear_schedule():
    b = make_betas("scaled_linear", T)
    np.testing.assert_allclose(b[[0, -1]], [0.00085, 0.012], rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(b), np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T), rtol=1e-12)


def test_posterior_variance_equals_gaussian_conditioning():
    d = GaussianDiffusion("linear", T)
    ab, ab_prev, alpha = d.alphas_cumprod, d.alphas_cumprod_prev, 1 - d.betas
    # x_{t-1} = sqrt(ab_{t-1}) x0 + ..., x_t = sqrt(alpha_t) x_{t-1} + ...: condition the joint on x_t
    cond_var = (1 - ab_prev) - alpha * (1 - ab_prev) ** 2 / (1 - ab)
    np.testing.assert_allclose(d.posterior_variance, cond_var, rtol=1e-9, atol=1e-15)
    assert d.posterior_variance[0] == 0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]  # ADM's clip at t=0


def test_q_posterior_mean_is_conditional_mean():
    d = GaussianDiffusion("cosine", 100)
    x0, xt = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 50, 99])
    mean, var, _ = d.q_posterior(x0, xt, t)
    ab, ab_prev = torch.from_numpy(d.alphas_cumprod)[t], torch.from_numpy(d.alphas_cumprod_prev)[t]
    alpha = (ab / ab_prev).reshape(-1, 1, 1, 1)
    m_prev = ab_prev.sqrt().reshape(-1, 1, 1, 1) * x0
    v_prev = (1 - ab_prev).reshape(-1, 1, 1, 1)
    expected = m_prev + alpha.sqrt() * v_prev / (1 - ab).reshape(-1, 1, 1, 1) * (xt - alpha.sqrt() * m_prev)
    torch.testing.assert_close(mean, expected)


def test_respacing_keeps_alphabar_subsequence_exactly():
    d = GaussianDiffusion("linear", T)
    kept = space_timesteps(T, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == T - 1 and kept[1] == 4
    r = d.respaced(250)
    np.testing.assert_array_equal(r.timestep_map, kept)
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-12)
    assert r.num_timesteps == 250
    with pytest.raises(ValueError, match="sampler steps"):
        d.respaced(0)


def test_model_sees_original_timesteps_when_respaced():
    seen = []

    def model(x, t):
        seen.extend(t.tolist())
        return torch.zeros_like(x)

    GaussianDiffusion("linear", T).sample(model, (1, 1, 2, 2), sampler="ddim", steps=10)
    assert seen == sorted(space_timesteps(T, 10), reverse=True)


def test_normal_kl_of_equal_gaussians_is_zero_and_matches_closed_form():
    m, lv = torch.randn(10), torch.randn(10)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-6  # zero up to float32 rounding
    # KL(N(0,1) || N(1, 4)) = log 2 + (1 + 1)/8 - 1/2
    assert normal_kl(torch.tensor(0.), torch.tensor(0.), torch.tensor(1.), torch.tensor(math.log(4))).item() \
        == pytest.approx(math.log(2) + 2 / 8 - 0.5, rel=1e-6)


def test_prediction_parameterisations_round_trip():
    x0, noise = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    for p in ("eps", "x0", "v"):
        d = GaussianDiffusion("linear", T, prediction=p)
        xt = d.q_sample(x0, t, noise)
        x0_hat, eps_hat = d.predict_x0_eps(d.target(x0, noise, t), xt, t)
        torch.testing.assert_close(x0_hat, x0)
        torch.testing.assert_close(eps_hat, noise)


# ------------------------------------------------------------------ losses and likelihood

def test_training_losses_l_simple_and_hybrid():
    torch.manual_seed(0)
    x0, noise, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4), torch.tensor([0, 7])
    d = GaussianDiffusion("linear", 100)
    zero = lambda x, t: torch.zeros_like(x)
    out = d.training_losses(zero, x0, t=t, noise=noise)
    torch.testing.assert_close(out["mse"], (noise ** 2).mean(dim=(1, 2, 3)))
    assert set(out) == {"loss", "mse"}

    # learned sigma: vb trains only the variance channels (the mean is detached)
    w = torch.zeros(1, 6, 1, 1, requires_grad=True)
    model = lambda x, t: torch.cat([x, x], 1) * w[:, :, 0:1, 0:1] + w
    d = GaussianDiffusion("linear", 100, learn_sigma=True)
    out = d.training_losses(model, x0, t=t, noise=noise)
    assert set(out) == {"loss", "mse", "vb"}
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    out["vb"].sum().backward()
    assert w.grad[:, :3].abs().max() == 0 and w.grad[:, 3:].abs().max() > 0


def test_bits_per_dim_of_a_perfect_model():
    """A model that knows x0 exactly and predicts the true posterior variance pays only L_T + L_0."""
    d = GaussianDiffusion("linear", 50, learn_sigma=True)
    x0 = torch.tensor([-0.5, 0.0, 0.25, 0.5], dtype=torch.float64).reshape(1, 4, 1, 1)

    seen = []

    def perfect(x, t):
        seen.extend(t.tolist())
        ab = torch.from_numpy(d.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], 1)  # v = -1: variance = clipped beta~_t

    bpd = d.bits_per_dim(perfect, x0.clone()).item()
    # L_0: N(x0, beta~_1) mass of the bin x0 +- 1/255, in bits (erf; the loss uses ADM's tanh cdf)
    sd = math.sqrt(d.posterior_variance[1])
    l0 = -math.log2(math.erf((1 / 255) / (sd * math.sqrt(2))))
    ab_T = d.alphas_cumprod[-1]
    prior = np.mean([0.5 * (-1 - math.log(1 - ab_T) + (1 - ab_T) + ab_T * v ** 2) for v in [-0.5, 0, .25, .5]])
    assert bpd == pytest.approx(l0 + prior / math.log(2), rel=2e-3)
    # num_t = k < T: L_T + (T/k) x the sum of k distinct random terms (unbiased: each t is drawn with prob. k/T).
    # Every t > 0 term is zero here (up to float32 round-off), so the estimate is L_T + (T/k) L_0 when t = 0 was
    # drawn and L_T alone when it was not; the model records which t it was called at.
    l_T, hits = d.prior_bpd(x0).item(), []
    for seed in range(20):
        seen.clear()
        est = d.bits_per_dim(perfect, x0.clone(), num_t=10, generator=torch.Generator().manual_seed(seed)).item()
        assert len(set(seen)) == 10
        hits.append(0 in seen)
        assert est == pytest.approx(l_T + 50 / 10 * (bpd - l_T) * hits[-1], abs=1e-5)
    assert 0 < sum(hits) < 20  # both cases occurred


def test_discretized_likelihood_edges_and_normalisation():
    # the 256 bins of one pixel value under a wide Gaussian sum to probability 1
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(bins, torch.zeros(256, dtype=torch.float64),
                                             torch.full((256,), math.log(0.5), dtype=torch.float64))
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-3)


# ------------------------------------------------------------------ samplers against the oracle

@pytest.mark.parametrize("steps", [1000, 100])
def test_ddpm_learned_range_exact_reverse_variance(steps):
    d = GaussianDiffusion("linear", T, learn_sigma=True)
    oracle = GaussianOracle(d, learn_sigma=True)
    oracle.respaced = d if steps == T else d.respaced(steps)
    x = d.sample(oracle, SHAPE, "ddpm", steps=steps, generator=torch.Generator().manual_seed(0))
    mean, std = moments(x)
    torch.testing.assert_close(mean, MU.double(), atol=0.012, rtol=0)
    torch.testing.assert_close(std, STD.double(), rtol=0.025, atol=1e-3)


# Deterministic samplers carry discretisation error on top of Monte Carlo error; the step counts below
# hold it under the tolerances (first order: DDIM error ~ 1/K; second order: DPM-Solver++ ~ 1/K^2).
@pytest.mark.parametrize("sampler,steps,prediction,spacing,rtol", [
    ("ddpm", 1000, "eps", "uniform", 0.03),    # fixed 'large' variance, full chain
    ("ddim", 1000, "eps", "uniform", 0.03),
    ("ddim", 500, "v", "uniform", 0.04),
    ("ddim", 500, "x0", "uniform", 0.04),
    ("dpm++2m", 20, "eps", "logsnr", 0.03),
    ("dpm++2m", 20, "x0", "logsnr", 0.03),
    ("dpm++2m", 200, "v", "uniform", 0.03),
])
def test_samplers_recover_gaussian_data(sampler, steps, prediction, spacing, rtol):
    d = GaussianDiffusion("linear", T, prediction=prediction)
    oracle = GaussianOracle(d, prediction=prediction)
    x = d.sample(oracle, SHAPE, sampler, steps=steps, spacing=spacing, generator=torch.Generator().manual_seed(1))
    mean, std = moments(x)
    torch.testing.assert_close(mean, MU.double(), atol=0.012, rtol=0)
    torch.testing.assert_close(std, STD.double(), rtol=rtol, atol=2e-3)


def test_dpm_solver_is_second_order_and_ddim_first_order():
    """Std error on the widest dimension: 4x the steps cuts DPM-Solver++'s error >= 8x, DDIM's ~4x.
    Same noise for every run, so Monte Carlo error cancels against the 1000-step reference."""
    d = GaussianDiffusion("linear", T)
    shape = (500, 6, 2, 2)
    oracle, noise = GaussianOracle(d), torch.randn(shape, generator=torch.Generator().manual_seed(5))
    std = lambda s, k: moments(d.sample(oracle, shape, s, steps=k, noise=noise, spacing="uniform"))[1][-1]
    ref = std("ddim", T)  # both solvers converge to the same probability-flow ODE solution
    err = lambda s, k: abs(std(s, k) - ref)
    assert err("dpm++2m", 50) / err("dpm++2m", 200) > 8
    assert 2.5 < err("ddim", 50) / err("ddim", 200) < 6


def test_logsnr_spacing_is_uniform_in_lambda():
    d = GaussianDiffusion("linear", T)
    kept = d.respaced(20, "logsnr").timestep_map
    lam = 0.5 * np.log(d.alphas_cumprod / (1 - d.alphas_cumprod))[kept]
    assert len(kept) == 20 and kept[0] == 0 and kept[-1] == T - 1
    assert np.ptp(np.diff(lam)) < 0.6  # the nearest-integer grid is within one step of uniform
    with pytest.raises(ValueError, match="spacing"):
        d.respaced(20, "quadratic")
    # cosine reaches lambda = -9.9: floored at -5.1 as DPM-Solver does, and exactly the steps asked for
    c = GaussianDiffusion("cosine", T)
    lam_c = 0.5 * np.log(c.alphas_cumprod / (1 - c.alphas_cumprod))
    for k in (10, 25, 100, 999):
        kept = c.respaced(k, "logsnr").timestep_map
        assert len(set(kept)) == k and kept[0] == 0 and kept[-1] == T - 1
    assert lam_c[c.respaced(25, "logsnr").timestep_map[-2]] > -5.1 - 0.5


def test_ddim_eta_one_and_cosine_schedule():
    d = GaussianDiffusion("cosine", T)
    x = d.sample(GaussianOracle(d), SHAPE, "ddim", steps=500, eta=1.0, generator=torch.Generator().manual_seed(2))
    mean, std = moments(x)
    torch.testing.assert_close(mean, MU.double(), atol=0.012, rtol=0)
    torch.testing.assert_close(std, STD.double(), rtol=0.04, atol=2e-3)


def test_samplers_are_deterministic_given_a_generator():
    d = GaussianDiffusion("linear", T)
    o = GaussianOracle(d)
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        eta = {"eta": 0.5} if sampler == "ddim" else {}  # DDIM's option only
        a = d.sample(o, (8, 6, 2, 2), sampler, steps=20, generator=torch.Generator().manual_seed(3), **eta)
        b = d.sample(o, (8, 6, 2, 2), sampler, steps=20, generator=torch.Generator().manual_seed(3), **eta)
        assert torch.equal(a, b)


def test_eta_is_ddims_option_only():
    d, o = GaussianDiffusion("linear", 100), lambda x, t: torch.zeros_like(x)
    for sampler in ("ddpm", "dpm++2m"):
        with pytest.raises(ValueError, match="eta is the DDIM sampler's option"):
            d.sample(o, (1, 1, 2, 2), sampler, steps=5, eta=0.0)
    assert d.sample(o, (1, 1, 2, 2), "ddim", steps=5, eta=1.0, generator=torch.Generator().manual_seed(0)).shape \
        == (1, 1, 2, 2)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "ddpm"])
def test_classifier_free_guidance_moves_the_mean_as_theory_says(sampler):
    # the mean is exact for every sampler (the map is affine); the std is checked by the tests above
    """With equal variances, eps_u + w (eps_c - eps_u) is the oracle of N(mu_u + w (mu_c - mu_u), s^2)."""
    d = GaussianDiffusion("linear", T)
    mu_c, mu_u, w = torch.full((6,), 0.4), torch.full((6,), -0.2), 2.5
    oracle = TwoOracles(GaussianOracle(d), mu_c, mu_u, null=10)
    y = torch.zeros(SHAPE[0], dtype=torch.long)
    x = d.sample(oracle, SHAPE, sampler, steps=50, model_kwargs={"y": y}, cfg_scale=w, null_label=10,
                 generator=torch.Generator().manual_seed(4))
    mean, _ = moments(x)
    torch.testing.assert_close(mean, (mu_u + w * (mu_c - mu_u)).double(), atol=0.015, rtol=0)
    # the official DiT mode guides only the first 3 channels; the rest follow the conditional model
    x = d.sample(oracle, SHAPE, sampler, steps=50, model_kwargs={"y": y}, cfg_scale=w, null_label=10,
                 cfg_channels=3, generator=torch.Generator().manual_seed(4))
    mean, _ = moments(x)
    expected = torch.cat([mu_u[:3] + w * (mu_c[:3] - mu_u[:3]), mu_c[3:]]).double()
    torch.testing.assert_close(mean, expected, atol=0.015, rtol=0)


def test_guidance_needs_labels_and_null_and_valid_channels():
    d = GaussianDiffusion("linear", 100)
    with pytest.raises(ValueError, match="null_label"):
        d.sample(lambda x, t, y=None: x, (1, 1, 2, 2), "ddim", cfg_scale=2.0, model_kwargs={"y": torch.zeros(1)})
    with pytest.raises(ValueError, match="cfg_channels"):  # 4 would guide the variance of a 2-channel model
        GaussianDiffusion("linear", 100, learn_sigma=True).sample(
            lambda x, t, y: torch.cat([x, x], 1), (2, 2, 2, 2), "ddim", cfg_scale=2.0, null_label=5,
            cfg_channels=4, model_kwargs={"y": torch.zeros(2, dtype=torch.long)})


def test_sampling_refuses_a_model_in_training_mode():
    model, d = TimeIgnoring(), GaussianDiffusion("linear", 100)
    with pytest.raises(ValueError, match="eval"):
        d.sample(model, (1, 1, 2, 2), "ddim", steps=5)
    with pytest.raises(ValueError, match="eval"):
        d.bits_per_dim(model, torch.zeros(1, 1, 2, 2))
    assert d.sample(model.eval(), (1, 1, 2, 2), "ddim", steps=5).shape == (1, 1, 2, 2)


def test_bf16_inputs_keep_the_schedule_in_float32():
    """x0 = sqrt(1/ab) x_t - sqrt(1/ab - 1) eps cancels at t = T-1 (coefficients ~158): with bf16 arithmetic
    the result is off by ~3 on data in [-1, 1]. Given bf16 inputs, the arithmetic must still be float32."""
    d = GaussianDiffusion("linear", T)
    xt, eps, t = torch.randn(64, 3, 4, 4).bfloat16(), torch.randn(64, 3, 4, 4).bfloat16(), torch.full((64,), T - 1)
    x0_hat, _ = d.predict_x0_eps(eps, xt, t)
    assert x0_hat.dtype == torch.float32
    ab = d.alphas_cumprod[-1]
    exact = xt.double() / math.sqrt(ab) - eps.double() * math.sqrt(1 / ab - 1)
    assert (x0_hat.double() - exact).abs().max() < 1e-3


def test_schedule_tables_are_copied_to_the_device_once(monkeypatch):
    """On a GPU each numpy -> device copy is a host sync: after the first use, no step may make one."""
    import diffusion
    d, o = GaussianDiffusion("linear", T, learn_sigma=True), lambda x, t: torch.cat([x, x], 1)
    run = lambda: (d.sample(o, (2, 3, 1, 1), "ddpm", steps=10), d.sample(o, (2, 3, 1, 1), "dpm++2m", steps=10),
                   d.training_losses(o, torch.zeros(2, 3, 1, 1)))
    run()  # the first use copies the tables (of this diffusion and its respaced copies) once
    calls = []
    monkeypatch.setattr(diffusion.torch, "from_numpy", lambda a: calls.append(a) or torch.as_tensor(a))
    run()
    assert calls == []


def test_power_cosine_guidance_gets_the_original_t():
    s = power_cosine_guidance(4.6, power=4)  # its closed form: test_formulations.py
    # a schedule is accepted by every sampler in place of a constant scale
    d = GaussianDiffusion("linear", T)
    oracle = TwoOracles(GaussianOracle(d), torch.full((6,), 0.4), torch.full((6,), -0.2), null=10)
    seen = []
    recording = lambda t: seen.append(t[0].item()) or s(t)
    x = d.sample(oracle, (2, 6, 2, 2), "dpm++2m", steps=10, model_kwargs={"y": torch.zeros(2, dtype=torch.long)},
                 cfg_scale=recording, null_label=10)
    assert seen == sorted(d.respaced(10, "logsnr").timestep_map.tolist(), reverse=True)  # original t, per step
    assert torch.isfinite(x).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="noise schedule"):
        GaussianDiffusion("quadratic")
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="score")
    with pytest.raises(ValueError, match="sampler"):
        GaussianDiffusion().sample(lambda x, t: x, (1, 1, 2, 2), "euler")
    with pytest.raises(ValueError, match="learn_sigma"):
        GaussianDiffusion(learn_sigma=True).training_losses(lambda x, t: x, torch.zeros(1, 3, 2, 2))


# ------------------------------------------------------------------ make_diffusion

def test_make_diffusion_round_trips_config():
    cases = [GaussianDiffusion(), GaussianDiffusion("cosine", 500, prediction="v", learn_sigma=True),
             GaussianDiffusion().respaced(10, "logsnr"), EDM(sigma_data=1.0, rho=5.0),
             FlowMatching("logit_normal", 0.2, 1.1)]
    for d in cases:
        cfg = json.loads(json.dumps(d.config()))
        assert cfg["formulation"] == d.formulation and set(d.DEFAULT_STEPS) == set(d.SAMPLERS)
        r = make_diffusion(**cfg)
        assert type(r) is type(d) and r.config() == d.config()
    r = make_diffusion(**cases[2].config())
    np.testing.assert_allclose(r.alphas_cumprod, cases[2].alphas_cumprod, rtol=1e-12)
    np.testing.assert_array_equal(r.timestep_map, cases[2].timestep_map)
    assert make_diffusion(**GaussianDiffusion("cosine").config()).schedule == "cosine"
    with pytest.raises(TypeError, match="formulation"):  # the class takes only its own options
        GaussianDiffusion(**GaussianDiffusion("cosine").config())
    assert GaussianDiffusion().DEFAULT_STEPS == {"ddpm": 250, "ddim": 50, "dpm++2m": 25}
    assert isinstance(make_diffusion(), GaussianDiffusion)  # the default formulation
    with pytest.raises(ValueError, match="'score'"):
        make_diffusion("score")
    with pytest.raises(ValueError, match=r"\['P_mean_x', 'sigma'\]"):
        make_diffusion("edm", sigma=1.0, P_mean_x=0.0)
    with pytest.raises(ValueError, match="schedule"):
        make_diffusion("flow", schedule="linear")


def test_make_diffusion_rebuilds_old_checkpoint_configs():
    """Configs recorded by older train_cifar.py versions: no formulation (DDPM), or learn_sigma=False beside EDM
    and flow, which have no learned variance."""
    old = make_diffusion(schedule="linear", timesteps=1000, prediction="eps", learn_sigma=True, fixed_variance="large")
    assert isinstance(old, GaussianDiffusion) and old.learn_sigma
    for cfg, cls in [({"formulation": "edm"}, EDM), ({"formulation": "flow"}, FlowMatching),
                     ({"formulation": "edm", "learn_sigma": False, "loss_type": "l2"}, EDM),
                     ({"formulation": "flow", "learn_sigma": False}, FlowMatching)]:
        d = make_diffusion(**cfg)
        assert type(d) is cls and d.learn_sigma is False and make_diffusion(**d.config()).config() == d.config()
    for f in ("edm", "flow"):
        with pytest.raises(ValueError, match="learn_sigma=True is for 'ddpm' only"):
            make_diffusion(f, learn_sigma=True)

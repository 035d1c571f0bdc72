"""EDM and flow matching (diffusion.py) against closed forms, and every sampler against an exact oracle.

The oracles: for data x0 ~ N(mu, s^2) independently per dimension,
  EDM   x = x0 + sigma n ~ N(mu, s^2 + sigma^2) and the optimal denoiser is
        D*(x; sigma) = E[x0 | x] = (s^2 x + sigma^2 mu) / (s^2 + sigma^2);
  flow  x_t = (1 - t) x0 + t eps ~ N((1 - t) mu, V_t), V_t = (1 - t)^2 s^2 + t^2, and the optimal velocity is
        v*(x, t) = E[eps - x0 | x_t] = t r - (mu + (1 - t) s^2 r),  r = (x - (1 - t) mu) / V_t.
The oracles see only what a network sees (c_in x and the network time for EDM; x_t and the network time for
flow) and recover sigma, x and t by inverting the mappings written out below from the papers, so the tests
pin network_t and the preconditioning as well. Samplers driven by them must return N(mu, s^2).
"""
import json
import math

import numpy as np
import pytest
import torch

from diffusion import EDM, FlowMatching, GaussianDiffusion, make_diffusion, power_cosine_guidance

MU = torch.tensor([-0.6, -0.2, 0.0, 0.3, 0.5, 0.8])
STD = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
SHAPE = (4000, 6, 2, 2)  # 16,000 draws per channel: mean s.e. ~ std / 126


def view(v, x):
    return v.reshape(-1, x.shape[1], *([1] * (x.ndim - 2))).to(x)


def moments(x):
    return x.double().mean(dim=(0, 2, 3)), x.double().std(dim=(0, 2, 3))


def edm_sigma_from_t(t):
    """Inverse of EDM.network_t: the network time is c_noise = ln(sigma) / 4 itself (EDM Table 1)."""
    return torch.exp(4 * t.double())


def flow_t_from_network_t(t):
    """Inverse of FlowMatching.network_t = 999 t."""
    return t.double() / 999


class EDMOracle:
    """F = (D* - c_skip x) / c_out from the network inputs (c_in x, c_noise), EDM Table 1 coefficients."""

    def __init__(self, mu=MU, std=STD, sigma_data=0.5):
        self.mu, self.std, self.sd = mu.double(), std.double(), sigma_data
        self.calls, self.batches = 0, []

    def __call__(self, x_in, t, mu=None):
        self.calls += 1
        self.batches.append(x_in.shape[0])
        sd, dtype = self.sd, x_in.dtype
        sigma = edm_sigma_from_t(t).reshape(-1, *([1] * (x_in.ndim - 1)))
        x = x_in.double() * torch.sqrt(sigma ** 2 + sd ** 2)  # undo c_in
        var, mu = view(self.std ** 2, x), view(self.mu if mu is None else mu.double(), x)
        d = (var * x + sigma ** 2 * mu) / (var + sigma ** 2)
        c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / torch.sqrt(sigma ** 2 + sd ** 2)
        return ((d - c_skip * x) / c_out).to(dtype)


class FlowOracle:
    def __init__(self, mu=MU, std=STD):
        self.mu, self.std = mu.double(), std.double()
        self.calls, self.batches = 0, []

    def __call__(self, x, t, mu=None):
        self.calls += 1
        self.batches.append(x.shape[0])
        dtype, x = x.dtype, x.double()
        t = flow_t_from_network_t(t).reshape(-1, *([1] * (x.ndim - 1)))
        var, mu = view(self.std ** 2, x), view(self.mu if mu is None else mu.double(), x)
        r = (x - (1 - t) * mu) / ((1 - t) ** 2 * var + t ** 2)
        return (t * r - (mu + (1 - t) * var * r)).to(dtype)


class TwoOracles:
    """Conditional oracle N(mu_c, s^2) for y != null, unconditional N(mu_u, s^2) for the null label."""

    def __init__(self, oracle, mu_c, mu_u, null):
        self.o, self.mu_c, self.mu_u, self.null = oracle, mu_c, mu_u, null

    def __call__(self, x, t, y):
        return self.o(x, t, mu=torch.where((y == self.null)[:, None], self.mu_u, self.mu_c))


def assert_gaussian(x, rtol, mu=MU, std=STD, atol_mean=0.012):
    mean, sd = moments(x)
    torch.testing.assert_close(mean, mu.double(), atol=atol_mean, rtol=0)
    torch.testing.assert_close(sd, std.double(), rtol=rtol, atol=2e-3)


# ------------------------------------------------------------------ EDM closed forms

def test_edm_preconditioning_and_loss_weight_match_table_1():
    e, sd = EDM(), 0.5
    for s in (0.002, 0.05, 0.5, 1.0, 7.0, 80.0):
        c_skip, c_out, c_in, c_noise = (float(c) for c in e.preconditioning(torch.tensor(s, dtype=torch.float64)))
        assert c_skip == pytest.approx(sd ** 2 / (s ** 2 + sd ** 2), rel=1e-12)
        assert c_out == pytest.approx(s * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert c_in == pytest.approx(1 / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert c_noise == pytest.approx(math.log(s) / 4, rel=1e-12)
        assert float(e.loss_weight(torch.tensor(s, dtype=torch.float64))) == \
            pytest.approx((s ** 2 + sd ** 2) / (s * sd) ** 2, rel=1e-12)
        assert float(e.network_t(s)) == pytest.approx(math.log(s) / 4, rel=1e-6)
    # denoise = c_skip x + c_out F(c_in x, c_noise), checked with a model that records its inputs
    x, seen = torch.randn(3, 2, 2, 2, dtype=torch.float64), {}

    def model(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.ones_like(x_in)

    sigma = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    d = e.denoise(model, x, sigma)
    s4 = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_in"], x / torch.sqrt(s4 ** 2 + sd ** 2))
    torch.testing.assert_close(seen["t"], (torch.log(sigma) / 4).float())
    torch.testing.assert_close(d, sd ** 2 / (s4 ** 2 + sd ** 2) * x + s4 * sd / torch.sqrt(s4 ** 2 + sd ** 2))


def test_edm_sigma_grid_is_eq_5():
    e = EDM()
    s = e.sigmas(18)
    assert s.dtype == torch.float32 and s.shape == (19,)
    i = np.arange(18, dtype=np.float64)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s[:-1].numpy(), expected.astype(np.float32), rtol=1e-7)
    assert s[0] == 80 and s[-2] == pytest.approx(0.002) and s[-1] == 0 and (s.diff() < 0).all()
    assert EDM().sigmas(1).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="steps"):
        e.sigmas(0)


def test_edm_training_losses_per_sample_values_and_sigma_distribution():
    e = EDM()
    torch.manual_seed(0)
    x0, noise = torch.rand(3, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.01, 0.5, 20.0])
    zero = lambda x, t: torch.zeros_like(x)  # F = 0: D = c_skip x
    out = e.training_losses(zero, x0, sigma=sigma, noise=noise)
    assert set(out) == {"loss", "mse"} and out["loss"].shape == out["mse"].shape == (3,)
    s4 = sigma.reshape(-1, 1, 1, 1)
    mse = ((0.25 / (s4 ** 2 + 0.25) * (x0 + s4 * noise) - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["loss"], (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 * mse)
    # default sigma: ln sigma ~ N(P_mean, P_std^2), read back from the network time the model is given
    seen = []
    e.training_losses(lambda x, t: seen.append(t) or torch.zeros_like(x), torch.zeros(20000, 1, 1, 1))
    log_sigma = torch.log(edm_sigma_from_t(seen[0]))
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.2, rel=0.02)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_edm_optimal_denoiser_has_the_analytic_loss(sigma):
    """E[lambda (D* - x0)^2] = lambda Var[x0 | x] = lambda s^2 sigma^2 / (s^2 + sigma^2), per dimension."""
    e, g = EDM(), torch.Generator().manual_seed(1)
    x0 = MU.reshape(1, 6, 1, 1) + STD.reshape(1, 6, 1, 1) * torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    loss = e.training_losses(EDMOracle(), x0, sigma=sigma, noise=noise)["loss"].mean().item()
    var = STD.double() ** 2
    expected = ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 * (var * sigma ** 2 / (var + sigma ** 2)).mean()).item()
    assert loss == pytest.approx(expected, rel=0.03)
    wrong = EDMOracle(mu=MU + 0.1)  # a perturbed denoiser pays more
    assert e.training_losses(wrong, x0, sigma=sigma, noise=noise)["loss"].mean().item() > 1.02 * loss


# ------------------------------------------------------------------ EDM samplers against the oracle

@pytest.mark.parametrize("sampler,steps,churn,rtol", [
    ("heun", 64, 0.0, 0.03),     # deterministic Alg. 2 (18 steps are +11% on the std-0.05 channel: see below)
    ("euler", 320, 0.0, 0.03),   # first order: many more steps for the same tolerance
    ("heun", 128, 80.0, 0.035),  # stochastic Alg. 2: churn in [0.05, 50] as EDM's ImageNet setting (Table 5)
])
def test_edm_samplers_recover_gaussian_data(sampler, steps, churn, rtol):
    x = EDM().sample(EDMOracle(), SHAPE, sampler, steps=steps, S_churn=churn, S_min=0.05, S_max=50,
                     generator=torch.Generator().manual_seed(0))
    assert_gaussian(x, rtol)


def final_x(d, oracle, sampler, steps, noise):
    return d.sample(oracle, noise.shape, sampler, steps=steps, noise=noise)


@pytest.mark.parametrize("formulation,sampler,low,high", [
    ("edm", "heun", 3.0, 6.0), ("edm", "euler", 1.6, 2.6),
    ("flow", "heun", 3.0, 6.0), ("flow", "euler", 1.6, 2.6),
])
def test_convergence_order(formulation, sampler, low, high):
    """Error of the final x for one fixed float64 noise against a 1280-step Heun reference: doubling the steps
    cuts it ~4x for Heun (second order), ~2x for Euler (first order)."""
    d, oracle = (EDM(), EDMOracle()) if formulation == "edm" else (FlowMatching(), FlowOracle())
    noise = torch.randn((64, 6, 1, 1), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = final_x(d, oracle, "heun", 1280, noise)
    err = lambda k: (final_x(d, oracle, sampler, k, noise) - ref).pow(2).mean().sqrt().item()
    k = 20 if sampler == "heun" else 40
    e1, e2, e3 = err(k), err(2 * k), err(4 * k)
    assert low < e1 / e2 < high and low < e2 / e3 < high, (e1, e2, e3)


def test_edm_evaluation_counts_default_steps_and_guidance_batches():
    e, shape = EDM(), (3, 6, 1, 1)
    o = EDMOracle()
    e.sample(o, shape)  # the default: 18 Heun steps, Euler into sigma = 0
    assert o.calls == 35 and set(o.batches) == {3}
    o = EDMOracle()
    e.sample(o, shape, "euler", steps=18)
    assert o.calls == 18
    o = TwoOracles(EDMOracle(), MU, MU, null=10)
    e.sample(o, shape, "heun", steps=18, cfg_scale=2.0, null_label=10,
             model_kwargs={"y": torch.zeros(3, dtype=torch.long)})
    assert o.o.calls == 35 and set(o.o.batches) == {6}  # one batched call of 2B per evaluation
    assert e.DEFAULT_STEPS == {"heun": 18, "euler": 35}


# ------------------------------------------------------------------ flow matching

def test_flow_training_losses_per_sample_values_and_t_distributions():
    f = FlowMatching()
    torch.manual_seed(0)
    x0, noise, t = torch.rand(3, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4), torch.tensor([0.0, 0.3, 1.0])
    seen = {}

    def model(x, t_net):
        seen["x"], seen["t"] = x, t_net
        return torch.zeros_like(x)

    out = f.training_losses(model, x0, t=t, noise=noise)
    assert set(out) == {"loss", "mse"} and out["loss"].shape == (3,)
    t4 = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], (1 - t4) * x0 + t4 * noise)  # t = 0 data, t = 1 noise
    torch.testing.assert_close(seen["t"], 999 * t)
    torch.testing.assert_close(out["mse"], ((noise - x0) ** 2).mean(dim=(1, 2, 3)))  # target v = eps - x0
    torch.testing.assert_close(out["loss"], out["mse"])
    # training times: uniform, or logit-normal (SD3 §3.1) with logit(t) ~ N(m, s^2)
    for d, check in [(FlowMatching(), lambda t: (t.mean(), t.var()) == (pytest.approx(0.5, abs=0.01),
                                                                          pytest.approx(1 / 12, rel=0.03))),
                     (FlowMatching("logit_normal", 0.5, 0.8),
                      lambda t: (torch.logit(t).mean(), torch.logit(t).std()) == (pytest.approx(0.5, abs=0.02),
                                                                                  pytest.approx(0.8, rel=0.03)))]:
        seen = []
        d.training_losses(lambda x, tn: seen.append(tn) or torch.zeros_like(x), torch.zeros(20000, 1, 1, 1))
        t = flow_t_from_network_t(seen[0])
        assert (t >= 0).all() and (t <= 1).all() and check(t)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_flow_optimal_velocity_has_the_analytic_loss(t):
    """Var[eps - x0 | x_t] = Var[x0 | x_t] / t^2 = s^2 / ((1 - t)^2 s^2 + t^2), per dimension."""
    f, g = FlowMatching(), torch.Generator().manual_seed(2)
    x0 = MU.reshape(1, 6, 1, 1) + STD.reshape(1, 6, 1, 1) * torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    loss = f.training_losses(FlowOracle(), x0, t=t, noise=noise)["loss"].mean().item()
    var = STD.double() ** 2
    assert loss == pytest.approx((var / ((1 - t) ** 2 * var + t ** 2)).mean().item(), rel=0.03)
    assert f.training_losses(FlowOracle(mu=MU + 0.1), x0, t=t, noise=noise)["loss"].mean().item() > 1.02 * loss


@pytest.mark.parametrize("sampler,steps,rtol", [
    ("euler", 320, 0.03),
    ("heun", 50, 0.03),
    ("sde", None, 0.03),  # the default: SiT's 250 Euler-Maruyama steps, then the denoising step
])
def test_flow_samplers_recover_gaussian_data(sampler, steps, rtol):
    x = FlowMatching().sample(FlowOracle(), SHAPE, sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert_gaussian(x, rtol)


def test_flow_evaluation_counts():
    f, shape = FlowMatching(), (3, 6, 1, 1)
    for sampler, steps, calls in [("euler", None, 50), ("heun", None, 50), ("sde", None, 250),
                                  ("euler", 7, 7), ("heun", 7, 14), ("sde", 7, 7)]:
        o = FlowOracle()
        f.sample(o, shape, sampler, steps=steps, generator=torch.Generator().manual_seed(0))
        assert o.calls == calls, sampler
    o = TwoOracles(FlowOracle(), MU, MU, null=10)
    f.sample(o, shape, "heun", steps=5, cfg_scale=3.0, null_label=10,
             model_kwargs={"y": torch.zeros(3, dtype=torch.long)})
    assert o.o.calls == 10 and set(o.o.batches) == {6}


# ------------------------------------------------------------------ guidance, guards, configs

@pytest.mark.parametrize("formulation,sampler,steps", [("edm", "heun", 18), ("edm", "euler", 35),
                                                       ("flow", "euler", 50), ("flow", "heun", 25),
                                                       ("flow", "sde", 100)])
def test_classifier_free_guidance_moves_the_mean_as_theory_says(formulation, sampler, steps):
    """With equal variances both D* and v* are affine in mu with the same slope in x: guiding them with scale w
    gives the oracle of N(mu_u + w (mu_c - mu_u), s^2), and the mean is exact for every sampler."""
    d, make = (EDM(), EDMOracle) if formulation == "edm" else (FlowMatching(), FlowOracle)
    mu_c, mu_u, w = torch.full((6,), 0.4), torch.full((6,), -0.2), 2.5
    oracle = TwoOracles(make(), mu_c, mu_u, null=10)
    kw = dict(model_kwargs={"y": torch.zeros(SHAPE[0], dtype=torch.long)}, cfg_scale=w, null_label=10)
    x = d.sample(oracle, SHAPE, sampler, steps=steps, generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(moments(x)[0], (mu_u + w * (mu_c - mu_u)).double(), atol=0.015, rtol=0)
    x = d.sample(oracle, SHAPE, sampler, steps=steps, cfg_channels=3, generator=torch.Generator().manual_seed(4), **kw)
    expected = torch.cat([mu_u[:3] + w * (mu_c[:3] - mu_u[:3]), mu_c[3:]]).double()
    torch.testing.assert_close(moments(x)[0], expected, atol=0.015, rtol=0)


def test_callable_guidance_gets_the_network_time():
    y = {"y": torch.zeros(2, dtype=torch.long)}
    for d, o, sampler, times in [
            (EDM(), EDMOracle(), "euler", lambda: [math.log(s) / 4 for s in EDM().sigmas(6).tolist()[:-1]]),
            (FlowMatching(), FlowOracle(), "euler", lambda: [999 * i / 6 for i in range(6, 0, -1)])]:
        seen = []
        s = power_cosine_guidance(3.0)
        d.sample(TwoOracles(o, MU, MU, 10), (2, 6, 1, 1), sampler, steps=6, model_kwargs=y, null_label=10,
                 cfg_scale=lambda t: seen.append(t[0].item()) or s(t))
        np.testing.assert_allclose(seen, times(), rtol=1e-5)


def test_sampling_is_deterministic_and_ignores_ddpm_keywords():
    for d, o, sampler, kw in [(EDM(), EDMOracle(), "heun", {"S_churn": 10.0}),
                              (FlowMatching(), FlowOracle(), "sde", {})]:
        run = lambda **extra: d.sample(o, (8, 6, 1, 1), sampler, steps=10, generator=torch.Generator().manual_seed(3),
                                       **kw, **extra)
        a = run()
        assert torch.equal(a, run()) and torch.equal(a, run(eta=1.0, spacing="logsnr"))


class TimeIgnoring(torch.nn.Module):
    def __init__(self, out_channels=1):
        super().__init__()
        self.m = torch.nn.Conv2d(1, out_channels, 1)

    def forward(self, x, t):
        return self.m(x)


@pytest.mark.parametrize("d", [EDM(), FlowMatching()])
def test_guards_training_mode_learned_sigma_and_bad_arguments(d):
    model = TimeIgnoring()
    with pytest.raises(ValueError, match="eval"):
        d.sample(model, (1, 1, 2, 2), steps=3)
    assert d.sample(model.eval(), (1, 1, 2, 2), steps=3).shape == (1, 1, 2, 2)
    two_c = TimeIgnoring(out_channels=2).eval()  # a learned-sigma model: 2C outputs
    with pytest.raises(ValueError, match="learn_sigma"):
        d.sample(two_c, (1, 1, 2, 2), steps=3)
    with pytest.raises(ValueError, match="learn_sigma"):
        d.training_losses(two_c, torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="learn_sigma"):
        type(d)(learn_sigma=True)
    with pytest.raises(ValueError, match="sampler"):
        d.sample(model, (1, 1, 2, 2), "ddim")
    with pytest.raises(ValueError, match="null_label"):
        d.sample(lambda x, t, y=None: x, (1, 1, 2, 2), steps=2, cfg_scale=2.0, model_kwargs={"y": torch.zeros(1)})
    assert d.learn_sigma is False and d.formulation in ("edm", "flow")
    assert set(d.DEFAULT_STEPS) == set(d.SAMPLERS)


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
    assert GaussianDiffusion(**GaussianDiffusion("cosine").config()).schedule == "cosine"
    assert GaussianDiffusion().DEFAULT_STEPS == {"ddpm": 250, "ddim": 50, "dpm++2m": 25}
    assert isinstance(make_diffusion(), GaussianDiffusion)  # the default formulation
    with pytest.raises(ValueError, match="'score'"):
        make_diffusion("score")
    with pytest.raises(ValueError, match=r"\['P_mean_x', 'sigma'\]"):
        make_diffusion("edm", sigma=1.0, P_mean_x=0.0)
    with pytest.raises(ValueError, match="schedule"):
        make_diffusion("flow", schedule="linear")


# ----- The L1 loss option (GenViT's loss_type='l1') -----

def test_l1_loss_closed_form_in_every_formulation():
    """With a zero network the errors are known in closed form: DDPM eps-prediction |0 - eps|; EDM D = c_skip x, so
    loss = sqrt(lambda) mean|c_skip x - x0|; flow |0 - (eps - x0)|. 'mse' stays the squared error beside it."""
    zero = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    mean = lambda v: v.flatten(1).mean(1)  # noqa: E731
    ddpm = make_diffusion(formulation="ddpm", loss_type="l1").training_losses(zero, x0, torch.tensor([0, 5, 999]), noise)
    torch.testing.assert_close(ddpm["loss"], mean(noise.abs()))
    torch.testing.assert_close(ddpm["mse"], mean(noise ** 2))
    edm = make_diffusion(formulation="edm", loss_type="l1")
    sigma = torch.tensor([0.1, 1.0, 10.0])
    got = edm.training_losses(zero, x0, sigma, noise)
    c_skip = (0.25 / (sigma ** 2 + 0.25))[:, None, None, None]
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(got["loss"], lam.sqrt() * mean((c_skip * (x0 + sigma[:, None, None, None] * noise)
                                                              - x0).abs()))
    flow = make_diffusion(formulation="flow", loss_type="l1").training_losses(zero, x0, torch.tensor([0.2, 0.5, 0.9]),
                                                                              noise)
    torch.testing.assert_close(flow["loss"], mean((noise - x0).abs()))
    for f in ("ddpm", "edm", "flow"):  # recorded, rebuilt, and checked
        assert make_diffusion(**make_diffusion(formulation=f, loss_type="l1").config()).loss_type == "l1"
        with pytest.raises(ValueError, match="unknown loss_type"):
            make_diffusion(formulation=f, loss_type="huber")

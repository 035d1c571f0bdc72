"""formulations.py, the interface the three formulations share: exact network-call counts (nfe) and defaults of
every sampler, the Euler/Heun integrator's order, guidance, the guards, sampler options and the L1 loss in every
formulation. Samplers are driven by conftest.py's exact oracles for data N(mu, s^2) per dimension (EDM's optimal
denoiser, flow matching's optimal velocity), written from the papers, so the tests pin network_t and the
preconditioning as well.
"""
import math

import numpy as np
import pytest
import torch

from diffusion import EDM, FlowMatching, GaussianDiffusion, make_diffusion
from conftest import MU, SHAPE, EDMOracle, FlowOracle, TimeIgnoring, TwoOracles, moments
from formulations import classifier_free_guidance, euler_heun, power_cosine_guidance


# ------------------------------------------------------------------ the interface: defaults and exact nfe

class Counting:
    """A model that counts its calls and returns zeros (a valid prediction for every formulation)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return torch.zeros_like(x)


FORMULATIONS = [GaussianDiffusion(), EDM(), FlowMatching()]


@pytest.mark.parametrize("d", FORMULATIONS, ids=lambda d: d.formulation)
def test_nfe_counts_the_real_network_calls_of_every_sampler(d):
    for sampler in (None, *d.SAMPLERS):
        for steps in (None, 1, 2, 7):
            m = Counting()
            d.sample(m, (2, 3, 1, 1), sampler, steps, generator=torch.Generator().manual_seed(0))
            assert m.calls == d.nfe(sampler, steps), (sampler, steps)
    assert d.nfe() == d.nfe(d.default_sampler, d.default_steps(d.default_sampler))


def test_defaults_and_nfe_values():
    ddpm, edm, flow = FORMULATIONS
    assert (ddpm.formulation, ddpm.default_sampler, ddpm.SAMPLERS) == ("ddpm", "dpm++2m", ("ddpm", "ddim", "dpm++2m"))
    assert (edm.formulation, edm.default_sampler, edm.SAMPLERS) == ("edm", "heun", ("heun", "euler"))
    assert (flow.formulation, flow.default_sampler, flow.SAMPLERS) == ("flow", "euler", ("euler", "heun", "sde"))
    usual = [{"ddpm": 250, "ddim": 50, "dpm++2m": 25}, {"heun": 18, "euler": 35}, {"euler": 50, "heun": 25, "sde": 250}]
    for d, steps in zip(FORMULATIONS, usual):
        assert {s: d.default_steps(s) for s in d.SAMPLERS} == steps == d.DEFAULT_STEPS  # and the old name, an alias
        assert d.default_steps() == d.default_steps(d.default_sampler)
    assert edm.nfe("heun", 18) == 35 and ddpm.nfe("ddpm", 250) == 250  # EDM Table 2: 35 NFE
    assert flow.nfe("heun", 10) == 20 and flow.nfe("heun") == 50 and edm.nfe("euler") == 35
    with pytest.raises(ValueError, match="sampler"):
        flow.nfe("ddim")
    with pytest.raises(ValueError, match="steps"):
        ddpm.nfe("ddim", 0)


@pytest.mark.parametrize("d", FORMULATIONS, ids=lambda d: d.formulation)
def test_none_means_the_default_sampler_and_steps(d):
    noise = torch.randn((2, 3, 1, 1), generator=torch.Generator().manual_seed(1))
    o = lambda x, t: 0.5 * x  # noqa: E731
    a = d.sample(o, noise.shape, noise=noise, generator=torch.Generator().manual_seed(2))
    b = d.sample(o, noise.shape, d.default_sampler, d.default_steps(d.default_sampler), noise=noise,
                 generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("d", FORMULATIONS, ids=lambda d: d.formulation)
def test_training_losses_draw_through_training_noise(d):
    x0 = torch.randn(4, 3, 2, 2)
    torch.manual_seed(7)
    t, noise = d.training_noise(x0.shape)
    expected = d.training_losses(lambda x, t: x, x0, t, noise)
    torch.manual_seed(7)
    got = d.training_losses(lambda x, t: x, x0)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_euler_heun_integrator_counts_and_exact_linear_steps():
    """dx/dt = x over [0, 1]: Euler multiplies by (1 + h), Heun by (1 + h + h^2/2) per step."""
    calls = []
    f = lambda x, t: calls.append(t) or x  # noqa: E731
    ts = [0.0, 0.5, 1.0]
    assert euler_heun(f, torch.ones(1, dtype=torch.float64), ts, heun=False).item() == 1.5 ** 2 and len(calls) == 2
    calls.clear()
    assert euler_heun(f, torch.ones(1, dtype=torch.float64), ts, heun=True).item() == 1.625 ** 2
    assert calls == [0.0, 0.5, 0.5, 1.0]
    calls.clear()
    assert euler_heun(f, torch.ones(1, dtype=torch.float64), ts, heun=True, euler_last=True).item() == 1.625 * 1.5
    assert len(calls) == 3


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


# ------------------------------------------------------------------ guidance, guards, sampler options

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


def test_sampling_is_deterministic_and_takes_only_its_own_options():
    for d, o, sampler, kw in [(EDM(), EDMOracle(), "heun", {"S_churn": 10.0}),
                              (FlowMatching(), FlowOracle(), "sde", {})]:
        run = lambda **extra: d.sample(o, (8, 6, 1, 1), sampler, steps=10, generator=torch.Generator().manual_seed(3),
                                       **kw, **extra)
        a = run()
        assert torch.equal(a, run())
        for extra in ({"eta": 1.0}, {"spacing": "logsnr"}):  # the DDPM samplers' keywords: no longer ignored
            with pytest.raises(TypeError, match=next(iter(extra))):
                run(**extra)
    with pytest.raises(TypeError, match="S_churn"):
        FlowMatching().sample(FlowOracle(), (2, 6, 1, 1), S_churn=1.0)


def test_power_cosine_guidance_schedule_closed_form():
    s = power_cosine_guidance(4.6, power=4)
    vals = s(torch.tensor([999, 500, 0]))
    assert vals[0].item() == pytest.approx(1.0, abs=1e-6)
    assert vals[2].item() == pytest.approx(4.6)
    assert vals[1].item() == pytest.approx(1 + 3.6 * 0.5 * (1 - math.cos(math.pi * 0.5 ** 4)))


def test_classifier_free_guidance_is_one_batched_call():
    seen = []

    def model(x, t, y):  # the conditional prediction is x, the unconditional (null label 0) one is 0
        seen.append((x.shape[0], y.tolist()))
        return x * (y != 0).float()[:, None]
    x, t, y = torch.ones(2, 2), torch.zeros(2), torch.tensor([3, 3])
    out = classifier_free_guidance(model, x, t, {"y": y}, cfg_scale=2.0, null_label=0)
    assert seen == [(4, [3, 3, 0, 0])]
    torch.testing.assert_close(out, 2.0 * x)  # 0 + 2 (x - 0)
    torch.testing.assert_close(classifier_free_guidance(model, x, t, {"y": y}), x)  # unguided: one plain call
    assert seen[1] == (2, [3, 3])


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
        make_diffusion(d.formulation, learn_sigma=True)
    with pytest.raises(TypeError, match="learn_sigma"):  # the constructors take no option they would ignore
        type(d)(learn_sigma=True)
    with pytest.raises(TypeError, match="formulation"):
        type(d)(formulation=d.formulation)
    with pytest.raises(ValueError, match="sampler"):
        d.sample(model, (1, 1, 2, 2), "ddim")
    with pytest.raises(ValueError, match="null_label"):
        d.sample(lambda x, t, y=None: x, (1, 1, 2, 2), steps=2, cfg_scale=2.0, model_kwargs={"y": torch.zeros(1)})
    assert d.learn_sigma is False and d.formulation in ("edm", "flow")
    assert set(d.DEFAULT_STEPS) == set(d.SAMPLERS)


# ----- The L1 loss option (GenViT's loss_type='l1') -----

def test_l1_loss_closed_form_in_every_formulation():
    """With a zero network the errors are known in closed form: DDPM eps-prediction |0 - eps|; EDM D = c_skip x, so
    loss = sqrt(lambda) mean|c_skip x - x0|; flow |0 - (eps - x0)|. 'mse' stays the squared error beside it."""
    zero = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    mean = lambda v: v.flatten(1).mean(1)  # noqa: E731
    ddpm = make_diffusion(formulation="ddpm", loss_type="l1").training_losses(zero, x0, torch.tensor([0, 5, 999]),
                                                                              noise)
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

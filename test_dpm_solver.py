"""
dpm_solver.py against numbers made with U-ViT's official samplers (reference/uvit_dpm_solver.json: the unmodified
dpm_solver_pp.py and dpm_solver_pytorch.py @ ce55170 driven as eval_ldm_discrete.py and eval_ldm.py drive them, with a
stand-in network): the network times each evaluation receives and the final x, seeded, in float64 (to 1e-9) and in
float32; plus the schedules' closed forms and the order lists.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion import GaussianDiffusion, make_betas
from dpm_solver import DiscreteVP, LinearVP, VPSolver, fast_orders

REF = json.loads((Path(__file__).resolve().parent / "reference" / "uvit_dpm_solver.json").read_text())
NULL = 1000


def release_solver(sampler):
    """The two official set-ups: U-ViT-H (eval_ldm_discrete.py) and the continuous U-ViT models (eval_ldm.py)."""
    if sampler == "dpm++3s":
        return VPSolver(DiscreteVP(make_betas("scaled_linear")), time_scale=1000, t_end=1 / 1000)
    return VPSolver(LinearVP(0.1, 20.0), time_scale=999, t_end=1e-4)


class StandIn:
    """The reference's network eps = 0.1 x cos(tau / 300) + 0.05 sin(tau / 100 + y); records each call's tau and y."""

    def __init__(self):
        self.taus, self.labels = [], []

    def __call__(self, x, tau, y):
        self.taus.append(tau.clone())
        self.labels.append(y.clone())
        t, yy = tau.reshape(-1, 1, 1, 1).to(x.dtype), y.reshape(-1, 1, 1, 1).to(x.dtype)
        return 0.1 * x * torch.cos(t / 300) + 0.05 * torch.sin(t / 100 + yy)


def run(sampler, key, dtype):
    ref = REF[sampler]["runs"][key]
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(dtype)
    net = StandIn()
    x = release_solver(sampler).sample(net, x_T.shape, sampler, ref["steps"], model_kwargs={"y": torch.tensor([3, 7])},
                                       cfg_scale=1.4 if "guided_s0.4" in key else 1.0, null_label=NULL, noise=x_T)
    return ref, net, x


CASES = [("dpm++3s", k) for k in REF["dpm++3s"]["runs"]] + [("dpm3s", k) for k in REF["dpm3s"]["runs"]]


@pytest.mark.parametrize("sampler,key", CASES)
def test_matches_the_official_sampler(sampler, key):
    f64 = key.startswith("f64")
    ref, net, x = run(sampler, key, torch.float64 if f64 else torch.float32)
    assert x.dtype == (torch.float64 if f64 else torch.float32) and len(net.taus) == len(ref["time_inputs"])
    assert release_solver(sampler).spans(sampler, ref["steps"])[1] == ref["orders"]
    guided = "guided_s0.4" in key
    for tau, y in zip(net.taus, net.labels):  # guidance: one batched call [cond, uncond] at one network time
        assert tau.dtype == x.dtype and len(set(tau.tolist())) == 1
        assert y.tolist() == ([3, 7, NULL, NULL] if guided else [3, 7])
    taus = np.array([float(t[0]) for t in net.taus])
    got, want = x.double().reshape(-1).numpy(), np.array(ref["x_final"])
    if f64:  # the official code in float64: the same numbers up to rounding
        np.testing.assert_allclose(taus, ref["time_inputs"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    else:  # the official float32 run (its float32 lambda round trip moves dpm3s's late taus by up to 0.12)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 if sampler == "dpm++3s" else 1e-3)
        if sampler == "dpm++3s":
            np.testing.assert_allclose(taus, ref["time_inputs"], rtol=0, atol=1e-4)


def test_the_references_tell_the_settings_apart():
    """The tolerances above separate guided from unguided, float32 from float64, and tau - 1 from tau."""
    for sampler in ("dpm++3s", "dpm3s"):
        runs = REF[sampler]["runs"]
        a, b = np.array(runs["f64_guided_s0.4"]["x_final"]), np.array(runs["f64_unguided"]["x_final"])
        assert np.abs(a - b).max() > 0.01
    solver, net = release_solver("dpm++3s"), StandIn()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).double()
    x = solver.sample(lambda x, t, y: net(x, t - 1, y), x_T.shape, "dpm++3s", 50,
                      model_kwargs={"y": torch.tensor([3, 7])}, cfg_scale=1.4, null_label=NULL, noise=x_T)
    assert np.abs(x.reshape(-1).numpy() - REF["dpm++3s"]["runs"]["f64_guided_s0.4"]["x_final"]).max() > 1e-3


def test_dpm_pp_3s_network_times_are_time_uniform_and_stop_at_label_one():
    """eval_ldm_discrete.py: 50 evaluations at tau = 1000 - 19.98 k, k = 0..49; the last step lands on t = 1/1000
    (label 1) with no denoising step after it."""
    net = StandIn()
    solver = release_solver("dpm++3s")
    solver.sample(net, (1, 1, 1, 1), "dpm++3s", 50, model_kwargs={"y": torch.tensor([0])},
                  noise=torch.ones(1, 1, 1, 1, dtype=torch.float64))
    np.testing.assert_allclose([float(t) for t in net.taus], 1000 - 19.98 * np.arange(50), rtol=0, atol=1e-9)
    spans, orders = solver.spans("dpm++3s", 50)
    assert orders == [3] * 16 + [2] and spans[-1][1] == pytest.approx(1e-3, abs=1e-15)


@pytest.mark.parametrize("steps", range(1, 13))
def test_fast_orders_spend_exactly_the_steps(steps):
    orders = fast_orders(steps)
    assert sum(orders) == steps and len(orders) == steps // 3 + 1  # K steps
    assert all(o == 3 for o in orders[:-2]) and orders[-1] in (1, 2, 3)
    for sampler in VPSolver.SAMPLERS:
        net = StandIn()
        release_solver(sampler).sample(net, (1, 1, 1, 1), sampler, steps, model_kwargs={"y": torch.tensor([0])})
        assert len(net.taus) == steps  # one network evaluation per step (two forwards with guidance)


def test_schedules_closed_forms():
    betas = make_betas("scaled_linear")
    d, ddpm = DiscreteVP(betas), GaussianDiffusion(schedule="scaled_linear")
    for n in (1, 2, 500, 1000):  # the knots: alpha(n / N)^2 = abar_n, the DDPM index n - 1
        assert d.alpha(n / 1000) ** 2 == pytest.approx(ddpm.alphas_cumprod[n - 1], rel=1e-12)
    la = 0.5 * np.log(ddpm.alphas_cumprod[[416, 417]])
    assert d.log_alpha(0.4175) == pytest.approx(la.mean(), rel=1e-12)  # linear in t between knots
    lin = LinearVP(0.1, 20.0)
    for t in (1e-4, 0.3, 1.0):  # Song et al. 2021 Eq. 33: log alpha = -t^2 (b1 - b0) / 4 - t b0 / 2
        assert lin.log_alpha(t) == pytest.approx(-0.25 * t * t * 19.9 - 0.05 * t, rel=1e-14)
    for sch in (d, lin):
        for t in (1e-3, 0.02, 0.5, 0.97, 1.0):
            assert sch.inverse_lambda(sch.lam(t)) == pytest.approx(t, rel=1e-9)
            assert sch.alpha(t) ** 2 + sch.sigma(t) ** 2 == pytest.approx(1.0, rel=1e-14)
            assert sch.lam(t) == pytest.approx(math.log(sch.alpha(t) / sch.sigma(t)), rel=1e-12)


def test_bad_sampler_and_steps():
    solver = release_solver("dpm3s")
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+2m'"):
        solver.sample(StandIn(), (1, 1, 1, 1), "dpm++2m", 5)
    with pytest.raises(ValueError, match="positive integer"):
        solver.sample(StandIn(), (1, 1, 1, 1), "dpm3s", 0)

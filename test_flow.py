"""flow.py (flow matching / rectified flow) against closed forms, and its samplers against the exact oracle of
conftest.py (data N(mu, s^2) per dimension; the optimal velocity v* = E[eps - x0 | x_t])."""
import pytest
import torch

from flow import FlowMatching
from conftest import MU, SHAPE, STD, FlowOracle, TwoOracles, assert_gaussian, flow_t_from_network_t

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


def test_network_times_are_sits_grids_reversed():
    """SiT's --num-sampling-steps N is N grid points, N - 1 fixed steps (willisma/SiT @ 947f95b integrators.py:23, 91):
    our euler K evaluates at t = 1 - t_SiT over linspace(0, 1, K + 1) but its end, so SiT's default num_steps=50 is
    our --steps 49; our sde K is its SDE over linspace(0, 1 - 1/K, K) with --last-step Tweedie at t_SiT = 1 - 1/K."""
    for sampler, steps, sit_grid in [("euler", 49, torch.linspace(0, 1, 50)[:-1]),
                                     ("sde", 5, torch.linspace(0, 1 - 1 / 5, 5))]:
        seen = []
        FlowMatching().sample(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x), (1, 1, 1, 1), sampler,
                              steps, generator=torch.Generator().manual_seed(0))
        assert seen == pytest.approx((999 * (1 - sit_grid.double())).tolist(), abs=1e-3), sampler

"""edm.py (EDM, Karras et al. 2022) against closed forms, and its samplers against the exact oracle of
conftest.py (data N(mu, s^2) per dimension; the optimal denoiser D* = E[x0 | x])."""
import math

import numpy as np
import pytest
import torch

from edm import EDM
from conftest import MU, SHAPE, STD, EDMOracle, TwoOracles, assert_gaussian, edm_sigma_from_t

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



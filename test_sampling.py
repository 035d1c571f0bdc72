"""
sampling.py: batched, seeded generation (its outputs are checked through sample.py in test_sample.py and under torchrun
in test_devices.py); here its progress bar, one tick per network call: sampler steps x batches, for every sampler.
"""
import pytest
import torch

import sampling
from diffusion import make_diffusion


@pytest.mark.parametrize("formulation, sampler, steps, nfe", [("ddpm", "ddim", 3, 3), ("ddpm", "dpm++2m", 2, 2),
                                                             ("edm", "heun", 3, 5), ("flow", "heun", 2, 4),
                                                             ("flow", "sde", 2, 2)])
def test_progress_counts_sampler_steps_times_batches(capsys, formulation, sampler, steps, nfe):
    calls = []

    def fwd(x, t, **kw):
        calls.append(len(x))
        return torch.zeros_like(x)
    batches = list(sampling.generate(fwd, make_diffusion(formulation=formulation), (3, 4, 4), 5, 2, sampler=sampler,
                                     steps=steps))
    assert [len(x) for x, _ in batches] == [2, 2, 1] and calls == [2] * nfe + [2] * nfe + [1] * nfe
    assert f"sampling: 100%|██████████| {3 * nfe}/{3 * nfe}" in capsys.readouterr().err
    list(sampling.generate(fwd, make_diffusion(formulation=formulation), (3, 4, 4), 1, 2, sampler=sampler,
                           steps=steps, progress=False))
    assert capsys.readouterr().err == ""

"""
Behaviour every backbone shares, tested once across all of them (DiT, U-ViT, image-space and latent DiffiT):
label dropout with probability 1 (the CFG null label), and a class-conditional forward that torch.compile
traces as one graph (the CPU label-range check in _check_inputs stays out of the graph).
"""
import pytest
import torch

import diffit
import dit
import uvit
from conftest import randomized

# Small class-conditional models (10 classes); weights are randomised below, so zero-initialised heads hide nothing.
BUILDS = {
    "dit": lambda **kw: dit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                num_classes=10, **kw),
    "uvit": lambda **kw: uvit.UViT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4,
                                   num_classes=10, **kw),
    "diffit-image": lambda **kw: diffit.MODELS["DiffiT-Tiny"](input_size=16, num_classes=10, **kw),
    "diffit-latent": lambda **kw: diffit.LatentDiffiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                                                      depth=2, num_heads=2, num_classes=10, **kw),
}




def inputs(model, B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=g)
    return x, torch.randint(0, 1000, (B,), generator=g), torch.randint(0, 10, (B,), generator=g)


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_label_dropout_prob_one(name):
    """class_dropout_prob=1.0: in training every label becomes the null label, so the output is the output for
    y = null label whatever y is; in eval nothing is dropped, so the output depends on y."""
    torch.manual_seed(0)
    model = randomized(BUILDS[name](class_dropout_prob=1.0))
    assert model.null_label == 10
    x, t, y = inputs(model)
    other, nulls = (y + 1) % 10, torch.full_like(y, 10)
    with torch.no_grad():
        model.train()
        dropped, dropped_other = model(x, t, y), model(x, t, other)
        model.eval()
        null_out, cond, cond_other = model(x, t, nulls), model(x, t, y), model(x, t, other)
    assert torch.equal(dropped, null_out) and torch.equal(dropped_other, null_out)
    assert not torch.allclose(cond, cond_other, atol=1e-4) and not torch.allclose(cond, null_out, atol=1e-4)


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here")
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_forward_compiles_without_graph_breaks(name, mode):
    """int(y.min()) in the label-range check would break the graph (measured: compiled DiT-S/2 training 1.17x
    slower than eager on a CPU before the check was skipped while tracing); eager still checks the range."""
    model = getattr(BUILDS[name](class_dropout_prob=0.1), mode)()
    x, t, y = inputs(model, B=2)
    torch._dynamo.reset()
    try:
        report = torch._dynamo.explain(model)(x, t, y)
    finally:
        torch._dynamo.reset()
    assert report.graph_break_count == 0 and report.graph_count == 1, report.break_reasons
    with pytest.raises(ValueError, match="labels must lie in"):
        model(x, t, torch.tensor([0, 11]))

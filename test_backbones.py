"""
What every backbone shares, tested once across all of them: the backbone contract of README.md ("The backbone
contract") for dit, uvit, diffit and genvit; backbones.check_inputs, the one-line input errors that the forward
passes leave out; label dropout with probability 1 (the CFG null label); a class-conditional forward that
torch.compile traces as one graph; and loading weights (the first missing, unexpected or mis-shaped key named in one
line, non-finite weights refused).
"""
import importlib

import pytest
import torch
import torch.nn as nn

import diffit
import dit
import genvit
import uvit
from backbones import BACKBONES, build_model, check_inputs, load_model, load_weights, mismatch
from conftest import randomized
from errors import RunError

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


# ----- The backbone contract (README.md, "The backbone contract") -----

# The CPU-sized registry entry of each backbone, and the input size it runs at here.
TINY = {"dit": ("DiT-Tiny", 8), "uvit": ("U-ViT-Tiny", 8), "diffit": ("DiffiT-Tiny", 16), "genvit": ("GenViT-Tiny", 8)}
ATTRIBUTES = ("input_size", "patch_size", "in_channels", "out_channels", "hidden_size", "depth", "num_heads",
              "num_classes", "class_dropout_prob", "learn_sigma", "attention", "grad_checkpoint", "class_cond",
              "null_label")


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_backbone_contract(backbone):
    """Registry, constructor keywords, attributes, forward(x, t, y=None, force_drop_ids=None) and what forward
    leaves to others (no guidance method, no input checks), for every backbone alike."""
    assert set(TINY) == set(BACKBONES)
    module = importlib.import_module(BACKBONES[backbone])
    assert isinstance(module.MODELS, dict) and all(callable(c) for c in module.MODELS.values())
    for ctor in module.MODELS.values():  # every entry takes the shared keywords (built without memory)
        with torch.device("meta"):
            model = ctor(learn_sigma=True, attention="math", grad_checkpoint=True)
        assert all(hasattr(model, a) for a in ATTRIBUTES) and model.out_channels == 2 * model.in_channels
    name, size = TINY[backbone]
    conditional = backbone != "genvit"  # GenViT's denoiser takes no labels; its num_classes is HybViT's head
    settings = [dict(num_classes=0, class_dropout_prob=0.0, learn_sigma=False),
                dict(num_classes=10, class_dropout_prob=0.0, learn_sigma=True, attention="math")]
    if conditional:
        settings.append(dict(num_classes=10, class_dropout_prob=0.1, learn_sigma=False, grad_checkpoint=True))
    for kw in settings:
        torch.manual_seed(0)
        model = randomized(build_model(backbone, name, input_size=size, in_channels=3, **kw))
        assert isinstance(model, nn.Module) and all(hasattr(model, a) for a in ATTRIBUTES)
        expect = {"input_size": size, "in_channels": 3, "attention": "sdpa", "grad_checkpoint": False, **kw}
        assert {k: getattr(model, k) for k in expect} == expect
        assert model.out_channels == (6 if kw["learn_sigma"] else 3)
        assert model.class_cond is (conditional and kw["num_classes"] > 0)
        assert model.null_label == (10 if model.class_cond and kw["class_dropout_prob"] > 0 else None)
        assert not any("cfg" in a or "guid" in a for a in dir(model))  # one guidance path: diffusion's
        x, t, y = inputs(model, B=3)
        model.eval()
        with torch.no_grad():
            out = model(x, t, y if model.class_cond else None)
            assert out.shape == (3, model.out_channels, size, size) and out.dtype == torch.float32
            assert torch.allclose(model(x, t.float(), y), out, atol=1e-5)  # integer or float network time
            if not model.class_cond:  # y is ignored
                assert torch.equal(model(x, t, y), out) and torch.equal(model(x, t, (y + 1) % 10), out)
            elif model.null_label is not None:  # force_drop_ids: exactly those labels become the null label
                drop = torch.tensor([1, 0, 1])
                dropped = model(x, t, y, force_drop_ids=drop)
                mixed = model(x, t, torch.where(drop == 1, torch.full_like(y, model.null_label), y))
                torch.testing.assert_close(dropped, mixed, atol=1e-6, rtol=1e-6)
                assert not torch.allclose(dropped, out, atol=1e-4)
    with pytest.raises(RunError, match=f"cannot build {name}: attention='flash' is not supported"):
        build_model(backbone, name, attention="flash")
    if not conditional:
        with pytest.raises(RunError, match="unconditional"):
            build_model(backbone, name, class_dropout_prob=0.1)


# ----- backbones.check_inputs: one-line errors for inputs that do not fit -----

@pytest.mark.parametrize("name", sorted(BUILDS))
def test_check_inputs_one_line_errors(name):
    model = BUILDS[name](class_dropout_prob=0.1).eval()  # 10 classes + the null label 10
    x, t, y = inputs(model, B=2)
    C, S = model.in_channels, model.input_size
    cases = [((x[:, :1], t, y), f"x must have shape \\(B, {C}, {S}, {S}\\)"),
             ((torch.randn(2, C + 1, S, S), t, y), "x must have shape"),
             ((x[..., :S // 2, :S // 2], t, y), "x must have shape"), ((x[0], t, y), "x must have shape"),
             ((x, t[:1], y), "t must be a tensor of shape \\(2,\\)"), ((x, t[:, None], y), "t must be a"),
             ((x, torch.tensor([1, 2, 3]), y), "t must be a"), ((x, 5, y), "t must be a tensor of shape"),
             ((x, t, None), "class-conditional model: pass y"), ((x, t, y.float()), "integer"),
             ((x, t, y[:1]), "integer tensor of shape"), ((x, t, torch.tensor([3, 11])), "labels must lie in 0..10"),
             ((x, t, torch.tensor([-1, 0])), "labels must lie in 0..10")]
    for args, match in cases:
        with pytest.raises(RunError, match=match):
            check_inputs(model, *args)
    check_inputs(model, x, t, torch.tensor([3, 10]))  # the null label itself is a valid input (CFG)
    with torch.no_grad():
        model(x, t, torch.tensor([3, 10]))
    no_null = BUILDS[name](class_dropout_prob=0.0)
    with pytest.raises(RunError, match="labels must lie in 0..9 \\(null label None\\)"):
        check_inputs(no_null, x, t, torch.tensor([3, 10]))


@pytest.mark.parametrize("build", [lambda: uvit.MODELS["U-ViT-Tiny"](input_size=8),
                                   lambda: genvit.MODELS["GenViT-Tiny"](num_classes=10)])
def test_check_inputs_of_a_model_without_labels(build):
    """Unconditional U-ViT and GenViT (whose num_classes is its classifier head): y is not checked, x and t are."""
    model = build()
    x, t = torch.randn(2, 3, model.input_size, model.input_size), torch.tensor([1, 2])
    for y in (None, torch.tensor([4.0, 7.0]), torch.tensor([4, 70])):
        check_inputs(model, x, t, y)
    with pytest.raises(RunError, match="x must have shape"):
        check_inputs(model, torch.randn(2, 3, 16, 16), t)
    with pytest.raises(RunError, match="x must have shape"):
        check_inputs(model, torch.randn(2, 4, model.input_size, model.input_size), t)


# ----- Label dropout and torch.compile -----

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
    """A check in forward such as int(y.min()) would break the graph (measured: compiled DiT-S/2 training 1.17x
    slower than eager on a CPU with a label-range check in forward); check_inputs, outside, still checks the range."""
    model = getattr(BUILDS[name](class_dropout_prob=0.1), mode)()
    x, t, y = inputs(model, B=2)
    torch._dynamo.reset()
    try:
        report = torch._dynamo.explain(model)(x, t, y)
    finally:
        torch._dynamo.reset()
    assert report.graph_break_count == 0 and report.graph_count == 1, report.break_reasons
    with pytest.raises(RunError, match="labels must lie in"):
        check_inputs(model, x, t, torch.tensor([0, 11]))


# ----- Loading weights: one line naming the first bad key, non-finite weights refused -----

def edited(change):
    sd = dict(BUILDS["dit"]().state_dict())
    change(sd)
    return sd


def poke_nan(sd):
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"].clone()
    sd["final_layer.linear.weight"][0, 0] = float("nan")


@pytest.mark.parametrize("change, expect", [
    (lambda sd: sd.pop("pos_embed"), "missing 'pos_embed'"),
    (lambda sd: sd.update({"extra.weight": torch.zeros(2)}), "unexpected 'extra.weight'"),
    (lambda sd: sd.update({"t_embedder.mlp.0.bias": torch.zeros(3)}),
     r"shape 't_embedder.mlp.0.bias' \(3,\) != \(32,\)"),
    (lambda sd: [sd.pop(k) for k in ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight")],
     r"missing 'pos_embed' \(\+2 more\)"),
    (poke_nan, "weight final_layer.linear.weight holds non-finite values"),
])
def test_load_weights_names_the_first_bad_key(change, expect):
    with pytest.raises(RunError, match=expect) as e:
        load_weights(BUILDS["dit"](), edited(change), "f.pt")
    assert str(e.value).startswith("f.pt: ") and "\n" not in str(e.value)
    assert mismatch(BUILDS["dit"](), BUILDS["dit"]().state_dict()) == ""  # a fitting state_dict: nothing to name


def test_load_model_refuses_non_finite_weights():
    model = BUILDS["dit"]()
    ckpt = dict(backbone="dit", model_name="DiT-S/2", model_kwargs=dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10),
        ema=edited(poke_nan), model=model.state_dict())
    load_model(ckpt, False, "cpu", "run/latest.pt")  # the raw weights are fine
    with pytest.raises(RunError, match="run/latest.pt: weight final_layer.linear.weight holds non-finite values"):
        load_model(ckpt, True, "cpu", "run/latest.pt")

"""Tests for uvit.py: official parameter counts and key layout, an independent reference forward, runtime options,
and the text-to-image U-ViT (counts, layout, parity with the official libs/uvit_t2i.py, context dropout)."""
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from backbones import check_inputs
from errors import RunError

from uvit import MODELS, Block, TextUViT, UViT, timestep_embedding

REF = Path(__file__).resolve().parent / "reference"  # facts from the official code, see reference/README.md
COUNTS = json.loads((REF / "uvit_param_counts.json").read_text())["models"]
S2_KEYS = json.loads((REF / "uvit_s2_keys.json").read_text())

# official config name -> our registry entry (+ overrides)
REGISTRY_OF = {
    "cifar10_uvit_small_S2": ("U-ViT-S/2", {}),
    "cifar10_uvit_small_deep_S2": ("U-ViT-S/2-Deep", {}),
    "celeba64_uvit_small_S4": ("U-ViT-S/4", {}),
    "imagenet64_uvit_mid_M4": ("U-ViT-M/4", {}),
    "imagenet64_uvit_large_L4": ("U-ViT-L/4", {}),
    "imagenet256_uvit_large_L2": ("U-ViT-L/2", {}),
    "imagenet256_uvit_huge_H2": ("U-ViT-H/2", {}),
    "imagenet512_uvit_large_L4": ("U-ViT-L/4", {"in_channels": 4, "class_dropout_prob": 0.15}),
    "imagenet512_uvit_huge_H4": ("U-ViT-H/4", {}),
}


def ours_from_official(kw):
    """Official UViT kwargs -> our keywords. Official num_classes counts table rows: -1 uncond, 1001 = 1000 + null."""
    nc = kw["num_classes"]
    return dict(input_size=kw["img_size"], patch_size=kw["patch_size"], in_channels=kw["in_chans"],
                hidden_size=kw["embed_dim"], depth=kw["depth"], num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"],
                qkv_bias=kw["qkv_bias"], mlp_time_embed=kw["mlp_time_embed"], conv=kw["conv"],
                num_classes=max(nc, 0) - (nc == 1001), class_dropout_prob=0.1 if nc == 1001 else 0.0)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def layout(m):
    return {k: list(v.shape) for k, v in m.state_dict().items()}


# ----- Parameter counts and key layout -----

@pytest.mark.parametrize("name", sorted(COUNTS))
def test_official_param_counts(name):
    spec = COUNTS[name]
    with torch.device("meta"):
        m = UViT(**ours_from_official(spec["kwargs"]))
        reg, over = REGISTRY_OF[name]
        r = MODELS[reg](**over)
    assert n_params(m) == spec["total_params"]
    assert n_params(r) == spec["total_params"], f"registry {reg} disagrees with {name}"
    assert layout(r) == layout(m)
    assert len(m.in_blocks) + 1 + len(m.out_blocks) == spec["num_blocks"]
    assert m.extras == spec["extras"] and list(m.pos_embed.shape) == spec["pos_embed_shape"]


def official_layout(D, depth, C, p, tokens, label_rows, conv, mlp_ratio=4):
    """Key -> shape of the official UViT state_dict (baofff/U-ViT libs/uvit.py @ ce55170; qkv without bias)."""
    keys = {"pos_embed": [1, tokens, D], "patch_embed.proj.weight": [D, C, p, p], "patch_embed.proj.bias": [D]}
    if label_rows:
        keys["label_emb.weight"] = [label_rows, D]
    H = int(D * mlp_ratio)
    blk = {"norm1.weight": [D], "norm1.bias": [D], "attn.qkv.weight": [3 * D, D], "attn.proj.weight": [D, D],
           "attn.proj.bias": [D], "norm2.weight": [D], "norm2.bias": [D], "mlp.fc1.weight": [H, D],
           "mlp.fc1.bias": [H], "mlp.fc2.weight": [D, H], "mlp.fc2.bias": [D]}
    skip = {"skip_linear.weight": [D, 2 * D], "skip_linear.bias": [D]}
    prefixes = [f"in_blocks.{i}." for i in range(depth // 2)] + ["mid_block."]
    for pre in prefixes:
        keys.update({pre + k: s for k, s in blk.items()})
    for i in range(depth // 2):
        keys.update({f"out_blocks.{i}." + k: s for k, s in {**blk, **skip}.items()})
    keys.update({"norm.weight": [D], "norm.bias": [D], "decoder_pred.weight": [p * p * C, D],
                 "decoder_pred.bias": [p * p * C]})
    if conv:
        keys.update({"final_layer.weight": [C, C, 3, 3], "final_layer.bias": [C]})
    return keys


def test_s2_key_layout_exact():
    with torch.device("meta"):
        m = MODELS["U-ViT-S/2"]()
    assert list(layout(m).items()) == list(S2_KEYS.items())  # names, shapes and order
    assert len(S2_KEYS) == 164
    assert official_layout(512, 12, 3, 2, 257, 0, True) == S2_KEYS  # the helper reproduces the computed json


def test_imagenet_key_layouts():
    with torch.device("meta"):
        h2, l2 = MODELS["U-ViT-H/2"](), MODELS["U-ViT-L/2"]()
    lh = layout(h2)
    assert len(lh) == 355
    assert lh["label_emb.weight"] == [1001, 1152] and lh["pos_embed"] == [1, 258, 1152]
    assert lh["patch_embed.proj.weight"] == [1152, 4, 2, 2] and lh["decoder_pred.weight"] == [16, 1152]
    assert not any(k.startswith("final_layer") or k.startswith("time_embed") for k in lh)
    assert lh == official_layout(1152, 28, 4, 2, 258, 1001, conv=False)
    assert layout(l2)["final_layer.weight"] == [4, 4, 3, 3]
    assert layout(l2) == official_layout(1024, 20, 4, 2, 258, 1001, conv=True)


@pytest.mark.parametrize("reg,expected", [("U-ViT-S/2", official_layout(512, 12, 3, 2, 257, 0, True)),
                                          ("U-ViT-H/2", official_layout(1152, 28, 4, 2, 258, 1001, False))])
def test_official_state_dict_loads_strict(reg, expected):
    with torch.device("meta"):
        m = MODELS[reg]()
        sd = {k: torch.empty(s) for k, s in expected.items()}  # stands in for the released .pth
    m.load_state_dict(sd, strict=True, assign=True)
    with pytest.raises(RuntimeError):  # strict really checks: a time-MLP key is unexpected
        m.load_state_dict({**sd, "time_embed.0.weight": torch.empty(1, device="meta")}, strict=True, assign=True)


def test_strict_round_trip():
    torch.manual_seed(0)
    a = UViT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=4, num_classes=5).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    b = UViT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=4, num_classes=5).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 5])
    assert not torch.equal(a(x, t, y), b(x, t, y))
    b.load_state_dict(torch.load(buf), strict=True)
    assert torch.equal(a(x, t, y), b(x, t, y))


# ----- Forward computation against an independent reference -----

def reference_forward(m, x, t, y=None):
    """Straight-line U-ViT forward (U-ViT §3.1, Fig. 1; official libs/uvit.py) using the model's parameters only."""
    P = {k: v for k, v in m.state_dict().items()}
    p, D, nh = m.patch_size, m.hidden_size, m.num_heads
    B = x.shape[0]
    patches = F.conv2d(x, P["patch_embed.proj.weight"], P["patch_embed.proj.bias"], stride=p)
    patches = patches.flatten(2).transpose(1, 2)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(D // 2, dtype=torch.float32) / (D // 2))
    ang = t.float()[:, None] * freqs
    time = torch.cat([ang.cos(), ang.sin()], 1).to(x.dtype)
    if "time_embed.0.weight" in P:
        time = F.linear(F.silu(F.linear(time, P["time_embed.0.weight"], P["time_embed.0.bias"])),
                        P["time_embed.2.weight"], P["time_embed.2.bias"])
    seq = [time[:, None], patches]
    if y is not None:
        seq.insert(0, P["label_emb.weight"][y][:, None])
    h = torch.cat(seq, 1) + P["pos_embed"]
    N = h.shape[1]

    def ln(z, name):
        return F.layer_norm(z, (D,), P[name + ".weight"], P[name + ".bias"], eps=1e-5)

    def block(pre, h, skip=None):
        if skip is not None:
            h = F.linear(torch.cat([h, skip], -1), P[pre + "skip_linear.weight"], P[pre + "skip_linear.bias"])
        qkv = F.linear(ln(h, pre + "norm1"), P[pre + "attn.qkv.weight"]).reshape(B, N, 3, nh, D // nh)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // nh), -1)
        h = h + F.linear((w @ v).transpose(1, 2).reshape(B, N, D), P[pre + "attn.proj.weight"],
                         P[pre + "attn.proj.bias"])
        z = F.gelu(F.linear(ln(h, pre + "norm2"), P[pre + "mlp.fc1.weight"], P[pre + "mlp.fc1.bias"]))
        return h + F.linear(z, P[pre + "mlp.fc2.weight"], P[pre + "mlp.fc2.bias"])

    n = m.depth // 2
    stack = []
    for i in range(n):
        h = block(f"in_blocks.{i}.", h)
        stack.append(h)
    h = block("mid_block.", h)
    for i in range(n):
        s = stack.pop()
        h = block(f"out_blocks.{i}.", h, s if f"out_blocks.{i}.skip_linear.weight" in P else None)
    h = F.linear(ln(h, "norm"), P["decoder_pred.weight"], P["decoder_pred.bias"])[:, 1 if y is None else 2:]
    C, g = m.out_channels, m.input_size // p
    out = torch.zeros(B, C, g * p, g * p, dtype=x.dtype)
    for j in range(g * g):  # token j -> patch (row j // g, col j % g), values laid out (p, p, C)
        r, c = divmod(j, g)
        out[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = h[:, j].reshape(B, p, p, C).permute(0, 3, 1, 2)
    if "final_layer.weight" in P:
        out = F.conv2d(out, P["final_layer.weight"], P["final_layer.bias"], padding=1)
    return out


def tiny(seed=0, randomize=True, **kw):
    torch.manual_seed(seed)
    cfg = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=4, num_classes=0)
    m = UViT(**{**cfg, **kw})
    if randomize:  # random weights everywhere, so zero biases / unit LayerNorms hide nothing
        with torch.no_grad():
            for prm in m.parameters():
                prm.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("kw", [dict(num_classes=0), dict(num_classes=5, class_dropout_prob=0.1),
                                dict(num_classes=5, class_dropout_prob=0.0, conv=False),
                                dict(num_classes=0, conv=False), dict(num_classes=5, skip=False),
                                dict(num_classes=0, skip=False, mlp_time_embed=True),
                                dict(num_classes=5, learn_sigma=True, patch_size=4, mlp_time_embed=True)])
@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_forward_matches_reference(kw, attention):
    m = tiny(attention=attention, **kw).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 17, 999])
    y = torch.tensor([0, 4, m.null_label or 2]) if m.num_classes else None
    with torch.no_grad():
        out, ref = m(x, t, y), reference_forward(m, x, t, y)
    assert out.shape == (3, m.out_channels, 8, 8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_time_token_and_pos_embed_order():
    m = tiny(num_classes=5).double().eval()
    assert not any(k.startswith("time_embed") for k in m.state_dict())  # raw sinusoid, no parameters
    e = timestep_embedding(torch.tensor([1]), 32)  # cos first, then sin
    assert abs(e[0, 0].item() - math.cos(1.0)) < 1e-6 and abs(e[0, 16].item() - math.sin(1.0)) < 1e-6
    seen = {}
    m.in_blocks[0].register_forward_hook(lambda mod, inp, out: seen.setdefault("tokens", inp[0]))
    x, t, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([5, 700]), torch.tensor([3, 1])
    with torch.no_grad():
        m(x, t, y)
        tok, pe = seen["tokens"], m.pos_embed[0]
        patches = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tok[:, 0], m.label_emb.weight[y] + pe[0])  # index 0: label
        torch.testing.assert_close(tok[:, 1], timestep_embedding(t, 32).double() + pe[1])  # index 1: time
        torch.testing.assert_close(tok[:, 2:], patches + pe[2:])  # patches from 2
    assert tok.shape == (2, 2 + 16, 32)


def test_initialisation():
    m = tiny(randomize=False, num_classes=5, hidden_size=64, depth=8)
    w = torch.cat([mod.weight.flatten() for mod in m.modules() if isinstance(mod, torch.nn.Linear)])
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() < 2.0
    biases = [mod.bias for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod.bias is not None]
    assert len(biases) > 10 and all(b.abs().sum() == 0 for b in biases)
    assert abs(m.pos_embed.std().item() - 0.02) < 0.003
    assert torch.equal(m.norm.weight, torch.ones(64)) and torch.equal(m.norm.bias, torch.zeros(64))
    assert abs(m.label_emb.weight.std().item() - 1.0) < 0.2  # PyTorch default N(0, 1)
    assert m.in_blocks[0].attn.qkv.bias is None and m.in_blocks[0].norm1.eps == 1e-5
    assert m.in_blocks[0].mlp.act.approximate == "none"  # exact erf GELU, unlike DiT's tanh form


# ----- Runtime options -----

def test_sdpa_and_math_agree_forward_and_grad():
    a, b = tiny(num_classes=5, attention="math"), tiny(num_classes=5, attention="sdpa")
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    oa, ob = a.eval()(x, t, y), b.eval()(x, t, y)
    torch.testing.assert_close(oa, ob, rtol=1e-4, atol=1e-4)
    oa.square().sum().backward()
    ob.square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-4, msg=n)


def test_grad_checkpoint_equal_gradients():
    a = tiny(num_classes=5, class_dropout_prob=0.0)
    b = tiny(num_classes=5, class_dropout_prob=0.0, grad_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    a.train()(x, t, y).sum().backward()
    b.train()(x, t, y).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_label_dropout_semantics():
    m = tiny(num_classes=10, class_dropout_prob=0.3)
    assert m.label_emb.num_embeddings == 11 and m.null_label == 10
    assert tiny(num_classes=10, class_dropout_prob=0.0).label_emb.num_embeddings == 10
    assert tiny(num_classes=10, class_dropout_prob=0.0).null_label is None and tiny().null_label is None
    torch.manual_seed(0)
    y = torch.randint(0, 10, (20000,))
    d = m.token_drop(y)
    frac = (d == 10).float().mean().item()
    assert 0.28 < frac < 0.32 and torch.equal(d[d != 10], y[d != 10])


def test_learn_sigma_channels_and_registry():
    m = tiny(learn_sigma=True, num_classes=5)
    assert m.out_channels == 6 and m.decoder_pred.weight.shape == (2 * 2 * 6, 32)
    assert m.final_layer.weight.shape == (6, 6, 3, 3)
    assert m(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 5])).shape == (2, 6, 8, 8)
    with torch.device("meta"):
        over = MODELS["U-ViT-S/2"](input_size=64, in_channels=4, num_classes=10, class_dropout_prob=0.1)
    assert over.pos_embed.shape == (1, 2 + 1024, 512) and over.label_emb.weight.shape == (11, 512)
    for attr in ("in_channels", "out_channels", "input_size", "patch_size", "num_classes", "learn_sigma",
                 "class_dropout_prob", "hidden_size", "depth", "num_heads"):
        assert hasattr(m, attr)
    t = MODELS["U-ViT-Tiny"]()
    assert t(torch.randn(1, 3, 32, 32), torch.tensor([999])).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("kw,msg", [(dict(attention="flash"), "attention"), (dict(patch_size=3), "multiple"),
                                    (dict(num_heads=5), "divisible"), (dict(depth=5), "even"),
                                    (dict(num_classes=-1), "num_classes"),
                                    (dict(class_dropout_prob=1.5), "class_dropout_prob"),
                                    (dict(class_dropout_prob=-0.1), "class_dropout_prob")])
def test_bad_constructor_args(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(randomize=False, **kw)


# ----- Text-to-image U-ViT (baofff/U-ViT libs/uvit_t2i.py, configs/mscoco_uvit_small.py @ ce55170) -----

# Built with the official class on the meta device: total parameters, state_dict keys, per-module counts of S/2.
T2I_COUNTS = {"U-ViT-S/2-T2I": (44_692_644, 166), "U-ViT-S/2-Deep-T2I": (58_345_636, 214)}
T2I_S2_MODULES = {"pos_embed": 171_008, "patch_embed": 8_704, "context_embed": 393_728, "in_blocks": 18_905_088,
                  "mid_block": 3_150_848, "out_blocks": 22_053_888, "norm": 1_024, "decoder_pred": 8_208,
                  "final_layer": 148}


def t2i_layout(depth):
    """Official uvit_t2i state_dict (key -> shape, in order): the unconditional 4-channel U-ViT's with context_embed
    right after patch_embed and 1 + 77 + 256 = 334 pos_embed rows."""
    base = list(official_layout(512, depth, 4, 2, 334, 0, True).items())
    return dict(base[:3] + [("context_embed.weight", [512, 768]), ("context_embed.bias", [512])] + base[3:])


@pytest.mark.parametrize("name", sorted(T2I_COUNTS))
def test_t2i_param_counts_and_key_layout(name):
    with torch.device("meta"):
        m = MODELS[name]()
    total, keys = T2I_COUNTS[name]
    assert isinstance(m, TextUViT) and n_params(m) == total and len(m.state_dict()) == keys
    assert list(layout(m).items()) == list(t2i_layout(m.depth).items())  # names, shapes and order
    assert m.extras == 78 and list(m.pos_embed.shape) == [1, 334, 512] and "null_context" not in m.state_dict()
    assert len(m.in_blocks) + 1 + len(m.out_blocks) == m.depth + 1
    if name == "U-ViT-S/2-T2I":
        by_module = {k: sum(p.numel() for n, p in m.named_parameters() if n.split(".")[0] == k) for k in T2I_S2_MODULES}
        assert by_module == T2I_S2_MODULES
        assert n_params(m) - 393_728 - 77 * 512 == 44_259_492  # = the unconditional 4-channel U-ViT (official)


def test_t2i_official_state_dict_loads_strict():
    with torch.device("meta"):
        m = MODELS["U-ViT-S/2-T2I"]()
        sd = {k: torch.empty(s) for k, s in t2i_layout(12).items()}  # stands in for mscoco_uvit_small.pth
    m.load_state_dict(sd, strict=True, assign=True)
    with pytest.raises(RuntimeError):  # a label table is unexpected
        m.load_state_dict({**sd, "label_emb.weight": torch.empty(1, device="meta")}, strict=True, assign=True)


def t2i_tiny(**kw):
    return TextUViT(**{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4,
                              clip_dim=16, num_clip_token=5), **kw})


def test_t2i_matches_official_forward():
    """Official libs/uvit_t2i.py UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=4, num_heads=4,
    mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, clip_dim=16, num_clip_token=5), its state_dict filled in order
    with 0.2 * randn (Generator seed 0), run in a throwaway environment (PyTorch 2.13 CPU, its SDPA path) on the
    inputs below; these are its outputs."""
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 770]), torch.randn(2, 5, 16, generator=g)
    m = t2i_tiny().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in m.state_dict().values():
            v.copy_(torch.randn(v.shape, generator=g) * 0.2)
        out = m(x, t, context)
    first = [0.48588237166404724, 0.3808528780937195, 0.422514408826828, 0.48841553926467896, -0.29666703939437866,
             -0.565527617931366, -0.37421345710754395, -0.3807678818702698, -0.0535823255777359, 0.28369641304016113,
             0.060921572148799896, 0.13853061199188232, 0.45147138833999634, 0.3735002875328064, 0.3720549941062927,
             0.05863675847649574]
    last = [0.5814518928527832, 0.08302147686481476, 0.5219880938529968, -0.07410129904747009, 0.020911991596221924,
            -0.288613885641098, -0.09845037758350372, -0.30990102887153625, 0.20919978618621826, 0.7132174968719482,
            0.6432758569717407, 0.6266629099845886, 0.05063984915614128, -0.3253178000450134, -0.04721817374229431,
            -0.2534465789794922]
    torch.testing.assert_close(out[0, :, 0, :4].flatten(), torch.tensor(first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :, -1, -4:].flatten(), torch.tensor(last), rtol=1e-5, atol=1e-5)
    assert out.sum().item() == pytest.approx(52.97315216064453, abs=1e-3)
    assert out.abs().sum().item() == pytest.approx(176.9755096435547, abs=1e-3)


def test_t2i_token_order_and_shared_layers():
    m = t2i_tiny().double().eval()
    assert all(type(b) is Block for b in [*m.in_blocks, m.mid_block, *m.out_blocks])  # UViT's blocks and skips
    assert m.class_cond is False and m.null_label is None and m.text_cond and m.label_emb is None
    seen = {}
    m.in_blocks[0].register_forward_hook(lambda mod, inp, out: seen.setdefault("tokens", inp[0]))
    x, t, c = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([5, 700]), torch.randn(2, 5, 16)
    with torch.no_grad():
        m(x, t, c)
        tok, pe = seen["tokens"], m.pos_embed[0]
        patches = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tok[:, 0], timestep_embedding(t, 32).double() + pe[0])  # index 0: time
        torch.testing.assert_close(tok[:, 1:6], m.context_embed(c.double()) + pe[1:6])  # 1..77: context
        torch.testing.assert_close(tok[:, 6:], patches + pe[6:])  # then the patches
    assert tok.shape == (2, 1 + 5 + 16, 32)


def test_t2i_null_context_and_dropout():
    torch.manual_seed(0)
    m = t2i_tiny(class_dropout_prob=0.5)
    m.null_context.copy_(torch.randn(5, 16))  # the caller sets CLIP("")
    x, t, c = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.randn(3, 5, 16)
    m.eval()
    with torch.no_grad():
        empty = m(x, t, m.null_context.expand(3, -1, -1))
        torch.testing.assert_close(m(x, t), empty)  # y=None: the empty prompt
        dropped = m(x, t, c, force_drop_ids=torch.tensor([1, 0, 1]))
        torch.testing.assert_close(dropped[[0, 2]], empty[[0, 2]])
        torch.testing.assert_close(dropped[1], m(x, t, c)[1])
        assert torch.equal(m(x, t, c), m(x, t, c))  # eval: no dropout
    m.train()
    torch.manual_seed(1)
    with torch.no_grad():
        a = m(x.repeat(200, 1, 1, 1), t.repeat(200), c.repeat(200, 1, 1))
        cond, unc = m.eval()(x, t, c), m(x, t)
    per = a.reshape(200, 3, -1)
    is_unc = (per - unc.reshape(1, 3, -1)).abs().amax(-1) < 1e-5
    assert (is_unc | ((per - cond.reshape(1, 3, -1)).abs().amax(-1) < 1e-5)).all()
    assert 0.4 < is_unc.float().mean().item() < 0.6


@pytest.mark.parametrize("kw,msg", [(dict(num_classes=10), "num_classes must be 0"), (dict(clip_dim=0), "clip_dim"),
                                    (dict(depth=3), "even")])
def test_t2i_bad_constructor_args(kw, msg):
    with pytest.raises(ValueError, match=msg):
        t2i_tiny(**kw)


def test_t2i_check_inputs_one_line_errors():
    m = t2i_tiny()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    check_inputs(m, x, t, torch.randn(2, 5, 16))
    check_inputs(m, x, t, None)  # the empty prompt
    for y in (torch.randn(2, 77, 768), torch.randn(1, 5, 16), torch.tensor([1, 2]), torch.zeros(2, 5, 16).long()):
        with pytest.raises(RunError, match=r"text-conditioned model: y must be a float context of shape \(2, 5, 16\)"):
            check_inputs(m, x, t, y)


@pytest.mark.parametrize("name", sorted(T2I_COUNTS))
def test_t2i_official_release_recognised(name):
    import official  # the released mscoco_uvit_small(_deep).pth: a bare state_dict of these keys
    with torch.device("meta"):
        sd = MODELS[name]().state_dict()
        spec = official.recognise(sd, "mscoco_uvit_small.pth")
        m = MODELS[spec["model_name"]](**spec["model_kwargs"])
    assert spec["model_name"] == name and isinstance(m, TextUViT) and n_params(m) == T2I_COUNTS[name][0]
    m.load_state_dict(sd, strict=True, assign=True)
    assert spec["defaults"]["cfg_scale"] == 2.0 and spec["text"]["latent_scale"] == 0.23010  # their scale 1 = our 2
    assert spec["diffusion"]["schedule"] == "scaled_linear" and spec["time_offset"] == 1

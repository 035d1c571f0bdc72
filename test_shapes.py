"""Fast CPU tests for dit.py: exact official parameter counts and state_dict layout, analytic embedding values,
attention backends, the official 3-channel CFG through diffusion's one guidance path, label dropout, unpatchify
layout, gradient checkpointing, constructor validation, and the primitives shared word for word by the backbone
files. What every backbone shares (the contract, input checks, torch.compile) is in test_backbones.py."""
import ast
import inspect
import io
import json
import math
from pathlib import Path

import pytest
import torch

import diffit
import diffusion
import dit
import genvit
import uvit
from conftest import randomized

REF = Path(__file__).resolve().parent / "reference"  # facts from the official code, see reference/README.md
COUNTS = json.loads((REF / "dit_param_counts.json").read_text())
S2_KEYS = json.loads((REF / "dit_s2_keys.json").read_text())
PAPER_NAMES = [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]


def tiny(**kw):
    """A very small DiT for forward/backward tests (4x8x8 input, 2 blocks, D=32, 2 heads)."""
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    return dit.DiT(**{**cfg, **kw})


def inputs(model, B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, max(model.num_classes, 1), (B,), generator=g)
    return x, t, y


def n_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----- Parameter counts and state_dict layout -----

def test_registry_names():
    assert set(dit.MODELS) == set(PAPER_NAMES) | {"DiT-Tiny"}
    assert set(COUNTS["models"]) == set(PAPER_NAMES)


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_param_counts_match_official(name):
    ref = COUNTS["models"][name]
    with torch.device("meta"):
        model = dit.MODELS[name]()                          # official defaults = the json's settings
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == \
        (ref["depth"], ref["hidden_size"], ref["num_heads"], ref["patch_size"])
    assert model.pos_embed.shape[1] == ref["num_patches"]
    assert n_params(model) == ref["total_params"]
    assert n_params(model, trainable_only=True) == ref["trainable_params"]
    assert model.pos_embed.numel() == ref["non_trainable_params"] and not model.pos_embed.requires_grad


def test_dit_tiny_param_count_at_cifar_settings():
    """Change detector, not a fidelity check: DiT-Tiny is ours, so these counts are our own computed numbers."""
    with torch.device("meta"):
        model = dit.MODELS["DiT-Tiny"](input_size=32, in_channels=3, num_classes=10)
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (6, 192, 3, 2)
    assert n_params(model) == 4_217_496 and n_params(model, trainable_only=True) == 4_168_344


def test_s2_state_dict_keys_and_shapes_exact():
    with torch.device("meta"):
        sd = dit.MODELS["DiT-S/2"]().state_dict()
    assert len(sd) == 132
    assert {k: list(v.shape) for k, v in sd.items()} == S2_KEYS


def test_xl2_state_dict_layout():
    with torch.device("meta"):
        sd = dit.MODELS["DiT-XL/2"](input_size=32).state_dict()
    assert len(sd) == 8 + 28 * 10 + 4
    D = 1152
    expect = {"pos_embed": (1, 256, D), "x_embedder.proj.weight": (D, 4, 2, 2),
              "y_embedder.embedding_table.weight": (1001, D), "t_embedder.mlp.0.weight": (D, 256),
              "blocks.27.attn.qkv.weight": (3 * D, D), "blocks.27.mlp.fc1.weight": (4 * D, D),
              "blocks.27.adaLN_modulation.1.weight": (6 * D, D), "final_layer.linear.weight": (32, D),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    # Same naming scheme as S/2 (json), with 28 blocks instead of 12.
    suffixes = [k[len("blocks.0."):] for k in S2_KEYS if k.startswith("blocks.0.")]
    names = {k for k in S2_KEYS if not k.startswith("blocks.")}
    names |= {f"blocks.{i}.{s}" for i in range(28) for s in suffixes}
    assert set(sd) == names


def test_state_dict_roundtrip_strict():
    src = randomized(tiny())
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = tiny()
    dst.load_state_dict(torch.load(buf), strict=True)
    assert "pos_embed" in dst.state_dict()
    x, t, y = inputs(src)
    src.eval(), dst.eval()
    assert torch.equal(src(x, t, y), dst(x, t, y))
    with pytest.raises(RuntimeError):                       # strict loading really checks the key set
        tiny().load_state_dict({k: v for k, v in src.state_dict().items() if k != "pos_embed"}, strict=True)


# ----- Initialisation and output shapes -----

def test_fresh_model_outputs_exactly_zero():
    torch.manual_seed(0)
    model = tiny()
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (4, 8, 8, 8) and torch.count_nonzero(out) == 0
    for b in model.blocks:                                  # adaLN-Zero: every block starts as the identity
        assert torch.count_nonzero(b.adaLN_modulation[1].weight) == torch.count_nonzero(b.adaLN_modulation[1].bias) == 0


def test_initialisation_statistics():
    torch.manual_seed(0)
    model = tiny(hidden_size=64, num_classes=100)
    for w in (model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight, model.y_embedder.embedding_table.weight):
        assert 0.018 < w.std().item() < 0.022               # N(0, 0.02)
    xavier = {"blocks.1.attn.qkv.weight": (64, 192), "blocks.0.mlp.fc2.weight": (256, 64),
              "x_embedder.proj.weight": (4 * 2 * 2, 64)}    # conv treated as a Linear (C*p*p -> D)
    params = dict(model.named_parameters())
    for name, (fan_in, fan_out) in xavier.items():
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = params[name]
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound, name
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0


@pytest.mark.parametrize("learn_sigma,c_out", [(True, 8), (False, 4)])
def test_output_shape_learn_sigma(learn_sigma, c_out):
    model = randomized(tiny(learn_sigma=learn_sigma))
    x, t, y = inputs(model)
    assert model.out_channels == c_out
    assert model(x, t, y).shape == (4, c_out, 8, 8)


def test_unconditional_model():
    model = randomized(tiny(num_classes=0))
    assert model.y_embedder is None and model.null_label is None
    assert not any(k.startswith("y_embedder") for k in model.state_dict())
    x, t, y = inputs(model)
    model.eval()
    assert torch.equal(model(x, t), model(x, t, y))         # y is ignored
    assert tiny().null_label == 5 and tiny(class_dropout_prob=0.0).null_label is None
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.weight.shape == (5, 32)


def test_float_timesteps_accepted():
    model = randomized(tiny()).eval()
    x, t, y = inputs(model)
    assert torch.equal(model(x, t, y), model(x, t.float(), y))


# ----- Embeddings (DiT §3.2; official models.py @ ed81ce2) -----

def test_timestep_embedding_values():
    emb = dit.timestep_embedding(torch.tensor([0, 1, 500]), 256)
    assert emb.shape == (3, 256) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    assert emb[1, 0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert emb[1, 128].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    k = 37
    f = math.exp(-math.log(10000) * k / 128)
    assert emb[2, k].item() == pytest.approx(math.cos(500 * f), abs=1e-4)
    assert emb[2, 128 + k].item() == pytest.approx(math.sin(500 * f), abs=1e-4)
    odd = dit.timestep_embedding(torch.tensor([0, 1, 500]), 257)  # odd width: one trailing zero channel
    assert odd.shape == (3, 257) and torch.equal(odd[:, :256], emb) and torch.count_nonzero(odd[:, 256]) == 0


def test_pos_embed_check_values_s2():
    pe = tiny(hidden_size=384, num_heads=6, depth=1, input_size=32).pos_embed[0]   # (256, 384), 16x16 grid
    assert pe.shape == (256, 384)
    s1 = math.sin(1.0)
    assert pe[1, 0].item() == pytest.approx(s1, abs=1e-6) and pe[1, 192].item() == 0.0        # (h=0, w=1)
    assert pe[16, 0].item() == 0.0 and pe[16, 192].item() == pytest.approx(s1, abs=1e-6)       # (h=1, w=0)
    assert pe[1, 96].item() == pytest.approx(math.cos(1.0), abs=1e-6) and pe[1, 288].item() == 1.0


def test_pos_embed_full_table_small():
    D, G = 16, 4
    pe = tiny(hidden_size=D, input_size=2 * G).pos_embed[0]
    for h in range(G):
        for w in range(G):
            for k in range(D // 4):
                om = 1.0 / 10000 ** (k / (D / 4))
                want = [math.sin(w * om), math.cos(w * om), math.sin(h * om), math.cos(h * om)]
                got = [pe[h * G + w, k + j * D // 4].item() for j in range(4)]
                assert got == pytest.approx(want, abs=1e-6)


# ----- Attention -----

def test_attention_layout_matches_hand_computation():
    torch.manual_seed(0)
    D, H = 12, 3
    attn = dit.Attention(D, H, attention="math")
    x = torch.randn(2, 5, D)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(D, dim=-1)     # rows [q; k; v]
    hd = D // H
    heads = []
    for h in range(H):                                       # head h owns channels [h*hd, (h+1)*hd)
        s = slice(h * hd, (h + 1) * hd)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(hd), dim=-1)
        heads.append(a @ v[..., s])
    want = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), want, atol=1e-6, rtol=1e-5)
    attn.attention = "sdpa"
    torch.testing.assert_close(attn(x), want, atol=1e-6, rtol=1e-5)


def test_sdpa_matches_math_forward_and_grad():
    m_math = randomized(tiny(attention="math"), gain=1.5)
    m_sdpa = tiny(attention="sdpa")
    m_sdpa.load_state_dict(m_math.state_dict())
    x, t, y = inputs(m_math)
    outs = []
    for m in (m_math, m_sdpa):
        m.eval()
        out = m(x, t, y)
        out.square().mean().backward()
        outs.append(out)
    assert outs[0].std() > 0.1                              # the comparison is not between zeros
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for (n, a), b in zip(m_math.named_parameters(), m_sdpa.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=n)


def layer_norm(x, eps=1e-6):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


def test_adaln_zero_block_chunk_order_and_modulation():
    D = 8
    block = dit.DiTBlock(D, num_heads=2)
    block.attn, block.mlp = torch.nn.Identity(), torch.nn.Identity()   # isolate the adaLN wiring
    a = [0.3, -0.4, 0.5, -0.6, 0.7, 0.8]       # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    with torch.no_grad():
        block.adaLN_modulation[1].weight.zero_()
        block.adaLN_modulation[1].bias.copy_(torch.tensor(a).repeat_interleave(D))
    x = torch.randn(2, 3, D) * 1e-3                         # tiny variance: LayerNorm eps 1e-6 matters
    x1 = x + a[2] * (layer_norm(x) * (1 + a[1]) + a[0])
    want = x1 + a[5] * (layer_norm(x1) * (1 + a[4]) + a[3])
    torch.testing.assert_close(block(x, torch.randn(2, D)), want, atol=1e-5, rtol=1e-5)


def test_final_layer_shift_scale_order():
    D = 6
    final = dit.FinalLayer(D, patch_size=1, out_channels=D)
    with torch.no_grad():
        final.linear.weight.copy_(torch.eye(D))
        final.linear.bias.zero_()
        final.adaLN_modulation[1].weight.zero_()
        final.adaLN_modulation[1].bias.copy_(torch.tensor([0.25, -0.5]).repeat_interleave(D))  # shift, scale
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(final(x, torch.randn(2, D)), layer_norm(x) * 0.5 + 0.25, atol=1e-5, rtol=1e-5)


def test_mlp_uses_tanh_gelu():
    assert tiny().blocks[0].mlp.act.approximate == "tanh"  # as the official weights were trained
    mlp = dit.Mlp(4, 16, approximate="tanh")
    x = torch.randn(5, 4) * 3
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(mlp(x), h @ mlp.fc2.weight.T + mlp.fc2.bias, atol=1e-6, rtol=1e-6)


# ----- Classifier-free guidance and label dropout (DiT §3.1; official models.py @ ed81ce2) -----

def official_forward_with_cfg(model, x, t, y, cfg_scale):
    """DiT.forward_with_cfg of facebookresearch/DiT models.py @ ed81ce2, line for line: the first half of x run
    with y = [labels; nulls]; guidance on eps channels 0..2 only, written into both halves; the rest per half."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model(combined, t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def test_three_channel_guidance_is_the_official_forward_with_cfg():
    """The one guidance path, diffusion.classifier_free_guidance with cfg_channels=3, gives the official DiT's
    guided half: channels 0..2 guided, channel 3 and the variances from the conditional half."""
    model = randomized(tiny()).eval()
    n, s = 3, 2.5  # an odd batch: the shared path doubles it itself (the official call needs [x; anything])
    x, t, labels = inputs(model, B=n)
    t = t[:1].repeat(n)
    x_full = torch.cat([x, torch.randn_like(x)])            # second half must be ignored
    nulls = torch.full((n,), model.null_label)
    official = official_forward_with_cfg(model, x_full, torch.cat([t, t]), torch.cat([labels, nulls]), s)
    out = diffusion.classifier_free_guidance(model, x, t, {"y": labels}, s, model.null_label, cfg_channels=3)
    cond, uncond = model(x, t, labels), model(x, t, nulls)
    assert official.shape == (2 * n, 8, 8, 8) and out.shape == (n, 8, 8, 8)
    torch.testing.assert_close(out, official[:n], atol=1e-6, rtol=1e-6)
    guided = uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(out[:, :3], guided, atol=1e-5, rtol=1e-5)
    assert torch.equal(official[:n, :3], official[n:, :3])
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], atol=1e-6, rtol=1e-6)      # eps ch 3 + variances
    torch.testing.assert_close(official[n:, 3:], uncond[:, 3:], atol=1e-6, rtol=1e-6)
    assert (cond[:, :3] - uncond[:, :3]).abs().max() > 1e-3                         # guidance is visible


def test_label_embedder_dropout():
    emb = dit.LabelEmbedder(num_classes=5, hidden_size=8, dropout_prob=1.0)
    table = emb.embedding_table.weight
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.equal(emb(labels, train=False), table[labels])         # eval never drops
    assert torch.equal(emb(labels, train=True), table[[5, 5, 5, 5]])   # prob 1 -> always null
    forced = dit.LabelEmbedder(5, 8, 0.1)
    out = forced(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(out, forced.embedding_table.weight[[5, 1, 5, 3]])
    with pytest.raises(ValueError, match="class_dropout_prob"):
        dit.LabelEmbedder(5, 8, 0.0)(labels, train=False, force_drop_ids=torch.ones(4))


# ----- Patch layout -----

def test_unpatchify_layout():
    C, p, G = 3, 2, 2
    tok = torch.zeros(1, G * G, p * p * C)
    for i in range(G * G):
        for j in range(p * p * C):
            tok[0, i, j] = 1000 * i + j
    img = dit.unpatchify(tok, p, C)
    assert img.shape == (1, C, p * G, p * G)
    for c in range(C):
        for r in range(p * G):
            for q in range(p * G):
                hi, pr, wi, pc = r // p, r % p, q // p, q % p
                assert img[0, c, r, q] == 1000 * (hi * G + wi) + (pr * p * C + pc * C + c)


def test_patchify_unpatchify_round_trip():
    x = torch.randn(2, 4, 8, 8)
    g, p = 2, 4                                                          # independent (p, p, C) patchify
    tokens = x.reshape(2, 4, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 4)
    assert torch.equal(dit.unpatchify(tokens, p, 4), x)


def test_final_layer_bias_maps_to_pixels():
    C, p = 2, 2
    model = tiny(in_channels=C, learn_sigma=False, input_size=4, patch_size=p)
    with torch.no_grad():
        model.final_layer.linear.bias.copy_(torch.arange(p * p * C, dtype=torch.float32))
    x, t, y = inputs(model, B=1)
    out = model(x, t, y)[0]
    for c in range(C):
        for r in range(4):
            for q in range(4):
                assert out[c, r, q].item() == (r % p) * p * C + (q % p) * C + c


def test_patch_embed_token_order_row_major():
    model = tiny(input_size=8, patch_size=2)
    with torch.no_grad():
        model.x_embedder.proj.weight.zero_()
        model.x_embedder.proj.weight[0, 0, 0, 0] = 1.0      # token channel 0 <- top-left pixel of its patch
        model.x_embedder.proj.bias.zero_()
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8).repeat(1, 4, 1, 1)
    tok = model.x_embedder(x)
    assert tok.shape == (1, 16, 32)
    assert tok[0, :, 0].tolist() == [float(8 * 2 * h + 2 * w) for h in range(4) for w in range(4)]


# ----- Gradient checkpointing -----

def test_grad_checkpoint_same_gradients(monkeypatch):
    calls = []
    real = dit.checkpoint
    monkeypatch.setattr(dit, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    grads = []
    for ckpt in (False, True):
        model = randomized(tiny(grad_checkpoint=ckpt, class_dropout_prob=0.0)).train()
        x, t, y = inputs(model)
        model(x, t, y).square().mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert len(calls) == 2 and all(k == {"use_reentrant": False} for k in calls)   # one call per block
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    model.eval()
    model(x, t, y)
    assert len(calls) == 2                                  # never checkpoints in eval mode


# ----- Input validation -----

@pytest.mark.parametrize("kw,msg", [
    (dict(input_size=9), "multiple of patch_size"),
    (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
    (dict(hidden_size=6, num_heads=3), "multiple of 4"),
    (dict(attention="flash"), "sdpa.*math"),
    (dict(class_dropout_prob=1.5), "class_dropout_prob"),
    (dict(class_dropout_prob=-0.1), "class_dropout_prob"),
    (dict(depth=0), "depth"),
    (dict(num_classes=-1), "num_classes"),
])
def test_bad_constructor_args(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


def test_registry_overrides():
    model = dit.MODELS["DiT-Tiny"](input_size=16, in_channels=3, num_classes=0, depth=1)
    assert (model.input_size, model.in_channels, model.out_channels, model.depth) == (16, 3, 6, 1)
    with torch.device("meta"):
        m = dit.MODELS["DiT-S/2"](input_size=32, in_channels=3, num_classes=0)
    assert m.y_embedder is None and m.x_embedder.proj.weight.shape == (384, 3, 2, 2)


# ----- Primitives shared by the backbone files -----

def test_backbone_primitives_identical():
    """dit.py, uvit.py, diffit.py and genvit.py each stand alone, so they repeat small primitives; those must be the
    same text in every file that has them, so that a diff of two backbones shows only what the papers differ in."""
    def src(module, name):
        return inspect.getsource(getattr(module, name))

    assert src(dit, "timestep_embedding") == src(uvit, "timestep_embedding") == src(diffit, "timestep_embedding")
    for name in ("PatchEmbed", "unpatchify", "Mlp", "run_block"):
        assert src(dit, name) == src(uvit, name) == src(diffit, name) == src(genvit, name), name
    assert src(dit, "Attention") == src(uvit, "Attention") == src(genvit, "Attention")
    for name in ("TimestepEmbedder", "LabelEmbedder", "get_2d_sincos_pos_embed"):
        assert src(dit, name) == src(diffit, name), name
    assert dit.ATTENTION_BACKENDS == uvit.ATTENTION_BACKENDS == diffit.ATTENTION_BACKENDS == \
        genvit.ATTENTION_BACKENDS == ("sdpa", "math")
    models = (dit.DiT, uvit.UViT, diffit.ImageDiffiT, diffit.LatentDiffiT)
    assert len({inspect.getsource(m.null_label.fget) for m in models}) == 1

    def argument_checks(cls):  # the constructor's validation up to the class_dropout_prob check
        body = inspect.getsource(cls.__init__).split("super().__init__()\n", 1)[1]
        return body[:body.index("must lie in [0, 1]")]
    assert argument_checks(dit.DiT) == argument_checks(uvit.UViT) == argument_checks(diffit.LatentDiffiT)
    assert "ATTENTION_BACKENDS" in argument_checks(dit.DiT)


def test_backbones_stand_alone():
    """Each backbone file imports only torch and the standard library, never another project file."""
    for module in (dit, uvit, diffit, genvit):
        tree = ast.parse(inspect.getsource(module))
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert names <= {"math", "functools", "torch"}, (module.__name__, names)

"""Fast CPU tests for diffit.py (DiffiT, Hatamizadeh et al. 2024). Big models are built on the meta device."""
import json
import math
from pathlib import Path

import pytest
import torch

from diffit import (MODELS, DiffiTBlock, LatentDiffiT, TMSA, get_2d_sincos_pos_embed, relative_position_index,
                    timestep_embedding, unpatchify, window_partition, window_reverse)


def _reference_dir():
    return Path(__file__).resolve().parent / "reference"  # facts from the official code, see reference/README.md


def _n_params(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _meta(name, **kw):
    with torch.device("meta"):
        return MODELS[name](**kw)


def _perturb(model, seed=0, std=0.05):
    """Move every parameter off its init (zero heads would otherwise block all gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _small_latent(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    return LatentDiffiT(**{**cfg, **kw})


def _tiny(**kw):
    """DiffiT-Tiny at 16x16 for speed: windows 4 at 16x16 and 8x8 (local), global at 4x4."""
    return MODELS["DiffiT-Tiny"](**{"input_size": 16, **kw})


def _inputs(B=2, C=3, S=16, num_classes=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, num_classes, (B,), generator=g) if num_classes else None
    return x, t, y


# ----- Registry, counts, layout -----

def test_registry_and_public_attributes():
    assert set(MODELS) == {"DiffiT-CIFAR", "DiffiT-FFHQ64", "DiffiT-XL/2", "DiffiT-Tiny"}
    attrs = ("in_channels", "out_channels", "input_size", "patch_size", "num_classes", "learn_sigma",
             "class_dropout_prob", "hidden_size", "depth", "num_heads", "null_label")
    for name in MODELS:
        m = _meta(name)
        for a in attrs:
            assert hasattr(m, a), (name, a)
    xl = _meta("DiffiT-XL/2")
    assert (xl.in_channels, xl.out_channels, xl.patch_size, xl.depth, xl.num_heads, xl.null_label) == (4, 8, 2, 28,
                                                                                                      16, 1000)
    cifar = _meta("DiffiT-CIFAR")
    assert (cifar.out_channels, cifar.patch_size, cifar.hidden_size, cifar.null_label) == (3, 1, 128, None)
    assert cifar.depth == 2 + 2 + 2 + 2 + 2  # encoder 2,2,2 + decoder 2,2 (no decoder blocks at the bottleneck)
    assert cifar.window_sizes == [4, 4, 4] and cifar.num_heads == 4
    ffhq = _meta("DiffiT-FFHQ64")
    assert ffhq.window_sizes == [8, 8, 8, 8] and ffhq.depth == 7 + 5
    assert ffhq.decoder[-1][0].block.attn.relative_position_bias_table.shape == (15 ** 2, 4)  # 64x64, 128 ch
    assert ffhq.encoder[3][0].block.attn.relative_position_bias_table.shape == (15 ** 2, 8)  # 8x8 level: global


def test_latent_param_count_exact_and_by_hand():
    counts = json.loads((_reference_dir() / "diffit_latent_counts.json").read_text())
    m = _meta("DiffiT-XL/2")
    assert _n_params(m) == counts["total_params"] == 561_330_144
    assert _n_params(m, trainable=True) == counts["trainable_params"] == 561_035_232
    D, p, C, N, depth, h = 1152, 2, 4, 256, 28, 16  # independent formula (pos_embed included)
    block = (2 * (D * 3 * D + 3 * D)  # qkv + qkv_temb (time token dim = D)
             + D * D + D + (2 * 16 - 1) ** 2 * h  # proj + relative bias table, W = 16
             + D * 4 * D + 4 * D + 4 * D * D + D)  # MLP
    embed = N * D + (C * p * p * D + D) + (256 * D + D + D * D + D) + 1001 * D  # pos, patch, time MLP, labels
    total = embed + depth * block + (D * p * p * 8 + p * p * 8)  # + final linear
    assert total == 561_330_144
    # change detector (our computed number, no official figure): ImageNet-512 size, 63^2 x 16 bias tables
    assert _n_params(_meta("DiffiT-XL/2", input_size=64)) == 563_562_464


def test_image_param_counts_pinned():
    """Change detector, not a fidelity check: our own computed counts at registry defaults (the paper gives none)."""
    assert _n_params(_meta("DiffiT-CIFAR")) == 15_083_971
    assert _n_params(_meta("DiffiT-FFHQ64")) == 22_420_187
    assert _n_params(_meta("DiffiT-Tiny")) == 547_699
    assert _n_params(_meta("DiffiT-CIFAR", depth=4)) > _n_params(_meta("DiffiT-CIFAR"))  # App. H.1 reading, 4,4,4


def test_tmsa_and_resblock_param_count_by_hand():
    m = _meta("DiffiT-CIFAR")
    rb = m.encoder[0][0]  # 32x32 level: C = 128, 4 heads (head_dim 32), window 4, time token 512
    C, Dt, h, W = 128, 512, 4, 4
    tmsa = (C * 3 * C + 3 * C) + (Dt * 3 * C + 3 * C) + (C * C + C) + (2 * W - 1) ** 2 * h
    assert _n_params(rb.block.attn) == tmsa == 263_236
    mlp = C * 4 * C + 4 * C + 4 * C * C + C
    assert _n_params(rb) == 2 * C + (9 * C * C + C) + tmsa + mlp  # GN + conv3x3 + TMSA + MLP (LNs have no affine)
    rb = m.encoder[2][0]  # 8x8 level: C = 256, 8 heads
    C, h = 256, 8
    assert _n_params(rb.block.attn) == (C * 3 * C + 3 * C) + (Dt * 3 * C + 3 * C) + (C * C + C) + 49 * h


def test_latent_key_layout_matches_official_json():
    ref = json.loads((_reference_dir() / "diffit_latent_keys.json").read_text())
    sd = _meta("DiffiT-XL/2").state_dict()
    assert list(sd) == list(ref)  # same names, same order
    assert {k: list(v.shape) for k, v in sd.items()} == ref
    assert len(sd) == 346 and sum(k.endswith("relative_position_index") for k in sd) == 28
    assert sd["blocks.0.attn.relative_position_index"].dtype == torch.int64
    # the released weights (these names and shapes) load with strict=True; a missing key would fail
    official = {k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("index") else torch.float32)
                for k, s in ref.items()}
    model = _meta("DiffiT-XL/2")
    model.load_state_dict(official, strict=True)
    official.pop("blocks.3.attn.qkv_temb.bias")
    with pytest.raises(RuntimeError, match="qkv_temb.bias"):
        model.load_state_dict(official, strict=True)


@pytest.mark.parametrize("build", [lambda: _tiny(num_classes=10), lambda: _small_latent()])
def test_state_dict_round_trip_strict(build):
    torch.manual_seed(0)
    a = _perturb(build()).eval()
    torch.manual_seed(1)
    b = build().eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x, t, y = _inputs(C=a.in_channels, S=a.input_size, num_classes=10)
    with torch.no_grad():
        out = a(x, t, y)
        assert torch.equal(out, b(x, t, y)) and out.abs().max() > 0


# ----- Window attention pieces -----

def test_window_partition_reverse_round_trip_and_layout():
    x = torch.arange(2 * 8 * 12 * 3, dtype=torch.float32).view(2, 8, 12, 3)
    w = window_partition(x, 4)
    assert w.shape == (2 * 2 * 3, 16, 3)
    assert torch.equal(w[0], x[0, :4, :4].reshape(16, 3))  # first window, row-major inside
    assert torch.equal(w[1], x[0, :4, 4:8].reshape(16, 3))  # windows row-major over the grid
    assert torch.equal(w[3], x[0, 4:8, :4].reshape(16, 3))
    assert torch.equal(w[6], x[1, :4, :4].reshape(16, 3))  # batch-major
    assert torch.equal(window_reverse(w, 4, 8, 12), x)


def test_relative_position_index_known_values():
    assert torch.equal(relative_position_index(2), torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3],
                                                                 [8, 7, 5, 4]]))
    idx = relative_position_index(4)
    assert idx.shape == (16, 16) and idx.dtype == torch.int64
    assert torch.all(idx.diagonal() == 3 * 7 + 3)  # zero offset = centre of the 7x7 table
    assert idx.min() == 0 and idx.max() == 48 and len(idx.unique()) == 49
    assert torch.equal(idx + idx.T, torch.full_like(idx, 48))  # offset (dh, dw) and (-dh, -dw) are mirror rows


def _reference_tmsa(attn, x, c, with_time):
    """Eqs. 3-6 written out: separate per-q/k/v matrices, per-head loop, bias B built from coordinates."""
    Bw, N, D = x.shape
    h, W = attn.num_heads, attn.window_size
    hd = D // h
    ct = c.repeat_interleave(Bw // c.shape[0], dim=0)  # each window gets its sample's time token
    Ws, bs, Wt, bt = attn.qkv.weight, attn.qkv.bias, attn.qkv_temb.weight, attn.qkv_temb.bias
    qkv = []
    for i in range(3):
        sl = slice(i * D, (i + 1) * D)
        proj = x @ Ws[sl].T + bs[sl]
        if with_time:
            proj = proj + (ct @ Wt[sl].T + bt[sl])[:, None, :]
        qkv.append(proj)
    q, k, v = qkv
    bias = torch.empty(h, N, N, dtype=x.dtype)
    for i in range(N):
        for j in range(N):
            dh, dw = i // W - j // W, i % W - j % W
            bias[:, i, j] = attn.relative_position_bias_table[(dh + W - 1) * (2 * W - 1) + (dw + W - 1)]
    heads = []
    for n in range(h):
        sl = slice(n * hd, (n + 1) * hd)
        s = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(hd) + bias[n]
        heads.append(torch.softmax(s, dim=-1) @ v[..., sl])
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_tmsa_matches_written_out_reference(attention):
    torch.manual_seed(0)
    attn = _perturb(TMSA(dim=24, num_heads=3, window_size=3, temb_dim=10, attention=attention)).double()
    x, c = torch.randn(2 * 4, 9, 24, dtype=torch.float64), torch.randn(2, 10, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(attn(x, c), _reference_tmsa(attn, x, c, with_time=True), atol=1e-10)
        full = attn(x, c)
        attn.qkv_temb.weight.zero_()
        attn.qkv_temb.bias.zero_()
        # time term zeroed: plain multi-head attention with relative position bias, independent of c
        plain = _reference_tmsa(attn, x, c, with_time=False)
        assert torch.allclose(attn(x, c), plain, atol=1e-10)
        assert torch.allclose(attn(x, torch.randn_like(c)), plain, atol=1e-10)
        assert not torch.allclose(full, plain, atol=1e-3)  # the time term did matter


def test_sdpa_equals_math_forward_and_grad():
    torch.manual_seed(0)  # no label dropout: each forward would draw its own drops
    fast = _perturb(_tiny(num_classes=10, learn_sigma=True, class_dropout_prob=0.0))
    ref = _tiny(num_classes=10, learn_sigma=True, attention="math", class_dropout_prob=0.0)
    ref.load_state_dict(fast.state_dict())
    x, t, y = _inputs(num_classes=10)
    outs = []
    for m in (fast, ref):
        out = m(x, t, y)
        (out ** 2).mean().backward()
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    assert fast.encoder[0][0].block.attn.relative_position_bias_table.grad.abs().max() > 0


def test_window_attention_is_local_and_global_when_window_covers_grid():
    torch.manual_seed(0)
    blk = DiffiTBlock(16, 2, window_size=4, temb_dim=8)
    x, c = torch.randn(1, 64, 16), torch.randn(1, 8)
    x2 = x.clone()
    x2[0, 0] += torch.randn(16)  # token (0, 0): in window 0 (random: a constant shift would vanish in LN)
    with torch.no_grad():
        d = (blk(x2, c, (8, 8)) - blk(x, c, (8, 8))).abs().sum(-1).view(8, 8)
    assert torch.all(d[:4, :4] > 0) and torch.all(d[4:] == 0) and torch.all(d[:, 4:] == 0)
    glob = DiffiTBlock(16, 2, window_size=8, temb_dim=8)
    with torch.no_grad():
        assert torch.all((glob(x2, c, (8, 8)) - glob(x, c, (8, 8))).abs().sum(-1) > 0)


# ----- Embeddings and init -----

def test_timestep_and_pos_embed_values():
    e = timestep_embedding(torch.tensor([1, 0]), 256)
    assert e.shape == (2, 256)
    assert math.isclose(e[0, 0].item(), math.cos(1), rel_tol=1e-6) and math.isclose(e[0, 128].item(), math.sin(1),
                                                                                     rel_tol=1e-6)
    assert torch.equal(e[1], torch.cat([torch.ones(128), torch.zeros(128)]))
    pe = get_2d_sincos_pos_embed(16, 4)  # token n = 4 * row + col; channels 0..7 column, 8..15 row
    assert pe.shape == (16, 16)
    assert math.isclose(pe[1, 0].item(), math.sin(1), rel_tol=1e-6) and pe[1, 8].item() == 0  # (h=0, w=1)
    assert pe[4, 0].item() == 0 and math.isclose(pe[4, 8].item(), math.sin(1), rel_tol=1e-6)  # (h=1, w=0)


def test_latent_init_and_fresh_model_outputs_zero():
    torch.manual_seed(0)
    m = _small_latent(input_size=16, hidden_size=128, depth=2)
    assert torch.equal(m.pos_embed[0], get_2d_sincos_pos_embed(128, 8)) and not m.pos_embed.requires_grad
    assert m.blocks[0].attn.relative_position_bias_table.shape == (15 ** 2, 4)  # window = 8x8 grid: global
    assert 0.015 < m.blocks[0].attn.relative_position_bias_table.std() < 0.025
    assert 0.015 < m.t_embedder.mlp[0].weight.std() < 0.025
    assert torch.all(m.blocks[1].attn.qkv_temb.bias == 0)
    x, t, y = _inputs(C=4, S=16, num_classes=10)
    out = m(x, t, y)
    assert out.shape == (2, 8, 16, 16) and torch.all(out == 0)
    assert torch.all(_tiny()(*_inputs()[:2]) == 0)  # zero head (ours) in image space too


def test_unpatchify_layout():
    tokens = torch.arange(16 * 16, dtype=torch.float32).view(1, 16, 16)  # p = 2, C_out = 4, grid 4
    img = unpatchify(tokens, 2, 4)
    n, pr, pc, ch = 4 * 1 + 2, 1, 0, 3  # token at grid (1, 2), sub-pixel (1, 0), channel 3
    assert img[0, ch, 1 * 2 + pr, 2 * 2 + pc] == tokens[0, n, (pr * 2 + pc) * 4 + ch]


# ----- Forward behaviour -----

def test_forward_shapes():
    torch.manual_seed(0)
    x, t, y = _inputs(S=32, num_classes=10)
    with torch.no_grad():
        assert MODELS["DiffiT-Tiny"]()(x, t).shape == (2, 3, 32, 32)
        assert _tiny(learn_sigma=True, num_classes=10)(x[..., :16, :16], t.float(), y).shape == (2, 6, 16, 16)
        ffhq_like = MODELS["DiffiT-FFHQ64"](hidden_size=16, head_dim=16, num_groups=4, temb_dim=32)
        assert ffhq_like.window_sizes == [8, 8, 8, 8]
        assert ffhq_like(*_inputs(B=1, S=64)[:2]).shape == (1, 3, 64, 64)
        assert _small_latent()(*_inputs(C=4, S=8, num_classes=10)).shape == (2, 8, 8, 8)


def test_null_label_row():
    no_null = _tiny(num_classes=10, class_dropout_prob=0.0)
    assert no_null.null_label is None and no_null.y_embedder.embedding_table.num_embeddings == 10
    assert _tiny().y_embedder is None


@pytest.mark.parametrize("build", [lambda **kw: _tiny(num_classes=10, dropout=0.2, **kw),
                                   lambda **kw: _small_latent(**kw)])
def test_grad_checkpoint_gives_equal_gradients(build):
    torch.manual_seed(0)
    plain = _perturb(build()).train()
    ckpt = build(grad_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = _inputs(C=plain.in_channels, S=plain.input_size, num_classes=10)
    for m in (plain, ckpt):
        torch.manual_seed(123)  # same dropout / label-dropout draws (checkpoint preserves the RNG state)
        (m(x, t, y) ** 2).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name


# ----- Bad inputs -----

@pytest.mark.parametrize("build, match", [
    (lambda: MODELS["DiffiT-Tiny"](attention="flash"), "not supported; choose one of"),
    (lambda: MODELS["DiffiT-Tiny"](patch_size=2), "patch_size must be 1"),
    (lambda: MODELS["DiffiT-Tiny"](input_size=30), "divisible by 2"),
    (lambda: MODELS["DiffiT-Tiny"](window_size=3), "divisible by window_size"),
    (lambda: MODELS["DiffiT-Tiny"](hidden_size=24), "head_dim"),
    (lambda: MODELS["DiffiT-Tiny"](num_blocks=(1, 1)), "block count"),
    (lambda: MODELS["DiffiT-Tiny"](num_heads=3), "divisible by num_heads"),
    (lambda: MODELS["DiffiT-Tiny"](num_classes=-1), "num_classes"),
    (lambda: MODELS["DiffiT-Tiny"](num_classes=10, class_dropout_prob=1.5), "class_dropout_prob"),
    (lambda: _small_latent(attention="xformers"), "not supported; choose one of"),
    (lambda: _small_latent(input_size=9), "multiple of patch_size"),
    (lambda: _small_latent(num_heads=5), "divisible by num_heads"),
    (lambda: _small_latent(class_dropout_prob=-0.1), "class_dropout_prob"),
])
def test_bad_constructor_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()

"""
GenViT / HybViT (genvit.py) against the official sndnyang/Diffusion_ViT layout: the exact CIFAR-10 parameter count
and state_dict (reference/genvit_cifar_keys.json), a complete and strict conversion of the official keys (bare and
"denoise_fn."-prefixed), SDPA = math, the official initialisation (no zero-init), and a straight-line forward written
from the official model's description that ours must match on converted random weights.
Training: the recipe in test_recipes.py, HybViT in test_hybvit.py, runs in test_train_cifar.py; an official training
file is sampled in test_official.py.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import genvit
from conftest import genvit_official_state_dict, randomized

REF = Path(__file__).resolve().parent / "reference"  # facts from the official code, see reference/README.md
OFFICIAL = json.loads((REF / "genvit_cifar_keys.json").read_text())


def cifar_model(**kw):
    return genvit.MODELS["GenViT-CIFAR"](**kw)


# ----- Count and layout -----

def test_cifar_count_and_modules_match_official():
    with torch.device("meta"):
        model = cifar_model()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL["total_params"] == 11_185_068
    assert all(p.requires_grad for p in model.parameters()) and not list(model.buffers())
    ours = {n: sum(p.numel() for k, p in model.named_parameters() if k.startswith(prefix)) for n, prefix in [
        ("pos_embedding", "pos_embed"), ("cls_token", "cls_token"), ("time_mlp", "t_embedder."),
        ("to_patch_embedding", "x_embedder."), ("recon_head", "recon_head."), ("mlp_head", ("cls_norm.", "cls_head."))]}
    ours["transformer.time_layers"] = sum(p.numel() for k, p in model.named_parameters() if "time_modulation" in k)
    ours["transformer.layers"] = sum(p.numel() for k, p in model.named_parameters()
                                     if k.startswith("blocks.") and "time_modulation" not in k)
    assert ours == OFFICIAL["params_by_module"]


def test_official_keys_convert_completely_and_strictly():
    """Every one of the 131 official keys maps to one of ours with the same number of elements, and the result
    loads with strict=True (no key missing, none unexpected)."""
    sd = {k: torch.empty(s, device="meta") for k, s in OFFICIAL["keys"].items()}
    assert len(sd) == OFFICIAL["state_dict_num_keys"] == 131
    converted = genvit.convert_official(sd)
    with torch.device("meta"):
        model = cifar_model()
    ours = model.state_dict()
    assert set(converted) == set(ours) and len(converted) == 131
    assert all(converted[k].shape == ours[k].shape for k in ours)
    assert converted["x_embedder.proj.weight"].shape == (384, 3, 4, 4)  # the official Linear (384, 48)
    model.load_state_dict(converted, strict=True, assign=True)


def test_training_checkpoint_layout_prefixed_with_diffusion_buffers():
    """gevit_main.py saves {'model_state_dict': GaussianDiffusion.state_dict()}: 'denoise_fn.' + the ViT keys
    and 12 (1000,) schedule buffers, 143 keys; the buffers are dropped, the rest equals the bare conversion."""
    bare = genvit_official_state_dict()
    wrapped = {"denoise_fn." + k: v for k, v in bare.items()}
    wrapped.update({name: torch.rand(1000) for name in genvit.DIFFUSION_BUFFERS})
    assert len(wrapped) == 143
    a, b = genvit.convert_official(bare), genvit.convert_official({"model_state_dict": wrapped})
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="unknown keys"):
        genvit.convert_official({**bare, "head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown keys"):
        genvit.convert_official({**wrapped, "model.extra": torch.zeros(1)})


# ----- The forward pass against a straight-line reading of the official model -----

def official_forward(sd, img, t=None, ffn_time=False, heads=12, dim_head=32, p=4):
    """models/DifViT.py ViT.forward, written out on the official state_dict: t=None is the classifier path
    (mlp_head on the class token), else the noise prediction (recon_head on the patch tokens)."""
    B, C, H, W = img.shape
    h, w = H // p, W // p
    x = img.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)  # (h w) (p1 p2 c)
    x = F.linear(x, sd["to_patch_embedding.1.weight"], sd["to_patch_embedding.1.bias"])
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1) + sd["pos_embedding"]
    if t is not None:
        half = x.shape[-1] // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)  # in float32, as the official
        emb = t.float()[:, None] * freqs[None]
        emb = torch.cat([emb.sin(), emb.cos()], dim=-1).to(x.dtype)  # SinusoidalPosEmb: sin first
        temb = F.linear(F.gelu(F.linear(emb, sd["time_mlp.1.weight"], sd["time_mlp.1.bias"])),
                        sd["time_mlp.3.weight"], sd["time_mlp.3.bias"])
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.layers."))
    for i in range(n_layers):
        pre = f"transformer.layers.{i}."
        if t is not None:
            te = F.linear(F.silu(temb), sd[f"transformer.time_layers.{i}.1.weight"],
                          sd[f"transformer.time_layers.{i}.1.bias"])[:, :, None]
            scale, shift = te.chunk(2, dim=1)
            x = x * (scale + 1) + shift
        y = F.layer_norm(x, x.shape[-1:], sd[pre + "0.norm.weight"], sd[pre + "0.norm.bias"])
        q, k, v = F.linear(y, sd[pre + "0.fn.to_qkv.weight"]).chunk(3, dim=-1)
        q, k, v = (z.reshape(B, -1, heads, dim_head).transpose(1, 2) for z in (q, k, v))
        a = ((q @ k.transpose(-1, -2)) * dim_head ** -0.5).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(B, -1, heads * dim_head)
        x = x + F.linear(a, sd[pre + "0.fn.to_out.0.weight"], sd[pre + "0.fn.to_out.0.bias"])
        if t is not None and ffn_time:
            x = x * (scale + 1) + shift
        y = F.layer_norm(x, x.shape[-1:], sd[pre + "1.norm.weight"], sd[pre + "1.norm.bias"])
        y = F.linear(F.gelu(F.linear(y, sd[pre + "1.fn.net.0.weight"], sd[pre + "1.fn.net.0.bias"])),
                     sd[pre + "1.fn.net.3.weight"], sd[pre + "1.fn.net.3.bias"])
        x = x + y
    if t is None:
        z = F.layer_norm(x[:, 0], x.shape[-1:], sd["mlp_head.0.weight"], sd["mlp_head.0.bias"])
        return F.linear(z, sd["mlp_head.1.weight"], sd["mlp_head.1.bias"])
    out = F.linear(x[:, 1:], sd["recon_head.0.weight"], sd["recon_head.0.bias"])  # (B, h w, p1 p2 c)
    return out.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


@pytest.mark.parametrize("ffn_time", [False, True])
def test_forward_and_classify_match_the_official_computation(ffn_time):
    sd = genvit_official_state_dict(seed=1)
    model = cifar_model(ffn_time=ffn_time).double().eval()
    model.load_state_dict(genvit.convert_official(sd), strict=True)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0, 417, 999])
    with torch.no_grad():
        eps, logits = model(x, t), model.classify(x)
        ref_eps, ref_logits = official_forward(sd, x, t, ffn_time), official_forward(sd, x)
    assert eps.shape == (3, 3, 32, 32) and logits.shape == (3, 10)
    torch.testing.assert_close(eps, ref_eps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    other = cifar_model(ffn_time=not ffn_time).double().eval()
    other.load_state_dict(genvit.convert_official(sd))
    with torch.no_grad():  # the FFN-time switch changes the denoiser, never the classifier
        assert not torch.allclose(other(x, t), eps, atol=1e-6)
        torch.testing.assert_close(other.classify(x), logits, rtol=1e-12, atol=1e-12)


def test_time_embedding_closed_form():
    """sin first, f_k = 10000^(-k/(half-1)): at t=0 [0..0, 1..1]; the last frequency is exactly 1/10000."""
    e = genvit.genvit_time_embedding(torch.tensor([0.0, 10000.0]), 8)
    assert torch.equal(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(e[1, 3], torch.sin(torch.tensor(1.0)))  # 10000 * 10000^-1
    torch.testing.assert_close(e[1, 0], torch.sin(torch.tensor(10000.0)))


# ----- Attention paths, init, interface -----

def test_sdpa_equals_math():
    torch.manual_seed(0)
    fast = genvit.MODELS["GenViT-Tiny"]().eval()
    ref = genvit.MODELS["GenViT-Tiny"](attention="math").eval()
    ref.load_state_dict(fast.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), ref(x, t), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.classify(x), ref.classify(x), rtol=1e-5, atol=1e-5)


def test_official_init_has_no_zero_init():
    """xavier-normal Linear weights (std sqrt(2 / (fan_in + fan_out))), zero biases, LN (1, 0), N(0, 1) tokens; the
    patch conv counts as Linear(48, 384). A fresh model's noise prediction is therefore not zero."""
    torch.manual_seed(0)
    model = cifar_model()
    for name, fan_in, fan_out in [("blocks.0.time_modulation.1.weight", 260, 130), ("x_embedder.proj.weight", 48, 384),
                                  ("blocks.3.attn.qkv.weight", 384, 1152), ("recon_head.weight", 384, 48)]:
        w = model.get_parameter(name)
        assert abs(w.std().item() / math.sqrt(2 / (fan_in + fan_out)) - 1) < 0.05, name
    assert all(torch.count_nonzero(b) == 0 for n, b in model.named_parameters() if n.endswith(".bias")
               and "norm" not in n)
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(384))
    for p in (model.pos_embed, model.cls_token):
        assert abs(p.std().item() - 1) < 0.1
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32), torch.tensor([500])).abs().mean() > 0.1


def test_interface_checks():
    model = randomized(genvit.MODELS["GenViT-Tiny"](learn_sigma=True, num_classes=0))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == (2, 6, 32, 32) and torch.equal(model(x, t, torch.tensor([4, 7])), out)  # y ignored
    assert model.null_label is None
    with pytest.raises(ValueError, match="no classifier head"):
        model.classify(x)
    with pytest.raises(ValueError, match="unconditional"):
        genvit.GenViT(class_dropout_prob=0.1)


def test_grad_checkpoint_same_gradients():
    torch.manual_seed(0)
    a = genvit.MODELS["GenViT-Tiny"]()
    b = genvit.MODELS["GenViT-Tiny"](grad_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    for m in (a, b):
        (m(x, t).square().mean() + m.classify(x).logsumexp(-1).mean()).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name, millions", [("GenViT-STL10", 13), ("GenViT-CelebA", 17),
                                            ("GenViT-ImageNet128", 26), ("GenViT-ImageNet224", 84)])
def test_readme_config_sizes(name, millions):
    """The official ReadMe's table: STL-10 13M, CelebA 17M, ImageNet 128 26M, ImageNet 224 84M (rounded)."""
    with torch.device("meta"):
        model = genvit.MODELS[name]()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions


def test_ffn_time_default_and_checkpoints_keep_theirs():
    """ffn_time defaults to False (the released CIFAR-10 logs' code; 84a4cfe's --ffnt 1 is ffn_time=True); a
    checkpoint rebuilds with the ffn_time its model_kwargs record, and without the key with False."""
    from backbones import load_model
    assert cifar_model().ffn_time is False and all(not b.ffn_time for b in cifar_model().blocks)
    for recorded, want in [({}, False), ({"ffn_time": True}, True), ({"ffn_time": False}, False)]:
        model = genvit.MODELS["GenViT-Tiny"](**recorded)
        ckpt = {"backbone": "genvit", "model_name": "GenViT-Tiny", "model_kwargs": recorded,
                "model": model.state_dict(), "ema": model.state_dict()}
        loaded = load_model(ckpt, True, "cpu")
        assert loaded.ffn_time is want and all(b.ffn_time is want for b in loaded.blocks)

"""
GenViT / HybViT (genvit.py) against the official sndnyang/Diffusion_ViT layout: the exact CIFAR-10 parameter count
and state_dict (reference/genvit_cifar_keys.json), a complete and strict conversion of the official keys (bare and
"denoise_fn."-prefixed), SDPA = math, the official initialisation (no zero-init), and a straight-line forward written
from the official model's description that ours must match on converted random weights.
Then training: the recipe, the cosine LR, HybViT's joint objective, a CPU run that resumes exactly, sampling.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import genvit
import hybvit
import official
import sample
import train_cifar
import training
from conftest import randomized
from diffusion import make_diffusion
from test_train import archive, cifar_dir  # noqa: F401  (module-scoped fixtures: a tiny CIFAR-10 archive)

REF = Path(__file__).resolve().parent / "reference"  # facts from the official code, see reference/README.md
OFFICIAL = json.loads((REF / "genvit_cifar_keys.json").read_text())


def official_state_dict(seed=0, scale=0.05):
    """Random float64 tensors in the official CIFAR-10 layout (131 keys)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g, dtype=torch.float64) * scale for k, shape in OFFICIAL["keys"].items()}


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
    bare = official_state_dict()
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
    sd = official_state_dict(seed=1)
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


# ----- Training: the recipe, the LR schedule, HybViT's joint objective, a short CPU run -----


GENVIT_TINY = ["--backbone", "genvit", "--model", "GenViT-Tiny", "--model-arg", "hidden_size=32",
               "--model-arg", "depth=2", "--batch-size", "4", "--log-every", "1", "--keep-every", "0",
               "--sample-every", "0"]


def test_recipe_is_genvits():
    a = train_cifar.parse_args(["--backbone", "genvit"])
    got = {k: getattr(a, k) for k in ("model", "steps", "batch_size", "lr", "weight_decay", "warmup", "grad_clip",
                                      "ema_decay", "schedule", "loss_type", "lr_schedule", "min_lr",
                                      "fixed_variance", "sampler", "sample_steps", "formulation", "class_cond")}
    assert got == dict(model="GenViT-CIFAR", steps=195_000, batch_size=128, lr=1e-3, weight_decay=0.05, warmup=3900,
                       grad_clip=1.0, ema_decay=0.999, schedule="cosine", loss_type="l1", lr_schedule="cosine",
                       min_lr=1e-6, fixed_variance="small", sampler="ddpm", sample_steps=1000, formulation="ddpm",
                       class_cond=False)
    assert a.betas == [0.9, 0.999]
    edm = train_cifar.parse_args(["--backbone", "genvit", "--formulation", "edm"])  # the recipe's DDPM sampler
    assert (edm.sampler, edm.sample_steps, edm.loss_type) == ("heun", 18, "l1")   # does not carry over
    dit = train_cifar.parse_args(["--backbone", "dit"])
    assert (dit.loss_type, dit.lr_schedule, dit.fixed_variance, dit.schedule) == ("l2", "constant", "large", "linear")


@pytest.mark.parametrize("argv, expect", [
    (["--backbone", "genvit", "--class-cond"], "denoiser is unconditional"),
    (["--backbone", "dit", "--hybvit"], "--hybvit is HybViT's objective: it needs --backbone genvit"),
    (["--backbone", "genvit", "--hybvit", "--dataset", "latents"], "classifier on images"),
    (["--backbone", "genvit", "--min-lr", "0.1"], "--min-lr must lie in [0, --lr]"),
])
def test_bad_genvit_flags(argv, expect, capsys):
    with pytest.raises(SystemExit):
        train_cifar.parse_args(argv)
    assert expect in capsys.readouterr().err


def test_cosine_lr_closed_form():
    """utils/scheduler.py per step: min + (max - min) s / W in the warm-up, then min + (max - min)(1 + cos(pi f))/2."""
    a = train_cifar.parse_args(["--backbone", "genvit", "--steps", "1100", "--warmup", "100"])
    lr = lambda s: training.learning_rate(a, s)  # noqa: E731
    assert lr(0) == 1e-6 and lr(100) == 1e-3 and lr(1100) == 1e-6
    assert lr(50) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2, rel=1e-12)
    assert lr(600) == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-12)  # half-way down the cosine
    assert lr(350) == pytest.approx(1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12)
    u = train_cifar.parse_args(["--backbone", "uvit", "--warmup", "4"])  # constant: unchanged (warm-up from lr/4)
    assert [training.learning_rate(u, s) for s in (0, 3, 10**6)] == [u.lr / 4, u.lr, u.lr]


def test_hybvit_joint_objective_gradient():
    """train_step with joint: the gradient is px * grad(diffusion loss) + pyx * grad(label-smoothed CE)."""
    torch.manual_seed(0)
    model = genvit.MODELS["GenViT-Tiny"](hidden_size=32, depth=2)
    diffusion = make_diffusion(schedule="cosine", loss_type="l1")
    x, xc, yc = torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.tensor([1, 5, 9])
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(1)
    terms, _ = training.train_step(model, diffusion, opt, scaler, params, x, None, 0.0,
                                   joint=hybvit.JointLoss(model.classify, xc, yc, 100.0, 1.0, 0.1))
    got = [p.grad.clone() for p in params]
    torch.manual_seed(1)  # the same t and noise
    diff = diffusion.training_losses(model, x)["loss"].mean()
    ce = F.cross_entropy(model.classify(xc), yc, label_smoothing=0.1)
    want = torch.autograd.grad(100.0 * diff + ce, params)
    assert torch.allclose(terms["ce"].mean(), ce) and terms["train_acc"].shape == (3,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_random_crop_is_a_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    out = data.random_crop(x, 4)
    padded = F.pad(x, (4, 4, 4, 4), value=-1.0)
    offsets = set()
    for i in range(64):
        hits = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits, i
        offsets.add(hits[0])
    assert len(offsets) > 30  # offsets spread over the 81 positions


def test_hybvit_cpu_run_logs_test_accuracy_and_resumes_exactly(tmp_path, cifar_dir):  # noqa: F811
    common_args = GENVIT_TINY + ["--hybvit", "--data-dir", cifar_dir, "--ckpt-every", "2", "--warmup", "2"]
    train_cifar.main(common_args + ["--steps", "4", "--out-dir", str(tmp_path / "a")])
    train_cifar.main(common_args + ["--steps", "2", "--out-dir", str(tmp_path / "b")])
    train_cifar.main(common_args + ["--steps", "4", "--out-dir", str(tmp_path / "b")])  # resumes at step 2
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    accs = [r for r in logs[0] if "test_acc" in r]
    assert [r["step"] for r in accs] == [2, 4] and all(0 <= r["test_acc"] <= 100 for r in accs)
    losses = [[(r["step"], r["loss"], r["ce"]) for r in log if "loss" in r] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = (torch.load(tmp_path / d / "latest.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["diffusion"] == {"formulation": "ddpm", "loss_type": "l1", "schedule": "cosine", "timesteps": 1000,
                              "prediction": "eps", "learn_sigma": False, "fixed_variance": "small"}
    assert a["model_kwargs"]["num_classes"] == 10 and a["data"]["num_classes"] == 0  # a head, no conditioning
    sample.main(["--ckpt", str(tmp_path / "a" / "latest.pt"), "--num-samples", "2", "--steps", "2",
                 "--npz", str(tmp_path / "s.npz")])
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 32, 32, 3)


@pytest.mark.parametrize("formulation", ["edm", "flow"])
def test_genvit_trains_with_every_formulation(tmp_path, cifar_dir, formulation):  # noqa: F811
    train_cifar.main(GENVIT_TINY + ["--data-dir", cifar_dir, "--steps", "2", "--formulation", formulation,
                                    "--out-dir", str(tmp_path / formulation)])
    ck = torch.load(tmp_path / formulation / "latest.pt", weights_only=True)
    assert ck["diffusion"]["formulation"] == formulation and ck["diffusion"]["loss_type"] == "l1"


def test_official_training_file_samples(tmp_path):
    """An official gevit_main.py file ({'model_state_dict': 'denoise_fn.'-prefixed ViT + schedule buffers, 'epoch'})
    is recognised, converted, and sampled with GenViT's 1000-step ancestral DDPM on the cosine schedule."""
    sd = {"denoise_fn." + k: v.float() for k, v in official_state_dict(seed=3).items()}
    sd.update({name: torch.rand(1000) for name in genvit.DIFFUSION_BUFFERS})
    torch.save({"model_state_dict": sd, "epoch": 499}, tmp_path / "ema_checkpoint.pth")
    spec = official.recognise(sd, "ema_checkpoint.pth")
    assert (spec["model_name"], spec["diffusion"], spec["defaults"]["steps"]) == \
        ("GenViT-CIFAR", {"schedule": "cosine", "fixed_variance": "small"}, 1000)
    assert spec["model_kwargs"] == dict(input_size=32, patch_size=4, in_channels=3, hidden_size=384, depth=9,
                                        num_heads=12, head_dim=32, mlp_ratio=2.0, num_classes=10)
    sample.main(["--ckpt", str(tmp_path / "ema_checkpoint.pth"), "--num-samples", "2", "--steps", "2",
                 "--npz", str(tmp_path / "g.npz"), "--out", str(tmp_path / "g.png")])
    assert np.load(tmp_path / "g.npz")["arr_0"].shape == (2, 32, 32, 3)

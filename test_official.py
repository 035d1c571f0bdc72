"""
official.py and sample.py on official release files: bare state_dicts in the DiT / U-ViT / DiffiT layouts (built here
from our registry at small sizes, saved as the releases store them: .pt, .pth, .safetensors) are recognised by their
keys and shapes, loaded strictly, given their paper's sampling defaults, and sampled through a tiny SD-VAE to a uint8
npz; an official GenViT training file is recognised, converted and sampled.
"""
import json
import os

import numpy as np
import pytest
import torch

import diffit
import dit
import genvit
import official
import sample
import uvit
import vae
from conftest import genvit_official_state_dict, randomized
from diffusion import GaussianDiffusion, make_betas, make_diffusion, power_cosine_guidance
from dpm_solver import DiscreteVP, LinearVP, VPSolver

# Small official-layout models of 4 x 8 x 8 latents with a 1001-row-style label table (10 classes + null row).
# Hidden sizes are small, so --model names the release config that supplies the head count (as a user would).
OFFICIAL = {
    "dit": (lambda: dit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=16,
                            num_classes=10, class_dropout_prob=0.1, learn_sigma=True), "DiT-XL-2-256x256.pt",
            ["--model", "DiT-XL/2"]),
    "uvit": (lambda: uvit.UViT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=16,
                               num_classes=10, class_dropout_prob=0.1, conv=False), "imagenet256_uvit_huge.pth",
             ["--model", "U-ViT-H/2"]),
    "diffit": (lambda: diffit.LatentDiffiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                                           num_heads=4, num_classes=10, class_dropout_prob=0.1),
               "diffit_256.safetensors", []),  # the head count is in the bias tables' shape
}


def release_file(tmp_path, backbone):
    build, name, extra = OFFICIAL[backbone]
    torch.manual_seed(0)
    model = randomized(build()).eval()
    path = tmp_path / name
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if name.endswith(".safetensors"):
        vae.save_safetensors(sd, str(path))
    else:
        torch.save(sd, path)  # a bare state_dict, as the releases store them
    return model, str(path), extra


@pytest.mark.parametrize("backbone", sorted(OFFICIAL))
def test_release_is_recognised_loaded_strictly_and_sampled(tmp_path, tiny_vae, backbone):
    model, path, extra = release_file(tmp_path, backbone)
    sd = official.read_weights(path)
    spec = official.recognise(sd, path, extra[1] if extra else None)
    assert spec["backbone"] == backbone and spec["model_kwargs"]["num_classes"] == 10
    loaded, _ = official.load_official(sd, path, extra[1] if extra else None, "cpu")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))  # the same network, strictly loaded
    npz = tmp_path / "s.npz"
    sample.main(["--ckpt", path, *extra, "--vae", tiny_vae, "--num-samples", "3", "--batch-size", "2",
                 "--steps", "2", "--npz", str(npz), "--out", str(tmp_path / "g.png"), "--image-size", "16"])
    with np.load(npz) as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_0"].dtype == np.uint8  # 8x8 latents -> 16x16 images
        assert f["arr_1"].shape == (3,) and f["arr_1"].max() < 10


def test_paper_sampling_defaults(tmp_path):
    """Each release gets its paper's sampler, steps and guidance unless flags override them."""
    specs = {}
    for backbone in OFFICIAL:
        _, path, extra = release_file(tmp_path, backbone)
        specs[backbone] = official.recognise(official.read_weights(path), path, extra[1] if extra else None)
    d = specs["dit"]["defaults"]
    assert (d["sampler"], d["steps"], d["cfg_scale"], d["cfg_channels"]) == ("ddpm", 250, 1.5, 3)  # DiT sample_ddp
    u = specs["uvit"]  # U-ViT-H: eval_ldm_discrete.py's DPM-Solver++ on t in [1/1000, 1], the network fed 1000 t
    assert (u["defaults"]["sampler"], u["defaults"]["steps"], u["defaults"]["cfg_scale"]) == ("dpm++3s", 50, 1.4)
    assert u["solver"] == dict(discrete=True, time_scale=1000, t_end=1e-3)
    assert u["diffusion"]["schedule"] == "scaled_linear" and u["time_offset"] == 1  # U-ViT-H: discrete, n = t + 1
    assert u["model_kwargs"]["conv"] is False and u["model_kwargs"]["qkv_bias"] is False
    f = specs["diffit"]
    assert f["model_kwargs"]["num_heads"] == 4 and f["defaults"]["steps"] == 250 and f["defaults"]["cfg_channels"] == 3
    s = f["defaults"]["cfg_scale"](torch.tensor([999, 0]))  # power-cosine: ~1 at the start, 4.6 at t = 0
    assert s[0].item() == pytest.approx(1.0, abs=1e-6) and s[1].item() == pytest.approx(4.6)
    assert f["defaults"]["cfg_strength"] == 4.6  # what --cfg-schedule schedules when --cfg-scale is not given
    args = sample.parse_args(["--ckpt", "x", "--sampler", "ddim"])
    assert args.steps is None and args.cfg_scale is None  # sample.resolve fills them from the file's defaults


def test_dit_xl2_layout_is_recognised_without_model_flag():
    """The real DiT-XL/2 release (meta device: no memory): heads from the registry config of its size."""
    with torch.device("meta"):
        sd = dit.MODELS["DiT-XL/2"](input_size=32, in_channels=4, num_classes=1000).state_dict()
    spec = official.recognise(sd, "DiT-XL-2-256x256.pt")
    kw = spec["model_kwargs"]
    assert spec["model_name"] == "DiT-XL/2" and (kw["depth"], kw["num_heads"], kw["input_size"]) == (28, 16, 32)
    assert (kw["num_classes"], kw["learn_sigma"]) == (1000, True)


@pytest.mark.parametrize("problem, expect", [
    ("no_vae", "pass --vae"),
    ("vae_channels", "has 8 latent channels but the model makes 4"),
    ("unknown_keys", "match no official DiT / U-ViT / DiffiT / GenViT layout"),
    ("image_size", "--image-size 256: this model makes 8x8 latents"),
])
def test_bad_official_inputs_are_one_line(tmp_path, tiny_vae, capsys, problem, expect):
    _, path, extra = release_file(tmp_path, "dit")
    argv = ["--ckpt", path, *extra, "--num-samples", "1", "--steps", "1", "--out", str(tmp_path / "g.png")]
    if problem == "vae_channels":
        cfg = json.loads(open(os.path.join(tiny_vae, "config.json")).read())
        other = tmp_path / "vae8"
        other.mkdir()
        cfg["latent_channels"] = 8
        (other / "config.json").write_text(json.dumps(cfg))
        model = vae.AutoencoderKL(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        vae.save_safetensors(model.state_dict(), str(other / "diffusion_pytorch_model.safetensors"))
        argv += ["--vae", str(other)]
    elif problem == "unknown_keys":
        torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
        argv[1] = str(tmp_path / "other.pt")
    elif problem == "image_size":
        argv += ["--vae", tiny_vae, "--image-size", "256"]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and expect in msg and "\n" not in msg and not (tmp_path / "g.png").exists()


def flat(key):
    return lambda sd: sd.update({key: sd[key].flatten()})


MALFORMED = [  # (backbone, edit of its release state_dict, what the one-line refusal says)
    ("dit", lambda sd: sd.pop("pos_embed"), "looks like an official release but lacks 'pos_embed'"),
    ("dit", lambda sd: sd.pop("final_layer.linear.weight"), "lacks 'final_layer.linear.weight'"),
    ("dit", flat("x_embedder.proj.weight"), "has a tensor of another shape (ValueError: not enough values"),
    ("dit", flat("pos_embed"), "has a tensor of another shape (IndexError"),
    ("dit", lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), "does not load into it (missing 'blocks.1.mlp.fc2.bias')"),
    ("dit", lambda sd: sd.update({"blocks.0.attn.proj.bias": torch.zeros(3)}),
     "does not load into it (shape 'blocks.0.attn.proj.bias' (3,) != (64,))"),
    ("dit", lambda sd: sd.update({"pos_embed": sd["pos_embed"] * float("inf")}), "weight pos_embed holds non-finite"),
    ("uvit", lambda sd: sd.pop("pos_embed"), "lacks 'pos_embed'"),
    ("uvit", lambda sd: sd.pop("decoder_pred.weight"), "lacks 'decoder_pred.weight'"),
    ("uvit", lambda sd: sd.pop("mid_block.mlp.fc1.weight"), "lacks 'mid_block.mlp.fc1.weight'"),
    ("diffit", lambda sd: sd.pop("blocks.0.attn.relative_position_bias_table"),
     "lacks 'blocks.0.attn.relative_position_bias_table'"),
    ("diffit", lambda sd: sd.pop("final_layer.linear.weight"), "lacks 'final_layer.linear.weight'"),
    ("diffit", flat("pos_embed"), "has a tensor of another shape (IndexError"),
]


@pytest.mark.parametrize("backbone, edit, expect", MALFORMED)
def test_malformed_release_files_are_one_line(tmp_path, capsys, backbone, edit, expect):
    """A release file missing a key that recognition reads, with a tensor of another rank or shape, or with
    non-finite weights: one line naming it (once a KeyError or IndexError traceback, or a black grid)."""
    _, path, extra = release_file(tmp_path, backbone)
    sd = official.read_weights(path)
    edit(sd)
    (vae.save_safetensors if path.endswith(".safetensors") else torch.save)(
        {k: v.contiguous() for k, v in sd.items()}, path)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", path, *extra, "--num-samples", "1", "--steps", "1", "--out", str(tmp_path / "g.png")])
    msg = e.value.code
    assert isinstance(msg, str) and expect in msg and path in msg and "\n" not in msg
    assert not (tmp_path / "g.png").exists()


def test_official_training_file_samples(tmp_path):
    """An official gevit_main.py file ({'model_state_dict': 'denoise_fn.'-prefixed ViT + schedule buffers, 'epoch'})
    is recognised, converted, and sampled with GenViT's 1000-step ancestral DDPM on the cosine schedule."""
    sd = {"denoise_fn." + k: v.float() for k, v in genvit_official_state_dict(seed=3).items()}
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


# ----- U-ViT: the official scripts' samplers by default, ours by flag -----

def uvit_release(tmp_path, name, **kw):
    """A small U-ViT file of `name`'s layout (--model name supplies the head count), as the releases store it."""
    torch.manual_seed(0)
    model = randomized(uvit.UViT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=16, **kw)).eval()
    path = tmp_path / "release.pth"
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return official.load(str(path), None, name, "cpu")


class Recorder:
    def __init__(self, model):
        self.model, self.times = model, []

    def __call__(self, x, t, **kw):
        self.times.append(t.clone())
        return self.model(x, t, **kw)


def test_uvit_h_samples_with_eval_ldm_discrete_and_2m_by_flag(tmp_path, tiny_vae):
    model, net, diffusion, meta, defaults, _ = uvit_release(tmp_path, "U-ViT-H/2", in_channels=4, num_classes=10,
                                                             class_dropout_prob=0.1, conv=False)
    assert net is model and diffusion.default_sampler == defaults["sampler"] == "dpm++3s"
    assert set(diffusion.SAMPLERS) == {"dpm++3s", "dpm3s", "ddpm", "ddim", "dpm++2m"}
    assert (diffusion.default_steps(), diffusion.default_steps("dpm++2m"), diffusion.default_steps("ddpm")) == \
        (50, 50, 250)  # --sampler dpm++2m: the earlier default, 50 logSNR steps
    shape, y = (2, 4, 8, 8), {"y": torch.tensor([1, 4])}
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    guide = dict(model_kwargs=y, cfg_scale=1.4, null_label=10, noise=noise)
    rec = Recorder(model)
    x = diffusion.sample(rec, shape, steps=5, **guide)
    solver = VPSolver(DiscreteVP(make_betas("scaled_linear")), time_scale=1000, t_end=1e-3)
    assert torch.equal(x, solver.sample(model, shape, "dpm++3s", 5, **guide))
    taus = [float(t[0]) for t in rec.times]  # fractional, time-uniform: 1000 (1 - 0.999 k / 5), never 1
    assert taus == pytest.approx([1000 - 199.8 * k for k in range(5)], abs=1e-4) and rec.times[0].dtype == torch.float32
    rec = Recorder(model)
    x2m = diffusion.sample(rec, shape, "dpm++2m", 5, **guide)
    ours = GaussianDiffusion(schedule="scaled_linear").sample(lambda x, t, **kw: model(x, t + 1, **kw), shape,
                                                              "dpm++2m", 5, **guide)
    assert torch.equal(x2m, ours) and rec.times[0][0].item() == 1000 and rec.times[-1][0].item() == 1  # n = t + 1
    assert not torch.allclose(x, x2m, atol=1e-3)
    args = sample.parse_args(["--ckpt", "x", "--sampler", "dpm++2m"])
    assert sample.resolve(args, diffusion, defaults, model.null_label)[:3] == ("dpm++2m", 50, 1.4)
    npz = tmp_path / "s.npz"  # sample.py end to end with the default sampler
    sample.main(["--ckpt", str(tmp_path / "release.pth"), "--model", "U-ViT-H/2", "--vae", tiny_vae, "--num-samples",
                 "2", "--steps", "2", "--npz", str(npz), "--out", str(tmp_path / "g.png"), "--image-size", "16"])
    assert np.load(npz)["arr_0"].shape == (2, 16, 16, 3)


@pytest.mark.parametrize("name, kw, sampler", [
    ("U-ViT-L/2", dict(in_channels=4, num_classes=10, class_dropout_prob=0.15), "dpm3s"),  # eval_ldm.py
    ("U-ViT-L/4", dict(in_channels=3, num_classes=1000, class_dropout_prob=0.0), "dpm3s"),  # ImageNet-64, eval.py
    ("U-ViT-S/2", dict(in_channels=3, num_classes=0, class_dropout_prob=0.0), "dpm++2m"),  # CIFAR-10: E-M 1000
])
def test_continuous_uvit_releases(tmp_path, name, kw, sampler):
    """The continuous-time models: DPM-Solver-fast on the VP-SDE, the network fed 999 t, t from 1 to 1e-4 (eval.py,
    eval_ldm.py); CIFAR-10's official 1000-step Euler-Maruyama is not implemented, so it keeps dpm++2m."""
    model, net, diffusion, meta, defaults, _ = uvit_release(tmp_path, name, **kw)
    assert defaults["sampler"] == diffusion.default_sampler == sampler and defaults["steps"] == 50
    assert diffusion.offset == 0 and isinstance(diffusion.solver.schedule, LinearVP)
    assert (diffusion.solver.time_scale, diffusion.solver.t_end) == (999.0, 1e-4)
    shape, noise = (2, kw["in_channels"], 8, 8), torch.randn(2, kw["in_channels"], 8, 8)
    labels = {"y": torch.tensor([1, 2])} if kw["num_classes"] else {}
    rec = Recorder(model)
    x = diffusion.sample(rec, shape, "dpm3s", 4, model_kwargs=labels, noise=noise)
    assert torch.isfinite(x).all() and len(rec.times) == 4 and rec.times[0][0].item() == pytest.approx(999.0)


def test_cfg_schedule_makes_diffits_released_setting_one_command(tmp_path):
    """DiffiT: the paper's power-cosine 4.6 by default; --cfg-scale 4.4 --cfg-schedule power-cosine is the released
    script's setting; --cfg-scale alone stays constant; --cfg-schedule alone schedules the paper's strength."""
    _, path, _ = release_file(tmp_path, "diffit")
    defaults = official.recognise(official.read_weights(path), path)["defaults"]
    t = torch.tensor([999, 600, 250, 0])

    def settings(*flags):
        return sample.resolve(sample.parse_args(["--ckpt", path, *flags]), GaussianDiffusion(), defaults, 10)
    for flags, label, want in [([], "powcos4.6", power_cosine_guidance(4.6)(t)),
                               (["--cfg-scale", "4.4", "--cfg-schedule", "power-cosine"], "powcos4.4",
                                power_cosine_guidance(4.4)(t)),
                               (["--cfg-scale", "4.4"], "4.4", torch.full((4,), 4.4)),
                               (["--cfg-schedule", "constant"], "4.6", torch.full((4,), 4.6)),
                               (["--cfg-scale", "1", "--cfg-schedule", "power-cosine"], "1", torch.ones(4))]:
        s = settings(*flags)
        got = s.cfg_scale(t) if callable(s.cfg_scale) else torch.full((4,), s.cfg_scale)
        assert s.cfg_label == label and torch.allclose(got, want.float()), flags
    assert settings("--cfg-scale", "4.4", "--cfg-schedule", "power-cosine").cfg_scale(t)[-1].item() == \
        pytest.approx(4.4)
    args = sample.parse_args(["--ckpt", path, "--cfg-schedule", "power-cosine"])
    with pytest.raises(sample.RunError, match="EDM's is ln\\(sigma\\)/4"):
        sample.resolve(args, make_diffusion("edm"), dict(sampler="heun", steps=None, cfg_scale=2.0, cfg_channels=None,
                                                         cfg_label="2"), 10)

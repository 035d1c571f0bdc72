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
    u = specs["uvit"]
    assert (u["defaults"]["sampler"], u["defaults"]["steps"], u["defaults"]["cfg_scale"]) == ("dpm++2m", 50, 1.4)
    assert u["diffusion"]["schedule"] == "scaled_linear" and u["time_offset"] == 1  # U-ViT-H: discrete, n = t + 1
    assert u["model_kwargs"]["conv"] is False and u["model_kwargs"]["qkv_bias"] is False
    f = specs["diffit"]
    assert f["model_kwargs"]["num_heads"] == 4 and f["defaults"]["steps"] == 250 and f["defaults"]["cfg_channels"] == 3
    s = f["defaults"]["cfg_scale"](torch.tensor([999, 0]))  # power-cosine: ~1 at the start, 4.6 at t = 0
    assert s[0].item() == pytest.approx(1.0, abs=1e-6) and s[1].item() == pytest.approx(4.6)
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

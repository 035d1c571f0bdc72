"""
sample.py. On a hand-built train_cifar.py checkpoint (a tiny DiT, no training): the sampling settings are resolved
from the flags and the checkpoint without touching args, our checkpoints never reach official.py, and the help text
names no stale defaults. On conftest.py's trained run: the grid and npz, FID in the same pass as the npz, grid names
that say EMA or raw, and bad input (one line, nothing written). Official release files are in test_official.py;
runs of every backbone, formulation and latent model end in sample.py in test_train_cifar.py.
"""
import argparse
import os

import numpy as np
import pytest
import torch

import dit
import official
import sample
from checkpoints import CHECKPOINT_KEYS
from conftest import CPU_ONLY, a_file, image, one_line_error, randomized, snapshot
from diffusion import make_diffusion

KW = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10,
          class_dropout_prob=0.1, learn_sigma=False)


def checkpoint(tmp_path, formulation="ddpm", run_args=None):
    """A train_cifar.py checkpoint of a random tiny class-conditional DiT on 8x8 'CIFAR-10' pixels."""
    torch.manual_seed(0)
    sd = randomized(dit.DiT(**KW)).state_dict()
    ckpt = dict(step=7, model=sd, ema=sd, backbone="dit", model_name="DiT-Tiny", model_kwargs=KW,
                diffusion=make_diffusion(formulation).config(), args=run_args or {},
                data=dict(dataset="cifar10", image_size=8, channels=3, num_classes=10, pixels=True))
    assert set(CHECKPOINT_KEYS) <= set(ckpt)
    path = tmp_path / "latest.pt"
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize("formulation, run_args, flags, expect", [
    ("ddpm", {}, [], ("dpm++2m", 25, "1")),                                     # the formulation's default sampler
    ("ddpm", {"sampler": "ddpm", "sample_steps": 7}, [], ("ddpm", 7, "1")),     # the run's grid sampler and steps
    ("ddpm", {"sampler": "ddpm", "sample_steps": 7}, ["--sampler", "ddim"], ("ddim", 50, "1")),  # its usual count
    ("ddpm", {}, ["--steps", "3", "--cfg-scale", "1.50"], ("dpm++2m", 3, "1.5")),
    ("edm", {}, [], ("heun", 18, "1")),
    ("flow", {"sampler": "bogus"}, [], ("euler", 50, "1")),                     # an unknown recorded sampler: ignored
])
def test_settings_come_from_flags_then_the_checkpoint(tmp_path, formulation, run_args, flags, expect):
    args = sample.parse_args(["--ckpt", checkpoint(tmp_path, formulation, run_args), *flags])
    before = dict(vars(args))
    model, net, diffusion, meta, defaults, head = sample.load(args, torch.device("cpu"))
    s = sample.resolve(args, diffusion, defaults, model.null_label)
    assert (s.sampler, s.steps, s.cfg_label) == expect and net is model and meta["image_size"] == 8
    assert head == "dit DiT-Tiny at step 7 (EMA weights)"
    assert vars(args) == before  # nothing filled into args behind the caller's back
    name = f"sample_latest_ema_{expect[0]}_{expect[1]}steps_cfg{expect[2]}.png"
    assert sample.grid_path(args, s) == os.path.join(str(tmp_path), name)


def test_run_leaves_args_alone_and_never_reaches_official(tmp_path, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("a train_cifar.py checkpoint went through official.py")
    for name in ("load", "read_weights", "recognise", "load_official"):
        monkeypatch.setattr(official, name, refuse)
    npz = tmp_path / "s.npz"
    args = sample.parse_args(["--ckpt", checkpoint(tmp_path), "--num-samples", "3", "--batch-size", "2",
                              "--steps", "2", "--cfg-scale", "2", "--npz", str(npz)])
    before = dict(vars(args))
    assert sample.run(args) is None
    assert vars(args) == before
    out = capsys.readouterr().out
    assert "dit DiT-Tiny at step 7 (EMA weights), dpm++2m 2 steps, cfg 2, 3 samples on cpu" in out
    assert os.path.exists(tmp_path / "sample_latest_ema_dpm++2m_2steps_cfg2.png")
    with np.load(npz) as f:
        assert f["arr_0"].shape == (3, 8, 8, 3) and f["arr_1"].shape == (3,)


def test_settings_errors_are_one_line(tmp_path):
    path = checkpoint(tmp_path, "edm")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", path, "--sampler", "ddim"])
    assert e.value.code == "error: --sampler ddim is not a edm sampler; choose one of heun, euler"
    args = argparse.Namespace(sampler=None, steps=None, cfg_scale=2.0)
    with pytest.raises(sample.RunError, match="--cfg-scale needs a class-conditional model"):
        sample.resolve(args, make_diffusion(), dict(sampler="ddpm", steps=None, cfg_channels=None), None)


def test_help_names_no_stale_defaults(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = capsys.readouterr().out
    steps = text[text.index("\n  --steps"):text.index("\n  --eta")]
    assert "{" not in steps and "usual count" in steps  # once a python dict of step counts
    with open(sample.__file__) as f, open(official.__file__) as g:
        assert max(len(line.rstrip("\n")) for line in f.readlines() + g.readlines()) <= 120


# ----- Trained checkpoints: grid, npz and FID in one pass -----

def test_sample_grid_and_npz_unconditional(tmp_path, baseline):
    npz, png = tmp_path / "u.npz", tmp_path / "u.png"
    sample.main(["--ckpt", str(baseline / "latest.pt"), "--num-samples", "3", "--batch-size", "2", "--steps", "2",
                 "--npz", str(npz), "--out", str(png)])
    with np.load(npz) as f:
        assert f.files == ["arr_0"] and f["arr_0"].shape == (3, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    assert image(png).shape == (2 + 2 * 34, 2 + 2 * 34, 3)        # ceil(sqrt(3)) = 2 per row, 2 rows


def test_sample_py_fid_in_the_same_pass_as_the_npz(tmp_path, baseline, fake_inception, capsys):
    import fid
    net, ref = fake_inception
    npz = tmp_path / "s.npz"
    score, is_mean = sample.main(["--ckpt", str(baseline / "latest.pt"), "--num-samples", "12",
                                  "--batch-size", "5", "--steps", "2", "--npz", str(npz), "--fid-ref", ref,
                                       "--out", str(tmp_path / "g.png")])
    assert "FID" in capsys.readouterr().out
    with np.load(npz) as f:
        mu, sigma = fid.compute_statistics(f["arr_0"], model=net, device="cpu")
    # 12 images of 48 features: a singular covariance, whose matrix square root turns 1e-16 rounding into ~1e-8
    assert score == pytest.approx(fid.frechet_distance(mu, sigma, *fid.load_stats(ref)), rel=1e-6)
    assert 1 <= is_mean <= 10  # IS lies between 1 and the number of classes


def test_sample_grid_names_say_ema_or_raw(existing):
    for flag, tag in [([], "ema"), (["--no-ema"], "raw")]:
        sample.main(["--ckpt", str(existing / "latest.pt"), "--num-samples", "2", "--steps", "1", *flag])
    names = sorted(f for f in os.listdir(existing) if f.startswith("sample_"))
    assert names == ["sample_latest_ema_dpm++2m_1steps_cfg1.png", "sample_latest_raw_dpm++2m_1steps_cfg1.png"]


# ----- Bad input: one line, nothing written -----

def edited_kwargs(existing, tmp_path):
    ck = torch.load(existing / "latest.pt", weights_only=True)
    ck["model_kwargs"]["depth"] = 3
    torch.save(ck, tmp_path / "edited.pt")
    return ["--ckpt", str(tmp_path / "edited.pt")]


def edited_weights(change):
    def make(existing, tmp_path):
        ck = torch.load(existing / "latest.pt", weights_only=True)
        change(ck["ema"])
        torch.save(ck, tmp_path / "edited.pt")
        return ["--ckpt", str(tmp_path / "edited.pt")]
    return make


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def would_run_code(existing, tmp_path):
    torch.save({"backbone": "dit", "model_kwargs": Evil()}, tmp_path / "evil.pt")
    return ["--ckpt", str(tmp_path / "evil.pt")]


W = "final_layer.linear.weight"
SAMPLE_BAD = [
    (edited_kwargs, "do not fit DiT-Tiny with the recorded model_kwargs"),
    (edited_weights(lambda sd: sd.update({W: torch.zeros(3, 3)})), f"shape '{W}' (3, 3) != (96, 32)"),
    (edited_weights(lambda sd: sd.pop(W)), f"do not fit DiT-Tiny with the recorded model_kwargs (missing '{W}')"),
    (edited_weights(lambda sd: sd.update({W: sd[W] * float("nan")})), f"weight {W} holds non-finite values"),
    (would_run_code, "evil.pt is not a plain tensor file (would run code: "),
    (lambda e, t: ["--out", os.path.join(a_file(e, t), "g.png")], "plain.txt is a file, not a folder"),
    (lambda e, t: ["--npz", os.path.join(a_file(e, t), "s.npz")], "plain.txt is a file, not a folder"),
    (lambda e, t: ["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (lambda e, t: ["--eta", "5"], "--eta must be in [0, 1]"),
    (lambda e, t: ["--eta", "-1"], "--eta must be in [0, 1]"),
    (lambda e, t: ["--nrow", "0"], "--nrow must be >= 1"),
    (lambda e, t: ["--steps", "0"], "--steps must be in 1..1000"),
    pytest.param(lambda e, t: ["--precision", "fp16"], "--precision fp16 needs a CUDA device", marks=CPU_ONLY),
    (lambda e, t: ["--device", "foo"], "--device 'foo' is not a device"),
]


@pytest.mark.parametrize("extra, expect", SAMPLE_BAD)
def test_sample_bad_input(existing, tmp_path, capsys, extra, expect):
    argv = ["--ckpt", str(existing / "latest.pt"), "--num-samples", "2", "--steps", "1"] + extra(existing, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert expect in one_line_error(e, capsys)
    assert snapshot(tmp_path) == before

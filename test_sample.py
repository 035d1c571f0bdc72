"""
sample.py on a hand-built train_cifar.py checkpoint (a tiny DiT, no training): the sampling settings are resolved
from the flags and the checkpoint without touching args, our checkpoints never reach official.py, and the help text
names no stale defaults. End-to-end runs on trained checkpoints are in test_train.py, test_reliability.py,
test_latents.py and test_genvit.py; official release files in test_official.py.
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
from conftest import randomized
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

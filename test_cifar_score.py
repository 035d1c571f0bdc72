"""
cifar_score.py: the Frechet distance against its closed form, per-class colours, an npz scored end to end (real
images with their own labels: colour correlation 1), the classifier trained and reloaded, bad npz refused in one line.
"""
import json

import numpy as np
import pytest
import torch

import cifar_score
from data import load_cifar10
from errors import RunError


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 4, generator=g)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0])
    assert cifar_score.frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    assert cifar_score.frechet(a, a + shift) == pytest.approx(float((shift ** 2).sum()), abs=1e-6)  # same covariance
    scaled = float((a.mean(0) ** 2).sum() + torch.cov(a.T).trace())  # b = 2a: |mu|^2 + tr(5S - 2 (4 S^2)^1/2)
    assert cifar_score.frechet(a, 2 * a) == pytest.approx(scaled, rel=1e-5)


def test_class_colours():
    x = torch.zeros(20, 3, 2, 2, dtype=torch.uint8)
    y = torch.arange(20) % 10
    x[y == 3, 0] = 100  # class 3 redder than the rest: 100 above the others, 90 above the mean over classes
    c = cifar_score.class_colours(x, y)
    assert c.shape == (10, 3) and c[3, 0].item() == pytest.approx(90.0) and c[0, 0].item() == pytest.approx(-10.0)


def test_train_then_score_npz(tmp_path, cifar_dir, capsys):
    weights = str(tmp_path / "clf.pt")
    x, y = load_cifar10(cifar_dir)
    npz = tmp_path / "real.npz"
    np.savez(npz, x.permute(0, 2, 3, 1).numpy(), y.numpy())
    cifar_score.main(["--train", "--epochs", "1", "--data-dir", cifar_dir, "--weights", weights, str(npz)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("classifier: test accuracy ") and lines[0].endswith(weights)
    got = json.loads(lines[1])
    assert got["n"] == len(x) and got["colour_corr"] == 1.0 and 0.0 <= got["accuracy"] <= 1.0 and got["fd"] >= 0
    bad = tmp_path / "bad.npz"
    np.savez(bad, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        cifar_score.main(["--data-dir", cifar_dir, "--weights", weights, str(bad)])
    assert "arr_0 must be uint8 (N, 32, 32, 3)" in e.value.code and "\n" not in e.value.code
    with pytest.raises(RunError):
        cifar_score.score(cifar_score.Classifier(), str(bad), None, None)

"""training.py: the learning-rate schedule against its closed form. (train_step with HybViT's joint loss is in
test_hybvit.py; train_step, update_ema and step_draws run in every test_train_cifar.py run, whose resumes must
match bit-exactly.)"""
import math

import pytest

import train_cifar
import training


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

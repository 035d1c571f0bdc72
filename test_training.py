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


def test_ema_rampup_is_edms():
    """EDM training_loop.py: beta = 0.5 ^ (B / max(min(H, n B 0.05), 1e-8)) after n steps of batch B, H the half-life
    in images; the paper's decay once the ramp-up reaches it (0.9999: step 138,623), 0 at step 0 (EMA = weights)."""
    a = train_cifar.parse_args(["--backbone", "dit"])  # EMA 0.9999, ramp-up 0.05 (the default)
    d = lambda s: training.ema_decay(a, s)  # noqa: E731
    assert a.ema_rampup == 0.05 and d(0) == 0.0 and d(1) == 0.5 ** 20 and d(20) == 0.5 and d(100) == 0.5 ** 0.2
    B, H = 128, 128 * math.log(0.5) / math.log(0.9999)
    for n in (0, 1, 7, 1000, 50_000, 138_622, 138_623, 10 ** 6):
        assert d(n) == pytest.approx(0.5 ** (B / max(min(H, n * B * 0.05), 1e-8)), rel=1e-12, abs=1e-300)
    assert d(138_622) < 0.9999 == d(138_623) == d(10 ** 6)
    off = train_cifar.parse_args(["--backbone", "genvit", "--ema-rampup", "0"])  # off: the constant decay
    assert [training.ema_decay(off, s) for s in (0, 1, 10 ** 6)] == [0.999] * 3

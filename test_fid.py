"""fid.py: the Frechet distance against closed forms, image layouts, statistics files, statistics and the Inception
Score, the CLI end to end with a stand-in feature network, and bad input named in one line before any network is
built. The Inception network itself: test_fid_inception.py."""
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fid
from conftest import one_line_error, snapshot
from errors import RunError


def random_spd(rng, d, n=None):
    """Sample covariance of n > d Gaussian draws: SPD, like a real FID covariance."""
    x = rng.standard_normal((n or 3 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(x, rowvar=False)


class TinyFeatures(nn.Module):
    """Stand-in for the Inception: [0, 1] images -> (48 pooled pixel features, 12 logits)."""
    def __init__(self, offset=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(48, 12)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(12, 48, generator=g) * 3)
        self.offset = offset

    def forward(self, x):
        f = F.adaptive_avg_pool2d(x, 4).flatten(1) + self.offset  # (B, 48)
        return f, self.fc(f)


def direct_stats(model, images_nhwc):
    """Features in one pass, then np.cov: the definition compute_statistics must reproduce."""
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        f, logits = model(x)
    f = f.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False), logits.double().numpy()

# ----- Frechet distance -----

def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(7), rng.standard_normal(7)
    a, b = rng.uniform(0.1, 4, 7), rng.uniform(0.1, 4, 7)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2 for N(1, 2^2) vs N(4, 3^2)
    assert fid.frechet_distance([1.0], [[4.0]], [4.0], [[9.0]]) == pytest.approx(9 + 1, rel=1e-12)


def test_frechet_commuting_non_diagonal_closed_form():
    rng = np.random.default_rng(1)
    d = 16
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenvectors -> S1, S2 commute
    a, b = rng.uniform(0.01, 5, d), rng.uniform(0.01, 5, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert np.abs(s1 - np.diag(np.diag(s1))).max() > 0.1  # really non-diagonal
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)


def test_frechet_zero_symmetric_and_matches_eigen_formula():
    rng = np.random.default_rng(2)
    d = 64
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    f12, f21 = fid.frechet_distance(mu1, s1, mu2, s2), fid.frechet_distance(mu2, s2, mu1, s1)
    assert f12 == pytest.approx(f21, rel=1e-10)
    # direct formula: Tr sqrt(S1 S2) = sum sqrt(eigenvalues of the (non-symmetric) product), in complex float64
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).sum().real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert f12 == pytest.approx(want, rel=1e-10)
    assert f12 > 0
    # rank-deficient covariance (fewer samples than dims) stays finite and non-negative
    s3 = random_spd(rng, d, n=d // 2)
    assert 0 < fid.frechet_distance(mu1, s3, mu2, s2) < np.inf


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="shape mismatch"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


# ----- Image layouts -----


def test_image_layouts_and_dtype_checks():
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(fid.to_uint8_nchw(nhwc), nchw)
    assert torch.equal(fid.to_uint8_nchw(nchw), nchw)
    with pytest.raises(ValueError, match="uint8"):
        fid.to_uint8_nchw(nhwc.astype(np.float32))
    with pytest.raises(ValueError, match="RGB"):
        fid.to_uint8_nchw(nhwc[..., :2])

# ----- Statistics files -----

def test_stats_npz_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.standard_normal(5), random_spd(rng, 5)
    path = str(tmp_path / "sub" / "stats.npz")
    fid.save_stats(path, mu, sigma)
    with np.load(path) as z:
        assert sorted(z.files) == ["mu", "sigma"]  # pytorch-fid format
    mu2, sigma2 = fid.load_stats(path)
    assert mu2.dtype == np.float64 and np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)
    assert os.listdir(tmp_path / "sub") == ["stats.npz"]  # no temp file left behind
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(RunError, match="'mu' and 'sigma'"):
        fid.load_stats(str(tmp_path / "bad.npz"))


# ----- Statistics and Inception Score -----

def test_compute_statistics_matches_np_cov_and_streams():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    # A mean 1000 x the feature std: summing raw x x^T in float64 and subtracting n mu mu^T would lose ~1e-8
    # relative (eps x mean^2 / var) and fail the 1e-12 below; compute_statistics centres, and agrees to ~1e-15.
    model = TinyFeatures(offset=1000.0)
    mu, sigma, logits = direct_stats(model, images)
    mu1, s1, (is_mean, is_std) = fid.compute_statistics(images, batch_size=5, device="cpu", model=model,
                                                        inception_score=True)
    assert mu1.dtype == np.float64 and sigma.shape == (48, 48)
    assert np.allclose(mu1, mu, rtol=0, atol=1e-12) and np.allclose(s1, sigma, rtol=1e-12, atol=1e-15)
    assert (is_mean, is_std) == pytest.approx(fid.inception_score_from_logits(logits), rel=1e-6)
    # a sampler streaming NCHW tensor batches of uneven size gives the same statistics
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    stream = (nchw[i:i + 9] for i in range(0, 37, 9))
    mu2, s2 = fid.compute_statistics(stream, batch_size=4, device="cpu", model=model)
    assert np.allclose(mu2, mu, rtol=0, atol=1e-12) and np.allclose(s2, sigma, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute_statistics(images[:1], device="cpu", model=model)


def test_inception_score_analytic():
    assert fid.inception_score_from_logits(np.zeros((40, 1008))) == pytest.approx((1.0, 0.0))
    # confident, balanced predictions over k classes in every split: IS = k exactly
    k = 5
    logits = np.zeros((10 * k * 3, 1008))
    logits[np.arange(len(logits)), np.arange(len(logits)) % k] = 60.0
    mean, std = fid.inception_score_from_logits(logits)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    with pytest.raises(ValueError, match="splits"):
        fid.inception_score_from_logits(np.zeros((5, 1008)))

# ----- End to end (stand-in network) -----

def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    model = TinyFeatures()
    monkeypatch.setattr(fid, "build_inception", lambda *a, **k: model)
    rng = np.random.default_rng(5)
    samples = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
    ref = (rng.integers(0, 200, (30, 8, 8, 3))).astype(np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    mu1, s1, logits = direct_stats(model, samples)
    mu2, s2, _ = direct_stats(model, ref)
    want = fid.frechet_distance(mu1, s1, mu2, s2)
    assert want > 1
    args = ["--device", "cpu", "--batch-size", "7", "--cache-dir", str(tmp_path)]
    got = fid.main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz")] + args)
    assert got == pytest.approx(want, rel=1e-6)
    out = capsys.readouterr().out
    assert f"FID: {want:.4f}" in out and f"IS: {fid.inception_score_from_logits(logits)[0]:.4f}" in out
    # reference given as a stats npz, samples as a folder of PNGs (lossless): same number
    fid.save_stats(str(tmp_path / "ref_stats.npz"), mu2, s2)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(samples):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    got = fid.main([str(folder), "--ref", str(tmp_path / "ref_stats.npz")] + args)
    assert got == pytest.approx(want, rel=1e-6)
    with pytest.raises(SystemExit, match="not a reference name") as e:  # main(): a one-line error, not a traceback
        fid.main([str(tmp_path / "nothing.npz")] + args)
    assert "\n" not in str(e.value)


def test_make_ref_uses_the_cifar_loader_and_caches(tmp_path, monkeypatch, capsys):
    model = TinyFeatures()
    monkeypatch.setattr(fid, "build_inception", lambda *a, **k: model)
    rng = np.random.default_rng(6)
    cifar = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    calls = []

    def load_cifar10(data_dir, train=True, download=True):  # the contract of data.load_cifar10
        calls.append((data_dir, train, download))
        return torch.from_numpy(cifar).permute(0, 3, 1, 2).contiguous(), torch.zeros(20, dtype=torch.int64)
    monkeypatch.setitem(sys.modules, "data", types.SimpleNamespace(load_cifar10=load_cifar10))
    args = ["--cache-dir", str(tmp_path), "--device", "cpu", "--data-dir", "dd"]
    fid.main(["--make-ref", "cifar10-train"] + args)
    path = fid.ref_stats_path("cifar10-train", str(tmp_path))
    assert calls == [("dd", True, True)] and f"cached at {path}" in capsys.readouterr().out
    mu, sigma, _ = direct_stats(model, cifar)
    mu_c, sigma_c = fid.load_stats(path)
    assert np.allclose(mu_c, mu, atol=1e-12) and np.allclose(sigma_c, sigma, rtol=1e-9, atol=1e-14)
    # scoring against the named reference reads the cache (no second CIFAR load) and says where it is
    np.savez(tmp_path / "s.npz", arr_0=cifar[:12])
    got = fid.main([str(tmp_path / "s.npz"), "--ref", "cifar10-train"] + args)
    assert calls == [("dd", True, True)] and path in capsys.readouterr().out
    mu_s, s_s, _ = direct_stats(model, cifar[:12])
    assert got == pytest.approx(fid.frechet_distance(mu_s, s_s, mu, sigma), rel=1e-6)


# ----- Bad input: named before any network -----

def truncated_npz(t):
    np.savez(t / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    raw = (t / "s.npz").read_bytes()
    (t / "s.npz").write_bytes(raw[: len(raw) // 2])
    return [str(t / "s.npz")]


def npz_of(t, arr):
    np.savez(t / "s.npz", arr_0=arr)
    return [str(t / "s.npz")]


def folder_with_bad_png(t):
    (t / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(t / "imgs" / "a.png")
    (t / "imgs" / "b.png").write_text("not an image")
    return [str(t / "imgs")]


def foreign_weights(t):
    torch.save({"w": torch.zeros(3)}, t / "mine.pt")  # the user's own file: never "delete it"
    return npz_of(t, np.zeros((4, 8, 8, 3), np.uint8)) + ["--weights", str(t / "mine.pt")]


FID_BAD = [
    (truncated_npz, "it is truncated or not an .npz"),
    (lambda t: npz_of(t, np.zeros((4, 8, 8), np.uint8)), "expected uint8 RGB images"),
    (lambda t: npz_of(t, np.zeros((4, 8, 8, 3), np.float32)), "expected uint8 RGB images"),
    (lambda t: npz_of(t, np.zeros((1, 8, 8, 3), np.uint8)), "holds 1 image(s); FID needs at least 2"),
    (folder_with_bad_png, "b.png"),
    (foreign_weights, "not pytorch-fid's FID Inception weights; point --weights"),
]


@pytest.mark.parametrize("make, expect", FID_BAD)
def test_fid_bad_input_is_named_before_any_network(tmp_path, capsys, monkeypatch, make, expect):
    monkeypatch.delenv("FID_WEIGHTS", raising=False)
    fid.save_stats(str(tmp_path / "ref.npz"), np.zeros(4), np.eye(4))
    argv = make(tmp_path)
    argv = argv if "--ref" in argv else argv + ["--ref", str(tmp_path / "ref.npz")]
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        fid.main(argv + ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    msg = one_line_error(e, capsys)
    assert expect in msg and "download" not in msg and "delete" not in msg
    assert snapshot(tmp_path) == before


def test_image_folder_batches_center_crop_mixed_sizes(tmp_path):
    """A folder of mixed sizes (COCO val2014) is refused as is, and with image_size each image is
    data.center_crop_resize'd first, exactly."""
    from data import center_crop_resize
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 30), (24, 50), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(RunError, match="differ in size"):
        fid.image_folder_batches(str(tmp_path), 2)
    batches, n = fid.image_folder_batches(str(tmp_path), 2, image_size=16)
    got = np.concatenate(list(batches))
    assert n == 3 and got.shape == (3, 16, 16, 3)
    for i in range(3):
        with Image.open(tmp_path / f"{i}.png") as im:
            assert np.array_equal(got[i], center_crop_resize(im, 16).permute(1, 2, 0).numpy())

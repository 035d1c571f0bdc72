"""Tests for fid.py and fid_inception.py: Frechet distance against closed forms, the Inception's exact state_dict,
pinned preprocessing, weights checksum handling, statistics and the CLI end to end with a stand-in feature network."""
import hashlib
import json
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
import fid_inception
from errors import RunError

REF_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "fid_inception_keys.json")


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

# ----- The network -----

def test_state_dict_matches_reference_keys_and_shapes():
    with open(REF_KEYS) as f:
        ref = json.load(f)
    model = fid_inception.InceptionV3FID()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(ref)) == []  # nothing extra
    assert sorted(set(ref) - set(ours)) == []  # nothing missing
    assert ours == ref
    # and the parameter / buffer split is pytorch-fid's: every key but the BatchNorm running statistics is a
    # parameter (frozen), so nothing a user fine-tunes is silently left out of the state_dict or put in twice
    buffers = {k for k in ref if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert {k for k, _ in model.named_parameters()} == set(ref) - buffers
    assert {k for k, _ in model.named_buffers()} == buffers
    assert all(not p.requires_grad for p in model.parameters())


def test_strict_load_of_reference_state_dict():
    with open(REF_KEYS) as f:
        ref = json.load(f)
    sd = {k: torch.full(s, float(i)) if s else torch.tensor(7) for i, (k, s) in enumerate(ref.items())}
    model = fid_inception.InceptionV3FID()
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.fc.weight, sd["fc.weight"])
    # an old checkpoint without num_batches_tracked loads too (into a fresh model, so that every value checked
    # below comes from this load), the counters filled with 0; a missing weight does not load
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    fresh = fid_inception.load_fid_state_dict(fid_inception.InceptionV3FID(), old)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in old.items())
    assert all(v.item() == 0 for k, v in fresh.state_dict().items() if k.endswith("num_batches_tracked"))
    del old["Mixed_6e.branch7x7dbl_5.conv.weight"]
    with pytest.raises(RuntimeError, match="Mixed_6e.branch7x7dbl_5.conv.weight"):
        fid_inception.load_fid_state_dict(fresh, old)


def test_forward_shapes_and_eval_mode():
    torch.manual_seed(0)
    model = fid_inception.InceptionV3FID()
    model.train()  # must be ignored: BatchNorm keeps the running statistics
    assert not any(m.training for m in model.modules())
    x = torch.rand(2, 3, 32, 32)  # resized to 299 inside; 32x32 would not survive the stem otherwise
    with torch.no_grad():
        pool, logits = model(x)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and (pool >= 0).all()  # pool3 averages post-ReLU / max-pooled maps
    assert torch.allclose(logits, model.fc(pool))
    assert not torch.equal(pool[0], pool[1])


@pytest.mark.parametrize("block, c_in, order", [
    (fid_inception.FIDInceptionA(192, 32), 192, ["branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"]),
    (fid_inception.InceptionB(288), 288, ["branch3x3", "branch3x3dbl_3", None]),
    (fid_inception.FIDInceptionC(768, 128), 768, ["branch1x1", "branch7x7_3", "branch7x7dbl_5", "branch_pool"]),
    (fid_inception.InceptionD(768), 768, ["branch3x3_2", "branch7x7x3_4", None]),
    (fid_inception.FIDInceptionE(1280), 1280,
     ["branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]),
])
def test_branch_concat_order(block, c_in, order):
    # zero convs + a distinct BatchNorm bias per layer: each output channel reveals which layer produced it
    block.eval()
    with torch.no_grad():
        for i, (_, layer) in enumerate(block.named_children()):
            layer.conv.weight.zero_()
            layer.bn.bias.fill_(i + 1.0)
        out = block(torch.zeros(1, c_in, 3, 3))[0, :, 0, 0]
    names = [n for n, _ in block.named_children()]
    want = torch.cat([torch.full((getattr(block, n).conv.out_channels,), names.index(n) + 1.0) if n
                      else torch.zeros(c_in) for n in order])  # None: the parameter-free max-pool branch
    assert torch.equal(out, want)


def test_pool_branches_follow_tf():
    # a spike in the corner of a 3x3 map; pool branch = identity 1x1 conv on channel 0 (it is concatenated last).
    # TF avg pool ignores padding: 9/4 at the corner, 9/9 in the centre; Mixed_7c max-pools: 9 and 9.
    model = fid_inception.InceptionV3FID()
    for name, want in [("Mixed_5b", (2.25, 1.0, 0.0)), ("Mixed_6b", (2.25, 1.0, 0.0)),
                       ("Mixed_7b", (2.25, 1.0, 0.0)), ("Mixed_7c", (9.0, 9.0, 0.0))]:
        block = getattr(model, name)
        bp = block.branch_pool
        with torch.no_grad():
            bp.conv.weight.zero_()
            bp.conv.weight[0, 0] = 1.0
            bp.bn.running_var.fill_(1.0 - bp.bn.eps)  # BatchNorm becomes the identity
            x = torch.zeros(1, block.branch1x1.conv.in_channels, 3, 3)
            x[0, 0, 0, 0] = 9.0
            y = block(x)[0, -bp.conv.out_channels]  # (3, 3)
        assert (y[0, 0].item(), y[1, 1].item(), y[2, 2].item()) == pytest.approx(want, abs=1e-5), name


# ----- Preprocessing -----

def test_preprocess_pinned_on_2x2_image():
    img = np.array([[[0, 10, 20], [255, 30, 40]],
                    [[51, 50, 60], [102, 70, 80]]], dtype=np.uint8)[None]  # (1, 2, 2, 3) NHWC
    x = fid.to_uint8_nchw(img).float() / 255
    y = fid_inception.preprocess(x)[0]  # (3, 299, 299)
    assert y.shape == (3, 299, 299)
    p = torch.from_numpy(img[0]).permute(2, 0, 1).double() / 255 * 2 - 1  # (3, 2, 2) in [-1, 1]
    for (i, j), (a, b) in {(0, 0): (0, 0), (0, 298): (0, 1), (298, 0): (1, 0), (298, 298): (1, 1)}.items():
        assert torch.allclose(y[:, i, j].double(), p[:, a, b], atol=1e-6)  # corners are the pixels
    assert y[0, 0, 0].item() == -1.0 and y[0, 0, 298].item() == 1.0  # uint8 0 -> -1, 255 -> +1 exactly
    # half-pixel centres (align_corners=False): output i samples source (i + 0.5) * 2 / 299 - 0.5, clamped at 0,
    # so columns 0..74 are exactly pixel 0, column 75 starts blending, column 149 is the midpoint
    assert torch.equal(y[:, 0, :75], y[:, 0, :1].expand(3, 75))
    w = 151 / 299 - 0.5
    assert torch.allclose(y[:, 0, 75].double(), p[:, 0, 0] + w * (p[:, 0, 1] - p[:, 0, 0]), atol=1e-6)
    assert torch.allclose(y[:, 149, 149].double(), p.mean((1, 2)), atol=1e-6)
    assert torch.allclose(y[:, 0, 149].double(), p[:, 0].mean(1), atol=1e-6)
    # weights per source pixel average to 1/2 along each axis, so the image mean is kept
    assert torch.allclose(y.double().mean((1, 2)), p.mean((1, 2)), atol=1e-5)


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

# ----- Statistics files and weights -----

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


def test_download_checks_sha1(tmp_path, monkeypatch):
    src = tmp_path / "fake.pth"
    src.write_bytes(b"not the inception weights" * 1000)
    url = src.as_uri()  # file://...
    monkeypatch.setattr(fid_inception, "FID_WEIGHTS_URL", url)
    monkeypatch.delenv("FID_WEIGHTS", raising=False)
    cache = tmp_path / "cache"
    dst = cache / "fake.pth"
    with pytest.raises(RunError) as e:  # bad checksum: clear message naming the URL and the destination
        fid_inception.fid_weights_path(cache_dir=str(cache), progress=False)
    assert "checksum mismatch" in str(e.value) and url in str(e.value) and str(dst) in str(e.value)
    assert os.listdir(cache) == []  # neither the bad file nor a temp file is left
    monkeypatch.setattr(fid_inception, "FID_WEIGHTS_URL", (tmp_path / "missing.pth").as_uri())
    with pytest.raises(RunError, match="could not download .*by hand"):  # offline / not found
        fid_inception.fid_weights_path(cache_dir=str(cache), progress=False)
    monkeypatch.setattr(fid_inception, "FID_WEIGHTS_URL", url)
    monkeypatch.setattr(fid_inception, "FID_WEIGHTS_SHA1", hashlib.sha1(src.read_bytes()).hexdigest())
    assert fid_inception.fid_weights_path(cache_dir=str(cache), progress=False) == str(dst)
    assert dst.read_bytes() == src.read_bytes() and os.listdir(cache) == ["fake.pth"]
    src.unlink()  # cached now: no second download
    assert fid_inception.fid_weights_path(cache_dir=str(cache), progress=False) == str(dst)


def test_build_inception_from_weights_file(tmp_path, monkeypatch):
    torch.manual_seed(1)
    sd = {k: v for k, v in fid_inception.InceptionV3FID().state_dict().items() if not k.endswith("num_batches_tracked")}
    for k, v in sd.items():
        if "running_var" in k:
            v.uniform_(0.5, 2.0)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    with pytest.raises(RunError, match="expected .*not pytorch-fid's FID Inception weights"):
        fid_inception.build_inception(weights=str(path), progress=False)
    monkeypatch.setattr(fid_inception, "FID_WEIGHTS_SHA1", fid_inception.sha1_of(str(path)))
    monkeypatch.setenv("FID_WEIGHTS", str(path))
    model = fid_inception.build_inception(progress=False)  # via $FID_WEIGHTS
    assert not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    monkeypatch.setenv("FID_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(RunError, match="nope.pth does not exist; download .*pytorch-fid"):
        fid_inception.build_inception(progress=False)

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

"""
fid_inception.py: the Inception's exact state_dict (reference/fid_inception_keys.json) and its strict loading, the
branch concatenation order and TF pooling of the blocks, the preprocessing pinned on a 2x2 image, and the weights
download and checksum handling.
"""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import fid
import fid_inception
from errors import RunError

REF_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "fid_inception_keys.json")


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


# ----- Weights -----

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

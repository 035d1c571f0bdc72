"""
data.py: the CIFAR-10 download (md5 check, safe extraction, pickles that may hold arrays only), batch indices,
crops, image folders and latents (.npz files and memory-mapped extract_latents.py folders); every bad input a
one-line error (malformed latents too: meta.json entries of the wrong kind, labels beyond the classes, latents that
are not floats, a .pt that would run code), with nothing written.
"""
import datetime
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import sample
from conftest import C, H, N, PER_BATCH, digest, exit_message, train, write_latents
from data import center_crop_resize


# ----- CIFAR-10 download / verify / extract -----

def test_download_verifies_md5_and_parses_the_pickles(tmp_path, mirror):
    root = tmp_path / "d"
    x, y = data.load_cifar10(str(root), train=True)
    assert x.dtype == torch.uint8 and x.shape == (5 * PER_BATCH, 3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (5 * PER_BATCH,)
    want_x = np.concatenate([mirror["arrays"][f"data_batch_{i}"][0] for i in range(1, 6)])
    want_y = sum([mirror["arrays"][f"data_batch_{i}"][1] for i in range(1, 6)], [])
    # row = 1024 R, 1024 G, 1024 B, each plane row-major: pixel (c, h, w) is column c*1024 + h*32 + w
    assert torch.equal(x, torch.from_numpy(want_x.reshape(-1, 3, 32, 32)))
    assert x[7, 2, 5, 9] == want_x[7, 2 * 1024 + 5 * 32 + 9]
    assert y.tolist() == want_y
    xt, yt = data.load_cifar10(str(root), train=False)
    assert xt.shape == (PER_BATCH, 3, 32, 32) and yt.tolist() == mirror["arrays"]["test_batch"][1]
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]  # no .part / temp dirs


def test_existing_folder_is_used_without_download(cifar_dir, monkeypatch):
    monkeypatch.setattr(data, "CIFAR_URL", "file:///nonexistent/cifar-10-python.tar.gz")
    x, _ = data.load_cifar10(cifar_dir)
    assert x.shape == (5 * PER_BATCH, 3, 32, 32)


def test_bad_md5_is_rejected_and_nothing_is_left(tmp_path, mirror, monkeypatch, capsys):
    monkeypatch.setattr(data, "CIFAR_MD5", "0" * 32)
    with pytest.raises(data.DataError, match="md5 mismatch") as e:
        data.load_cifar10(str(tmp_path / "d"))
    assert mirror["url"] in str(e.value) and "by hand" in str(e.value)
    assert os.listdir(tmp_path / "d") == []
    with pytest.raises(SystemExit) as e:  # through the CLI: one line, non-zero
        train(tmp_path / "run", tmp_path / "d", "--steps", 1, "--cifar-url", mirror["url"])
    msg = exit_message(e, capsys)
    assert msg.startswith("error: md5 mismatch") and "\n" not in msg
    assert not (tmp_path / "run").exists()


def test_offline_message_names_url_and_manual_layouts(tmp_path, monkeypatch):
    url = "file:///nonexistent/cifar-10-python.tar.gz"
    with pytest.raises(data.DataError) as e:
        data.load_cifar10(str(tmp_path), url=url)
    msg = str(e.value)
    assert msg.startswith(f"could not download {url}")
    assert os.path.join(str(tmp_path), "cifar-10-python.tar.gz") in msg and "cifar-10-batches-py/ folder" in msg
    assert ".." not in msg  # only paths the user has: no tool outside this repository
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("member", ["../evil", "/abs/evil", "cifar-10-batches-py/../../evil", "other/evil", "link"])
def test_unsafe_archive_members_are_rejected(tmp_path, monkeypatch, member):
    path = str(tmp_path / "cifar-10-python.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
        bad = tarfile.TarInfo("cifar-10-batches-py/link" if member == "link" else member)
        if member == "link":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            bad.size = 4
        tar.addfile(bad, None if member == "link" else io.BytesIO(b"evil"))
    monkeypatch.setattr(data, "CIFAR_MD5", digest(path))
    with pytest.raises(data.DataError, match="unsafe member"):
        data.load_cifar10(str(tmp_path), url="file:///unused/cifar-10-python.tar.gz")
    assert sorted(os.listdir(tmp_path)) == ["cifar-10-python.tar.gz"]  # nothing extracted, temp dir removed
    assert not (tmp_path.parent / "evil").exists()


def test_existing_folder_pickles_may_hold_arrays_only(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):  # a global outside numpy's array reconstruction is refused before it is called
        (root / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": datetime.date(2020, 1, 1)}))
    with pytest.raises(data.DataError, match="refusing to load datetime.date"):
        data.load_cifar10(str(tmp_path), download=False)


def test_a_killed_cifar_extraction_leaves_nothing_behind_next_time(tmp_path, mirror):
    import data
    stale = tmp_path / "d" / ".extract-killed"
    (stale / "cifar-10-batches-py").mkdir(parents=True)
    (stale / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
    x, _ = data.load_cifar10(str(tmp_path / "d"))
    assert len(x) == 50 and sorted(os.listdir(tmp_path / "d")) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


# ----- Batches and crops -----

def test_batch_indices_are_epochs_without_replacement():
    b = data.BatchIndices(10, 4, seed=3)
    first = torch.cat([b(s) for s in range(5)])                 # 20 draws = exactly 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert torch.equal(data.BatchIndices(10, 4, seed=3)(3), b(3))  # a pure function of the step (resume)
    assert not torch.equal(first[:10], first[10:])              # a new permutation every epoch


def test_random_crop_is_a_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    out = data.random_crop(x, 4)
    padded = F.pad(x, (4, 4, 4, 4), value=-1.0)
    offsets = set()
    for i in range(64):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits, i
        offsets.add(hits[0])
    assert len(offsets) > 30  # offsets spread over the 81 positions


def test_center_crop_resize_box_halving_and_crop_by_hand():
    """8x4 RGB with R = 30x + 10y, G = 200 - 20x, B = 7 -> size 2: the short side 4 >= 2*2, so one BOX halving to
    4x2 (each pixel the mean of a 2x2 block: R = 60bx + 20by + 20, G = 190 - 40bx), no resize (scale 1), then the
    centre crop keeps columns 1..2."""
    x, y = np.arange(8)[None, :], np.arange(4)[:, None]
    a = np.zeros((4, 8, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 30 * x + 10 * y, 200 - 20 * x + 0 * y, 7
    out = center_crop_resize(Image.fromarray(a), 2)
    expected = np.array([[[80, 140], [100, 160]], [[150, 110], [150, 110]], [[7, 7], [7, 7]]], np.uint8)
    assert out.dtype == torch.uint8 and out.shape == (3, 2, 2)
    np.testing.assert_array_equal(out.numpy(), expected)
    # a grey 3x5 image (no halving: 3 < 4) is made RGB and stays constant through BICUBIC and the crop
    out = center_crop_resize(Image.new("L", (3, 5), 77), 2)
    assert out.shape == (3, 2, 2) and (out == 77).all()


# ----- Image folders -----

def write_image(path, size, color):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_dataset_with_class_subfolders_trains(tmp_path):
    root = tmp_path / "pets"
    for i in range(3):
        write_image(str(root / "cat" / f"{i}.png"), (40, 48), (200, 10, 10))
        write_image(str(root / "dog" / "nested" / f"{i}.jpg"), (64, 64), (10, 10, 200))
    x, y, names = data.load_image_folder(str(root), 16)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.uint8 and names == ["cat", "dog"]
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and x[0, :, 8, 8].tolist() == [200, 10, 10]
    out = tmp_path / "run"
    train(out, root, "--dataset", "folder", "--image-size", 16, "--class-cond", "--steps", 2)
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["data"]["class_names"] == ["cat", "dog"] and ck["model_kwargs"]["input_size"] == 16


def test_flat_folder_is_unconditional_and_center_cropped(tmp_path):
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))                     # left half red, right half blue
    os.makedirs(tmp_path / "flat")
    img.save(tmp_path / "flat" / "a.png")
    write_image(str(tmp_path / "flat" / "b.bmp"), (32, 32), (0, 255, 0))
    x, y, names = data.load_image_folder(str(tmp_path / "flat"), 32)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 0] and names == []
    assert x[0, :, 16, 0].tolist() == [255, 0, 0] and x[0, :, 16, 31].tolist() == [0, 0, 255]  # columns 16..47
    assert x[1, :, 0, 0].tolist() == [0, 255, 0]


def test_folder_without_images_is_refused(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "out", tmp_path / "empty", "--dataset", "folder", "--steps", 1)
    assert "no images" in exit_message(e, capsys) and not (tmp_path / "out").exists()


# ----- Latents -----

def test_latents_dataset_trains_without_grids(tmp_path, capsys):
    z = np.random.default_rng(0).standard_normal((12, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "z.npz", latents=z, labels=np.arange(12) % 3)
    x, y = data.load_latents(str(tmp_path / "z.npz"))
    assert torch.equal(x, torch.from_numpy(z)) and y.tolist() == (np.arange(12) % 3).tolist()
    out = tmp_path / "lat"
    train(out, tmp_path / "z.npz", "--dataset", "latents", "--model-arg", "patch_size=2", "--class-cond",
          "--steps", 2, "--sample-every", 1)
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["model_kwargs"]["input_size"] == 8 and ck["model_kwargs"]["in_channels"] == 4
    assert ck["model_kwargs"]["num_classes"] == 3 and not (out / "samples").exists()
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(out / "latest.pt")])
    assert "this is a latent model (4 x 8 x 8); pass --vae" in exit_message(e, capsys)


def test_folder_is_memory_mapped_and_batches_follow_the_moments(tmp_path, tiny_vae):
    mean = np.stack([np.full((C, H, H), 1.0), np.full((C, H, H), -1.0)])[None].repeat(N, 0)   # flip 0: +1, 1: -1
    mean = mean * (np.arange(N) + 1)[:, None, None, None, None]                              # row i: +-(i + 1)
    moments = np.concatenate([mean, np.full_like(mean, -30.0)], axis=2).astype(np.float16)   # std ~ 3e-7
    store = data.LatentFolder(write_latents(str(tmp_path / "lat"), tiny_vae, moments=moments))
    assert isinstance(store.moments, np.memmap) and store.shape == (N, C, H, H)  # nothing read yet
    torch.manual_seed(0)
    z, y = data.LatentBatches(store, "cpu")(torch.tensor([5, 0, 11, 5, 2, 7, 7, 3]), with_labels=True)
    rows = torch.tensor([5, 0, 11, 5, 2, 7, 7, 3], dtype=torch.float32) + 1
    got = z[:, 0, 0, 0] / 0.5                                   # undo the scaling factor
    assert torch.allclose(got.abs(), rows, atol=1e-3)           # each sample's own row, scaled by 0.5
    assert (got > 0).any() and (got < 0).any()                  # both stored flips are drawn
    assert torch.allclose(z, z[:, :1].expand_as(z), atol=1e-4) and y.tolist() == [2, 0, 2, 2, 2, 1, 1, 0]


# ----- Malformed latents: one line, before anything is written -----

class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def folder_with(change_meta=None, moments=None, labels=None):
    def make(tmp_path, vae):
        folder = write_latents(str(tmp_path / "lat"), vae, moments=moments, labels=labels)
        if change_meta:
            meta = json.load(open(os.path.join(folder, "meta.json")))
            change_meta(meta)
            json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))
        return folder
    return make


def npz_with(**arrays):
    def make(tmp_path, vae):
        np.savez(tmp_path / "z.npz", **arrays)
        return str(tmp_path / "z.npz")
    return make


def pt_with(obj):
    def make(tmp_path, vae):
        torch.save(obj, tmp_path / "z.pt")
        return str(tmp_path / "z.pt")
    return make


Z = np.zeros((N, C, H, H), np.float32)
MOMENTS = np.zeros((N, 2, 2 * C, H, H))
BAD_LATENTS = {  # name -> (makes the data, what the one-line error says)
    "scaling abc": (folder_with(lambda m: m.update(scaling_factor="abc")), "scaling_factor 'abc' (a finite number"),
    "scaling NaN": (folder_with(lambda m: m.update(scaling_factor=float("nan"))), "scaling_factor nan"),
    "scaling 0": (folder_with(lambda m: m.update(scaling_factor=0)), "scaling_factor 0 (a finite number > 0)"),
    "count a string": (folder_with(lambda m: m.update(count="12")), "count '12' (an integer >= 1)"),
    "size negative": (folder_with(lambda m: m.update(latent_size=-8)), "latent_size -8 (an integer >= 1)"),
    "names not a list": (folder_with(lambda m: m.update(class_names="abc")), "class_names abc (a list of names)"),
    "label out of range": (folder_with(labels=np.arange(N) % 9), "holds labels 0..8 but meta.json names 3 classes"),
    "names too few": (folder_with(lambda m: m.update(class_names=["a", "b"])), "names 2 classes"),
    "label negative": (folder_with(labels=np.arange(N) - 1), "holds labels -1..10"),
    "moments int8": (folder_with(moments=MOMENTS.astype(np.int8)), "latents.npy holds int8 (float16 or float32"),
    "moments bool": (folder_with(moments=MOMENTS.astype(bool)), "latents.npy holds bool"),
    "moments complex": (folder_with(moments=MOMENTS.astype(np.complex64)), "latents.npy holds complex64"),
    "npz bool": (npz_with(latents=Z.astype(bool)), "needs a float array 'latents'"),
    "npz int8": (npz_with(latents=Z.astype(np.int8)), "needs a float array 'latents'"),
    "npz complex": (npz_with(latents=Z.astype(np.complex64)), "needs a float array 'latents'"),
    "npz NaN": (npz_with(latents=Z + np.nan), "the latents hold NaN or inf values"),
    "npz labels float": (npz_with(latents=Z, labels=np.zeros(N)), "labels must be integers >= 0"),
    "npz labels negative": (npz_with(latents=Z, labels=-np.ones(N, np.int64)), "labels must be integers >= 0"),
    "pt not a tensor": (pt_with({"latents": [1, 2]}), "needs a float array 'latents'"),
    "pt labels a list": (pt_with({"latents": torch.zeros(N, C, H, H), "labels": [1]}), "labels must have shape"),
    "pt would run code": (pt_with({"latents": Evil()}), "is not a plain tensor file (would run code: "),
}


@pytest.mark.parametrize("case", sorted(BAD_LATENTS))
def test_malformed_latents_are_one_line_before_anything_is_written(tmp_path, tiny_vae, capsys, case):
    make, expect = BAD_LATENTS[case]
    path = make(tmp_path, tiny_vae)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "out", path, "--dataset", "latents", "--model-arg", "patch_size=2", "--class-cond",
              "--steps", 1)
    msg = exit_message(e, capsys)
    assert expect in msg and "\n" not in msg and "weights_only" not in msg and "\x1b" not in msg
    assert sorted(os.listdir(tmp_path)) == before and "never run" not in capsys.readouterr().out


def test_an_impossible_image_size_is_refused_before_it_is_allocated(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(SystemExit) as e:  # 3 TB for one image: once an allocation the OOM killer ended
        train(tmp_path / "out", tmp_path / "imgs", "--dataset", "folder", "--image-size", 1_000_000, "--steps", 1)
    msg = exit_message(e, capsys)
    assert "1 images of 1000000x1000000 need 3.0 TB of memory, more than this machine's" in msg
    assert not (tmp_path / "out").exists()

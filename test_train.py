"""
End-to-end tests of train_cifar.py / sample.py / data.py on the CPU, offline: a tiny CIFAR-format archive is
generated here and "downloaded" through a file:// URL; the model is a DiT-Tiny shrunk to hidden 32, depth 2.
"""
import datetime
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import backbones
import images
import data
import sample
import train_cifar
from diffusion import GaussianDiffusion

TINY = ["--backbone", "dit", "--model", "DiT-Tiny", "--model-arg", "hidden_size=32", "--model-arg", "depth=2",
        "--model-arg", "num_heads=2", "--model-arg", "patch_size=4", "--batch-size", "4", "--log-every", "1",
        "--ckpt-every", "10", "--keep-every", "0", "--sample-every", "0", "--sample-steps", "2"]
PER_BATCH = 10                                                   # images per pickled batch: 50 train, 10 test


# ----- Fixtures: a tiny official-layout CIFAR-10 archive -----

def make_archive(path, members):
    """tar.gz of the folder entry cifar-10-batches-py/ and {name: bytes}, like the official one; returns its md5."""
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return digest(path)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    rng = np.random.default_rng(0)
    members, arrays = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, PER_BATCH)]
        arrays[name] = (x, y)
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(
            {b"batch_label": b"b", b"labels": y, b"data": x, b"filenames": [b"f.png"] * PER_BATCH}, protocol=2)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"c"] * 10}, protocol=2)
    path = str(tmp_path_factory.mktemp("mirror") / "cifar-10-python.tar.gz")
    md5 = make_archive(path, members)
    return {"path": path, "url": "file://" + path, "md5": md5, "arrays": arrays}


@pytest.fixture
def mirror(monkeypatch, archive):
    monkeypatch.setattr(data, "CIFAR_URL", archive["url"])
    monkeypatch.setattr(data, "CIFAR_MD5", archive["md5"])
    return archive


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory, archive):
    """A data dir with cifar-10-batches-py/ already extracted (runs use it without downloading)."""
    root = str(tmp_path_factory.mktemp("data"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "CIFAR_MD5", archive["md5"])
        data.load_cifar10(root, url=archive["url"])
    os.remove(os.path.join(root, "cifar-10-python.tar.gz"))
    return root


def train(out_dir, data_dir, *extra):
    train_cifar.main(TINY + ["--data-dir", str(data_dir), "--out-dir", str(out_dir), *map(str, extra)])


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def exit_message(excinfo, capsys):
    """SystemExit's message: the string code (sys.exit("error: ...")) or argparse's stderr (code 2)."""
    code = excinfo.value.code
    assert code not in (0, None)
    return code if isinstance(code, str) else capsys.readouterr().err


def image(path):
    """A PNG's pixels as an (H, W[, C]) uint8 array (file closed)."""
    with Image.open(path) as img:
        return np.asarray(img)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cifar_dir):
    """The uninterrupted 20-step run, with grids at steps 10 and 20 and kept checkpoints."""
    out = tmp_path_factory.mktemp("runs") / "base"
    train(out, cifar_dir, "--steps", 20, "--sample-every", 10, "--keep-every", 10)
    return out


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


# ----- Batches -----

def test_batch_indices_are_epochs_without_replacement():
    b = data.BatchIndices(10, 4, seed=3)
    first = torch.cat([b(s) for s in range(5)])                 # 20 draws = exactly 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert torch.equal(data.BatchIndices(10, 4, seed=3)(3), b(3))  # a pure function of the step (resume)
    assert not torch.equal(first[:10], first[10:])              # a new permutation every epoch


# ----- Training end to end -----

def test_training_writes_checkpoints_logs_grids(baseline):
    files = sorted(os.listdir(baseline))
    assert files == ["ckpt_0000010.pt", "ckpt_0000020.pt", "config.json", "latest.pt", "log.jsonl", "loss.png",
                     "samples"]                                 # no temporary files left behind
    assert sorted(os.listdir(baseline / "samples")) == ["step_0000010_ema.png", "step_0000020_ema.png"]
    assert image(baseline / "samples" / "step_0000020_ema.png").shape == (2 + 8 * 34, 2 + 8 * 34, 3)  # 8x8, 2 px gaps
    assert image(baseline / "loss.png").shape == (480, 800, 3)
    log = read_log(baseline)
    assert [r["step"] for r in log] == list(range(1, 21))
    assert set(log[0]) == {"step", "loss", "mse", "vb", "lr", "grad_norm", "img_per_s", "elapsed"}
    assert all(abs(r["loss"] - r["mse"] - r["vb"]) < 1e-5 for r in log)   # DiT: hybrid loss = mse + vb
    ck = torch.load(baseline / "latest.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 20 and ck["backbone"] == "dit" and ck["model_name"] == "DiT-Tiny"
    assert ck["model_kwargs"] == {"input_size": 32, "in_channels": 3, "num_classes": 0, "class_dropout_prob": 0.0,
                                  "learn_sigma": True, "hidden_size": 32, "depth": 2, "num_heads": 2,
                                  "patch_size": 4}
    assert ck["diffusion"] == {"formulation": "ddpm", "schedule": "linear", "timesteps": 1000, "prediction": "eps",
                               "learn_sigma": True, "loss_type": "l2", "fixed_variance": "large"}
    assert ck["args"]["lr"] == 1e-4 and ck["args"]["betas"] == [0.9, 0.999]  # DiT recipe
    assert set(ck["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert torch.load(baseline / "ckpt_0000010.pt", weights_only=True)["step"] == 10
    # EMA: 0.9999 over 20 steps stays next to the init, while the raw weights moved
    model, ema = ck["model"]["final_layer.linear.weight"], ck["ema"]["final_layer.linear.weight"]
    assert model.abs().max() > 0 and ema.abs().max() < 0.01 * model.abs().max()


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, cifar_dir, baseline):
    out = tmp_path / "resumed"
    train(out, cifar_dir, "--steps", 10)
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == 10
    train(out, cifar_dir, "--steps", 20)                        # --resume auto picks up latest.pt
    got, want = read_log(out), read_log(baseline)
    assert [r["step"] for r in got] == list(range(1, 21))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-7), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), g["step"]
    a = torch.load(out / "latest.pt", weights_only=True)
    b = torch.load(baseline / "latest.pt", weights_only=True)
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]), k


def test_ctrl_c_saves_a_checkpoint_and_the_rerun_matches(tmp_path, cifar_dir, baseline, monkeypatch):
    real, calls = GaussianDiffusion.training_losses, []

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 7:
            signal.raise_signal(signal.SIGINT)               # as if the user pressed Ctrl-C during step 7
        return real(self, *a, **kw)
    monkeypatch.setattr(GaussianDiffusion, "training_losses", interrupted)
    out = tmp_path / "ctrl-c"
    with pytest.raises(SystemExit, match="interrupted at step 7; checkpoint saved"):
        train(out, cifar_dir, "--steps", 20, "--sample-every", 5)
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == 7
    # the interrupt saves at once: no grid (or FID) for step 7 delays the checkpoint
    assert sorted(os.listdir(out / "samples")) == ["step_0000005_ema.png"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(GaussianDiffusion, "training_losses", real)
    train(out, cifar_dir, "--steps", 20, "--sample-every", 5)
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(baseline)]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cifar_dir, monkeypatch):
    real, calls = GaussianDiffusion.training_losses, []

    def poisoned(self, *a, **kw):
        calls.append(1)
        terms = real(self, *a, **kw)
        if len(calls) >= 8:
            terms["loss"] = terms["loss"] * float("nan")
        return terms
    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        train(out, cifar_dir, "--steps", 20, "--ckpt-every", 5, "--log-every", 3)
    msg = str(e.value.code)
    assert "non-finite loss" in msg and "step 8" in msg and f"{out / 'latest.pt'} (step 5)" in msg
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert sorted(os.listdir(out)) == ["config.json", "latest.pt", "log.jsonl", "loss.png"]


@pytest.mark.parametrize("backbone", ["uvit", "diffit"])
def test_other_backbones_plug_in(tmp_path, cifar_dir, backbone):
    tiny = {"uvit": ["--model", "U-ViT-Tiny", "--model-arg", "depth=2"],
            "diffit": ["--model", "DiffiT-Tiny", "--model-arg", "hidden_size=16", "--model-arg", "num_groups=4"]}
    argv = ["--backbone", backbone, *tiny[backbone], "--batch-size", "2", "--steps", "2", "--class-cond",
            "--data-dir", cifar_dir, "--out-dir", str(tmp_path / backbone), "--sample-every", "0"]
    train_cifar.main(argv)
    ck = torch.load(tmp_path / backbone / "latest.pt", weights_only=True)
    assert ck["backbone"] == backbone and ck["model_kwargs"]["num_classes"] == 10
    assert not ck["diffusion"].get("learn_sigma") and ck["diffusion"]["formulation"] == (
        "edm" if backbone == "diffit" else "ddpm")  # DiffiT trains with EDM, as its paper
    sample.main(["--ckpt", str(tmp_path / backbone / "latest.pt"), "--num-samples", "2", "--steps", "1",
                 "--cfg-scale", "2", "--out", str(tmp_path / "g.png")])
    assert image(tmp_path / "g.png").shape == (2 + 1 * 34, 2 + 2 * 34, 3)


def test_recipes_are_the_papers_and_flags_override_them():
    uvit = train_cifar.parse_args(["--backbone", "uvit"])
    assert (uvit.model, uvit.lr, uvit.weight_decay, uvit.betas, uvit.warmup, uvit.batch_size, uvit.steps,
            uvit.ema_decay, uvit.learn_sigma) == ("U-ViT-S/2", 2e-4, 0.03, [0.99, 0.999], 2500, 128, 500_000,
                                                 0.9999, False)
    dit = train_cifar.parse_args(["--backbone", "dit", "--lr", "3e-4", "--no-learn-sigma"])
    assert (dit.model, dit.lr, dit.weight_decay, dit.warmup, dit.learn_sigma) == ("DiT-S/2", 3e-4, 0.0, 0, False)
    assert train_cifar.parse_args(["--backbone", "diffit"]).model == "DiffiT-CIFAR"
    # the default U-ViT is the paper's CIFAR-10 U-ViT-S/2: 44,255,328 parameters (U-ViT Table 1; official
    # libs/uvit.py count)
    with torch.device("meta"):
        model = backbones.build_model("uvit", "U-ViT-S/2", input_size=32, in_channels=3, num_classes=0,
                                        class_dropout_prob=0.0, learn_sigma=False)
    assert sum(p.numel() for p in model.parameters()) == 44_255_328


# ----- sample.py -----

def test_sample_grid_and_npz_unconditional(tmp_path, baseline):
    npz, png = tmp_path / "u.npz", tmp_path / "u.png"
    sample.main(["--ckpt", str(baseline / "latest.pt"), "--num-samples", "3", "--batch-size", "2", "--steps", "2",
                 "--npz", str(npz), "--out", str(png)])
    with np.load(npz) as f:
        assert f.files == ["arr_0"] and f["arr_0"].shape == (3, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    assert image(png).shape == (2 + 2 * 34, 2 + 2 * 34, 3)        # ceil(sqrt(3)) = 2 per row, 2 rows


def test_class_conditional_training_and_npz_labels(tmp_path, cifar_dir):
    out = tmp_path / "cond"
    train(out, cifar_dir, "--steps", 2, "--class-cond", "--sample-every", 2)
    assert image(out / "samples" / "step_0000002_ema.png").shape == (2 + 10 * 34, 2 + 8 * 34, 3)  # a row per class
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["model_kwargs"]["num_classes"] == 10 and ck["model_kwargs"]["class_dropout_prob"] == 0.1
    assert ck["model"]["y_embedder.embedding_table.weight"].shape == (11, 32)  # + the null row
    npz = tmp_path / "c.npz"
    args = ["--ckpt", str(out / "latest.pt"), "--num-samples", "5", "--batch-size", "4", "--steps", "2",
            "--npz", str(npz), "--out", str(tmp_path / "c.png")]
    sample.main(args + ["--cfg-scale", "1.5", "--sampler", "ddim"])
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].shape == (5,) and f["arr_1"].dtype == np.int64 and 0 <= f["arr_1"].min() <= 9
        assert f["arr_1"].max() <= 9
    sample.main(args + ["--class-label", "3", "--sampler", "ddpm", "--no-ema"])
    with np.load(npz) as f:
        assert f["arr_1"].tolist() == [3] * 5


def test_save_grid_places_images_row_major(tmp_path):
    imgs = torch.stack([torch.full((3, 2, 2), v, dtype=torch.uint8) for v in (10, 20, 30)])
    images.save_grid(imgs, str(tmp_path / "g.png"), nrow=2, pad=1)
    arr = image(tmp_path / "g.png")
    assert arr.shape == (1 + 2 * 3, 1 + 2 * 3, 3)
    assert arr[1, 1, 0] == 10 and arr[1, 4, 0] == 20 and arr[4, 1, 0] == 30     # row-major, pad 1
    assert arr[4, 4, 0] == 0 and arr[0, 0, 0] == 0                                # empty cell, padding


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


# ----- Bad input: one line, non-zero exit, nothing overwritten -----

@pytest.fixture
def run_with_ckpt(tmp_path, baseline):
    out = tmp_path / "existing"
    shutil.copytree(baseline, out)
    return out, digest(out / "latest.pt")


@pytest.mark.parametrize("extra, expect", [
    (["--backbone", "nope"], "invalid choice: 'nope'"),
    (["--model", "DiT-Huge/2"], "unknown dit model 'DiT-Huge/2'; choose one of DiT-XL/2"),
    (["--model-arg", "patch_size=3"], "input_size=32 must be a multiple of patch_size=3"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model-arg", "depth=3"], "is from another config (model_kwargs.depth 2 != 3)"),
    (["--backbone", "uvit", "--model", "U-ViT-Tiny"], "is from another config (backbone 'dit' != 'uvit'"),
    (["--class-cond"], "model_kwargs.num_classes 0 != 10"),
    (["--resume", "never"], "already holds a run (latest.pt); use --resume auto"),
    (["--keep-every", "15"], "--keep-every 15 must be a multiple of --ckpt-every 10"),
])
def test_bad_input_exits_with_one_line_and_keeps_the_checkpoint(run_with_ckpt, cifar_dir, capsys, extra, expect):
    out, before = run_with_ckpt
    with pytest.raises(SystemExit) as e:
        train(out, cifar_dir, "--steps", 30, *extra)
    msg = exit_message(e, capsys)
    assert expect in msg.strip().splitlines()[-1]                # the message is its last (or only) line
    assert isinstance(e.value.code, int) or "\n" not in msg
    if "invalid choice" in expect:
        assert all(name in msg for name in ("dit", "uvit", "diffit"))
    assert digest(out / "latest.pt") == before and sorted(os.listdir(out / "samples")) == [
        "step_0000010_ema.png", "step_0000020_ema.png"]


@pytest.mark.parametrize("corrupt", ["truncated", "garbage", "not_a_checkpoint"])
def test_corrupt_checkpoint_is_refused(tmp_path, cifar_dir, baseline, capsys, corrupt):
    bad = tmp_path / "bad.pt"
    raw = (baseline / "latest.pt").read_bytes()
    if corrupt == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif corrupt == "garbage":
        bad.write_bytes(os.urandom(1000))
    else:
        torch.save({"weights": torch.zeros(2)}, bad)
    before = digest(bad)
    for run in (lambda: train(tmp_path / "out", cifar_dir, "--steps", 30, "--resume", bad),
                lambda: sample.main(["--ckpt", str(bad)])):
        with pytest.raises(SystemExit) as e:
            run()
        msg = exit_message(e, capsys)
        assert msg.startswith("error:") and str(bad) in msg and "\n" not in msg
        assert "cannot read checkpoint" in msg or "not a train_cifar.py checkpoint" in msg
    assert digest(bad) == before and not (tmp_path / "out").exists()


def test_folder_without_images_is_refused(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "out", tmp_path / "empty", "--dataset", "folder", "--steps", 1)
    assert "no images" in exit_message(e, capsys) and not (tmp_path / "out").exists()


# ----- FID wired into training and sampling (the Inception replaced by a small fixed feature map) -----

class PooledPixels(torch.nn.Module):
    """Stand-in for the FID Inception: [0, 1] images -> (48 pooled pixel features, 10 logits)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(48, 10)

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return f, self.fc(f)


@pytest.fixture
def fake_inception(monkeypatch, tmp_path):
    """fid.build_inception -> PooledPixels; a reference stats npz of 50 random images in that feature space."""
    import fid
    torch.manual_seed(0)
    net = PooledPixels()
    monkeypatch.setattr(fid, "build_inception", lambda *a, **k: net)
    ref = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    path = tmp_path / "ref_stats.npz"
    fid.save_stats(str(path), *fid.compute_statistics(ref, model=net, device="cpu"))
    return net, str(path)


def test_fid_during_training_is_logged_and_matches_sample_py(tmp_path, cifar_dir, fake_inception):
    out, ref = tmp_path / "fid", fake_inception[1]
    train(out, cifar_dir, "--steps", 4, "--fid-every", 2, "--fid-samples", 6, "--fid-ref", ref,
          "--sampler", "ddim", "--sample-steps", 3)
    fids = [r for r in read_log(out) if "fid" in r]
    assert [r["step"] for r in fids] == [2, 4] and all(np.isfinite(r["fid"]) for r in fids)
    assert fids[0]["fid_samples"] == 6 and fids[0]["sampler"] == "ddim-3"
    # the same EMA weights, sampler, seed and batching through sample.py give the same number
    score, _ = sample.main(["--ckpt", str(out / "latest.pt"), "--num-samples", "6", "--batch-size", "8",
                            "--sampler", "ddim", "--steps", "3", "--fid-ref", ref, "--out", str(tmp_path / "g.png")])
    assert score == pytest.approx(fids[1]["fid"], abs=1e-4)


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


def test_fid_setup_fails_before_training(tmp_path, cifar_dir, capsys):
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "r", cifar_dir, "--steps", 2, "--fid-every", 1, "--fid-ref", str(tmp_path / "missing.npz"))
    assert "cannot compute FID" in exit_message(e, capsys)
    assert not (tmp_path / "r" / "latest.pt").exists()


# ----- Formulations: every one trains, resumes bit-exactly and samples through sample.py -----

@pytest.mark.parametrize("formulation", ["edm", "flow"])
def test_formulation_run_resumes_exactly_and_samples(tmp_path, cifar_dir, capsys, formulation):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--formulation", formulation, "--sample-every", "0"]
    train(full, cifar_dir, "--steps", 6, *args)
    train(part, cifar_dir, "--steps", 3, *args)
    train(part, cifar_dir, "--steps", 6, *args)              # resumed from step 3
    assert [r["loss"] for r in read_log(part)] == [r["loss"] for r in read_log(full)]
    a, b = (torch.load(p / "latest.pt", weights_only=True) for p in (part, full))
    assert a["diffusion"] == {**b["diffusion"]} and a["diffusion"]["formulation"] == formulation
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    with pytest.raises(SystemExit) as e:                     # resuming under another formulation is refused
        train(part, cifar_dir, "--steps", 8, "--sample-every", "0")
    assert "diffusion.formulation" in exit_message(e, capsys)
    npz = tmp_path / "s.npz"
    sample.main(["--ckpt", str(full / "latest.pt"), "--num-samples", "2", "--steps", "2", "--npz", str(npz),
                 "--out", str(tmp_path / "g.png")])
    assert f"{'heun' if formulation == 'edm' else 'euler'} 2 steps" in capsys.readouterr().out
    with np.load(npz) as f:
        assert f["arr_0"].shape == (2, 32, 32, 3) and f["arr_0"].dtype == np.uint8

"""
extract_latents.py: the latents-v1 format (shapes, labels, meta, the flip slot, moments equal to vae.encode of the
preprocessed images), exact resume after a SIGKILL and after a broken image, and one-line refusals of bad input; the
VAE recorded by content (a resume with another VAE at the same path refused), one writer per --out, and full disks
and impossible sizes refused before anything is written (on a small tmpfs where mounting works, and simulated). A
tiny random-init AutoencoderKL (2x downsampling) on 8x8 images keeps it fast on the CPU. (The preprocessing,
data.center_crop_resize: test_data.py.)
"""
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import extract_latents
import vae as vae_lib
from conftest import small_disk, snapshot
from data import _images_under, center_crop_resize

HERE = os.path.dirname(os.path.abspath(__file__))
META_KEYS = {"format", "complete", "count", "image_size", "latent_channels", "latent_size", "dtype", "stores",
             "flips", "class_names", "vae", "scaling_factor", "files_sha1", "done", "vae_sha256", "downsample_factor"}
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                norm_num_groups=32)
FP16_REL = 2.0 ** -10  # the float16 bound 2^-11, with room for float32 differences between batchings


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A diffusers folder (config.json + diffusion_pytorch_model.safetensors) of a tiny random-init VAE."""
    torch.manual_seed(0)
    model = vae_lib.AutoencoderKL(**TINY_VAE)
    folder = tmp_path_factory.mktemp("vae")
    with open(folder / "config.json", "w") as f:
        json.dump(model.config, f)
    vae_lib.save_safetensors(model.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    return str(folder)


def random_image(path, size, seed):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def class_folder(root, n_per_class=(3, 4)):
    """root/a_cls (label 0, one image in a nested folder) and root/b_cls (label 1), images of several sizes and
    two formats, plus files that must be ignored."""
    sizes = [(10, 12), (16, 9), (8, 8), (9, 13)]
    for c, (name, n) in enumerate(zip(("b_cls", "a_cls"), n_per_class[::-1])):
        for i in range(n):
            sub = os.path.join(root, name, "nested" if (name == "a_cls" and i == 0) else "")
            random_image(os.path.join(sub, f"img{i}.{'jpg' if i == 1 else 'png'}"), sizes[i % 4], seed=10 * c + i)
    with open(os.path.join(root, "a_cls", "notes.txt"), "w") as f:
        f.write("not an image")
    os.makedirs(os.path.join(root, "empty_cls"))  # holds no image: not a class
    return root


def args(data, vae, out, *extra, size=8, batch=2):
    return ["--data-dir", str(data), "--image-size", str(size), "--vae", vae, "--out", str(out),
            "--batch-size", str(batch), "--device", "cpu", "--workers", "0", *extra]


def fails(argv):
    with pytest.raises(SystemExit) as e:
        extract_latents.main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error:") and "\n" not in msg, msg
    return msg


def read(out):
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(out, "latents.npy"), "rb") as f:
        raw = f.read()
    return meta, raw


def reference_moments(vae_path, files, size):
    """vae.encode of the preprocessed images and of their flips, float32 (N, 2, 2C, h, w)."""
    model = vae_lib.load_vae(vae_path, "cpu")
    x = torch.stack([center_crop_resize(Image.open(f), size) for f in files]).float() / 127.5 - 1
    with torch.no_grad():
        out = [torch.cat(model.encode(v), 1) for v in (x, x.flip(3))]
    return torch.stack(out, 1).numpy()


# ----- The format -----

def test_class_folders_shapes_labels_meta_and_moments(tmp_path, tiny_vae, capsys):
    data, out = class_folder(tmp_path / "data"), tmp_path / "out"
    random_image(str(data / "stray.png"), (8, 8), 99)  # a root-level image beside class folders: ignored
    meta = extract_latents.main(args(data, tiny_vae, out))
    printed = capsys.readouterr().out
    assert f"{out}" in printed and "512 bytes per image" in printed  # 2 flips x 8 x 4 x 4 x 2 bytes

    with open(out / "meta.json") as f:
        assert json.load(f) == meta
    assert set(meta) == META_KEYS
    assert meta["format"] == "latents-v1" and meta["complete"] is True and meta["count"] == meta["done"] == 7
    assert (meta["image_size"], meta["latent_channels"], meta["latent_size"]) == (8, 4, 4)
    assert (meta["dtype"], meta["stores"], meta["flips"]) == ("float16", "moments", 2)
    assert meta["class_names"] == ["a_cls", "b_cls"] and meta["vae"] == os.path.abspath(tiny_vae)
    assert meta["scaling_factor"] == 0.18215 and meta["downsample_factor"] == 2
    vae_files = [os.path.join(tiny_vae, f) for f in ("config.json", "diffusion_pytorch_model.safetensors")]
    assert meta["vae_sha256"] == hashlib.sha256(b"".join(open(f, "rb").read() for f in vae_files)).hexdigest()
    files = _images_under(str(data / "a_cls")) + _images_under(str(data / "b_cls"))
    assert len(files) == 7
    rel = [os.path.relpath(f, data).replace(os.sep, "/") for f in files]
    assert rel[0] == "a_cls/img1.jpg" and "a_cls/nested/img0.png" in rel
    assert meta["files_sha1"] == hashlib.sha1("\n".join(rel).encode()).hexdigest()

    labels = np.load(out / "labels.npy")
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 3 + [1] * 4
    lat = np.load(out / "latents.npy", mmap_mode="r")
    assert isinstance(lat, np.memmap) and lat.shape == (7, 2, 8, 4, 4) and lat.dtype == np.float16

    ref = reference_moments(tiny_vae, files, 8)
    got = lat.astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=FP16_REL, atol=1e-6)
    assert not np.allclose(got[:, 0], got[:, 1], atol=1e-3)  # the flip slot is its own encoding, not a copy
    assert ref[:, :, 4:].max() <= 20 and ref[:, :, 4:].min() >= -30

    # float32 storage: the same moments at float32 accuracy
    meta32 = extract_latents.main(args(data, tiny_vae, tmp_path / "out32", "--dtype", "float32", batch=3))
    lat32 = np.load(tmp_path / "out32" / "latents.npy", mmap_mode="r")
    assert meta32["dtype"] == "float32" and lat32.dtype == np.float32
    np.testing.assert_allclose(lat32, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lat32, got, rtol=FP16_REL, atol=1e-6)


def test_flat_folder_is_unconditional(tmp_path, tiny_vae):
    data = tmp_path / "flat"
    for i in range(3):
        random_image(str(data / f"{i}.png"), (12, 8), i)
    meta = extract_latents.main(args(data, tiny_vae, tmp_path / "out", "--workers", "2"))  # decoded in workers
    assert meta["class_names"] == [] and meta["count"] == 3 and meta["complete"]
    assert np.load(tmp_path / "out" / "labels.npy").tolist() == [0, 0, 0]
    ref = reference_moments(tiny_vae, [str(data / f"{i}.png") for i in range(3)], 8)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "latents.npy").astype(np.float32), ref, rtol=FP16_REL,
                               atol=1e-6)


# ----- Resume -----

KILL_ON_THIRD_BATCH = """
import os, signal, sys, torch
torch.set_num_threads(1)
import extract_latents
encode, calls = extract_latents.encode_batch, []
def killed_on_third(*a):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return encode(*a)
extract_latents.encode_batch = killed_on_third
extract_latents.main(sys.argv[1:])
"""


def test_resume_after_sigkill_is_byte_identical(tmp_path, tiny_vae, capsys):
    data = class_folder(tmp_path / "data")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    extract_latents.main(args(data, tiny_vae, whole))
    r = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_BATCH, *args(data, tiny_vae, cut, "--flush-every", "2")],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    meta, _ = read(cut)
    assert meta["complete"] is False and meta["done"] == 4  # two flushed chunks of 2 images
    lat = np.load(cut / "latents.npy", mmap_mode="r")
    assert lat.shape == (7, 2, 8, 4, 4)

    # a mismatched rerun is refused and leaves the incomplete output as it was
    msg = fails(args(data, tiny_vae, cut, size=4))
    assert "image_size 8 != 4" in msg and "new --out" in msg
    assert read(cut)[0] == meta

    capsys.readouterr()
    extract_latents.main(args(data, tiny_vae, cut))
    assert "resuming" in capsys.readouterr().out
    assert read(cut) == read(whole)

    # a complete output: nothing to do, nothing rewritten
    stamp = os.stat(cut / "latents.npy").st_mtime_ns, os.stat(cut / "meta.json").st_mtime_ns
    extract_latents.main(args(data, tiny_vae, cut))
    assert "already complete" in capsys.readouterr().out
    assert (os.stat(cut / "latents.npy").st_mtime_ns, os.stat(cut / "meta.json").st_mtime_ns) == stamp
    msg = fails(args(data, tiny_vae, cut, "--dtype", "float32"))
    assert "dtype 'float16' != 'float32'" in msg


def test_broken_image_stops_the_run_and_stays_resumable(tmp_path, tiny_vae):
    data = class_folder(tmp_path / "data")
    broken = data / "a_cls" / "nested" / "img0.png"  # the 3rd file in sorted order: batch 1 of --batch-size 2
    good = broken.read_bytes()
    whole = tmp_path / "whole"
    extract_latents.main(args(data, tiny_vae, whole))
    broken.write_bytes(good[:40])  # truncated PNG
    out = tmp_path / "out"
    msg = fails(args(data, tiny_vae, out, "--workers", "1", "--flush-every", "100"))
    assert str(broken) in msg and "cannot read image" in msg
    meta, _ = read(out)
    assert meta["complete"] is False and meta["done"] == 2  # the batch before it was kept
    broken.write_bytes(good)
    extract_latents.main(args(data, tiny_vae, out))
    assert read(out) == read(whole)


# ----- Bad input: one line, nothing that looks complete -----

def test_bad_inputs_are_one_line_errors(tmp_path, tiny_vae):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in fails(args(empty, tiny_vae, out))
    (empty / "readme.txt").write_text("no pictures here")
    (empty / "sub").mkdir()
    assert "no images" in fails(args(empty, tiny_vae, out))
    assert "not a folder" in fails(args(tmp_path / "missing", tiny_vae, out))
    assert not out.exists()

    data = class_folder(tmp_path / "data")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert "is a file" in fails(args(data, tiny_vae, a_file))
    assert a_file.read_text() == "keep me"
    assert "is a file" in fails(args(data, tiny_vae, a_file / "below"))
    assert "multiple of the VAE's downsample factor 2" in fails(args(data, tiny_vae, out, size=7))
    assert "no such file or folder" in fails(args(data, str(tmp_path / "no-vae"), out))
    assert "--batch-size must be >= 1" in fails(args(data, tiny_vae, out, batch=0))
    assert not out.exists()

    # an unreadable meta.json is refused, not overwritten
    out.mkdir()
    (out / "meta.json").write_text("{half")
    assert "not a readable meta.json" in fails(args(data, tiny_vae, out))
    assert (out / "meta.json").read_text() == "{half"


def test_rounding_error_report(tmp_path, tiny_vae):
    """The float16 / bfloat16 rounding of float32 moments stays within the formats' bounds 2^-11 and 2^-8."""
    data = class_folder(tmp_path / "data")
    extract_latents.main(args(data, tiny_vae, tmp_path / "out", "--dtype", "float32"))
    s = extract_latents.rounding_error(str(tmp_path / "out" / "latents.npy"))
    assert s["images"] == 7
    for name, bound in (("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)):
        assert s[name]["bound"] == bound and 0 < s[name]["max_rel"] <= bound
        assert s[name]["mean_rel"] < bound / 2 + 1e-9
    assert s["float16"]["max_err_over_std"] < s["bfloat16"]["max_err_over_std"]


def test_float16_overflow_is_refused(tmp_path, tiny_vae, monkeypatch):
    data = class_folder(tmp_path / "data")
    encode = extract_latents.encode_batch
    monkeypatch.setattr(extract_latents, "encode_batch", lambda *a: encode(*a) * 1e6)
    assert "use --dtype float32" in fails(args(data, tiny_vae, tmp_path / "out"))
    assert read(tmp_path / "out")[0]["complete"] is False


# ----- Provenance: the VAE is recorded by content, and a resume refuses another one -----

def test_a_vae_changed_between_kill_and_resume_is_refused(tmp_path, tiny_vae, capsys):
    """The same path, other weights: resuming would mix two VAEs in one latents.npy (marked complete)."""
    data, own = class_folder(tmp_path / "data"), tmp_path / "vae"
    shutil.copytree(tiny_vae, own)
    weights = own / "diffusion_pytorch_model.safetensors"
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    extract_latents.main(args(data, str(own), whole))
    r = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_BATCH, *args(data, str(own), cut, "--flush-every", "2")],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    good = weights.read_bytes()
    torch.manual_seed(5)
    vae_lib.save_safetensors(vae_lib.AutoencoderKL(**TINY_VAE).state_dict(), str(weights))
    before = snapshot(cut)
    msg = fails(args(data, str(own), cut))
    was, now = read(whole)[0]["vae_sha256"], vae_lib.load_vae(own).sha256
    assert f"the VAE's content changed: sha256 {was[:12]} when the extraction began, {now[:12]} now" in msg
    assert snapshot(cut) == before
    weights.write_bytes(good)  # the VAE it began with: the resume completes it, byte-identical
    extract_latents.main(args(data, str(own), cut))
    assert read(cut) == read(whole)


def test_latents_from_before_hashes_were_recorded_still_resume(tmp_path, tiny_vae):
    data = class_folder(tmp_path / "data")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    extract_latents.main(args(data, tiny_vae, whole))
    interrupt_after_first_batch(data, tiny_vae, cut)
    meta = json.loads((cut / "meta.json").read_text())
    del meta["vae_sha256"], meta["downsample_factor"]  # as an older version wrote it: unknown, not compared
    (cut / "meta.json").write_text(json.dumps(meta))
    extract_latents.main(args(data, tiny_vae, cut))
    assert read(cut) == read(whole)


def interrupt_after_first_batch(data, vae, out):
    """An extraction stopped by Ctrl-C after its first batch of 2 (flushed: done 2)."""
    encode, calls = extract_latents.encode_batch, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(*a)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extract_latents, "encode_batch", interrupted)
        with pytest.raises(SystemExit, match="interrupted; rerun the same command to resume"):
            extract_latents.main(args(data, vae, out, "--flush-every", "2"))
    assert json.loads((out / "meta.json").read_text())["done"] == 2


# ----- One writer per --out -----

HOLDER = "import sys, time, files; files.lock_folder(sys.argv[1]); print('locked', flush=True); time.sleep(120)"


def test_a_second_extraction_into_a_locked_out_is_refused(tmp_path, tiny_vae):
    data = class_folder(tmp_path / "data")
    out = tmp_path / "out"
    interrupt_after_first_batch(data, tiny_vae, out)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        msg = fails(args(data, tiny_vae, out))
        assert f"--out {out} is in use by another run (pid {holder.pid})" in msg and snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    extract_latents.main(args(data, tiny_vae, out))  # the holder died: its lock went with it
    assert read(out)[0]["complete"] is True


# ----- Full disks and impossible sizes: one line, checked before anything is written -----

def test_an_impossible_image_size_is_refused_before_anything_is_written(tmp_path, tiny_vae):
    data = class_folder(tmp_path / "data")
    msg = fails(args(data, tiny_vae, tmp_path / "out", size=100_000))  # once: a 560 GB sparse file and meta.json
    assert "needs" in msg and not (tmp_path / "out").exists()


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_a_full_disk_is_one_line_and_leaves_no_latents_file(tmp_path, tiny_vae, monkeypatch, disk):
    data = class_folder(tmp_path / "data")
    big = ("--dtype", "float32")  # 7 x 2 x 8 x 16 x 16 x 4 = 114,688 bytes of latents at --image-size 32
    with contextlib.ExitStack() as stack:
        if disk == "tmpfs":
            root = stack.enter_context(small_disk(tmp_path / "disk", 64 * 1024))
        else:  # a 64 KiB disk as os.statvfs and os.posix_fallocate report it
            root = tmp_path / "disk"
            root.mkdir()
            monkeypatch.setattr(os, "statvfs", lambda p: type("St", (), dict(f_bavail=16, f_frsize=4096))())
            monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: (_ for _ in ()).throw(
                OSError(errno.ENOSPC, "No space left on device")))
        msg = fails(args(data, tiny_vae, root / "out", *big, size=32))
        assert f"--out {root / 'out'} (latents (7, 2, 8, 16, 16) float32) needs 180.3 kB but" in msg
        assert "kB free" in msg
        assert not (root / "out").exists()
        # past the free-space check (a filesystem that over-reports, another writer): the reservation fails instead
        monkeypatch.setattr(extract_latents, "check_free_space", lambda *a: None)
        msg = fails(args(data, tiny_vae, root / "out", *big, size=32))
        assert "latents.npy (OSError: [Errno 28] No space left on device)" in msg and "114,688 bytes needed" in msg
        assert not (root / "out" / "latents.npy").exists()
        assert json.loads((root / "out" / "meta.json").read_text())["complete"] is False

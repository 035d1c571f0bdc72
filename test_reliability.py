"""
No run lost, no debris, every bad input a one-line error: interrupts at chosen moments (SIGINT during a grid,
kill -9 inside a checkpoint write and inside the kept-checkpoint step), then resumes that must continue
bit-exactly; and a table of bad inputs to train_cifar.py, sample.py and fid.py, each of which must exit non-zero
with one line and leave every file that existed before byte-identical.
"""
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

import checkpoints
import errors
import files
import fid
import runs
import sample
import train_cifar
from diffusion import GaussianDiffusion
from test_train import TINY, archive, baseline, cifar_dir, digest, mirror, read_log, train  # noqa: F401 (fixtures)

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="valid input where a CUDA GPU is visible")


def snapshot(*folders):
    """{path: md5} of every file below the folders."""
    out = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for f in names:
                out[os.path.join(root, f)] = digest(os.path.join(root, f))
    return out


def one_line_error(excinfo, capsys):
    """The exit message of a failed command: non-zero, a single line, no traceback."""
    code = excinfo.value.code
    assert code not in (0, None)
    msg = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def same_weights(a, b):
    a, b = (torch.load(p, weights_only=True, map_location="cpu") for p in (a, b))
    return a["step"] == b["step"] and all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in b[k])


# ----- Interrupts: SIGINT during a grid -----

def test_sigint_during_a_grid_saves_that_step_and_the_resume_is_exact(tmp_path, cifar_dir, baseline, monkeypatch):
    """The stop request arrives while the step-5 grid is sampled (no checkpoint is due at step 5): the grid is
    abandoned, the step-5 checkpoint is really written, and the resumed run equals the uninterrupted one."""
    real = GaussianDiffusion.sample

    def interrupted(self, *a, **kw):
        signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C while the grid is being sampled
        return real(self, *a, **kw)
    monkeypatch.setattr(GaussianDiffusion, "sample", interrupted)
    out = tmp_path / "grid-int"
    with pytest.raises(SystemExit, match="interrupted at step 5; checkpoint saved"):
        train(out, cifar_dir, "--steps", 20, "--sample-every", 5, "--ckpt-every", 10)
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == 5
    assert not (out / "samples").exists() or os.listdir(out / "samples") == []  # the abandoned grid wrote nothing
    monkeypatch.setattr(GaussianDiffusion, "sample", real)
    train(out, cifar_dir, "--steps", 20, "--sample-every", 10, "--keep-every", 10)
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(baseline)]
    assert same_weights(out / "latest.pt", baseline / "latest.pt")


# ----- Interrupts: kill -9 inside checkpoint writes (a child process, killed at a chosen call) -----

KILLER = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
mode, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def hit():
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if mode == "save":          # die half-way through the n-th torch.save: a partial temporary file is left
    real = torch.save
    def save(obj, f, *a, **k):
        if calls[0] + 1 == n:
            f.write(b"PK partial checkpoint")
            f.flush()
        hit()
        return real(obj, f, *a, **k)
    torch.save = save
else:                       # die at the n-th os.link: the kept checkpoint is written, latest.pt not yet moved on
    real_link = os.link
    def link(*a, **k):
        hit()
        return real_link(*a, **k)
    os.link = link
sys.path.insert(0, sys.argv[3])
import train_cifar
train_cifar.main(sys.argv[4:])
"""


@pytest.mark.parametrize("mode, n, step_left", [
    ("save", 2, 10),   # killed inside the 2nd checkpoint write (step 20, a kept step): step 10 stays
    ("link", 2, 10),   # killed after ckpt_0000020.pt was written, before latest.pt moved on to it
])
def test_kill_9_inside_a_checkpoint_write_loses_nothing(tmp_path, cifar_dir, baseline, mode, n, step_left):
    out = tmp_path / f"kill-{mode}"
    argv = TINY + ["--data-dir", str(cifar_dir), "--out-dir", str(out), "--steps", "20", "--sample-every", "0",
                   "--keep-every", "10"]
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), mode, str(n), HERE, *argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == step_left  # loadable, the previous one
    debris = [f for f in os.listdir(out) if ".tmp" in f]
    assert debris or mode == "link"  # the killed write left its temporary file
    train(out, cifar_dir, "--steps", 20, "--sample-every", "0", "--keep-every", "10")
    files = sorted(os.listdir(out))
    assert not [f for f in files if ".tmp" in f]  # debris removed when the next run started
    assert [f for f in files if f.startswith("ckpt_")] == ["ckpt_0000010.pt", "ckpt_0000020.pt"]  # none lost
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(baseline)]
    assert same_weights(out / "latest.pt", baseline / "latest.pt")
    assert same_weights(out / "ckpt_0000020.pt", baseline / "ckpt_0000020.pt")


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                         text=True).stdout.strip()  # a pid that has exited
    names = [f"latest.pt.tmp{pid}", "ckpt_0000050.pt.tmp" + pid, "ckpt_0000040.pt.tmp",  # (no pid: older copies)
             f"log.jsonl.tmp{os.getpid()}", "notes.tmp.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = files.remove_stale_temps(str(tmp_path))
    assert removed == sorted(["ckpt_0000040.pt.tmp", f"ckpt_0000050.pt.tmp{pid}", f"latest.pt.tmp{pid}"])
    assert sorted(os.listdir(tmp_path)) == sorted([f"log.jsonl.tmp{os.getpid()}", "notes.tmp.txt"])  # live: kept


# ----- Resuming into a folder that holds another run -----

def test_resume_path_into_a_folder_with_a_further_run_refuses_and_truncates_nothing(tmp_path, cifar_dir, baseline,
                                                                                    capsys):
    out = tmp_path / "further"
    shutil.copytree(baseline, out)
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train(out, cifar_dir, "--steps", 30, "--resume", baseline / "ckpt_0000010.pt")
    msg = one_line_error(e, capsys)
    assert "already holds a run" in msg and "new --out-dir" in msg
    assert snapshot(out) == before  # the 20-line log and the step-20 latest.pt are untouched


def test_log_is_rewritten_atomically(tmp_path, monkeypatch):
    """A kill while the log is trimmed on resume leaves the old log whole (here: the write fails midway)."""
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 101)]
    log.write_text("".join(lines))
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(errors.RunError, match="No space left"):
        runs.read_log(str(log), 50)
    monkeypatch.setattr(os, "replace", real)
    assert log.read_text() == "".join(lines) and os.listdir(tmp_path) == ["log.jsonl"]
    assert [r["step"] for r in runs.read_log(str(log), 50)] == list(range(1, 51))


# ----- Bad inputs: one line, non-zero exit, nothing changed -----

@pytest.fixture
def existing(tmp_path, baseline):
    """A copy of the finished 20-step run (checkpoints, log, grids) that bad commands must leave as it is."""
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    return out


def without_rng(existing, tmp_path):
    ck = torch.load(existing / "latest.pt", weights_only=True)
    del ck["rng"]
    torch.save(ck, tmp_path / "no_rng.pt")
    return ["--resume", str(tmp_path / "no_rng.pt"), "--out-dir", str(tmp_path / "fresh")]


def non_square_latents(existing, tmp_path):
    np.savez(tmp_path / "z.npz", latents=np.zeros((4, 4, 8, 6), np.float32))
    return ["--dataset", "latents", "--data-dir", str(tmp_path / "z.npz"), "--out-dir", str(tmp_path / "z")]


def bomb_folder(existing, tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "imgs" / "bomb.png")  # 4096 px > 2 x the limit set below
    Image.MAX_IMAGE_PIXELS = 1000
    return ["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--out-dir", str(tmp_path / "b")]


def a_file(existing, tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    return str(tmp_path / "plain.txt")


TRAIN_BAD = [
    (lambda e, t: ["--out-dir", a_file(e, t)], "is a file, not a folder"),
    (lambda e, t: ["--out-dir", os.path.join(a_file(e, t), "sub")], "plain.txt is a file, not a folder"),
    (lambda e, t: ["--data-dir", a_file(e, t), "--out-dir", str(t / "x")], "is a file; give the folder"),
    pytest.param(lambda e, t: ["--device", "cuda"], "no CUDA GPU is visible", marks=CPU_ONLY),
    (lambda e, t: ["--device", "foo"], "--device 'foo' is not a device"),
    (lambda e, t: ["--betas", "1.5", "0.9"], "--betas must both lie in [0, 1)"),
    (lambda e, t: ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (lambda e, t: ["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (lambda e, t: ["--lr", "nan"], "--lr must be a finite number > 0"),
    pytest.param(lambda e, t: ["--precision", "fp16"], "--precision fp16 needs a CUDA device", marks=CPU_ONLY),
    (without_rng, "that can be resumed (missing ['rng'])"),
    (non_square_latents, "must be (N >= 1, C, S, S), square"),
    (bomb_folder, "bomb.png (DecompressionBombError"),
]


@pytest.mark.parametrize("extra, expect", TRAIN_BAD)
def test_train_bad_input(existing, tmp_path, cifar_dir, capsys, monkeypatch, extra, expect):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after bomb_folder
    argv = extra(existing, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        train(existing, cifar_dir, "--steps", 30, *argv)
    assert expect in one_line_error(e, capsys)
    assert snapshot(tmp_path) == before  # nothing written, nothing changed (no config.json either)


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(existing, cifar_dir, capsys, monkeypatch):
    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    before = digest(existing / "latest.pt")
    with pytest.raises(SystemExit) as e:
        train(existing, cifar_dir, "--steps", 30)
    msg = one_line_error(e, capsys)
    assert "cannot write" in msg and "No space left on device" in msg
    assert digest(existing / "latest.pt") == before and not [f for f in os.listdir(existing) if ".tmp" in f]


def test_ckpt_every_alone_needs_no_keep_every():
    args = train_cifar.parse_args(["--backbone", "dit", "--ckpt-every", "3000"])
    assert args.keep_every == 30_000  # the default follows --ckpt-every (10 checkpoints per kept one)


def test_gpu_recipe_on_a_cpu_prints_the_cpu_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_cifar, "load_data", lambda args: (_ for _ in ()).throw(errors.RunError("stop here")))
    with pytest.raises(errors.RunError, match="stop here"):
        train_cifar.setup(train_cifar.parse_args(["--backbone", "uvit", "--device", "cpu"]))
    out = capsys.readouterr().out
    assert "paper's GPU recipe" in out and train_cifar.CPU_COMMAND in out


def edited_kwargs(existing, tmp_path):
    ck = torch.load(existing / "latest.pt", weights_only=True)
    ck["model_kwargs"]["depth"] = 3
    torch.save(ck, tmp_path / "edited.pt")
    return ["--ckpt", str(tmp_path / "edited.pt")]


SAMPLE_BAD = [
    (edited_kwargs, "do not fit DiT-Tiny with the recorded model_kwargs"),
    (lambda e, t: ["--out", os.path.join(a_file(e, t), "g.png")], "plain.txt is a file, not a folder"),
    (lambda e, t: ["--npz", os.path.join(a_file(e, t), "s.npz")], "plain.txt is a file, not a folder"),
    (lambda e, t: ["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (lambda e, t: ["--eta", "5"], "--eta must be in [0, 1]"),
    (lambda e, t: ["--eta", "-1"], "--eta must be in [0, 1]"),
    (lambda e, t: ["--nrow", "0"], "--nrow must be >= 1"),
    (lambda e, t: ["--steps", "0"], "--steps must be in 1..1000"),
    pytest.param(lambda e, t: ["--precision", "fp16"], "--precision fp16 needs a CUDA device", marks=CPU_ONLY),
    (lambda e, t: ["--device", "foo"], "--device 'foo' is not a device"),
]


@pytest.mark.parametrize("extra, expect", SAMPLE_BAD)
def test_sample_bad_input(existing, tmp_path, capsys, extra, expect):
    argv = ["--ckpt", str(existing / "latest.pt"), "--num-samples", "2", "--steps", "1"] + extra(existing, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert expect in one_line_error(e, capsys)
    assert snapshot(tmp_path) == before


def test_sample_grid_names_say_ema_or_raw(existing):
    for flag, tag in [([], "ema"), (["--no-ema"], "raw")]:
        sample.main(["--ckpt", str(existing / "latest.pt"), "--num-samples", "2", "--steps", "1", *flag])
    names = sorted(f for f in os.listdir(existing) if f.startswith("sample_"))
    assert names == ["sample_latest_ema_dpm++2m_1steps_cfg1.png", "sample_latest_raw_dpm++2m_1steps_cfg1.png"]


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


def test_corrupt_latest_rolls_back_to_a_kept_checkpoint_of_the_same_run(existing, cifar_dir, baseline, capsys):
    """The advice a corrupt latest.pt gets works: move it aside, resume the run's own ckpt_XXXXXXX.pt there."""
    (existing / "latest.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        train(existing, cifar_dir, "--steps", 20)
    assert "move it aside" in one_line_error(e, capsys)
    os.replace(existing / "latest.pt", existing / "latest.pt.bad")
    train(existing, cifar_dir, "--steps", 20, "--sample-every", 10, "--keep-every", 10,
          "--resume", existing / "ckpt_0000010.pt")
    assert [r["loss"] for r in read_log(existing)] == [r["loss"] for r in read_log(baseline)]
    assert same_weights(existing / "latest.pt", baseline / "latest.pt")


def test_a_killed_cifar_extraction_leaves_nothing_behind_next_time(tmp_path, mirror):
    import data
    stale = tmp_path / "d" / ".extract-killed"
    (stale / "cifar-10-batches-py").mkdir(parents=True)
    (stale / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
    x, _ = data.load_cifar10(str(tmp_path / "d"))
    assert len(x) == 50 and sorted(os.listdir(tmp_path / "d")) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_checkpoints_from_before_loss_type_still_resume():
    """A checkpoint recorded before loss_type / fixed_variance existed was trained with l2 and 'large': resuming it
    with those values is accepted, with others refused naming the entry."""
    old = {"diffusion": {"formulation": "ddpm", "schedule": "linear", "timesteps": 1000, "prediction": "eps",
                         "learn_sigma": False}}
    new = {**old["diffusion"], "loss_type": "l2", "fixed_variance": "large"}
    checkpoints.check_compatible(old, {"diffusion": new}, "old.pt")
    with pytest.raises(errors.RunError, match=r"diffusion.loss_type 'l2' != 'l1'"):
        checkpoints.check_compatible(old, {"diffusion": {**new, "loss_type": "l1"}}, "old.pt")
    edm = {"diffusion": {"formulation": "edm", "sigma_data": 0.5}}  # no fixed_variance key for EDM
    checkpoints.check_compatible(edm, {"diffusion": {**edm["diffusion"], "loss_type": "l2"}}, "old.pt")

"""
files.py: atomic writes (a kill -9 inside a checkpoint write, in a child process killed at a chosen call, loses
nothing and the resumed run continues bit-exactly), temporary files of dead processes removed, and a full disk
reported in one line with the earlier file kept: for checkpoints (torch's zip writer masks the OSError), logs, grids,
the loss plot and npz files, on a small tmpfs where this machine allows mounting, and simulated. (The folder lock:
test_runs.py.)
"""
import contextlib
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch

import checkpoints
import errors
import files
import images
import runs
import sample
from conftest import TINY, digest, one_line_error, read_log, same_weights, small_disk, train

HERE = os.path.dirname(os.path.abspath(__file__))


# ----- kill -9 inside checkpoint writes -----

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


# ----- Stale temporaries and a full disk -----

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


# ----- Full disks: one line, every earlier file byte-identical, no temporary file left -----

class FullFile(io.FileIO):
    """A file on a full disk: its name is created, as on a real one, and every write fails with ENOSPC."""

    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")


def fill(folder):
    """Write a file until the disk is full."""
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


def log_append(folder):
    log = runs.TrainLog.__new__(runs.TrainLog)  # only what append uses: the main process, its records and path
    log.run, log.records, log.path = types.SimpleNamespace(procs=types.SimpleNamespace(main=True)), [], \
        str(folder / "log.jsonl")
    log.append({"step": 21, "loss": 0.5})


WRITERS = {  # name -> (the file, what writes it again)
    "checkpoint": ("latest.pt", lambda d: checkpoints.save_checkpoint({"w": torch.ones(5000)}, str(d / "latest.pt"))),
    "grid": ("g.png", lambda d: images.save_grid(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), str(d / "g.png"))),
    "loss plot": ("loss.png", lambda d: images.plot_losses([{"step": s, "loss": 1 / s} for s in (1, 2, 3)],
                                                          str(d / "loss.png"))),
    "npz": ("s.npz", lambda d: sample.write_npz(str(d / "s.npz"), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), None)),
    "log": ("log.jsonl", log_append),
}


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_is_one_line_and_keeps_the_earlier_file(tmp_path, monkeypatch, disk, writer):
    name, write = WRITERS[writer]
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(small_disk(tmp_path / "disk", 64 * 1024)) if disk == "tmpfs" else tmp_path
        (d / name).write_bytes(b"x" * 4096)  # the earlier file (a whole page: an append needs a new one)
        if disk == "tmpfs":
            fill(d)
        else:
            for module in (files, runs):
                monkeypatch.setattr(module, "open", lambda p, mode="r", *a, **k: FullFile(p, mode[0]),
                                    raising=False)
        with pytest.raises(errors.RunError) as e:
            write(d)
        msg = str(e.value)
        assert f"cannot write {d / name}" in msg and "No space left on device" in msg and "\n" not in msg
        assert (d / name).read_bytes() == b"x" * 4096 and not [f for f in os.listdir(d) if ".tmp" in f]


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_a_full_disk_during_a_run_keeps_every_checkpoint(existing, tmp_path, cifar_dir, capsys, monkeypatch, disk):
    """torch's zip writer reports the full disk as a RuntimeError (the OSError is its context): one line too."""
    with contextlib.ExitStack() as stack:
        if disk == "tmpfs":
            room = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(existing) for f in fs)
            run = stack.enter_context(small_disk(tmp_path / "disk", room + 96 * 1024)) / "run"
            shutil.copytree(existing, run)
        else:
            run = existing

            def full(obj, f, *a, **k):
                f.write(b"partial")
                try:
                    raise OSError(errno.ENOSPC, "No space left on device")
                except OSError:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            monkeypatch.setattr(torch, "save", full)
        kept = {f: digest(run / f) for f in ("latest.pt", "ckpt_0000010.pt", "ckpt_0000020.pt")}
        log = (run / "log.jsonl").read_bytes()
        with pytest.raises(SystemExit) as e:
            train(run, cifar_dir, "--steps", 30)
        msg = one_line_error(e, capsys)
        assert f"cannot write {run / 'latest.pt'} (OSError: [Errno 28] No space left on device)" in msg
        assert {f: digest(run / f) for f in kept} == kept and (run / "log.jsonl").read_bytes().startswith(log)
        assert not [f for f in os.listdir(run) if ".tmp" in f]

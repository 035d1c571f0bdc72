"""
files.py: atomic writes (a kill -9 inside a checkpoint write, in a child process killed at a chosen call, loses
nothing and the resumed run continues bit-exactly), temporary files of dead processes removed, and a full disk
reported in one line with the last checkpoint kept.
"""
import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

import files
from conftest import TINY, digest, one_line_error, read_log, same_weights, train

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

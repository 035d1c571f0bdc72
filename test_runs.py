"""
runs.py: run folders and resuming (an interrupted and resumed run equals the uninterrupted one; a folder holding
another run is refused), stop signals (Ctrl-C during a step or a grid), the stop at a non-finite loss, the roll-back
to a kept checkpoint after a corrupt latest.pt, the log rewritten atomically on resume, and one writer per run folder
(a second run refused naming the holder's pid, a killed holder never blocking its resume, torchrun's workers stopping
when their launcher is killed).
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import errors
import files
import runs
from conftest import TINY, one_line_error, read_log, same_weights, snapshot, train
from diffusion import GaussianDiffusion


# ----- Resuming -----

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


# ----- Stop signals and a non-finite loss -----

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


# ----- The log -----

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


# ----- One writer per run folder -----

HOLDER = "import sys, time, files; files.lock_folder(sys.argv[1]); print('locked', flush=True); time.sleep(120)"
HERE = os.path.dirname(os.path.abspath(__file__))


def test_the_folder_lock_names_its_holder_and_goes_with_it(tmp_path):
    fd = files.lock_folder(str(tmp_path))
    with pytest.raises(errors.RunError, match=f"--out-dir {tmp_path} is in use by another run \\(pid {os.getpid()}\\)"):
        files.lock_folder(str(tmp_path))
    files.unlock(fd)
    with files.locked(str(tmp_path), "--out"):
        assert files.lock_holder(str(tmp_path)) == str(os.getpid())
    files.unlock(files.lock_folder(str(tmp_path)))  # released at the end of the with block
    assert os.listdir(tmp_path) == []  # the folder itself is locked: no lock file in it


def test_a_second_run_is_refused_and_a_killed_holder_never_blocks_its_resume(existing, cifar_dir, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(existing)], cwd=HERE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(existing)
        with pytest.raises(SystemExit) as e:
            train(existing, cifar_dir, "--steps", 22)
        assert f"--out-dir {existing} is in use by another run (pid {holder.pid})" in one_line_error(e, capsys)
        assert snapshot(existing) == before  # the log not trimmed, no config.json written
    finally:
        holder.kill()  # kill -9: the OS drops its lock
        holder.wait()
    train(existing, cifar_dir, "--steps", 22)
    assert [r["step"] for r in read_log(existing)] == list(range(1, 23))


def alive(pid):
    """Running (a zombie that nobody reaped has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read().split("State:")[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="torchrun with gloo on Linux (/proc)")
def test_torchrun_workers_stop_when_their_launcher_dies(tmp_path, cifar_dir, capsys):
    """kill -9 of torchrun: its workers stop within seconds with a checkpoint, as on Ctrl-C, and never go on as a
    second writer beside the rerun; while they run, a second run in the folder is refused naming rank 0."""
    out = tmp_path / "run"
    argv = TINY + ["--data-dir", str(cifar_dir), "--out-dir", str(out), "--device", "cpu", "--ckpt-every", "100000"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "train_cifar.py"), *argv, "--steps", "99999"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    with open(tmp_path / "torchrun.txt", "w") as log:
        launcher = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while not (out / "log.jsonl").exists() or len((out / "log.jsonl").read_text().splitlines()) < 3:
            assert launcher.poll() is None and time.time() - t0 < 120, (tmp_path / "torchrun.txt").read_text()[-2000:]
            time.sleep(0.2)
        workers = open(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read().split()
        assert len(workers) == 2 and files.lock_holder(str(out)) in workers
        with pytest.raises(SystemExit) as e:
            train(out, cifar_dir, "--steps", 99999, "--ckpt-every", 100000)
        assert f"is in use by another run (pid {files.lock_holder(str(out))})" in one_line_error(e, capsys)
    finally:
        launcher.kill()
        launcher.wait()
    t0 = time.time()
    while any(alive(w) for w in workers):
        assert time.time() - t0 < 15, "torchrun's workers outlived their launcher"
        time.sleep(0.2)
    step = torch.load(out / "latest.pt", weights_only=True)["step"]  # saved on the way out, as on SIGTERM
    assert [r["step"] for r in read_log(out)] == list(range(1, step + 1))  # one writer: no interleaved records
    train(out, cifar_dir, "--steps", step + 1, "--ckpt-every", 100000)
    assert f"resumed from {out / 'latest.pt'} at step {step}" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out)] == list(range(1, step + 2))

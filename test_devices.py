"""
devices.py's processes under torchrun on CPUs (gloo, 2 processes): a run gives the same losses and weights for 1 and
2 processes at the same global batch (class-conditional DiT with learned sigma: timesteps, noise, flips and label
dropout all drawn per step for the global batch), resumes under torchrun, and sharded sampling writes the same npz,
in the same order, as one process; a global batch that the processes cannot share is refused. Memory: a batch whose
activations (measured on the meta device) cannot fit is refused before the run, and an out-of-memory error is one line.
(torchrun's workers stopping with their launcher: test_runs.py.)
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import devices
import dit
import train_cifar
from conftest import TINY, read_log, train

TORCHRUN = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                              reason="torch.distributed with gloo is not available")
HERE = os.path.dirname(os.path.abspath(__file__))


def launch(script, args, nproc, timeout=240):
    """torchrun --standalone --nproc_per_node nproc script args (1 thread per process) -> (exit code, output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(HERE, script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def train_args(out_dir, data_dir, steps):
    return TINY + ["--class-cond", "--data-dir", data_dir, "--out-dir", out_dir, "--steps", steps,
                   "--ckpt-every", 3, "--device", "cpu"]


@TORCHRUN
def test_two_processes_equal_one_and_resume(tmp_path, cifar_dir):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    rc, text = launch("train_cifar.py", train_args(one, cifar_dir, 6), 1)
    assert rc == 0, text[-2000:]
    rc, text = launch("train_cifar.py", train_args(two, cifar_dir, 3), 2)  # 3 steps, then resumed to 6
    assert rc == 0, text[-2000:]
    rc, text = launch("train_cifar.py", train_args(two, cifar_dir, 6), 2)
    assert rc == 0 and "resumed from" in text, text[-2000:]
    a, b = read_log(one), read_log(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "mse", "vb", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-4, atol=1e-6, err_msg=key)
    ca, cb = (torch.load(os.path.join(d, "latest.pt"), weights_only=True) for d in (one, two))
    assert ca["step"] == cb["step"] == 6
    for k in ca["model"]:
        torch.testing.assert_close(cb["model"][k], ca["model"][k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(cb["ema"][k], ca["ema"][k], rtol=1e-4, atol=1e-6, msg=k)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # one writer: the same files, no per-rank debris


@TORCHRUN
def test_sharded_sampling_equals_one_process(tmp_path, cifar_dir):
    run = str(tmp_path / "run")
    rc, text = launch("train_cifar.py", train_args(run, cifar_dir, 2), 1)
    assert rc == 0, text[-2000:]
    ckpt = os.path.join(run, "latest.pt")
    outs = []
    for n in (1, 2):  # 5 batches of 2 (the last one short): rounds of 2 batches and a last round of 1
        npz = str(tmp_path / f"s{n}.npz")
        rc, text = launch("sample.py", ["--ckpt", ckpt, "--num-samples", 9, "--batch-size", 2, "--steps", 3,
                                        "--sampler", "ddim", "--npz", npz, "--out", str(tmp_path / f"g{n}.png"),
                                        "--device", "cpu"], n)
        assert rc == 0, text[-2000:]
        outs.append(np.load(npz))
    assert outs[0]["arr_0"].shape == (9, 32, 32, 3)
    assert np.array_equal(outs[0]["arr_0"], outs[1]["arr_0"]) and np.array_equal(outs[0]["arr_1"], outs[1]["arr_1"])


@TORCHRUN
def test_global_batch_must_divide(tmp_path, cifar_dir):
    args = train_args(str(tmp_path / "odd"), cifar_dir, 2)
    args[args.index("--batch-size") + 1] = "3"
    rc, text = launch("train_cifar.py", args, 2)
    assert rc != 0 and "--batch-size 3 (the global batch) must be divisible by the 2 processes" in text


# ----- Memory -----

@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 1000000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
], ids=["cuda", "cpu-allocator", "python"])
def test_out_of_memory_is_one_line(tmp_path, cifar_dir, monkeypatch, error):
    def step(*a, **k):
        raise error
    monkeypatch.setattr(train_cifar, "train_step", step)
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "run", cifar_dir, "--steps", 2)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: out of memory at --batch-size 4 (") and "\n" not in msg
    assert "lower --batch-size or add --grad-checkpoint" in msg
    monkeypatch.setattr(train_cifar, "train_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError stays a traceback
        train(tmp_path / "run2", cifar_dir, "--steps", 2)


def test_a_batch_that_cannot_fit_is_refused_before_the_run(monkeypatch):
    model = dit.DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    per_sample = devices.activation_bytes(model, (3, 8, 8))
    assert 10_000 < per_sample < 10_000_000  # the tensors autograd keeps: tokens x width x blocks, in float32
    monkeypatch.setattr(devices, "memory_free", lambda device: 100 * per_sample)
    devices.check_batch_memory(model, (150, 3, 8, 8), torch.device("cpu"), "fp32")  # within twice the free memory
    devices.check_batch_memory(model, (300, 3, 8, 8), torch.device("cpu"), "bf16")  # half the bytes
    with pytest.raises(devices.RunError, match=r"a batch of 300 needs about .*B for activations but cpu has .*B "
                                               r"free; lower --batch-size \(about 100 would fit\)"):
        devices.check_batch_memory(model, (300, 3, 8, 8), torch.device("cpu"), "fp32")

"""Devices, precision and processes: --device / --precision checked before any long work, autocast, one process or
one per GPU / CPU under torchrun (DDP, workers that stop when their launcher dies), and memory: a batch measured
before it is run, an out-of-memory error told in one line."""
import datetime
import os
import signal
import sys
import threading
import time

import torch

from errors import RunError, first_line
from files import size


def resolve_device(name=None):
    """--device as a torch.device (default cuda if available, else cpu); a bad or absent device is a RunError."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type != "cpu":
        _check_accelerator(name, device)
    return device


def _check_accelerator(name, device):
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} but no CUDA GPU is visible to torch; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RunError(f"--device {name} but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type not in ("cpu", "cuda", "mps"):
        raise RunError(f"--device {name}: only cpu, cuda and mps are supported")


# ----- Processes: one, or many under torchrun -----

class Processes:
    """This process's place in a run: rank and world size (0 and 1 without torchrun: one process, no group)."""

    def __init__(self, rank=0, world=1, host_group=None):
        self.rank, self.world, self.host_group = rank, world, host_group

    @property
    def main(self):  # the one process that writes files, logs and prints progress
        return self.rank == 0

    def part(self, n):
        """This process's slice of a global batch of n (n divisible by the world size), in rank order."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def any(self, flag):
        """True on every process when `flag` is true on any (a stop request on one rank stops them all)."""
        return bool(flag)

    def mean(self, tensor):
        """The mean of a tensor over the processes (per-rank loss statistics -> the global batch's)."""
        return tensor

    def gather(self, obj):
        """[obj of rank 0, ..., obj of rank world-1] on the main process, None on the others."""
        return [obj]

    def wrap(self, model, device, find_unused_parameters=False):
        """model itself in one process; under torchrun DistributedDataParallel (its backward averages gradients)."""
        return model

    def close(self):
        pass


class TorchrunProcesses(Processes):
    """Processes under torchrun: a process group, plus a gloo group for host-side values (stop flags, gathered
    samples) that never syncs a GPU."""

    def any(self, flag):
        t = torch.tensor([int(bool(flag))])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def mean(self, tensor):
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        tensor /= self.world
        return tensor

    def gather(self, obj):
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0, group=self.host_group)
        return out

    def wrap(self, model, device, find_unused_parameters=False):
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                         else None, find_unused_parameters=find_unused_parameters)

    def close(self):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start_processes(device_name=None):
    """-> (Processes, device): one process on resolve_device(device_name), or under torchrun (WORLD_SIZE > 1) this
    rank's place in the process group (join_torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return Processes(), device
    return join_torchrun(world, device)


def join_torchrun(world, device):
    """Join the process group through torchrun's rendezvous (its env:// variables): NCCL with one GPU per process
    (cuda:LOCAL_RANK) or gloo on CPUs. -> (TorchrunProcesses, device). Only the main process prints."""
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RunError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; start at "
                           "most one process per GPU (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise RunError(f"torchrun runs on CUDA GPUs (NCCL) or CPUs (gloo), not {device.type}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's worker: its parent is the launcher
        stop_with_launcher(os.getppid())
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    host = torch.distributed.new_group(backend="gloo") if backend == "nccl" else torch.distributed.group.WORLD
    if rank != 0:  # one process reports
        sys.stdout = open(os.devnull, "w")
    return TorchrunProcesses(rank, world, host), device


def stop_with_launcher(launcher, grace=60.0, poll=0.5):
    """A watchdog thread: when torchrun (the parent) dies, e.g. by kill -9, this worker gets SIGTERM (train_cifar.py
    then stops after the step with a checkpoint, as on Ctrl-C) and exits after `grace` seconds at the latest, so no
    orphaned workers go on writing the run folder (their rerun would be a second writer)."""
    def watch():
        while os.getppid() == launcher:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)
    threading.Thread(target=watch, name="stop-with-launcher", daemon=True).start()


# ----- Memory -----

def memory_size():
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_free(device):
    """Bytes free for a run on device: the GPU's free memory, or the host's available memory (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def activation_bytes(model, sample_shape):
    """Bytes that autograd keeps for the backward pass per sample, measured by forward passes of 1 and 2 samples on
    the meta device (nothing allocated, nothing computed); None where a model cannot run there."""
    weights = {k: torch.empty_like(v, device="meta").requires_grad_(v.requires_grad)
               for k, v in [*model.named_parameters(), *model.named_buffers()]}
    sizes = []
    for b in (1, 2):
        saved = {}  # storage -> bytes: a tensor saved by several ops (or its views) counts once

        def pack(t):
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t
        x, t = torch.zeros(b, *sample_shape, device="meta"), torch.zeros(b, device="meta")
        kw = {"y": torch.zeros(b, dtype=torch.long, device="meta")} if getattr(model, "class_cond", False) else {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                torch.func.functional_call(model, weights, (x, t), kw)
        except Exception:  # an op without a meta kernel: no estimate
            return None
        sizes.append(sum(saved.values()))
    return sizes[1] - sizes[0]


def check_batch_memory(model, batch_shape, device, precision):
    """A batch whose activations clearly exceed the free memory (twice over: the estimate is rough) is refused before
    the run starts; on a CPU the kernel's OOM killer would end it without a word. bf16 / fp16 keep about half."""
    per_sample = activation_bytes(model, batch_shape[1:])
    need = (per_sample or 0) * batch_shape[0] * (1.0 if precision == "fp32" else 0.5)
    free = memory_free(device)
    if need > 2 * free:
        fits = max(1, int(batch_shape[0] * free / need))
        raise RunError(f"a batch of {batch_shape[0]} needs about {size(need)} for activations but {device} has "
                       f"{size(free)} free; lower --batch-size (about {fits} would fit) or add --grad-checkpoint")


def out_of_memory(e, batch_size):
    """The one-line exit message for an out-of-memory error (CUDA's OutOfMemoryError, the CPU allocator's
    RuntimeError, MemoryError), else None."""
    text = str(e)
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
            or "out of memory" in text.lower():
        return (f"error: out of memory at --batch-size {batch_size} ({first_line(e)[:120]}); lower --batch-size "
                "or add --grad-checkpoint")
    return None


def default_precision(device):
    """bf16 on GPUs that have it; on the CPU fp32 (bf16 pays off only on CPUs with AMX tiles; see README)."""
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def check_precision(precision, device):
    if precision == "fp16" and device.type != "cuda":
        raise RunError("--precision fp16 needs a CUDA device (its loss scaler is CUDA-only); use bf16 or fp32")


def autocast_forward(model, device, precision):
    """model(x, t, **kw) (or any model method, e.g. GenViT.classify) under bf16/fp16 autocast, output cast to
    float32 so the diffusion math stays in fp32; fp32: the model itself."""
    return model if precision == "fp32" else _autocast(model, device, precision)


def _autocast(model, device, precision):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def forward(*args, **kw):
        with torch.autocast(device.type, dtype=dtype):
            return model(*args, **kw).float()
    return forward

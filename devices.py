"""Devices, precision and processes: --device / --precision checked before any long work, autocast, and one
process or one per GPU / CPU under torchrun (DDP)."""
import datetime
import os
import sys

import torch

from errors import RunError


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
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    host = torch.distributed.new_group(backend="gloo") if backend == "nccl" else torch.distributed.group.WORLD
    if rank != 0:  # one process reports
        sys.stdout = open(os.devnull, "w")
    return TorchrunProcesses(rank, world, host), device


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

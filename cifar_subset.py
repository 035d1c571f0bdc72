"""
The data of gpu_report.py's short training run: a seeded random subset of CIFAR-10's training images written once
as a small npz (gpu_report.py --make-subset DATA_DIR N OUT.npz), its reader, and synthetic stand-in images.
--make-subset writes x (N, 3, 32, 32) uint8 and y (N,) int64 from data.load_cifar10 (no download): N x 3,080
bytes, so 10,000 = 30.8 MB; at most 20,000 (61.6 MB), so that the file fits beside the checkout in 64 MiB.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from data import load_cifar10
from errors import RunError, first_line
from files import atomic_write, check_writable

MAX_SUBSET = 20_000  # 20k x 3,080 B = 61.6 MB: the largest subset that fits 64 MiB beside the checkout


def synthetic_images(n, seed=0):
    """uint8 (n, 3, 32, 32) smooth random images (bilinear 4x4 colour grids): structure a model can learn."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def load_subset(path):
    """(uint8 (N, 3, 32, 32), int64 (N,)) from an npz written by make_subset."""
    try:
        with np.load(path) as f:
            x, y = f["x"], f["y"]
    except (OSError, KeyError, ValueError) as e:
        raise RunError(f"{path}: not an npz with arrays x and y ({first_line(e)}); write one with "
                       "python gpu_report.py --make-subset DATA_DIR N OUT.npz") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, 32, 32) or y.shape != (len(x),) or not len(x):
        raise RunError(f"{path}: expected x uint8 (N, 3, 32, 32) and y (N,), got x {x.dtype} {x.shape}, y {y.shape}")
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def make_subset(data_dir, n, out):
    """A seeded random n of CIFAR-10's training images from data_dir (no download) -> npz x uint8, y int64."""
    try:
        n = int(n)
    except ValueError:
        raise RunError(f"--make-subset: N must be an integer, got {n!r}") from None
    if not 1 <= n <= MAX_SUBSET:
        raise RunError(f"--make-subset: N must be in 1..{MAX_SUBSET} ({MAX_SUBSET} images = 61.6 MB, the most that "
                       f"fits 64 MiB beside the checkout; 10000 recommended), got {n}")
    check_writable(out, "--make-subset OUT")
    x, y = load_cifar10(data_dir, train=True, download=False)
    if n > len(x):
        raise RunError(f"--make-subset: {data_dir} has {len(x)} training images, fewer than N = {n}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]  # random: about n/10 per class
    atomic_write(out, lambda f: np.savez(f, x=x[idx].numpy(), y=y[idx].numpy()))
    print(f"wrote {out}: {n} CIFAR-10 training images, {os.path.getsize(out) / 1e6:.1f} MB")

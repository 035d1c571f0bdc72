"""
What the scripts (train_cifar.py, sample.py, bench.py) share, in one place they import one way:

  RECIPES, LATENT_RECIPES                        each paper's training recipe, per backbone (pixels / latents)
  BACKBONES, build_model(backbone, name, **kw)   --backbone name -> module with a MODELS registry -> nn.Module
  resolve_device(name), check_precision(...)     --device / --precision checked before any long work
  start_processes, Processes                     one process, or one per GPU / CPU under torchrun (DDP)
  save_checkpoint / load_checkpoint / check_compatible / load_model
                                                 checkpoint files: atomic writes, weights_only loads, resume checks
  atomic_write, atomic_link, remove_stale_temps, check_writable, check_dir, make_dir
                                                 every file written whole or not at all; debris of killed runs removed
  autocast_forward(model, device, precision)     model(x, t, **kw) under autocast, fp32 output
  rng_state / set_rng_state                      every RNG as tensors, for exact resumes
  StopOnSignal, Interrupted                      Ctrl-C / SIGTERM: finish the step, save, exit
  to_uint8, save_grid, plot_losses, generate     images: [-1, 1] -> uint8, PNG grids, loss curve, batched sampling

Library code: problems a user can fix raise RunError with a message that says what was wrong and what to do;
only a script's main() turns it into the one-line error and exit code.
"""
import datetime
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import zipfile

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

# --backbone name -> module with a MODELS registry; adding a backbone is one line here plus its recipe.
BACKBONES = {"dit": "dit", "uvit": "uvit", "diffit": "diffit", "genvit": "genvit"}
# What every train_cifar.py checkpoint holds (the model is rebuilt from backbone, model_name, model_kwargs).
CHECKPOINT_KEYS = ("step", "model", "ema", "backbone", "model_name", "model_kwargs", "diffusion", "data")
RESUME_KEYS = ("opt", "rng", "args")  # also needed to continue a run exactly


class RunError(Exception):
    """A problem with the user's input or files; the message says what was wrong and what to do."""


def first_line(e):
    """'TypeName: first line of the message' (for wrapping low-level errors into one-line messages)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


# ----- Each paper's recipes (train_cifar.py's defaults; bench.py measures the same models) -----

RECIPES = {
    # DiT (Peebles & Xie §4 "Training"; facebookresearch/DiT train.py @ ed81ce2): AdamW lr 1e-4, wd 0, betas
    # (0.9, 0.999), no warm-up, no clipping, EMA 0.9999, learn_sigma with the hybrid loss, linear schedule. Ours:
    # DiT-S/2 (33M params, 256 tokens at 32x32x3) because it matches U-ViT-S/2 (44M, 256 tokens) in size; B/2 is
    # 130M and ~4x the compute per step. Batch 128 on one GPU (official: 256 global). 500k steps = U-ViT's
    # CIFAR-10 budget (DiT reports no CIFAR-10 run).
    "dit": dict(model="DiT-S/2", steps=500_000, batch_size=128, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999),
                warmup=0, grad_clip=0.0, ema_decay=0.9999, learn_sigma=True, formulation="ddpm"),
    # U-ViT CIFAR-10 (Bao et al. App. B; baofff/U-ViT configs/cifar10_uvit_small.py @ ce55170): U-ViT-S/2, AdamW
    # lr 2e-4, wd 0.03, betas (0.99, 0.999), batch 128, 2.5k warm-up then constant, 500k steps, EMA 0.9999,
    # eps-prediction, no clipping. The official run is a continuous VP-SDE; here the discrete linear schedule.
    "uvit": dict(model="U-ViT-S/2", steps=500_000, batch_size=128, lr=2e-4, weight_decay=0.03, betas=(0.99, 0.999),
                 warmup=2500, grad_clip=0.0, ema_decay=0.9999, learn_sigma=False, formulation="ddpm"),
    # DiffiT-CIFAR (DiffiT App. I.1): EDM training and EDM's Heun sampler (18 steps), Adam lr 1e-3, batch 512,
    # 200k iterations; where the paper is silent, EDM's CIFAR-10 recipe (Karras et al. 2022, train.py defaults):
    # lr ramp-up over 10 Mimg (19,531 steps at 512), EMA half-life 0.5 Mimg (decay 0.5^(512/500k) per step),
    # dropout 0.13 (the DiffiT-CIFAR default). EDM trains 200 Mimg; the paper's 200k x 512 = 102.4 Mimg is kept.
    "diffit": dict(model="DiffiT-CIFAR", steps=200_000, batch_size=512, lr=1e-3, weight_decay=0.0,
                   betas=(0.9, 0.999), warmup=19_531, grad_clip=0.0, ema_decay=0.5 ** (512 / 500_000),
                   learn_sigma=False, formulation="edm"),
    # GenViT (Yang et al. 2022; sndnyang/Diffusion_ViT gevit_main.py, utils/scheduler.py, diffusion.py @ 84a4cfe):
    # AdamW lr 1e-3, wd 0.05, batch 128, 500 epochs = 195k steps (390 per epoch), 10 warm-up epochs from 1e-6
    # then cosine to 1e-6, per step; clip 1.0, EMA 0.999; cosine schedule, L1 eps loss, 1000-step ancestral
    # sampling with the posterior ("small", clipped) variance. HybViT adds --hybvit (100 L_diff + CE).
    "genvit": dict(model="GenViT-CIFAR", steps=195_000, batch_size=128, lr=1e-3, weight_decay=0.05,
                   betas=(0.9, 0.999), warmup=3_900, grad_clip=1.0, ema_decay=0.999, learn_sigma=False,
                   formulation="ddpm", schedule="cosine", loss_type="l1", lr_schedule="cosine", min_lr=1e-6,
                   fixed_variance="small", sampler="ddpm", sample_steps=1000),
}
# On latents from extract_latents.py (256x256 images -> 4x32x32), each paper's ImageNet-256 recipe.
LATENT_RECIPES = {
    # DiT §4 / train.py: DiT-XL/2, AdamW lr 1e-4, no weight decay, global batch 256, EMA 0.9999, learned sigma,
    # linear schedule; evaluated with 250-step DDPM. 400k steps = the paper's scaling-study length (XL/2: 7M).
    "dit": dict(model="DiT-XL/2", steps=400_000, batch_size=256, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999),
                warmup=0, grad_clip=0.0, ema_decay=0.9999, learn_sigma=True, schedule="linear", sampler="ddpm",
                sample_steps=250, formulation="ddpm"),
    # U-ViT Table / configs/imagenet256_uvit_huge.py: U-ViT-H/2, AdamW lr 2e-4, wd 0.03, betas (0.99, 0.99), batch
    # 1024, 5k warm-up, 500k steps, EMA 0.9999, label dropout 0.1, the discrete scaled-linear schedule
    # (train_ldm_discrete.py); DPM-Solver 50 steps.
    "uvit": dict(model="U-ViT-H/2", steps=500_000, batch_size=1024, lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99),
                 warmup=5000, grad_clip=0.0, ema_decay=0.9999, learn_sigma=False, schedule="scaled_linear",
                 sampler="dpm++2m", sample_steps=50, formulation="ddpm"),
    # DiffiT App. I.2: DiffiT-XL/2, lr 3e-4, batch 256, EMA 0.9999, ADM's diffusion (linear, learned sigma); the
    # optimizer and length are not stated: AdamW without weight decay (DiT's) and DiT's 400k steps are ours.
    "diffit": dict(model="DiffiT-XL/2", steps=400_000, batch_size=256, lr=3e-4, weight_decay=0.0,
                   betas=(0.9, 0.999), warmup=0, grad_clip=0.0, ema_decay=0.9999, learn_sigma=True,
                   schedule="linear", sampler="ddpm", sample_steps=250,
                   formulation="ddpm"),
    # GenViT reports no latent model: its CIFAR-10 recipe and size on the 32x32x4 latents (patch 4: 64 tokens).
    "genvit": RECIPES["genvit"],
}
# What a recipe leaves unset: DDPM's linear schedule, L2 loss, constant LR after the warm-up, ADM's 'large' variance.
RECIPE_DEFAULTS = dict(schedule="linear", loss_type="l2", lr_schedule="constant", min_lr=0.0, fixed_variance="large")


# ----- Models -----

def build_model(backbone, model_name, **kwargs):
    """MODELS[model_name](**kwargs) from the backbone's module."""
    if backbone not in BACKBONES:
        raise RunError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    models = importlib.import_module(BACKBONES[backbone]).MODELS
    if model_name not in models:
        raise RunError(f"unknown {backbone} model {model_name!r}; choose one of {', '.join(models)}")
    try:
        return models[model_name](**kwargs)
    except (ValueError, TypeError) as e:
        raise RunError(f"cannot build {model_name}: {e} (check --image-size, --model-arg)") from None


def load_model(ckpt, use_ema, device, path="checkpoint"):
    """Rebuild the checkpoint's model (eval mode) on device with its EMA or raw weights."""
    model = build_model(ckpt["backbone"], ckpt["model_name"], **ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise RunError(f"{path}: its weights do not fit {ckpt['model_name']} with the recorded model_kwargs "
                       f"({str(e).splitlines()[0][:120]}); the file was edited or comes from another version: "
                       "pass an unmodified train_cifar.py checkpoint") from None
    return model.to(device).eval()


def resolve_device(name=None):
    """--device as a torch.device (default cuda if available, else cpu); a bad or absent device is a RunError."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} but no CUDA GPU is visible to torch; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RunError(f"--device {name} but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type not in ("cpu", "cuda", "mps"):
        raise RunError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


# ----- Processes: one, or many under torchrun -----

class Processes:
    """This process's place in a run: rank and world size (0 and 1 without torchrun, with no process group), and
    under torchrun a gloo group for host-side values (stop flags, gathered samples) that never syncs a GPU."""

    def __init__(self, rank=0, world=1, host_group=None):
        self.rank, self.world, self.host_group = rank, world, host_group

    @property
    def main(self):
        """The one process that writes files, logs and prints progress."""
        return self.rank == 0

    def part(self, n):
        """This process's slice of a global batch of n (n divisible by the world size), in rank order."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def any(self, flag):
        """True on every process when `flag` is true on any (a stop request on one rank stops them all)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([int(bool(flag))])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def mean(self, tensor):
        """The mean of a tensor over the processes (per-rank loss statistics -> the global batch's)."""
        if self.world > 1:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
            tensor /= self.world
        return tensor

    def gather(self, obj):
        """[obj of rank 0, ..., obj of rank world-1] on the main process, None on the others."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0, group=self.host_group)
        return out

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start_processes(device_name=None):
    """-> (Processes, device). Under torchrun (WORLD_SIZE > 1) this joins the process group through torchrun's
    rendezvous (its env:// variables): NCCL with one GPU per process (cuda:LOCAL_RANK) or gloo on CPUs. Without
    torchrun nothing is initialised and the device is resolve_device(device_name)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return Processes(), device
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
    return Processes(rank, world, host), device


def default_precision(device):
    """bf16 on GPUs that have it; on the CPU fp32 (bf16 pays off only on CPUs with AMX tiles; see README)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def check_precision(precision, device):
    if precision == "fp16" and device.type != "cuda":
        raise RunError("--precision fp16 needs a CUDA device (its loss scaler is CUDA-only); use bf16 or fp32")


def autocast_forward(model, device, precision):
    """model(x, t, **kw) (or any model method, e.g. GenViT.classify) under autocast, output cast to float32 so the
    diffusion math stays in fp32."""
    if precision == "fp32":
        return model
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def forward(*args, **kw):
        with torch.autocast(device.type, dtype=dtype):
            return model(*args, **kw).float()
    return forward


# ----- Files: atomic writes, stale temporaries -----

TMP_RE = re.compile(r"\.tmp(\d*)$")  # <name>.tmp<pid>: what atomic_write leaves when killed (older: no pid)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def atomic_write(path, write):
    """write(f) into <path>.tmp<pid> in the same folder, fsync, then os.replace onto path: the file is either
    the old one or the complete new one, never half-written. OSError (full disk, read-only folder) -> RunError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise RunError(f"cannot write {path} ({first_line(e)}); free disk space or choose a writable folder "
                       "(the previous file, if any, is unchanged)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(folder):
    """Delete <name>.tmp<pid> files in folder (not below) left by killed processes; returns their names."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        m = TMP_RE.search(name)
        path = os.path.join(folder, name)
        pid = int(m.group(1) or 0) if m else None
        if m and pid != os.getpid() and not (pid and _pid_alive(pid)) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


def atomic_link(src, dst):
    """dst becomes the same file as src (a hard link; a copy where links are unsupported), atomically."""
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        raise RunError(f"cannot write {dst} ({e}); free disk space or choose a writable --out-dir") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(path, what):
    """Fail now, before any long work, if the file `path` could not be created: it is a folder, or its folder (or
    the nearest existing parent) is a file or not writable. Creates nothing."""
    if os.path.isdir(path):
        raise RunError(f"{what} {path} is a folder; give a file path")
    check_dir(os.path.dirname(os.path.abspath(path)), what)


def check_dir(folder, what):
    """Fail now if the folder cannot be made or written: it (or its nearest existing parent) is a file, or not
    writable. Creates nothing, so a command refused later leaves no empty folder behind."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise RunError(f"{what} {folder}: {path} is a file, not a folder; give a folder path")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunError(f"{what} {folder}: {path} is not writable (read-only disk or permissions); choose a "
                       "writable folder")


def make_dir(folder, what):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {what} {folder} ({first_line(e)}); choose a writable folder") from None


# ----- Checkpoints -----

def rng_state():
    """Every RNG as tensors / plain types (loadable with weights_only=True)."""
    np_s, py_s = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_s[0], torch.from_numpy(np_s[1].astype(np.int64)), *map(int, np_s[2:4]), float(np_s[4])],
            "python": [py_s[0], torch.tensor(py_s[1], dtype=torch.int64), py_s[2]]}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate((s["python"][0], tuple(s["python"][1].tolist()), s["python"][2]))




def plain(x):
    """Tuples -> lists etc., so the value round-trips through torch.load(weights_only=True) and JSON."""
    return json.loads(json.dumps(x))


def save_checkpoint(state, path):
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, resume=False):
    """A train_cifar.py checkpoint on the CPU (weights_only=True: never unpickles code). resume=True also
    requires what continuing the run needs (optimizer, RNG states, args)."""
    if not os.path.isfile(path):
        raise RunError(f"checkpoint {path} does not exist; check the path (or use --resume auto / never)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes: all "not a checkpoint"
        why = "not a zip archive" if not zipfile.is_zipfile(path) else first_line(e)[:140]
        hint = "pass an older ckpt_XXXXXXX.pt or a new --out-dir"
        if os.path.basename(path) == "latest.pt":  # a kept checkpoint of the same run can take over
            hint = (f"move it aside (mv {path} {path}.bad) and resume from a kept checkpoint of this run with "
                    f"--resume {os.path.join(os.path.dirname(path), 'ckpt_XXXXXXX.pt')}, or pick a new --out-dir")
        raise RunError(f"cannot read checkpoint {path} ({why}); it is truncated or not a train_cifar.py "
                       f"checkpoint: {hint}") from None
    return validate_checkpoint(ckpt, path, resume)


def validate_checkpoint(ckpt, path, resume=False):
    """ckpt if it holds every key of a train_cifar.py checkpoint (and, with resume, what continuing needs).
    Checkpoints written before formulations existed are DDPM ones."""
    need = CHECKPOINT_KEYS + (RESUME_KEYS if resume else ())
    missing = [k for k in need if k not in (ckpt if isinstance(ckpt, dict) else {})]
    if missing:
        what = " that can be resumed" if resume else ""
        raise RunError(f"{path} is not a train_cifar.py checkpoint{what} (missing {missing}); pass latest.pt or a "
                       "ckpt_XXXXXXX.pt of a run")
    if isinstance(ckpt["diffusion"], dict):
        ckpt["diffusion"].setdefault("formulation", "ddpm")
    return ckpt


MAY_CHANGE = {"data.vae"}  # which VAE decodes the grids may change on resume; the latents may not
# Settings recorded only since a later version, with the value every older checkpoint was trained with.
ADDED = {"diffusion.loss_type": "l2", "diffusion.fixed_variance": "large"}


def check_compatible(ckpt, config, path):
    """Resuming needs the same backbone, model, constructor kwargs, diffusion and data geometry."""
    diffs = []
    for k, new in plain(config).items():
        old = plain(ckpt.get(k))
        if isinstance(new, dict) and isinstance(old, dict):  # name the differing entries, e.g. model_kwargs.depth
            old = {**{j[len(k) + 1:]: v for j, v in ADDED.items() if j.startswith(k + ".") and j[len(k) + 1:] in new},
                   **old}
            diffs += [f"{k}.{j} {old.get(j)!r} != {new.get(j)!r}" for j in sorted({**old, **new})
                      if old.get(j) != new.get(j) and f"{k}.{j}" not in MAY_CHANGE]
        elif old != new:
            diffs.append(f"{k} {old!r} != {new!r}")
    if diffs:
        raise RunError(f"{path} is from another config ({'; '.join(diffs)}); rerun with the flags it was trained "
                       "with, or pick a new --out-dir")


# ----- Stopping on a signal -----

class Interrupted(Exception):
    """A stop request arrived during a sample grid or an FID: that work is abandoned, the checkpoint is not."""


class StopOnSignal:
    """First Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.signum, self.old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write("stopping to save a checkpoint (Ctrl-C again to quit at once)")

    def guard(self, fwd):
        """fwd that raises Interrupted once a stop was requested: grids and FID stop within one model call."""
        def guarded(*a, **kw):
            if self.signum is not None:
                raise Interrupted
            return fwd(*a, **kw)
        return guarded

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


# ----- Images -----

def to_uint8(x):
    """Model-space [-1, 1] -> uint8 [0, 255] (rounded)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_grid(images, path, nrow=8, pad=2):
    """(N, C, H, W) uint8 (C = 1 or 3) -> one PNG with nrow images per row and pad black pixels between;
    written atomically."""
    images = torch.as_tensor(images).cpu()
    if images.ndim != 4 or images.dtype != torch.uint8 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid wants uint8 (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(c, pad + rows * (h + pad), pad + cols * (w + pad), dtype=torch.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    arr = grid.permute(1, 2, 0).numpy()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the folder of {path} ({first_line(e)}); choose a writable path") from None
    atomic_write(path, lambda f: Image.fromarray(arr[..., 0] if c == 1 else arr).save(f, format="PNG"))


def plot_losses(records, path, size=(800, 480)):
    """Loss vs step with Pillow: log10 y axis, 5 ticks per axis labelled with the default font."""
    pts = [(r["step"], math.log10(r["loss"])) for r in records if r.get("loss", 0) > 0 and math.isfinite(r["loss"])]
    if len(pts) < 2:
        return
    (W, H), (L, R, T, B) = size, (70, 20, 30, 40)
    xs, ys = zip(*pts)
    x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(ys), max(max(ys), min(ys) + 1e-3)  # never 0-wide
    px = lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)
    py = lambda v: T + (y1 - v) / (y1 - y0) * (H - T - B)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):
        s, v = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        d.line([px(s), H - B, px(s), H - B + 4], fill="black")
        d.text((px(s) - 15, H - B + 8), f"{int(s)}", fill="black")
        d.line([L - 4, py(v), W - R, py(v)], fill=(225, 225, 225))
        d.text((5, py(v) - 6), f"{10 ** v:.4g}", fill="black")
    d.line([(px(s), py(v)) for s, v in pts], fill=(31, 119, 180), width=2)
    d.text((L, 8), "training loss (log scale) vs step", fill="black")
    atomic_write(path, lambda f: img.save(f, format="PNG"))


# ----- Sampling -----

def generate(fwd, diffusion, shape, num_samples, batch_size, num_classes=0, class_label=None, sampler="dpm++2m",
             steps=25, eta=0.0, cfg_scale=1.0, cfg_channels=None, null_label=None, seed=0, device="cpu",
             progress=True, decode=None, procs=None):
    """Yield (uint8 (n, C, H, W) CPU images, int64 labels or None) batches of samples. The initial noise and the
    labels come from a CPU generator (the same for a seed on any device); the per-step noise of ddpm / ddim with
    eta > 0 comes from a generator on the device. Labels: class_label, else uniform. decode maps samples to
    images in [-1, 1] first (a VAE decoder for latent models). Under torchrun (procs) batch k is sampled by rank
    k % world and every round of batches is gathered on the main process, which yields them in order (the others
    yield nothing): the same samples, in the same order, as one process."""
    procs = procs or Processes()
    gen = torch.Generator().manual_seed(seed)
    labels = None
    if num_classes:
        labels = torch.full((num_samples,), class_label) if class_label is not None \
            else torch.randint(num_classes, (num_samples,), generator=gen)
    starts = range(0, num_samples, batch_size)
    mine = None
    for k, i in enumerate(tqdm(starts, desc="sampling", disable=not progress or not procs.main)):
        n = min(batch_size, num_samples - i)
        noise = torch.randn((n, *shape), generator=gen)  # drawn by every process: the generator stays in step
        y = None if labels is None else labels[i:i + n]
        if k % procs.world == procs.rank:
            x = diffusion.sample(fwd, (n, *shape), sampler=sampler, steps=steps, eta=eta,
                                 model_kwargs=None if y is None else {"y": y.to(device)}, cfg_scale=cfg_scale,
                                 cfg_channels=cfg_channels, null_label=null_label, noise=noise, device=device,
                                 clip_denoised=decode is None, generator=torch.Generator(device).manual_seed(seed + i))
            mine = (to_uint8(x if decode is None else decode(x)).cpu(), y)
        if k % procs.world == procs.world - 1 or k == len(starts) - 1:  # a round done: batches in rank order
            for batch in procs.gather(mine) or []:
                if batch is not None:
                    yield batch
            mine = None

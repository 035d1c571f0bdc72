"""train_cifar.py checkpoint files: what they hold, atomic saves, weights_only loads, the checks before a resume,
and every RNG state for exact resumes."""
import json
import os
import random
import zipfile

import numpy as np
import torch

from errors import RunError, first_line
from files import atomic_write

# What every train_cifar.py checkpoint holds (the model is rebuilt from backbone, model_name, model_kwargs).
CHECKPOINT_KEYS = ("step", "model", "ema", "backbone", "model_name", "model_kwargs", "diffusion", "data")
RESUME_KEYS = ("opt", "rng", "args")  # also needed to continue a run exactly


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

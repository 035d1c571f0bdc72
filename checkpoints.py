"""train_cifar.py checkpoint files: what they hold, atomic saves, weights_only loads (a file that would run code is
refused as such), the checks before a resume (config, latents, step, weights, optimizer and RNG states), and every
RNG state for exact resumes."""
import json
import math
import os
import pickletools
import random
import re
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
    """Restore rng_state()'s states (check_state tries them first: a damaged one is a RunError before anything)."""
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
        refusal = code_refusal(path, e, "pass a train_cifar.py checkpoint (latest.pt or a ckpt_XXXXXXX.pt of a run)")
        if refusal:
            raise refusal from None
        why = "not a zip archive" if not zipfile.is_zipfile(path) else load_reason(e)
        hint = "pass an older ckpt_XXXXXXX.pt or a new --out-dir"
        if os.path.basename(path) == "latest.pt":  # the newest kept checkpoint of the same run can take over
            kept = sorted(f for f in os.listdir(os.path.dirname(path) or ".") if re.fullmatch(r"ckpt_\d+\.pt", f))
            then = (f"resume its newest kept checkpoint, --resume {os.path.join(os.path.dirname(path), kept[-1])}"
                    if kept else "rerun to start the run again (it kept no ckpt_XXXXXXX.pt)")
            hint = f"move it aside (mv {path} {path}.bad) and {then}, or pick a new --out-dir"
        raise RunError(f"cannot read checkpoint {path} ({why}); it is truncated or not a train_cifar.py "
                       f"checkpoint: {hint}") from None
    ckpt = validate_checkpoint(ckpt, path, resume)
    if resume:
        check_state(ckpt, path)
    return ckpt


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal escapes, which torch's weights_only messages may hold


def code_refusal(path, e, hint):
    """The RunError for a file that torch.load(weights_only=True) refused because unpickling it would run code (it
    imports a global: a foreign or hostile pickle; a TorchScript archive), else None. Torch's advice to load such a
    file unsafely is not passed on."""
    text = ANSI.sub("", str(e))
    if "weights_only" not in text and "Weights only" not in text:
        return None
    m = re.search(r"GLOBAL (\S+)|(TorchScript)|(legacy \.tar)", text)
    if m:
        what = next(g for g in m.groups() if g)
    else:  # torch names no global for a raw (not zipped) pickle: read its opcodes
        what = None if zipfile.is_zipfile(path) else pickle_global(path)
    if what is None:
        return None
    return RunError(f"{path} is not a plain tensor file (would run code: {what}); it was not loaded: {hint}")


def pickle_global(path):
    """The first global (module.name) that a raw pickle file imports, read with pickletools (nothing runs), or None
    (garbage, or a pickle of plain data)."""
    strings = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST") and re.fullmatch(r"[\w.]+ [\w.]+", arg):
                    return arg.replace(" ", ".")
                if op.name == "STACK_GLOBAL":
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle
        return None
    return None


def load_reason(e):
    """Why torch.load failed, in a few words: no terminal escapes, no advice to load the file unsafely."""
    text = ANSI.sub("", str(e)).strip()
    if "Weights only load failed" in text:
        m = re.search(r"(Unsupported operand \d+|Unsupported global: GLOBAL \S+)", text)
        return f"{type(e).__name__}: not a file of plain tensors" + (f" ({m[1]})" if m else "")
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:140]}"


def check_state(ckpt, path):
    """What a resume loads, checked before anything is: the step, model and EMA of the same layout with finite
    weights, an optimizer state that is not empty, RNG states that restore. Each problem is one line naming it."""
    def bad(what):
        return RunError(f"{path}: {what}; the file was edited or damaged: resume from another checkpoint of the run "
                        "(ckpt_XXXXXXX.pt) or pick a new --out-dir")
    step, elapsed = ckpt["step"], ckpt.get("elapsed", 0.0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"step {step!r} is not a number of steps (an integer >= 0)")
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not 0 <= elapsed < math.inf:
        raise bad(f"elapsed {elapsed!r} is not a number of seconds")
    if not isinstance(ckpt["args"], dict) or not isinstance(ckpt.get("scaler") or {}, dict):
        raise bad("'args' or 'scaler' is not a dict")
    check_weights(ckpt, bad)
    opt = ckpt["opt"]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if not (groups and isinstance(groups, list) and isinstance(opt.get("state"), dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise bad("'opt' is not an optimizer state (state, param_groups)")
    if step > 0 and not opt["state"] and ckpt["args"].get("precision") != "fp16":  # fp16 may skip its first steps
        raise bad(f"the optimizer state is empty although the run is at step {step}")
    saved = rng_state()
    try:
        set_rng_state(ckpt["rng"])  # a trial: every state restores, or the resume stops here
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise bad(f"its RNG state cannot be restored ({first_line(e)[:100]})") from None
    finally:
        set_rng_state(saved)


def check_weights(ckpt, bad):
    """model and ema: state_dicts of tensors with the same names and shapes, all finite (NaN weights draw black)."""
    for k in ("model", "ema"):
        if not (isinstance(ckpt[k], dict) and ckpt[k]
                and all(isinstance(n, str) and torch.is_tensor(v) for n, v in ckpt[k].items())):
            raise bad(f"'{k}' is not a state_dict of tensors")
    model, ema = ckpt["model"], ckpt["ema"]
    for name in {**model, **ema}:
        if name not in model or name not in ema:
            raise bad(f"{name!r} is in {'model' if name in model else 'ema'} only")
        if model[name].shape != ema[name].shape:
            raise bad(f"ema[{name!r}] has shape {tuple(ema[name].shape)} but model[{name!r}] "
                      f"{tuple(model[name].shape)}")
    for k in ("model", "ema"):
        for name, v in ckpt[k].items():
            if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all():
                raise bad(f"{k}[{name!r}] holds non-finite values (NaN or inf)")


def load_optimizer(opt, state, path):
    """opt.load_state_dict(state), refused in one line when it does not fit the model's parameters."""
    try:
        opt.load_state_dict(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"{path}: its optimizer state does not fit the model ({first_line(e)[:120]}); the file was "
                       "edited or damaged: resume from another checkpoint of the run or pick a new --out-dir") from None
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.ndim and v.shape != p.shape:
                raise RunError(f"{path}: optimizer state {key} of parameter {i} has shape {tuple(v.shape)}, the "
                               f"parameter {tuple(p.shape)}; the file was edited or damaged: resume from another "
                               "checkpoint of the run or pick a new --out-dir")


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


# Which VAE decodes the grids may change on resume (the latents may not), and where the CLIP folder lies.
MAY_CHANGE = {"data.vae", "text.clip"}
# Settings recorded only since a later version, with the value every older checkpoint was trained with.
ADDED = {"diffusion.loss_type": "l2", "diffusion.fixed_variance": "large"}
# Provenance recorded only since a later version: unknown in older checkpoints, so not compared there.
UNKNOWN_BEFORE = {"data.latents", "data.latents_vae", "data.scaling_factor"}


def check_compatible(ckpt, config, path):
    """Resuming needs the same backbone, model, constructor kwargs, diffusion and data geometry."""
    diffs = []
    for k, new in plain(config).items():
        old = plain(ckpt.get(k))
        if isinstance(new, dict) and isinstance(old, dict):  # name the differing entries, e.g. model_kwargs.depth
            old = {**{j[len(k) + 1:]: v for j, v in ADDED.items() if j.startswith(k + ".") and j[len(k) + 1:] in new},
                   **old}
            diffs += [f"{k}.{j} {old.get(j)!r} != {new.get(j)!r}" for j in sorted({**old, **new})
                      if old.get(j) != new.get(j) and f"{k}.{j}" not in MAY_CHANGE
                      and not (f"{k}.{j}" in UNKNOWN_BEFORE and j not in old)]
        elif old != new:
            diffs.append(f"{k} {old!r} != {new!r}")
    if any(d.startswith("data.latents") for d in diffs):  # the same shapes, other data: a silent mix otherwise
        raise RunError(f"{path} trained on other latents ({'; '.join(diffs)}; the checkpoint's first); resume with "
                       "the --data-dir it trained on, or pick a new --out-dir")
    if diffs:
        raise RunError(f"{path} is from another config ({'; '.join(diffs)}); rerun with the flags it was trained "
                       "with, or pick a new --out-dir")

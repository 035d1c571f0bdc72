"""A training run's folder and state: which checkpoint to resume, the Run (model, EMA, optimizer, step) saved
atomically into latest.pt and kept ckpt_XXXXXXX.pt, the non-finite stop with rollback advice, log.jsonl and
loss.png, and stopping on a signal (Ctrl-C / SIGTERM finish the step and save; a second Ctrl-C quits at once)."""
import argparse
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from backbones import load_weights
from checkpoints import load_optimizer, plain, rng_state, save_checkpoint, set_rng_state
from devices import Processes
from errors import RunError
from files import atomic_link, atomic_write, lock_folder, make_dir, remove_stale_temps
from images import plot_losses
from recipes import paper_recipe
from training import first_nonfinite, weights_finite


def resume_path(resume, out_dir):
    """The checkpoint that --resume (auto, never or a path) resumes into out_dir (None = a fresh run)."""
    latest = os.path.join(out_dir, "latest.pt")
    if resume == "auto":
        return latest if os.path.exists(latest) else None
    return explicit_resume(resume, out_dir)


def explicit_resume(resume, out_dir):
    """--resume never / a path: refuses whatever would overwrite another run; a kept checkpoint of this run is a
    rollback (the log is trimmed)."""
    latest, log = os.path.join(out_dir, "latest.pt"), os.path.join(out_dir, "log.jsonl")
    if os.path.exists(latest) and not (resume != "never" and os.path.exists(resume)
                                       and os.path.samefile(resume, latest)):
        hint = "use --resume auto to continue it" if resume == "never" else \
            f"resuming {resume} there would overwrite it: use --resume auto to continue that run"
        raise RunError(f"{out_dir} already holds a run (latest.pt); {hint}, or pick a new --out-dir")
    own = resume != "never" and os.path.dirname(os.path.abspath(resume)) == os.path.abspath(out_dir)
    if resume != "never" and not own and not os.path.exists(latest) and os.path.exists(log) \
            and os.path.getsize(log):
        raise RunError(f"{out_dir} holds the log.jsonl of another run; resume {resume} into a new --out-dir")
    return None if resume == "never" else resume


def prepare_folder(out_dir):
    """Create out_dir, remove what killed runs left in it (and in samples/); -> its lock (files.lock_folder)."""
    if os.path.isdir(out_dir):  # a new folder holds no debris
        remove_debris(out_dir)
    make_dir(out_dir, "--out-dir")
    return lock_folder(out_dir)


def remove_debris(out_dir):
    """Remove the temporary files that killed runs left in out_dir and samples/."""
    for folder in (out_dir, os.path.join(out_dir, "samples")):
        removed = remove_stale_temps(folder)
        if removed:
            print(f"removed {len(removed)} temporary file(s) of an interrupted run in {folder}")


@dataclass
class Run:
    """Where a training run stands, and its checkpoints; under torchrun each process holds one, the main one writes."""
    args: argparse.Namespace
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    diffusion: object              # GaussianDiffusion, EDM or FlowMatching (diffusion.make_diffusion)
    meta: dict                     # data geometry and classes (also in the checkpoint)
    config: dict                   # what a resume must match (checkpoints.check_compatible)
    out_dir: str
    device: torch.device
    procs: Processes
    decode: Optional[object] = None  # latents -> images in [-1, 1] (the VAE decoder), None for pixel runs
    text: Optional[object] = None    # text_runs.TextRun of a caption dataset (its CLIP encoder), else None
    step: int = 0
    elapsed: float = 0.0           # seconds of training before this process
    saved_at: float = 0.0          # seconds of training at the newest checkpoint written or resumed from
    last_good: Optional[tuple] = None  # (path, step) of the newest checkpoint written or resumed from

    @property
    def latest(self):
        return os.path.join(self.out_dir, "latest.pt")

    def kept_path(self):
        k = self.args.keep_every
        return os.path.join(self.out_dir, f"ckpt_{self.step:07d}.pt") if k and self.step % k == 0 else None

    def restore(self, ckpt, path):
        """Continue from a checkpoint: weights, optimizer, loss scaler, every RNG, the step."""
        load_weights(self.model, ckpt["model"], f"{path} (model)")  # one line naming the first bad key
        load_weights(self.ema, ckpt["ema"], f"{path} (ema)")
        load_optimizer(self.opt, ckpt["opt"], path)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step, self.elapsed, self.last_good = ckpt["step"], ckpt.get("elapsed", 0.0), (path, ckpt["step"])
        self.saved_at = self.elapsed
        if not self.procs.main:  # every rank resumes from the same file; only the main one writes
            return
        print(f"resumed from {path} at step {self.step}")
        keep = self.kept_path()
        if path == self.latest and keep and not os.path.exists(keep):  # a kept copy an older version lost
            atomic_link(path, keep)

    def save(self, elapsed):
        """latest.pt; every --keep-every steps ckpt_XXXXXXX.pt first, then linked: a kill never loses a kept one."""
        keep = self.kept_path()
        if self.procs.main:
            save_checkpoint({"step": self.step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                             "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                             "args": plain(vars(self.args)), "rng": rng_state(), "elapsed": elapsed, **self.config},
                            keep or self.latest)
            if keep:
                atomic_link(keep, self.latest)
        self.last_good, self.saved_at = (self.latest, self.step), elapsed

    def check_finite(self, window=(), weights=False):
        """RunError, writing nothing, at a non-finite loss in `window` (stats ending now) or weights (with weights)."""
        at = first_nonfinite(window, self.step)
        if at is None and weights and not weights_finite(self.model, self.ema):
            at = self.step
        if at is not None:
            self.stop_nonfinite(at)

    def stop_nonfinite(self, at):
        where = f"{self.last_good[0]} (step {self.last_good[1]})" if self.last_good else "none written yet"
        raise RunError(f"non-finite loss/weights at step {at}; run stopped, last good checkpoint: {where}; "
                       "resume from it with a lower --lr, --grad-clip 1 or --precision fp32")


# ----- Run folders -----

def default_out_dir(args):
    """runs/<backbone>-<model>-<data>[-cond], then whatever else makes another run: a formulation other than the
    recipe's, a prediction other than eps, -hybvit, each --model-arg (recipe's or flag's) as key=value. A run that an
    older version wrote under the name without them continues there when its config.json holds the same settings."""
    data_name = args.dataset  # cifar10, cifar10-captions; other data: its folder's name
    if args.dataset not in ("cifar10", "cifar10-captions"):
        data_name = os.path.splitext(os.path.basename(os.path.normpath(args.data_dir)))[0]
    cond = "-cond" if args.class_cond and args.dataset not in ("captions", "cifar10-captions") else ""
    old = os.path.join("runs", f"{args.backbone}-{args.model.replace('/', '-')}-{data_name}{cond}")
    extra = [args.formulation] * (args.formulation != paper_recipe(args.backbone, args.dataset)["formulation"])
    extra += [f"prediction={args.prediction}"] * (args.formulation == "ddpm" and args.prediction != "eps")
    extra += ["hybvit"] * args.hybvit + [re.sub(r"[^\w.,=+-]", "", f"{k}={v}")
                                       for k, v in sorted(args.model_arg.items())]
    new = "-".join([old] + extra)
    return old if extra and not os.path.exists(new) and same_settings(old, args) else new


def same_settings(folder, args):
    """Whether folder holds a run (latest.pt) whose config.json has args' formulation, --hybvit and --model-arg."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            old = json.load(f)["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    settings = (args.formulation, args.hybvit, plain(args.model_arg))
    return os.path.exists(os.path.join(folder, "latest.pt")) and settings == (
        old.get("formulation", "ddpm"), bool(old.get("hybvit")), old.get("model_arg", {}))


# ----- The log -----

def read_log(path, max_step):
    """Records of an earlier run up to the resumed step (later ones were not checkpointed); [] for a new run."""
    return trim_log(path, max_step) if os.path.exists(path) else []


def trim_log(path, max_step):
    """read_log of an existing file, rewritten atomically: a kill here leaves the old log, never a truncated one."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(r, dict) and r.get("step", math.inf) <= max_step:
                records.append(r)
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
    return records


class TrainLog:
    """log.jsonl, loss.png and the progress bar; step stats stay on the device until write() (the only host sync)."""

    def __init__(self, run, keys):
        self.run, self.keys, self.path = run, keys, os.path.join(run.out_dir, "log.jsonl")
        self.records = read_log(self.path, run.step) if run.procs.main else []
        self.window, self.t_start, self.t_window, self.step_window = [], time.time(), time.time(), run.step
        self.bar = tqdm(total=run.args.steps, initial=run.step, desc=f"{run.args.backbone} {run.args.model}",
                        dynamic_ncols=True, disable=not run.procs.main)

    def elapsed(self):  # seconds of training, earlier processes of the run included
        return self.run.elapsed + time.time() - self.t_start

    def add(self, terms, gnorm):
        self.window.append(torch.stack([terms[k].detach().float().mean() for k in self.keys] + [gnorm.float()]))
        self.bar.update(1)

    def unlogged(self):  # the per-step stats since the last write, averaged over the processes
        return list(self.run.procs.mean(torch.stack(self.window))) if self.window else []

    def write(self, lr):
        """One record of the steps since the last write: mean loss terms, lr, grad norm, images/s, elapsed."""
        run, window = self.run, self.unlogged()
        run.check_finite(window)
        now, vals = time.time(), torch.stack(window).mean(0).tolist()
        ips = (run.step - self.step_window) * run.args.batch_size / max(now - self.t_window, 1e-9)
        if run.procs.main:
            self.append({"step": run.step, **dict(zip(self.keys, vals)), "lr": lr, "grad_norm": vals[-1],
                         "img_per_s": round(ips, 1), "elapsed": round(run.elapsed + now - self.t_start, 1)})
            plot_losses(self.records, os.path.join(run.out_dir, "loss.png"))
        self.bar.set_postfix(loss=f"{vals[0]:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")
        self.window, self.t_window, self.step_window = [], now, run.step

    def append(self, record):
        """A record (a training window, an FID, a test accuracy) into log.jsonl; callers are the main process."""
        self.records.append(record)
        try:
            with open(self.path, "a") as f:  # a kill mid-line leaves a partial last line, which read_log drops
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise RunError(f"cannot write {self.path} ({e}); free disk space, then rerun to resume from the last "
                           "checkpoint") from None


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

"""
Train a diffusion transformer (DiT, U-ViT, DiffiT) on CIFAR-10, an image folder or pre-extracted latents on
one GPU (or the CPU) with each paper's recipe; resumable, with an EMA model, sample grids and logs.

  python train_cifar.py --backbone uvit                 # U-ViT-S/2, U-ViT's CIFAR-10 recipe (unconditional)
  python train_cifar.py --backbone dit --class-cond     # DiT-S/2, class-conditional with label dropout for CFG
  python train_cifar.py --backbone dit --dataset folder --data-dir ~/pets --image-size 64 --model DiT-S/4
  python sample.py --ckpt runs/uvit-U-ViT-S-2-cifar10/latest.pt --num-samples 50000 --npz uvit.npz

Rerunning the same command resumes from <out-dir>/latest.pt (--resume auto, the default). Everything a run
writes goes into --out-dir: latest.pt, ckpt_XXXXXXX.pt, log.jsonl, loss.png, samples/step_XXXXXXX.png.
"""
import argparse
import ast
import copy
import importlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from data import BatchIndices, DataError, get_batch, load_dataset
from diffusion import PREDICTIONS, SAMPLERS, SCHEDULES, GaussianDiffusion

# ----- Backbones and their CIFAR-10 recipes -----

# --backbone name -> module (imported lazily) with a MODELS registry; adding a backbone is one line here
# plus its recipe below.
BACKBONES = {"dit": "dit", "uvit": "uvit", "diffit": "diffit"}

RECIPES = {
    # DiT [anchors.md §1.8, DiT train.py]: AdamW lr 1e-4, wd 0, betas (0.9, 0.999), no warm-up, no clipping,
    # EMA 0.9999, learn_sigma with the hybrid loss, linear schedule. Ours: DiT-S/2 (33M params, 256 tokens at
    # 32x32x3) because it matches U-ViT-S/2 (44M, 256 tokens) in size; B/2 is 130M and ~4x the compute per
    # step. Batch 128 on one GPU (official: 256 global). 500k steps = U-ViT's CIFAR-10 budget (DiT has none).
    "dit": dict(model="DiT-S/2", steps=500_000, batch_size=128, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999),
                warmup=0, grad_clip=0.0, ema_decay=0.9999, learn_sigma=True),
    # U-ViT CIFAR-10 [anchors.md §2.4, configs/cifar10_uvit_small.py]: U-ViT-S/2, AdamW lr 2e-4, wd 0.03,
    # betas (0.99, 0.999), batch 128, 2.5k warm-up then constant, 500k steps, EMA 0.9999, eps-prediction,
    # no clipping. The official run is a continuous VP-SDE; here the discrete linear schedule, T=1000.
    "uvit": dict(model="U-ViT-S/2", steps=500_000, batch_size=128, lr=2e-4, weight_decay=0.03, betas=(0.99, 0.999),
                 warmup=2500, grad_clip=0.0, ema_decay=0.9999, learn_sigma=False),
    # DiffiT-CIFAR: OURS. The paper trains with EDM (Adam, batch 512, lr 1e-3, 200k steps, diffit.md §4.1); we
    # use DDPM's CIFAR-10 recipe (Ho et al. 2020, App. B: lr 2e-4, batch 128, 5k warm-up, clip 1.0, EMA
    # 0.9999) for 800k steps = 102.4M images, the paper's image budget (200k x 512).
    "diffit": dict(model="DiffiT-CIFAR", steps=800_000, batch_size=128, lr=2e-4, weight_decay=0.0,
                   betas=(0.9, 0.999), warmup=5000, grad_clip=1.0, ema_decay=0.9999, learn_sigma=False),
}


def die(msg):
    """One-line error, non-zero exit."""
    raise SystemExit(f"error: {msg}")


def build_model(backbone, model_name, **kwargs):
    """MODELS[model_name](**kwargs) from the backbone's module; unknown names or bad configs exit with one line."""
    if backbone not in BACKBONES:
        die(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    try:
        models = importlib.import_module(BACKBONES[backbone]).MODELS
    except ModuleNotFoundError as e:
        if e.name != BACKBONES[backbone]:
            raise
        die(f"backbone {backbone!r} needs {BACKBONES[backbone]}.py, which this checkout does not have yet")
    if model_name not in models:
        die(f"unknown {backbone} model {model_name!r}; choose one of {', '.join(models)}")
    try:
        return models[model_name](**kwargs)
    except (ValueError, TypeError) as e:
        die(f"cannot build {model_name}: {e} (check --image-size, --model-arg)")


# ----- Arguments -----

def model_arg(text):
    """KEY=VALUE with VALUE a python literal (int, float, bool, tuple) or a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. depth=6), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--backbone", required=True, choices=list(BACKBONES), help="model family")
    a("--model", help="name in the backbone's MODELS registry (default: the recipe's)")
    a("--model-arg", type=model_arg, action="append", default=[], metavar="KEY=VALUE",
      help="constructor override, repeatable (e.g. --model-arg depth=6)")
    a("--dataset", default="cifar10", choices=["cifar10", "folder", "latents"])
    a("--data-dir", default="data", help="cifar10: download folder; folder: image root; latents: .npz/.pt file")
    a("--cifar-url", default=None, help="override the CIFAR-10 tarball URL (a mirror or file://)")
    a("--image-size", type=int, default=32)
    a("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    a("--class-cond", action="store_true", help="class-conditional (default: unconditional, the papers' CIFAR-10)")
    a("--class-dropout", type=float, default=0.1, help="label dropout probability for classifier-free guidance")
    a("--learn-sigma", action=argparse.BooleanOptionalAction, default=None, help="learned variance, hybrid loss")
    a("--schedule", default="linear", choices=SCHEDULES)
    a("--prediction", default="eps", choices=PREDICTIONS)
    for flag, typ in [("--steps", int), ("--batch-size", int), ("--lr", float), ("--weight-decay", float),
                      ("--warmup", int), ("--grad-clip", float), ("--ema-decay", float)]:
        a(flag, type=typ, default=None, help="default: the backbone's recipe")
    a("--betas", type=float, nargs=2, default=None, help="AdamW betas (default: the recipe's)")
    a("--seed", type=int, default=0)
    a("--precision", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPUs with it, else fp32")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad-checkpoint", action="store_true", help="recompute block activations in backward (saves memory)")
    a("--attention", default="sdpa", choices=["sdpa", "math"])
    a("--out-dir", default=None, help="default: runs/<backbone>-<model>-<dataset>")
    a("--resume", default="auto", help="auto (latest.pt in --out-dir if any), never, or a checkpoint path")
    a("--log-every", type=int, default=100)
    a("--sample-every", type=int, default=5000, help="0 = no sample grids")
    a("--sampler", default="dpm++2m", choices=SAMPLERS, help="sampler for the grids")
    a("--sample-steps", type=int, default=25)
    a("--ckpt-every", type=int, default=5000)
    a("--keep-every", type=int, default=50_000, help="also keep ckpt_XXXXXXX.pt every this many steps (0 = never)")
    a("--fid-every", type=int, default=0, help="FID of the EMA model every this many steps (0 = never)")
    a("--fid-samples", type=int, default=10_000, help="samples per FID (U-ViT selects checkpoints by FID-10k)")
    a("--fid-ref", default="cifar10-train", help="cifar10-train, cifar10-test or a stats .npz (mu, sigma)")
    args = p.parse_args(argv)
    for k, v in RECIPES[args.backbone].items():  # flags left unset take the backbone's recipe
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.betas, args.model_arg = list(args.betas), dict(args.model_arg)
    checks = [(args.batch_size >= 1, "--batch-size must be >= 1"), (args.steps >= 0, "--steps must be >= 0"),
              (args.lr > 0, "--lr must be > 0"), (0 <= args.ema_decay < 1, "--ema-decay must be in [0, 1)"),
              (0 <= args.class_dropout < 1, "--class-dropout must be in [0, 1)"),
              (args.image_size >= 1, "--image-size must be >= 1"), (args.warmup >= 0, "--warmup must be >= 0"),
              (min(args.log_every, args.ckpt_every) >= 1, "--log-every and --ckpt-every must be >= 1"),
              (min(args.sample_every, args.keep_every, args.fid_every) >= 0,
               "--sample-every, --keep-every and --fid-every must be >= 0"),
              (args.fid_samples >= 2, "--fid-samples must be >= 2"),
              (args.keep_every % args.ckpt_every == 0, "--keep-every must be a multiple of --ckpt-every (kept "
                                                       "checkpoints are copies of a checkpoint step)"),
              (1 <= args.sample_steps <= 1000, "--sample-steps must be in 1..1000")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return args


def plain(x):
    """Tuples -> lists etc., so the value round-trips through torch.load(weights_only=True) and JSON."""
    return json.loads(json.dumps(x))


# ----- Data -----

def load_data(args):
    """-> (uint8 images or float latents (N, C, H, W), int64 labels (N,) or None, class names)."""
    try:
        x, y, names = load_dataset(args.dataset, args.data_dir, args.image_size, args.cifar_url)
    except DataError as e:
        die(str(e))
    if args.dataset == "latents":
        args.image_size, args.flip = x.shape[-1], False  # flipping a latent is not flipping the image
    if args.class_cond and not names:
        die(f"--class-cond needs labels: one sub-folder per class in {args.data_dir} (or labels in the latents file)")
    print(f"data: {args.dataset} {tuple(x.shape)} {x.dtype}, {len(names) if args.class_cond else 'no'} classes")
    return x, (y if args.class_cond else None), names


# ----- Images: grids, loss curve -----

def to_uint8(x):
    """Model-space [-1, 1] -> uint8 [0, 255] (rounded)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_grid(images, path, nrow=8, pad=2):
    """(N, C, H, W) uint8 (C = 1 or 3) -> one PNG with nrow images per row and pad black pixels between."""
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)


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
    img.save(path)


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


def save_checkpoint(state, path):
    """torch.save to a temporary file in the same folder, fsync, os.replace: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """A train_cifar.py checkpoint on the CPU (weights_only=True); unreadable files exit with one line."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} does not exist; check the path (or use --resume auto / never)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
            "it is truncated or not a train_cifar.py checkpoint: pass an older ckpt_XXXXXXX.pt or a new --out-dir")
    missing = sorted({"step", "model", "ema", "backbone", "model_name", "model_kwargs", "diffusion", "data"}
                     - set(ckpt if isinstance(ckpt, dict) else {}))
    if missing:
        die(f"{path} is not a train_cifar.py checkpoint (missing {missing})")
    return ckpt


def check_compatible(ckpt, config, path):
    """Resuming needs the same backbone, model, constructor kwargs, diffusion and data geometry."""
    diffs = []
    for k, new in plain(config).items():
        old = plain(ckpt.get(k))
        if isinstance(new, dict) and isinstance(old, dict):  # name the differing entries, e.g. model_kwargs.depth
            diffs += [f"{k}.{j} {old.get(j)!r} != {new.get(j)!r}" for j in sorted({**old, **new})
                      if old.get(j) != new.get(j)]
        elif old != new:
            diffs.append(f"{k} {old!r} != {new!r}")
    if diffs:
        die(f"{path} is from another config ({'; '.join(diffs)}); rerun with the flags it was trained with, "
            "or pick a new --out-dir")


# ----- Training -----

def autocast_forward(model, device, precision):
    """model(x, t, **kw) under autocast, output cast to float32 so the diffusion math stays in fp32."""
    if precision == "fp32":
        return model
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def forward(x, t, **kw):
        with torch.autocast(device.type, dtype=dtype):
            return model(x, t, **kw).float()
    return forward


@torch.no_grad()
def sample_grid(ema, diffusion, meta, args, device, path):
    """EMA samples from fixed noise (same every time): 8x8, or one row of 8 per class (first 10 classes)."""
    n_cls = min(meta["num_classes"], 10)
    y = torch.arange(n_cls, device=device).repeat_interleave(8) if n_cls else None
    shape = (len(y) if n_cls else 64, meta["channels"], meta["image_size"], meta["image_size"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    x = diffusion.sample(autocast_forward(ema, device, args.precision), shape, sampler=args.sampler,
                         steps=args.sample_steps, model_kwargs={"y": y} if n_cls else None, noise=noise,
                         generator=torch.Generator(device).manual_seed(args.seed), device=device, clip_denoised=True)
    save_grid(to_uint8(x), path, nrow=8)


def fid_evaluator(args, meta, diffusion, device):
    """ema -> (FID, IS) of --fid-samples EMA samples vs --fid-ref. The Inception weights and reference statistics
    are loaded now, before training, so a missing file fails at once rather than hours in."""
    from sample import fid_score, fid_setup, generate  # lazy: sample.py imports this module
    if not meta["pixels"]:
        die("--fid-every needs pixel data (a latent run has no VAE decoder yet)")
    if args.fid_ref.startswith("cifar10") and (args.dataset != "cifar10" or args.image_size != 32):
        die(f"--fid-ref {args.fid_ref} only fits CIFAR-10 at 32x32; pass a stats .npz made with fid.py")
    inception, ref = fid_setup(args.fid_ref, args.data_dir, device)
    shape = (meta["channels"], meta["image_size"], meta["image_size"])

    def evaluate(ema):  # unguided samples, uniform labels when class-conditional
        batches = generate(autocast_forward(ema, device, args.precision), diffusion, shape, args.fid_samples,
                           2 * args.batch_size, num_classes=meta["num_classes"], sampler=args.sampler,
                           steps=args.sample_steps, seed=args.seed, device=device, progress=False)
        return fid_score((x for x, _ in batches), inception, ref, device, args.fid_samples)
    return evaluate


def read_log(path, max_step):
    """Records of an earlier run up to the resumed step (later ones were not checkpointed); rewrites the file."""
    def parse(line):
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            return {}
    with open(path, "a+") as f:
        f.seek(0)
        records = [r for r in map(parse, f) if r.get("step", math.inf) <= max_step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


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
        tqdm.write("stopping after this step to save a checkpoint (Ctrl-C again to quit at once)")

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def train_step(fwd, diffusion, opt, scaler, params, x, y, grad_clip):
    """One optimizer step on the hybrid / simple loss; returns (loss terms, grad norm before clipping)."""
    terms = diffusion.training_losses(fwd, x, model_kwargs=None if y is None else {"y": y})
    opt.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"].mean()).backward()
    scaler.unscale_(opt)  # true gradients for the norm / clipping (a no-op unless fp16)
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else \
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None])))
    scaler.step(opt)
    scaler.update()
    return terms, gnorm


@torch.no_grad()
def update_ema(ema, model, decay):
    """EMA of the weights with one foreach lerp (ema += (1 - decay)(w - ema)); buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    buffers = list(model.buffers())
    if buffers:
        torch._foreach_copy_(list(ema.buffers()), buffers)


def train(args, model, diffusion, data, labels, meta, config, out_dir, device, ckpt, ckpt_path):
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # EMA starts as a copy (DiT train.py)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    step, elapsed0, last_good = 0, 0.0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, elapsed0, last_good = ckpt["step"], ckpt.get("elapsed", 0.0), (ckpt_path, ckpt["step"])
        set_rng_state(ckpt["rng"])
        print(f"resumed from {ckpt_path} at step {step}")
    log_path, latest = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "latest.pt")
    records = read_log(log_path, step)
    data, labels = data.to(device), None if labels is None else labels.to(device)
    batches = BatchIndices(len(data), args.batch_size, args.seed)
    fwd = autocast_forward(torch.compile(model) if args.compile else model, device, args.precision)
    params = list(model.parameters())
    keys = ["loss", "mse", "vb"] if diffusion.learn_sigma else ["loss", "mse"]
    evaluate_fid = fid_evaluator(args, meta, diffusion, device) if args.fid_every else None
    window, t_start, t_window, step_window = [], time.time(), time.time(), step
    model.train()

    def check_finite(weights_too=False):
        """Stop on a non-finite loss (or weights) without writing a checkpoint: the last good one stays."""
        ok = torch.isfinite(torch.stack(window)[:, :-1]).all(1).tolist() if window else []  # skip grad norm (fp16)
        at = step - len(window) + 1 + ok.index(False) if False in ok else None
        if at is None and weights_too and not torch.isfinite(
                torch.stack(torch._foreach_norm(params + list(ema.parameters())))).all():
            at = step
        if at is not None:
            bar.close()
            where = f"{last_good[0]} (step {last_good[1]})" if last_good else "none written yet"
            die(f"non-finite loss/weights at step {at}; run stopped, last good checkpoint: {where}; "
                "resume from it with a lower --lr, --grad-clip 1 or --precision fp32")

    bar = tqdm(total=args.steps, initial=step, desc=f"{args.backbone} {args.model}", dynamic_ncols=True)
    with StopOnSignal() as stop:
        while step < args.steps and stop.signum is None:
            lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr  # linear warm-up
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = get_batch(data, labels, batches(step), args.flip)
            terms, gnorm = train_step(fwd, diffusion, opt, scaler, params, x, y, args.grad_clip)
            update_ema(ema, model, args.ema_decay)
            step += 1
            bar.update(1)
            window.append(torch.stack([terms[k].detach().float().mean() for k in keys] + [gnorm.float()]))
            done, stopping = step == args.steps, stop.signum is not None
            last = done or stopping  # interrupted: log and checkpoint at once, no grid or FID (short SIGTERM grace)
            if step % args.log_every == 0 or last:  # the only per-window host sync
                check_finite()
                now, vals = time.time(), torch.stack(window).mean(0).tolist()
                ips = (step - step_window) * args.batch_size / max(now - t_window, 1e-9)
                records.append({"step": step, **dict(zip(keys, vals)), "lr": lr, "grad_norm": vals[-1],
                                "img_per_s": round(ips, 1), "elapsed": round(elapsed0 + now - t_start, 1)})
                with open(log_path, "a") as f:
                    f.write(json.dumps(records[-1]) + "\n")
                plot_losses(records, os.path.join(out_dir, "loss.png"))
                bar.set_postfix(loss=f"{vals[0]:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")
                window, t_window, step_window = [], now, step
            if args.sample_every and meta["pixels"] and (step % args.sample_every == 0 or done):
                check_finite(weights_too=True)
                grid = os.path.join(out_dir, "samples", f"step_{step:07d}.png")
                sample_grid(ema, diffusion, meta, args, device, grid)
            if evaluate_fid and (step % args.fid_every == 0 or done):
                check_finite(weights_too=True)
                score, is_mean = evaluate_fid(ema)
                records.append({"step": step, "fid": round(score, 4), "inception_score": is_mean,
                                "fid_samples": args.fid_samples, "sampler": f"{args.sampler}-{args.sample_steps}"})
                with open(log_path, "a") as f:
                    f.write(json.dumps(records[-1]) + "\n")
                tqdm.write(f"step {step}: FID {score:.2f} ({args.fid_samples} EMA samples, {args.sampler} "
                           f"{args.sample_steps} steps, vs {args.fid_ref})")
            if step % args.ckpt_every == 0 or last:
                check_finite(weights_too=True)
                save_checkpoint({"step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                                 "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                                 "args": plain(vars(args)), "rng": rng_state(),
                                 "elapsed": elapsed0 + time.time() - t_start, **config}, latest)
                last_good = (latest, step)
                if args.keep_every and step % args.keep_every == 0:  # a periodic keep: copy, then rename
                    keep = os.path.join(out_dir, f"ckpt_{step:07d}.pt")
                    shutil.copyfile(latest, keep + ".tmp")
                    os.replace(keep + ".tmp", keep)
    bar.close()
    if stop.signum is not None:
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {latest}; rerun the command to resume")
    print(f"done: {step} steps; checkpoints, log.jsonl, loss.png and samples/ are in {out_dir}")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if args.precision == "fp16" and device.type != "cuda":
        die("--precision fp16 needs a CUDA device; use bf16 or fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 (DiT train.py)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    data, labels, names = load_data(args)
    meta = {"dataset": args.dataset, "image_size": args.image_size, "channels": data.shape[1],
            "num_classes": len(names) if args.class_cond else 0, "class_names": names if args.class_cond else [],
            "pixels": args.dataset != "latents"}
    kwargs = {"input_size": args.image_size, "in_channels": data.shape[1], "num_classes": meta["num_classes"],
              "class_dropout_prob": args.class_dropout if args.class_cond else 0.0, "learn_sigma": args.learn_sigma,
              **args.model_arg}
    model = build_model(args.backbone, args.model, attention=args.attention, grad_checkpoint=args.grad_checkpoint,
                        **kwargs)
    config = {"backbone": args.backbone, "model_name": args.model, "model_kwargs": plain(kwargs), "data": meta,
              "diffusion": {"schedule": args.schedule, "timesteps": 1000, "prediction": args.prediction,
                            "learn_sigma": args.learn_sigma}}
    diffusion = GaussianDiffusion(**config["diffusion"])
    data_name = "cifar10" if args.dataset == "cifar10" else os.path.splitext(os.path.basename(
        os.path.normpath(args.data_dir)))[0]
    out_dir = args.out_dir or os.path.join(
        "runs", f"{args.backbone}-{args.model.replace('/', '-')}-{data_name}" + ("-cond" if args.class_cond else ""))
    latest = os.path.join(out_dir, "latest.pt")
    if args.resume == "never" and os.path.exists(latest):
        die(f"{out_dir} already holds a run (latest.pt); use --resume auto to continue it or pick a new --out-dir")
    ckpt_path = (latest if os.path.exists(latest) else None) if args.resume == "auto" else \
        None if args.resume == "never" else args.resume
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None
    if ckpt is not None:
        check_compatible(ckpt, config, ckpt_path)
    os.makedirs(out_dir, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.backbone} {args.model}, {n_params:,} parameters; precision {args.precision} on {device}")
    print(f"run directory: {os.path.abspath(out_dir)}")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"args": plain(vars(args)), "parameters": n_params, **config}, f, indent=1)
    train(args, model, diffusion, data, labels, meta, config, out_dir, device, ckpt, ckpt_path)


if __name__ == "__main__":
    main()

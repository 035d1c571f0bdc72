"""
Every GPU row of BENCHMARKS.md in one run, written as one JSON report: training img/s, peak memory and MFU
(DiT-XL/2 on ImageNet-256 latents and the three CIFAR-10 models; eager vs torch.compile, with and without gradient
checkpointing, SDPA vs math attention), which SDPA kernels run, sampling at each paper's sampler, VAE encode and
decode at 256x256, and a short real bf16 training run of U-ViT-S/2. Budgeted to finish in under 8 minutes on one
H100-class GPU.

  python gpu_report.py gpu_report.json --data cifar10k.npz      # on the GPU
  python gpu_report.py --smoke smoke.json                        # the same code paths, tiny models, CPU, < 1 min
  python gpu_report.py --make-subset data 10000 cifar10k.npz     # the training run's data, from CIFAR-10 on disk
  python gpu_report.py --markdown gpu_report.json                # the report as BENCHMARKS.md's GPU tables

Each step has a time budget (BUDGET_S) and the whole report a deadline (DEADLINE_S): a row starts only while both
have at least its estimated cost (EST_S) left, else it is recorded as skipped with the reason, so the report always
comes back. Rows are not interrupted once started. The JSON is rewritten atomically after every row (rows not yet
reached say "pending"); an exception in a row is recorded in that row as one line and the report goes on; a CUDA
out-of-memory is recorded as status "oom", the cache emptied, and the compiled twin of that row skipped. The rows
reuse bench.py: bench_row (the train_cifar.py step on a fixed batch, or the sampler), count_macs, timed,
peak_memory, the PEAK_FLOPS table and the MFU formula (3 x forward MACs x 2 x img/s / dense bf16 peak); the SDPA
rows use sdpa_probe.py, the training run's data cifar_subset.py (--make-subset: a seeded random N of the 50k training
images, at most 20,000 = 61.6 MB), --markdown gpu_markdown.py. Without --data (or if the file is missing) the
training run uses synthetic images.
"""
import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn

import bench
from cifar_subset import load_subset, make_subset, synthetic_images
from devices import autocast_forward, resolve_device
from errors import RunError, first_line
from files import atomic_write, check_writable
from gpu_markdown import markdown
from recipes import LATENT_RECIPES, RECIPES
from data import BatchIndices, get_batch
from diffusion import make_diffusion
from sdpa_probe import SDPACalls, probe_sdpa
from vae import SD_VAE_CONFIG, AutoencoderKL

# Seconds per step, in run order (total 445 s; with start-up the report stays under 8 minutes). Cheap, must-have
# steps first; the compile rows come last within their steps and are the first to be skipped.
BUDGET_S = {"sdpa": 20, "train_run": 55, "sample": 60, "vae": 20, "cifar_train": 130, "dit_xl_train": 160}
DEADLINE_S = 450  # no row starts later than this after the report began
# Estimated seconds per row on an H100 (a row starts only if its step and the deadline have this much left); guesses,
# not measurements: torch.compile (inductor) of a training graph is the long pole, ~40 s CIFAR-size, ~90 s DiT-XL/2.
EST_S = {"sdpa": 3, "train": 8, "train_xl": 12, "compile": 40, "compile_xl": 90, "sample": 8, "sample_xl": 30,
         "vae": 5, "train_run": 20}

XL = ("dit", "DiT-XL/2", dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                              class_dropout_prob=0.1))  # DiT's ImageNet-256 latent model (4 x 32 x 32)
CIFAR_MODELS = [(b, *bench.CIFAR[b]) for b in ("dit", "uvit", "diffit")]  # bench.py's CIFAR-10 rows
# Each paper's sampler and step count: DiT §5 (DDPM, 250 steps; cfg 1.5 for its FID), U-ViT (DPM-Solver, 50 steps;
# dpm++2m here, in pixel space), DiffiT App. I.1 (EDM's Heun, 18 steps = 35 network evaluations).
SAMPLING = {"DiT-XL/2": ("ddpm", 250), "DiT-S/2": ("ddpm", 250), "U-ViT-S/2": ("dpm++2m", 50),
            "DiffiT-CIFAR": ("heun", 18)}
# --smoke: the same constructors with small widths and depths, so that every row runs its code path in seconds
TINY = {"DiT-XL/2": dict(depth=1, hidden_size=64, num_heads=2), "DiT-S/2": dict(depth=1, hidden_size=64, num_heads=2),
        "U-ViT-S/2": dict(depth=2, hidden_size=64, num_heads=2),
        "DiffiT-CIFAR": dict(hidden_size=32, num_blocks=(1, 1, 1), temb_dim=128, head_dim=16, num_groups=8,
                             dropout=0.0),
        "VAE": dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)}
SIZES = {  # batch sizes, repeats, precision of the train/sample rows; smoke: CPU, one timed step, dynamo with the
    # eager backend (inductor compiles for about a minute per model on a CPU)
    "gpu": dict(xl_batches=(32, 64, 128, 256), batch=128, xl_sample_batch=32, vae_batch=32, vae_size=256, warmup=3,
                steps=8, vae_repeats=5, run_steps=600, run_warmup=100, log_every=25, synthetic=4096, sample_steps=None,
                compile_backend=None, precision="bf16"),
    "smoke": dict(xl_batches=(2, 4), batch=2, xl_sample_batch=2, vae_batch=2, vae_size=32, warmup=1, steps=1,
                  vae_repeats=1, run_steps=2, run_warmup=1, log_every=1, synthetic=16, sample_steps=2,
                  compile_backend="eager", precision="fp32")}  # CPU bf16 is slow without AMX; the run stays bf16


# ----- The plan: every row, in run order -----

def plan(smoke=False, data=None):
    """[row]: dict(step, name, settings, run, est, needs) with settings JSON-serialisable."""
    z, est = SIZES["smoke" if smoke else "gpu"], {k: 0 if smoke else v for k, v in EST_S.items()}
    tiny = lambda name: TINY[name] if smoke else {}  # noqa: E731
    rows = []

    def add(step, name, run, est_s, needs=None, **settings):
        rows.append(dict(step=step, name=name, settings=settings, run=run, est=est_s, needs=needs))

    models = [XL] + CIFAR_MODELS
    for b, name, kw in models:
        add("sdpa", f"sdpa {name}", row_sdpa, est["sdpa"], kind="sdpa", backbone=b, model=name,
            kwargs={**kw, **tiny(name)}, batch=z["xl_batches"][0] if name == XL[1] else z["batch"], backward=True)
    add("sdpa", "sdpa VAE", row_sdpa, est["sdpa"], kind="sdpa", model="VAE", config=tiny("VAE"),
        batch=z["vae_batch"], image_size=z["vae_size"], backward=False)

    b, name, kw = CIFAR_MODELS[1]
    add("train_run", f"train-run {name} bf16", row_train_run, est["train_run"], kind="train_run", backbone=b,
        model=name, kwargs={**kw, **tiny(name)}, batch=z["batch"], precision="bf16", max_steps=z["run_steps"],
        log_every=z["log_every"], data=data, synthetic_images=z["synthetic"], lr=RECIPES[b]["lr"],
        weight_decay=RECIPES[b]["weight_decay"], betas=RECIPES[b]["betas"], ema_decay=RECIPES[b]["ema_decay"],
        warmup=z["run_warmup"], note=f"U-ViT's CIFAR-10 recipe with a {z['run_warmup']}-step warm-up (recipe: "
        f"{RECIPES[b]['warmup']}), so that a few hundred steps reach the full lr; flips on, EMA updated")

    for b, name, kw in models:
        sampler, steps = SAMPLING[name][0], z["sample_steps"] or SAMPLING[name][1]
        formulation = (LATENT_RECIPES if name == XL[1] else RECIPES)[b]["formulation"]
        add("sample", f"sample {name} {sampler}", row_sample, est["sample_xl" if name == XL[1] else "sample"],
            kind="sample", backbone=b, model=name, kwargs={**kw, **tiny(name)}, formulation=formulation,
            sampler=sampler, steps=steps, nfe=make_diffusion(formulation).nfe(sampler, steps),
            cfg_scale=1.5, batch=z["xl_sample_batch"] if name == XL[1] else z["batch"], precision=z["precision"],
            compile=False, repeats=1, warmup="one 1-step sampler run")

    for direction in ("encode", "decode"):
        for precision in ("fp32", "tf32", "bf16"):
            add("vae", f"vae {direction} {z['vae_size']} {precision}", row_vae, est["vae"], kind="vae",
                direction=direction, precision=precision, config=tiny("VAE"), batch=z["vae_batch"],
                image_size=z["vae_size"], warmup=1, repeats=z["vae_repeats"],
                weights="random init (timing only: the cost does not depend on the weights)")

    def train(step, b, name, kw, batch, compile_, attention="sdpa", ckpt=False, xl=False):
        mode = "compile" if compile_ else "eager"
        key = (name, batch, ckpt, attention)
        needs = (lambda ctx: "skipped: eager ran out of memory at this batch and checkpointing setting"
                 if key in ctx["oom"] else None) if compile_ else None
        add(step, f"train {name} b{batch} {mode} {attention}" + (" ckpt" if ckpt else ""), row_train,
            est[("compile" if compile_ else "train") + ("_xl" if xl else "")], needs, kind="train", backbone=b,
            model=name, kwargs={**kw, **tiny(name), "attention": attention, "grad_checkpoint": ckpt}, batch=batch,
            precision=z["precision"], attention=attention, compile=compile_, grad_checkpoint=ckpt,
            compile_backend=(z["compile_backend"] or "inductor") if compile_ else None,
            formulation=RECIPES[b]["formulation"], warmup=z["warmup"], steps=z["steps"], tf32=True)

    for compile_, attention, ckpt in [(False, "sdpa", False), (False, "math", False), (False, "sdpa", True),
                                      (True, "sdpa", False), (True, "sdpa", True)]:
        for b, name, kw in CIFAR_MODELS:
            train("cifar_train", b, name, kw, z["batch"], compile_, attention, ckpt)
    b, name, kw = XL
    for compile_ in (False, True):
        for ckpt in (False, True):
            for batch in z["xl_batches"]:
                train("dit_xl_train", b, name, kw, batch, compile_, ckpt=ckpt, xl=True)
        if not compile_:
            train("dit_xl_train", b, name, kw, z["xl_batches"][0], False, "math", xl=True)
    return rows


# ----- Rows -----

def row_train(s, ctx):
    """bench.bench_row's training job: the train_cifar.py step (loss, backward, grad norm, AdamW, EMA)."""
    args = argparse.Namespace(precision=s["precision"], attention=s["attention"], compile=s["compile"],
                              grad_checkpoint=s["grad_checkpoint"], batch_size=s["batch"], warmup=s["warmup"],
                              steps=s["steps"], no_train=False, no_sample=True, tf32=s["tf32"])
    backend = None if s["compile_backend"] in (None, "inductor") else s["compile_backend"]
    r = bench.bench_row(s["backbone"], s["model"], s["kwargs"], args, ctx["device"], s["formulation"], backend)
    return dict(params=r["params"], gmacs=r["gmacs"], compile=r["compile"], **r["train"])


def row_sample(s, ctx):
    """bench.bench_row's sampling jobs (guided too for class-conditional models) at the paper's sampler."""
    args = argparse.Namespace(precision=s["precision"], attention="sdpa", compile=False, grad_checkpoint=False,
                              batch_size=s["batch"], warmup=1, sampler=s["sampler"], sample_steps=s["steps"],
                              sample_repeats=s["repeats"], cfg_scale=s["cfg_scale"], no_train=True, no_sample=False,
                              tf32=True)
    r = bench.bench_row(s["backbone"], s["model"], s["kwargs"], args, ctx["device"], s["formulation"])
    return dict(params=r["params"], gmacs=r["gmacs"], sample=r["sample"], sample_cfg=r.get("sample_cfg"))


@contextlib.contextmanager
def tf32(on):
    """TF32 matmuls and convs on or off inside the block (CUDA settings; plain fp32 on the CPU)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def vae_parts(vae, direction, size):
    """(module, input at batch 1) of the encode or decode path."""
    if direction == "encode":
        return nn.Sequential(vae.encoder, vae.quant_conv), torch.randn(1, vae.in_channels, size, size)
    n = size // vae.downsample_factor
    return nn.Sequential(vae.post_quant_conv, vae.decoder), torch.randn(1, vae.latent_channels, n, n)


def row_vae(s, ctx):
    """AutoencoderKL.encode / decode under inference_mode; MACs counted on the meta device (count_macs: convs and
    linears; the mid-block attention matmuls, not a fused qkv, are left out: under 1% at 256x256)."""
    device, cfg, B, size = ctx["device"], {**SD_VAE_CONFIG, **s["config"]}, s["batch"], s["image_size"]
    with torch.device("meta"):
        macs = bench.count_macs(*vae_parts(AutoencoderKL(**cfg), s["direction"], size))["total"]
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**cfg).eval()
    net, x1 = vae_parts(vae, s["direction"], size)
    x = x1.to(device).expand(B, *x1.shape[1:]).contiguous()
    bf16 = s["precision"] == "bf16"
    with tf32(s["precision"] == "tf32"), torch.inference_mode(), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        mem_reset = bench.reset_peak(device)
        times = bench.timed(lambda: net(x), s["warmup"], s["repeats"], device)
        res = bench.summary(times, B)
        peak = bench.peak_flops(device, s["precision"] if bf16 else "fp32")  # reads the TF32 switch set here
    note = {"note": "CPU: TF32 is a CUDA setting, this is plain fp32"} if s["precision"] == "tf32" and \
        device.type != "cuda" else {}
    return dict(**res, peak_memory_bytes=bench.peak_memory(device), mem_reset=mem_reset, gmacs=macs / 1e9,
                params=sum(p.numel() for p in net.parameters()), mfu=bench.mfu(macs, res["images_per_s"], peak, 1),
                **note)


def row_sdpa(s, ctx):
    """The model's attention calls, captured on the meta device at batch 1, probed on the device in bf16 and fp32."""
    with torch.device("meta"), SDPACalls() as rec, torch.no_grad():
        if s["model"] == "VAE":
            vae = AutoencoderKL(**{**SD_VAE_CONFIG, **s["config"]})
            for direction in ("encode", "decode"):
                net, x = vae_parts(vae, direction, s["image_size"])
                net(x)
        else:
            model = importlib.import_module(s["backbone"]).MODELS[s["model"]](**s["kwargs"]).eval()
            model(*bench.make_inputs(model, 1, torch.device("meta")))
    scaled = lambda shape: [shape[0] * s["batch"], *shape[1:]]  # noqa: E731  (batch x windows) at the row's batch
    return dict(calls=[dict(q=scaled(q), k=scaled(k), v=scaled(v), mask=m, **{str(dt).split(".")[1]: probe_sdpa(
        (q, k, v, m), s["batch"], ctx["device"], dt, s["backward"]) for dt in (torch.bfloat16, torch.float32)})
        for q, k, v, m in rec.calls])


# ----- The short real training run -----

def training_data(s):
    """(uint8 images, description): the npz of --data when present, else synthetic images (and say so)."""
    if s["data"] and os.path.exists(s["data"]):
        x, _ = load_subset(s["data"])
        return x, dict(source="npz", path=s["data"], images=len(x))
    note = f"{s['data']} not found; " if s["data"] else "no --data given; "
    print(f"note: {note}the training run uses synthetic images")
    return synthetic_images(s["synthetic_images"]), dict(source="synthetic", images=s["synthetic_images"],
                                                         note=note + "synthetic smooth random images")


def row_train_run(s, ctx):
    """train_cifar.py's step (train_step and update_ema, through bench) and batches (BatchIndices, get_batch with
    flips) for max_steps or until the row's time is up, logging the mean loss every log_every steps."""
    device, B = ctx["device"], s["batch"]
    x, data = training_data(s)
    x = x.to(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = importlib.import_module(s["backbone"]).MODELS[s["model"]](**s["kwargs"])
    diffusion, params = make_diffusion("ddpm", learn_sigma=model.learn_sigma), list(model.parameters())
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"], betas=tuple(s["betas"]),
                            fused=device.type == "cuda")
    ema, scaler = copy.deepcopy(model).requires_grad_(False), torch.amp.GradScaler(device.type, enabled=False)
    fwd, batches = autocast_forward(model, device, s["precision"]), BatchIndices(len(x), B, seed=0)
    model.train()
    mem_reset, curve, window, step, t0 = bench.reset_peak(device), [], [], 0, time.perf_counter()
    while step < s["max_steps"] and (step == 0 or time.perf_counter() < ctx["row_deadline"] - 2):
        lr = s["lr"] * min(1.0, (step + 1) / s["warmup"])  # linear warm-up, as train_cifar.py
        for g in opt.param_groups:
            g["lr"] = lr
        xb, _ = get_batch(x, None, batches(step), flip=True)
        terms, gnorm = bench.train_step(fwd, diffusion, opt, scaler, params, xb, None, grad_clip=0.0)
        bench.update_ema(ema, model, s["ema_decay"])
        window.append(terms["loss"].detach().float().mean())
        step += 1
        if step % s["log_every"] == 0 or step == s["max_steps"]:  # the only host sync
            curve.append(dict(step=step, loss=torch.stack(window).mean().item(), grad_norm=gnorm.item(), lr=lr,
                              elapsed_s=round(time.perf_counter() - t0, 2)))
            window = []
    bench.sync(device)
    wall = time.perf_counter() - t0
    losses = [c["loss"] for c in curve]
    return dict(data=data, steps=step, wall_s=round(wall, 2), images_per_s=step * B / wall, curve=curve,
                loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                finite=all(map(math.isfinite, losses)), peak_memory_bytes=bench.peak_memory(device),
                mem_reset=mem_reset, stopped_by="max_steps" if step == s["max_steps"] else "time budget")


# ----- Running the plan -----

def environment(device, argv):
    """bench.environment plus what a GPU row needs: driver, CUDA, cuDNN, triton, the peak used for MFU, the date."""
    env = bench.environment(device, argv)
    env.update(command="python gpu_report.py " + " ".join(argv or []), cuda=torch.version.cuda,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               driver=None, gpu_memory_bytes=None, capability=None, triton=None)
    for pkg in ("triton", "pytorch-triton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env["triton"] = env["triton"] or importlib.metadata.version(pkg)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
        try:  # the driver version is not exposed by torch
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver_note"] = "nvidia-smi did not answer"
    env["peak_bf16_flops"] = bench.peak_flops(device, "bf16")
    env["mfu"] = "3 x forward MACs x 2 FLOP/MAC x img/s / dense peak (bench.mfu); sampling: NFE x (2 with CFG)"
    if env["peak_bf16_flops"] is None:
        env["mfu_note"] = ("CPU: no MFU" if device.type != "cuda" else
                           f"no dense peak known for {env['device_name']!r} (bench.PEAK_FLOPS): MFU left null")
    return env


def is_oom(e):
    while e is not None:  # bench_row turns an OOM into a RunError raised inside the except block
        if isinstance(e, torch.OutOfMemoryError):
            return True
        e = e.__cause__ or e.__context__
    return False


def brief(row):
    f = row.get("figures") or {}
    ips = f.get("images_per_s") or (f.get("sample") or {}).get("images_per_s")
    if ips is not None:
        return f"{ips:.1f} img/s" + (f", MFU {100 * f['mfu']:.1f}%" if f.get("mfu") else "")
    return row.get("note") or row.get("error") or ("ok" if f else row["status"])


def run_report(out, smoke=False, data=None, device=None, budgets=None, deadline=None, only=None, argv=None):
    """Run every row of plan() under the budgets, rewriting `out` after each; returns the report."""
    device = resolve_device(device or ("cpu" if smoke else None))
    if not smoke and device.type != "cuda":
        raise RunError("the GPU report needs a CUDA GPU and torch sees none; --smoke runs its rows tiny on the CPU")
    check_writable(out, "OUT")
    budgets = {**BUDGET_S, **(budgets or {})}
    deadline = DEADLINE_S if deadline is None else deadline
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train_cifar.py
    rows = plan(smoke, data)
    public = [dict(name=r["name"], step=r["step"], status="pending", settings=r["settings"]) for r in rows]
    report = dict(mode="smoke" if smoke else "gpu", env=environment(device, argv), budgets_s=budgets,
                  deadline_s=deadline, only=only, rows=public)
    write = lambda: atomic_write(out, lambda f: f.write(json.dumps(report, indent=1).encode()))  # noqa: E731
    write()
    if device.type == "cuda":  # the CUDA context starts here, not inside the first row's budget
        torch.ones(1, device=device).sum().item()
    ctx, t0, step_start = dict(device=device, oom=set()), time.perf_counter(), {}
    for r, pub in zip(rows, public):
        now = time.perf_counter()
        step_start.setdefault(r["step"], now)
        step_left = budgets[r["step"]] - (now - step_start[r["step"]])
        left = min(step_left, deadline - (now - t0))
        note = r["needs"](ctx) if r["needs"] else None
        if only and r["step"] not in only:
            note = f"skipped: step {r['step']} not in --only"
        elif left <= 0 or left < r["est"]:
            which = f"step budget ({budgets[r['step']]} s)" if step_left <= left else f"deadline ({deadline} s)"
            note = f"skipped: {which} has {max(left, 0):.0f} s left, the row needs ~{r['est']} s (estimate)"
        if note:
            pub.update(status="skipped", note=note)
        else:
            ctx["row_deadline"] = now + left
            if device.type == "cuda":  # what is still allocated from before (should be about 0)
                pub["allocated_at_start_bytes"] = torch.cuda.memory_allocated(device)
            try:
                pub.update(status="ok", figures=r["run"](r["settings"], ctx))
            except Exception as e:  # one row's failure is that row's, the report goes on
                oom = is_oom(e)
                pub.update(status="oom" if oom else "error", error=first_line(e))
                s = r["settings"]
                if oom and s["kind"] == "train" and not s["compile"]:
                    ctx["oom"].add((s["model"], s["batch"], s["grad_checkpoint"], s["attention"]))
            finally:
                gc.collect()  # the row's model and optimizer go before the next row's peak is measured
                if r["settings"].get("compile"):
                    torch.compiler.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            pub["wall_s"] = round(time.perf_counter() - now, 2)
        write()
        print(f"[{time.perf_counter() - t0:6.1f} s] {r['name']}: {brief(pub)}", flush=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    write()
    return report


# ----- Command line -----

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("out", nargs="?", help="the JSON report to write")
    a("--smoke", action="store_true", help="tiny models, one step, on the CPU (unless --device): the code paths only")
    a("--data", help="npz with x (N, 3, 32, 32) uint8 and y (N,) for the training run (else synthetic images)")
    a("--device", help="default: cuda (the report), cpu (--smoke)")
    a("--only", nargs="+", choices=list(BUDGET_S), metavar="STEP",
      help=f"run only these steps ({', '.join(BUDGET_S)}); the others are recorded as skipped")
    a("--budget-scale", type=float, default=1.0, help="multiply every step budget and the deadline (e.g. 2.5 with "
      "--only dit_xl_train for all its compile rows)")
    a("--make-subset", nargs=3, metavar=("DATA_DIR", "N", "OUT"), help="write a CIFAR-10 subset npz and exit")
    a("--markdown", metavar="REPORT", help="print a report's tables (BENCHMARKS.md layout) and exit")
    args = p.parse_args(argv)
    if not (args.out or args.make_subset or args.markdown):
        p.error("give OUT.json (or --make-subset / --markdown)")
    if args.budget_scale < 0:
        p.error("--budget-scale must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and unaffected by a busy machine
    try:
        if args.make_subset:
            return make_subset(*args.make_subset)
        if args.markdown:
            try:
                with open(args.markdown) as f:
                    report = json.load(f)
            except (OSError, ValueError) as e:
                raise RunError(f"--markdown {args.markdown}: cannot read the report ({first_line(e)})") from None
            return print(markdown(report), end="")
        report = run_report(args.out, args.smoke, args.data, args.device,
                            {k: v * args.budget_scale for k, v in BUDGET_S.items()}, DEADLINE_S * args.budget_scale,
                            args.only, sys.argv[1:] if argv is None else argv)
    except RunError as e:
        raise SystemExit(f"error: {e}")
    print(markdown(report), end="")
    return report


if __name__ == "__main__":
    main()

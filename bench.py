"""
Benchmark the diffusion backbones: training-step and sampling throughput, peak memory and forward FLOPs.

  python bench.py --all                                   # the default CIFAR-10 model of each backbone
  python bench.py --backbone dit --model DiT-XL/2 --input-size 32 --in-channels 4 --no-train --no-sample
  python bench.py --backbone uvit --model U-ViT-S/2 --precision bf16 --compile --batch-size 128 --json out.json
  python gpu_report.py gpu_report.json --data cifar10k.npz  # every GPU row of BENCHMARKS.md, one run (gpu_report.py)

Training step = forward + GaussianDiffusion.training_losses + backward + AdamW step + EMA update (one
torch._foreach_lerp_): one step of train_cifar.py without the data loading, on a fixed random batch.
Sampling = GaussianDiffusion.sample with a K-step sampler (default dpm++2m), with and without classifier-free
guidance (guidance only for class-conditional models: --num-classes turns any model conditional). Both are timed
after warm-up (training: --warmup steps; sampling: --warmup one-step sampler runs); the table gives the median of
the timed repeats and the JSON every repeat. Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the
process's peak RSS (resource.getrusage ru_maxrss; Linux lets us reset that high-water mark per row through
/proc/self/clear_refs, else it is the process-lifetime peak). RSS includes the ~0.3 GB of the interpreter and torch.

FLOP counting convention (count_macs), the one the DiT, U-ViT and DiffiT tables use ("Gflops" = GMACs; DiT
issue #14): multiply-accumulates, forward pass only, one image (batch 1). Counted: every nn.Linear
(in x out per input row: per-sample layers such as adaLN and the time MLP count once, per-token layers once per
token), every nn.Conv2d (Cin/groups x kh x kw x Cout per output pixel) and the two attention matmuls Q K^T and
A V (N x N x D each per attention call, per window for windowed attention, D = all heads together). Not counted:
biases, norms, softmax, activations, embedding look-ups, elementwise ops, resampling without a conv, and the
diffusion arithmetic. Attention modules are found through the project interface: any module with a fused `qkv`
nn.Linear; its first input is (B', N, D_in) with B' = batch x windows, and D = qkv.out_features / 3. The count
runs on the meta device (no memory, no time, XL models included), falling back to a CPU forward if an op fails.
MFU (GPU only) = 3 x forward MACs x 2 FLOP/MAC x images/s / the device's dense peak (backward = 2 x forward;
the recomputation of --grad-checkpoint is not credited, as usual).
"""
import argparse
import copy
import importlib
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn

from diffusion import SAMPLERS, make_diffusion
from backbones import BACKBONES
from devices import autocast_forward, resolve_device
from errors import RunError
from files import atomic_write, check_writable
from recipes import RECIPES
from training import train_step, update_ema

# What `train_cifar.py --backbone X` trains by default: the recipe's model, unconditional, 32x32x3 (DiT's
# registry defaults are the ImageNet latent ones, so they are overridden the same way train_cifar does).
CIFAR = {b: (r["model"], dict(input_size=32, in_channels=3, num_classes=0, class_dropout_prob=0.0,
                              learn_sigma=r["learn_sigma"])) for b, r in RECIPES.items()}
# Dense peak FLOP/s (no sparsity) by device-name pattern, first match wins; unknown devices get no MFU. Sources,
# the vendors' datasheets (* = the sheet gives only the 2:4-sparsity figure; dense is half of it):
#   H100 SXM / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet: bf16 1,979* / 1,513* / 1,671*, tf32 989* / 756* /
#     835*, fp32 67 / 51 / 60 TFLOPS.  H200 SXM / NVL: NVIDIA H200 datasheet: the H100 SXM / NVL figures.
#   A100 (SXM and PCIe, 40/80 GB): NVIDIA A100 datasheet: bf16 312, tf32 156, fp32 19.5.
#   L40S: NVIDIA L40S datasheet: bf16 362, tf32 183 (dense figures given), fp32 91.6.  L40: NVIDIA L40 datasheet:
#     bf16 362*, tf32 181*, fp32 90.5.  L4: NVIDIA L4 datasheet: bf16 242*, tf32 120*, fp32 30.3.
#   A10: NVIDIA A10 datasheet: bf16 125, tf32 62.5, fp32 31.2.
#   RTX 4090: NVIDIA Ada Lovelace GPU architecture whitepaper, appendix table: bf16 165.2 (fp32 accumulate, what
#     torch's bf16 matmuls use), tf32 82.6, fp32 82.6.
PEAK_FLOPS = [(r"H100 NVL", dict(bf16=835.5e12, tf32=417.5e12, fp32=60e12)),
              (r"H100.*(HBM3|SXM)", dict(bf16=989e12, tf32=495e12, fp32=67e12)),
              (r"H100 PCIe", dict(bf16=756e12, tf32=378e12, fp32=51e12)),
              (r"H200 NVL", dict(bf16=835.5e12, tf32=417.5e12, fp32=60e12)),
              (r"H200", dict(bf16=989e12, tf32=495e12, fp32=67e12)),
              (r"A100", dict(bf16=312e12, tf32=156e12, fp32=19.5e12)),
              (r"L40S", dict(bf16=362e12, tf32=183e12, fp32=91.6e12)),
              (r"L40\b", dict(bf16=181e12, tf32=90.5e12, fp32=90.5e12)),
              (r"\bL4\b", dict(bf16=121e12, tf32=60e12, fp32=30.3e12)),
              (r"\bA10\b", dict(bf16=125e12, tf32=62.5e12, fp32=31.2e12)),  # not A100, not A10G (no datasheet)
              (r"RTX 4090$", dict(bf16=165.2e12, tf32=82.6e12, fp32=82.6e12))]  # not the cut-down 4090 D


# ----- FLOP counting -----

def count_macs(model, *inputs):
    """Forward MACs of model(*inputs) by kind: {'linear', 'conv', 'attention', 'total'} (convention: module doc)."""
    macs = dict(linear=0, conv=0, attention=0)

    def on_linear(m, inp, out):  # rows x in x out = numel(input) x out
        macs["linear"] += inp[0].numel() * m.out_features

    def on_conv(m, inp, out):  # per output element: Cin/groups x kh x kw
        macs["conv"] += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def on_attention(m, inp, out):  # Q K^T and A V: N x N x D each, per (batch x window) row
        *lead, n, _ = inp[0].shape
        macs["attention"] += 2 * math.prod(lead) * n * n * (m.qkv.out_features // 3)

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(on_linear))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
        if isinstance(getattr(m, "qkv", None), nn.Linear):
            hooks.append(m.register_forward_hook(on_attention))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return {**macs, "total": sum(macs.values())}


def make_inputs(model, batch, device):
    """Random (x, t, y) for one call; y only for class-conditional models."""
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device) if model.num_classes else None
    return x, t, y


def model_stats(build, kwargs):
    """(forward MACs at batch 1, params all, params trainable) of build(**kwargs), built and run on the meta
    device; a CPU forward is the fallback for ops without a meta kernel."""
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = build(**kwargs).eval()
            macs = count_macs(model, *make_inputs(model, 1, torch.device(device)))
            params = list(model.parameters())
            return macs, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
        except (RuntimeError, NotImplementedError) as e:
            if device == "cpu":
                raise
            print(f"note: meta-device FLOP count failed ({str(e).splitlines()[0][:120]}); counting on the CPU")


def peak_flops_by_name(name, key):
    """Dense peak FLOP/s of the device named `name` (torch.cuda.get_device_name), key bf16 / tf32 / fp32; or None."""
    return next((table[key] for pattern, table in PEAK_FLOPS if re.search(pattern, name)), None)


def peak_flops(device, precision):
    """Dense peak FLOP/s for this GPU and precision, or None (CPU, unknown device)."""
    if device.type != "cuda":
        return None
    key = "bf16" if precision in ("bf16", "fp16") else "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return peak_flops_by_name(torch.cuda.get_device_name(device), key)


def mfu(macs, images_per_s, peak, calls=3):
    """Model FLOP utilisation: calls forward passes per image (training: 3, backward = 2 x forward) x forward MACs
    x 2 FLOP/MAC x images/s over the dense peak; None without a peak."""
    return calls * macs * 2 * images_per_s / peak if peak else None


# ----- Timing and memory -----

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, warmup, repeats, device, warmup_fn=None):
    """Seconds per call of fn over `repeats` calls, after `warmup` untimed calls of warmup_fn (default fn)."""
    for _ in range(warmup):
        (warmup_fn or fn)()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)  # device work is asynchronous: wait before reading the host clock
        times.append(time.perf_counter() - t0)
    return times


def reset_peak(device):
    """Start a new memory high-water mark; returns False where the CPU mark cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS (VmHWM, ru_maxrss)
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # Linux: VmHWM is the peak RSS since the last clear_refs reset
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: lifetime peak (Linux: KiB)


def summary(times, batch):
    """Median and spread of per-call seconds as calls/s and images/s."""
    med = statistics.median(times)
    return {"seconds": times, "median_s": med, "per_s": 1 / med, "images_per_s": batch / med,
            "images_per_s_min": batch / max(times), "images_per_s_max": batch / min(times)}


# ----- One benchmark row -----

def bench_train(model, fwd, diffusion, args, device):
    """Exactly train_cifar.py's step (loss, backward, grad norm, AdamW, EMA) on a fixed batch: no data loading."""
    params, ema = list(model.parameters()), copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    x, _, y = make_inputs(model, args.batch_size, device)
    model.train()

    def step():
        train_step(fwd, diffusion, opt, scaler, params, x, y, grad_clip=0.0)
        update_ema(ema, model, 0.9999)
    return timed(step, args.warmup, args.steps, device)


def bench_sample(model, fwd, diffusion, args, device, cfg):
    model.eval()
    B, shape = args.batch_size, (args.batch_size, model.in_channels, model.input_size, model.input_size)
    kwargs = {"y": torch.randint(0, model.num_classes, (B,), device=device)} if model.num_classes else {}

    def run(steps):
        diffusion.sample(fwd, shape, sampler=args.sampler, steps=steps, model_kwargs=kwargs, device=device,
                         cfg_scale=args.cfg_scale if cfg else 1.0, null_label=model.null_label)
    return timed(lambda: run(args.sample_steps), args.warmup, args.sample_repeats, device, lambda: run(1))


def compile_failed(row, e):
    print(f"warning: torch.compile failed on this platform ({type(e).__name__}: "
          f"{str(e).strip().splitlines()[0][:160]}); falling back to eager")
    row["compile"] = "failed->eager"


def bench_row(backbone, name, kwargs, args, device, formulation="ddpm", compile_backend=None):
    """Build one model and measure it with the `formulation`'s loss and sampler (diffusion.make_diffusion);
    compile_backend: torch.compile's backend (None: its default, inductor). Returns the JSON row."""
    build = importlib.import_module(backbone).MODELS[name]
    try:
        macs, n_all, n_train = model_stats(build, kwargs)
    except (ValueError, TypeError) as e:
        raise RunError(f"cannot build {name} with {kwargs}: {e}")
    row = dict(backbone=backbone, model=name, kwargs=kwargs, params=n_all, params_trainable=n_train,
               macs=macs, gmacs=macs["total"] / 1e9, precision=args.precision, attention=args.attention,
               compile=args.compile, grad_checkpoint=args.grad_checkpoint, batch_size=args.batch_size,
               tf32=device.type == "cuda" and args.tf32)
    if args.no_train and args.no_sample:
        return row
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: XL models build in seconds on a GPU
        model = build(**kwargs)
    diffusion = make_diffusion(formulation, learn_sigma=model.learn_sigma)
    net = model
    if args.compile:
        try:
            net = torch.compile(model) if compile_backend is None else torch.compile(model, backend=compile_backend)
        except Exception as e:  # unsupported Python / platform fails at wrap time
            compile_failed(row, e)
    fwd = autocast_forward(net, device, args.precision)
    peak = peak_flops(device, args.precision)
    jobs = ([] if args.no_train else [("train", None)]) + ([] if args.no_sample else [("sample", False)]) + \
        ([("sample_cfg", True)] if not args.no_sample and model.null_label is not None else [])
    for key, cfg in jobs:
        row["mem_reset"] = reset_peak(device)
        run = (lambda f: bench_train(model, f, diffusion, args, device)) if cfg is None else \
            (lambda f: bench_sample(model, f, diffusion, args, device, cfg))
        try:
            times = run(fwd)
        except torch.OutOfMemoryError:
            raise RunError(f"{name} ran out of memory ({key}, batch {args.batch_size}); lower --batch-size or add "
                "--grad-checkpoint / --precision bf16")
        except Exception as e:  # torch.compile compiles lazily: a missing compiler fails on the first call
            if net is model:
                raise
            compile_failed(row, e)
            net, fwd = model, autocast_forward(model, device, args.precision)
            times = run(fwd)
        res = summary(times, args.batch_size)
        res["peak_memory_bytes"] = peak_memory(device)
        if cfg is not None:
            res.update(sampler=args.sampler, sampler_steps=args.sample_steps, cfg_scale=args.cfg_scale if cfg else 1.0,
                       nfe=diffusion.nfe(args.sampler, args.sample_steps))
        calls = 3 if cfg is None else (2 if cfg else 1) * diffusion.nfe(args.sampler, args.sample_steps)  # per image
        res["mfu"] = mfu(macs["total"], res["images_per_s"], peak, calls)
        row[key] = res
    return row


# ----- Command line -----

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    a = p.add_argument
    a("--backbone", help=f"one of {', '.join(BACKBONES)}")
    a("--model", nargs="+", help="name(s) in the backbone's MODELS registry (default: its CIFAR-10 model)")
    a("--all", action="store_true", help="the default CIFAR-10 model of every backbone")
    a("--input-size", type=int)
    a("--in-channels", type=int)
    a("--num-classes", type=int, help="class-conditional with this many classes (and a null label for CFG)")
    a("--learn-sigma", action=argparse.BooleanOptionalAction, default=None)
    a("--precision", choices=["bf16", "fp16", "fp32"], default="fp32", help="autocast dtype (fp32 = none)")
    a("--attention", choices=["sdpa", "math"], default="sdpa")
    a("--tf32", action=argparse.BooleanOptionalAction, default=True,
      help="CUDA: TF32 matmuls/convs in fp32 (on by default, as train_cifar.py and DiT's train.py)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad-checkpoint", action="store_true", help="activation checkpointing per block")
    a("--batch-size", type=int, help="default: 128 on a GPU, 8 on the CPU")
    a("--device", help="default: cuda if available, else cpu")
    a("--steps", type=int, help="timed training steps (default: 20 GPU, 3 CPU)")
    a("--warmup", type=int, help="untimed warm-up steps / one-step sampler runs (default: 5 GPU, 1 CPU)")
    a("--sampler", choices=SAMPLERS, default="dpm++2m")
    a("--sample-steps", type=int, help="sampler steps K (default: 20 GPU, 4 CPU)")
    a("--sample-repeats", type=int, help="timed sampler runs (default: 5 GPU, 2 CPU)")
    a("--cfg-scale", type=float, default=1.5, help="guidance scale of the guided sampling runs")
    a("--no-train", action="store_true")
    a("--no-sample", action="store_true")
    a("--json", help="write the results here")
    args = p.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except RunError as e:
        p.error(str(e))
    gpu = args.device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    for k, g, c in [("batch_size", 128, 8), ("steps", 20, 3), ("warmup", 5, 1), ("sample_steps", 20, 4),
                    ("sample_repeats", 5, 2)]:
        if getattr(args, k) is None:
            setattr(args, k, g if gpu else c)
    for ok, msg in [(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
                    (args.steps >= 1, "--steps must be >= 1"), (args.warmup >= 0, "--warmup must be >= 0"),
                    (1 <= args.sample_steps <= 1000, "--sample-steps must be in 1..1000"),
                    (args.sample_repeats >= 1, "--sample-repeats must be >= 1"),
                    (args.precision != "fp16" or gpu, "--precision fp16 needs a CUDA device; use bf16 or fp32"),
                    (all(getattr(args, k, None) is None or getattr(args, k) >= 1 for k in
                         ("input_size", "in_channels")), "--input-size and --in-channels must be >= 1")]:
        if not ok:
            p.error(msg)
    return args


def select_models(args):
    """[(backbone, model name, constructor kwargs)] from --all / --backbone / --model and the overrides."""
    if args.all and (args.backbone or args.model):
        raise RunError("--all benchmarks every backbone's CIFAR-10 model; drop --backbone/--model (or drop --all)")
    if not args.all and args.backbone not in BACKBONES:
        what = "no --backbone given" if args.backbone is None else f"unknown backbone {args.backbone!r}"
        raise RunError(f"{what}; choose one of {', '.join(BACKBONES)} (or pass --all)")
    over = {k: v for k, v in [("input_size", args.input_size), ("in_channels", args.in_channels),
                              ("num_classes", args.num_classes), ("learn_sigma", args.learn_sigma)] if v is not None}
    if args.num_classes:
        over["class_dropout_prob"] = 0.1  # a null label row, so that guided sampling can be benchmarked
    over.update(attention=args.attention, grad_checkpoint=args.grad_checkpoint)
    picks = []
    for backbone in BACKBONES if args.all else [args.backbone]:
        registry = importlib.import_module(backbone).MODELS
        for name in args.model or [CIFAR[backbone][0]]:
            if name not in registry:
                raise RunError(f"unknown {backbone} model {name!r}; choose one of {', '.join(registry)}")
            base = {} if args.model else CIFAR[backbone][1]  # a model named explicitly keeps its registry defaults
            picks.append((backbone, name, {**base, **over}))
    return picks


def environment(device, argv):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
                cpu=cpu, nproc=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), loadavg_start=list(os.getloadavg()),
                command="python bench.py " + " ".join(sys.argv[1:] if argv is None else argv))


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def table(rows, args):
    """Markdown table, one row per model/config."""
    K, gpu = args.sample_steps, args.device.type == "cuda"
    head = ["model", "params", "GMACs", "precision", "attention", "compile", "ckpt", "batch",
            "train img/s (min-max)", "steps/s", "peak mem GB", f"sample img/s ({args.sampler}, K={K})",
            "cfg sample img/s"] + (["train MFU"] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tr, sa, sc = r.get("train"), r.get("sample"), r.get("sample_cfg")
        cells = [r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['gmacs']:.2f}",
                 r["precision"] + ("/tf32" if r["tf32"] and r["precision"] == "fp32" else ""), r["attention"],
                 str(r["compile"]).lower(), "on" if r["grad_checkpoint"] else "off", str(r["batch_size"]),
                 f"{tr['images_per_s']:.2f} ({tr['images_per_s_min']:.2f}-{tr['images_per_s_max']:.2f})" if tr else "-",
                 fmt(tr and tr["per_s"], ".3f"), fmt(tr and tr["peak_memory_bytes"] / 1e9, ".2f"),
                 fmt(sa and sa["images_per_s"], ".2f"), fmt(sc and sc["images_per_s"], ".2f")]
        if gpu:
            cells.append(fmt(tr and tr["mfu"] and 100 * tr["mfu"], ".1f") + ("%" if tr and tr["mfu"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args, argv)
    except RunError as e:
        raise SystemExit(f"error: {e}")


def run(args, argv):
    picks = select_models(args)
    if args.json:
        check_writable(args.json, "--json")  # before minutes of benchmarking
    env = environment(args.device, argv)
    t0 = time.perf_counter()
    rows = [bench_row(b, n, kw, args, args.device) for b, n, kw in picks]
    env.update(loadavg_end=list(os.getloadavg()), wall_s=round(time.perf_counter() - t0, 1),
               memory=("torch.cuda.max_memory_allocated" if args.device.type == "cuda" else
                       "peak RSS (ru_maxrss), reset per row" if all(r.get("mem_reset", True) for r in rows)
                       else "peak RSS (ru_maxrss), process-wide lifetime high-water mark"))
    result = dict(env=env, settings={k: (str(v) if k == "device" else v) for k, v in vars(args).items()
                                     if k != "model"}, rows=rows)
    print(f"device {env['device_name']} ({env['device']}), torch {env['torch']}, threads {env['threads']}, "
          f"nproc {env['nproc']}, load average {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f}, "
          f"memory = {env['memory']}; median of {args.steps} train steps / {args.sample_repeats} sampler runs "
          f"after {args.warmup} warm-up; {env['wall_s']} s")
    print(table(rows, args))
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=1).encode()))
    return result


if __name__ == "__main__":
    main()

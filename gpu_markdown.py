"""
A gpu_report.py JSON report as the GPU tables of BENCHMARKS.md (gpu_report.py --markdown REPORT): training,
SDPA kernels, sampling, VAE and the short training run; a row without figures says why (skipped, out of memory,
error, or not measured yet).
"""
from sdpa_probe import BACKENDS

NOT_YET = "not measured yet"


def cell(row, value, spec=".1f"):
    """A figure, or why there is none (skipped / oom / error / pending)."""
    if row["status"] != "ok":
        return {"pending": NOT_YET, "oom": "out of memory"}.get(row["status"], row["status"])
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def compiled(row):
    """off, the backend, or failed->eager (bench_row fell back)."""
    s, c = row["settings"], (row.get("figures") or {}).get("compile")
    return c if isinstance(c, str) else s["compile_backend"] if s["compile"] else "off"


def gb(v):
    return None if v is None else v / 1e9


def pct(v):
    return None if v is None else f"{100 * v:.1f}%"


def markdown(report):
    """BENCHMARKS.md's GPU tables from a report (a plan with pending rows gives the empty layout)."""
    env, rows = report.get("env") or {}, report["rows"]
    by = lambda kind: [r for r in rows if r["settings"]["kind"] == kind]  # noqa: E731
    fig = lambda r: r.get("figures") or {}  # noqa: E731
    out = [f"Machine: {env['device_name']}, driver {env.get('driver')}, CUDA {env.get('cuda')}, cuDNN "
           f"{env.get('cudnn')}, torch {env.get('torch')}, triton {env.get('triton')}; {env.get('date')}; "
           f"`{env.get('command')}` ({report.get('wall_s')} s)" if env else f"Machine: {NOT_YET}", ""]

    def table(head, body):
        out.extend(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        out.extend("| " + " | ".join(map(str, b)) + " |" for b in body)
        out.append("")

    train_head = ["model", "batch", "precision", "attention", "compile", "ckpt", "train img/s", "peak mem GB", "MFU"]
    for title, step in [("DiT-XL/2, ImageNet-256 latents (4x32x32, 1000 classes, learn_sigma)", "dit_xl_train"),
                        ("CIFAR-10 models (bench.py's CIFAR rows)", "cifar_train")]:
        out.append(f"**Training: {title}**")
        table(train_head, [[s["model"], s["batch"], s["precision"], s["attention"], compiled(r),
                            "on" if s["grad_checkpoint"] else "off", cell(r, fig(r).get("images_per_s")),
                            cell(r, gb(fig(r).get("peak_memory_bytes")), ".2f"), cell(r, pct(fig(r).get("mfu")))]
                           for r in by("train") if r["step"] == step for s in [r["settings"]]])
    out.append("**SDPA kernels** (default: what an unrestricted call ran; then each backend alone: ok / no, the "
               "reason in the JSON)")
    body = []
    for r in by("sdpa"):
        for c in fig(r).get("calls") or [{}]:
            for dt in ("bfloat16", "float32"):
                p, call = c.get(dt, {}), f"q {c['q']}" if c else cell(r, None)
                body.append([r["settings"]["model"], call + (f", mask {c['mask']}" if c.get("mask") else ""),
                             dt] + [cell(r, p.get(k) and p[k].split(":")[0]) for k in ("default", *BACKENDS)])
    table(["model", "attention call", "dtype", "default", *BACKENDS], body)
    out.append("**Sampling at each paper's sampler** (eager; img/s of one timed run)")
    table(["model", "sampler", "steps (NFE)", "batch", "precision", "img/s", "guided img/s (cfg 1.5)", "peak mem GB",
           "MFU"],
          [[s["model"], s["sampler"], f"{s['steps']} ({s['nfe']})", s["batch"], s["precision"],
            cell(r, (fig(r).get("sample") or {}).get("images_per_s"), ".2f"),
            cell(r, (fig(r).get("sample_cfg") or {}).get("images_per_s"), ".2f"),
            cell(r, gb((fig(r).get("sample") or {}).get("peak_memory_bytes")), ".2f"),
            cell(r, pct((fig(r).get("sample") or {}).get("mfu")))] for r in by("sample") for s in [r["settings"]]])
    out.append("**VAE (SD kl-f8 architecture, random init: timing only)**")
    table(["direction", "precision", "batch", "image", "img/s", "peak mem GB", "GMACs/img", "MFU"],
          [[s["direction"], s["precision"], s["batch"], f"{s['image_size']}x{s['image_size']}",
            cell(r, fig(r).get("images_per_s")), cell(r, gb(fig(r).get("peak_memory_bytes")), ".2f"),
            cell(r, fig(r).get("gmacs"), ".2f"), cell(r, pct(fig(r).get("mfu")))] for r in by("vae")
           for s in [r["settings"]]])
    out.append("**Short real training run (bf16)**")
    for r in by("train_run"):
        f, s = fig(r), r["settings"]
        table(["model", "batch", "data", "steps", "img/s (whole run)", "loss: first log -> last", "peak mem GB"],
              [[s["model"], s["batch"], cell(r, (f.get("data") or {}).get("source")), cell(r, f.get("steps")),
                cell(r, f.get("images_per_s")), cell(r, f.get("loss_first") and
                                                      f"{f['loss_first']:.4f} -> {f['loss_last']:.4f}"),
                cell(r, gb(f.get("peak_memory_bytes")), ".2f")]])
        curve = ", ".join(f"{c['step']}: {c['loss']:.4f}" for c in f.get("curve", []))
        out.append(f"Loss every {s['log_every']} steps: {curve or NOT_YET}")
    return "\n".join(out).rstrip() + "\n"

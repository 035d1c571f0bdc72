"""
gpu_report.py and the modules it uses (CPU only): the --smoke report end to end (every row, its settings and
figures; the sdpa_probe.py, sampling, VAE and training-run rows), the plan's sizes and budgets, the budget
mechanism, per-row failures and out-of-memory handling, --make-subset (cifar_subset.py) and --markdown
(gpu_markdown.py).
"""
import json
import pickle

import numpy as np
import pytest
import torch

import bench
import cifar_subset
import gpu_markdown
import gpu_report


SMOKE_NAMES = (["sdpa DiT-XL/2", "sdpa DiT-S/2", "sdpa U-ViT-S/2", "sdpa DiffiT-CIFAR", "sdpa VAE",
                "train-run U-ViT-S/2 bf16",
                "sample DiT-XL/2 ddpm", "sample DiT-S/2 ddpm", "sample U-ViT-S/2 dpm++2m", "sample DiffiT-CIFAR heun"]
               + [f"vae {d} 32 {p}" for d in ("encode", "decode") for p in ("fp32", "tf32", "bf16")]
               + [f"train {m} b2 {v}" for v in ("eager sdpa", "eager math", "eager sdpa ckpt", "compile sdpa",
                                                "compile sdpa ckpt") for m in ("DiT-S/2", "U-ViT-S/2", "DiffiT-CIFAR")]
               + [f"train DiT-XL/2 b{b} {v}" for v in ("eager sdpa", "eager sdpa ckpt") for b in (2, 4)]
               + ["train DiT-XL/2 b2 eager math"]
               + [f"train DiT-XL/2 b{b} {v}" for v in ("compile sdpa", "compile sdpa ckpt") for b in (2, 4)])


def fake_cifar(root, per_batch=4):
    """data.load_cifar10's layout: 5 pickled training batches of uint8 (n, 3072) R, G, B planes and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng, xs = np.random.default_rng(0), []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        xs.append(x)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": x, b"labels": [i] * per_batch}, protocol=2))
    return np.concatenate(xs).reshape(-1, 3, 32, 32)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke report (about 35 s on one core) on a 12-image subset made by --make-subset."""
    tmp = tmp_path_factory.mktemp("smoke")
    images = fake_cifar(tmp / "cifar")
    npz, out = tmp / "sub.npz", tmp / "smoke.json"
    gpu_report.main(["--make-subset", str(tmp / "cifar"), "12", str(npz)])
    report = gpu_report.main([str(out), "--smoke", "--data", str(npz)])
    return dict(report=report, file=json.loads(out.read_text()), images=images, npz=npz)


def test_make_subset_writes_a_subset_of_the_training_images(smoke):
    with np.load(smoke["npz"]) as f:
        x, y = f["x"], f["y"]
    assert x.dtype == np.uint8 and x.shape == (12, 3, 32, 32) and y.shape == (12,)
    originals = {im.tobytes(): i // 4 + 1 for i, im in enumerate(smoke["images"])}  # image -> its batch's label
    assert len({im.tobytes() for im in x}) == 12 and all(originals[im.tobytes()] == label for im, label in zip(x, y))


def test_smoke_report_has_every_row_with_settings_and_figures(smoke):
    report = smoke["report"]
    assert smoke["file"] == json.loads(json.dumps(report))  # the file on disk is the final report
    assert [r["name"] for r in report["rows"]] == SMOKE_NAMES
    for k in ("device_name", "torch", "cuda", "cudnn", "driver", "date", "command", "peak_bf16_flops", "python"):
        assert k in report["env"], k
    assert report["mode"] == "smoke" and report["env"]["mfu_note"] == "CPU: no MFU"
    assert report["budgets_s"] == gpu_report.BUDGET_S
    for r in report["rows"]:
        assert r["settings"] and r["status"] == "ok" and r["figures"], r["name"]
    rows = {r["name"]: r for r in report["rows"]}
    for name, r in rows.items():
        if name.startswith("train "):
            f, s = r["figures"], r["settings"]
            assert f["images_per_s"] > 0 and isinstance(f["peak_memory_bytes"], int) and f["mfu"] is None, name
            assert s["grad_checkpoint"] == name.endswith("ckpt") == s["kwargs"]["grad_checkpoint"], name
            assert s["attention"] == s["kwargs"]["attention"] == ("math" if "math" in name else "sdpa")
            assert f["compile"] is ("compile" in name) and s["compile_backend"] == ("eager" if f["compile"] else None)
    xl = rows["train DiT-XL/2 b4 compile sdpa ckpt"]["settings"]
    assert {k: xl["kwargs"][k] for k in ("input_size", "in_channels", "num_classes", "learn_sigma",
                                         "class_dropout_prob")} == dict(gpu_report.XL[2]) and xl["batch"] == 4


def test_smoke_sampling_sdpa_vae_and_training_run_rows(smoke):
    rows = {r["name"]: r for r in smoke["report"]["rows"]}
    heun = rows["sample DiffiT-CIFAR heun"]
    assert heun["settings"]["formulation"] == "edm" and heun["figures"]["sample"]["nfe"] == 3  # 2 Heun steps
    assert heun["figures"]["sample_cfg"] is None and rows["sample U-ViT-S/2 dpm++2m"]["figures"]["sample_cfg"] is None
    assert rows["sample DiT-XL/2 ddpm"]["figures"]["sample_cfg"]["cfg_scale"] == 1.5  # class-conditional: guided too
    # SDPA on the CPU: the flash kernel for unmasked attention; DiffiT's additive bias mask only runs on math
    (dit_call,) = rows["sdpa DiT-S/2"]["figures"]["calls"]
    assert dit_call["q"] == [2, 2, 256, 32]  # batch 2 x (2 heads, 256 tokens, head_dim 32)
    assert dit_call["bfloat16"]["default"] == "flash" and dit_call["bfloat16"]["flash"] == "ok"
    assert dit_call["bfloat16"]["efficient"].startswith("no: ") and dit_call["float32"]["math"] == "ok"
    diffit_calls = rows["sdpa DiffiT-CIFAR"]["figures"]["calls"]
    assert len(diffit_calls) == 3 and all(c["mask"] and c["float32"]["default"] == "math" for c in diffit_calls)
    assert diffit_calls[0]["q"][0] == 2 * 64  # batch 2 x 64 windows of 4x4 at 32x32
    vae = [rows[f"vae decode 32 {p}"]["figures"] for p in ("fp32", "tf32", "bf16")]
    assert vae[0]["gmacs"] == vae[2]["gmacs"] > 0 and "CPU: TF32" in vae[1]["note"]
    run = rows["train-run U-ViT-S/2 bf16"]
    assert run["figures"]["data"] == dict(source="npz", path=str(smoke["npz"]), images=12)
    assert run["figures"]["steps"] == 2 and [c["step"] for c in run["figures"]["curve"]] == [1, 2]
    assert run["figures"]["finite"] and run["settings"]["precision"] == "bf16"


def test_markdown_fills_the_benchmarks_layout(smoke):
    text = gpu_markdown.markdown(smoke["report"])
    assert gpu_markdown.NOT_YET not in text
    assert "| DiT-XL/2 | 4 | fp32 | sdpa | eager | on |" in text  # smoke: dynamo with the eager backend
    assert "| DiffiT-CIFAR | heun | 2 (3) | 2 | fp32 |" in text
    pending = dict(rows=[dict(r, status="pending", figures=None) for r in smoke["report"]["rows"]])
    empty = gpu_markdown.markdown(pending)
    train_lines = [l for l in empty.splitlines() if l.startswith("| DiT-XL/2 |")]
    assert len(train_lines) == 9 + 2 + 1 and all(gpu_markdown.NOT_YET in l for l in train_lines)  # train, sdpa, sample


def test_gpu_plan_sizes_and_budgets():
    rows = gpu_report.plan(smoke=False)
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)) == len(SMOKE_NAMES) + 8  # 4 XL batches instead of 2, x 4 settings
    for b in (32, 64, 128, 256):
        for v in ("eager sdpa", "eager sdpa ckpt", "compile sdpa", "compile sdpa ckpt"):
            assert f"train DiT-XL/2 b{b} {v}" in names
    s = {r["name"]: r["settings"] for r in rows}
    assert s["train U-ViT-S/2 b128 compile sdpa"]["compile_backend"] == "inductor"
    assert all(v["precision"] == "bf16" for v in s.values() if v["kind"] in ("train", "sample", "train_run"))
    assert [(s[f"sample {m}"]["steps"], s[f"sample {m}"]["nfe"]) for m in ("DiT-XL/2 ddpm", "U-ViT-S/2 dpm++2m",
                                                                          "DiffiT-CIFAR heun")] == \
        [(250, 250), (50, 50), (18, 35)]
    assert s["vae encode 256 bf16"]["image_size"] == 256 and s["train-run U-ViT-S/2 bf16"]["max_steps"] >= 200
    assert all(r["est"] > 0 for r in rows)
    assert sum(gpu_report.BUDGET_S.values()) <= gpu_report.DEADLINE_S < 8 * 60 - 15  # start-up fits in 8 minutes


def test_zero_budget_skips_every_row_and_still_writes_the_report(tmp_path):
    out = tmp_path / "r.json"
    report = gpu_report.run_report(str(out), smoke=True, budgets={k: 0 for k in gpu_report.BUDGET_S})
    assert json.loads(out.read_text()) == json.loads(json.dumps(report)) and report["env"]["torch"] == torch.__version__
    assert [r["name"] for r in report["rows"]] == SMOKE_NAMES
    for r in report["rows"]:
        assert r["status"] == "skipped" and r["note"].startswith("skipped: step budget (0 s) has 0 s left")
        assert "figures" not in r and r["settings"]
    report = gpu_report.run_report(str(out), smoke=True, deadline=0)
    assert all("deadline (0 s)" in r["note"] for r in report["rows"])


def test_only_runs_the_named_steps(tmp_path):
    report = gpu_report.run_report(str(tmp_path / "r.json"), smoke=True, only=["vae"])
    for r in report["rows"]:
        assert (r["status"], r.get("note")) == (("ok", None) if r["step"] == "vae" else
                                                ("skipped", f"skipped: step {r['step']} not in --only")), r["name"]


def test_failures_stay_in_their_row_and_an_oom_skips_the_compiled_twin(tmp_path, monkeypatch):
    out, calls = tmp_path / "r.json", []

    def fake_bench_row(backbone, name, kwargs, args, device, formulation="ddpm", compile_backend=None):
        calls.append(args)
        if len(calls) == 2:  # the file is rewritten after every row: row 1 recorded, this one still pending
            on_disk = [r["status"] for r in json.loads(out.read_text())["rows"] if r["step"] == "dit_xl_train"]
            assert on_disk[:2] == ["ok", "pending"]
        if args.batch_size == 4 and not args.grad_checkpoint:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if args.batch_size == 4:
            try:  # how bench_row reports it: a RunError raised while handling the OOM
                raise torch.OutOfMemoryError("CUDA out of memory")
            except torch.OutOfMemoryError:
                raise gpu_report.RunError("DiT-XL/2 ran out of memory (train, batch 4)")
        if args.attention == "math":
            raise ValueError("bad shape\nsecond line of the message")
        return dict(params=1, gmacs=1.0, compile=args.compile, train=dict(images_per_s=10.0, mfu=None))
    monkeypatch.setattr(bench, "bench_row", fake_bench_row)
    report = gpu_report.run_report(str(out), smoke=True, only=["dit_xl_train"])
    rows = {r["name"]: r for r in report["rows"] if r["step"] == "dit_xl_train"}
    assert rows["train DiT-XL/2 b4 eager sdpa"]["status"] == "oom"
    assert rows["train DiT-XL/2 b4 eager sdpa ckpt"]["status"] == "oom"
    assert rows["train DiT-XL/2 b2 eager math"]["error"] == "ValueError: bad shape"  # one line
    for ckpt in ("", " ckpt"):
        assert rows[f"train DiT-XL/2 b4 compile sdpa{ckpt}"]["note"].startswith("skipped: eager ran out of memory")
        assert rows[f"train DiT-XL/2 b2 compile sdpa{ckpt}"]["figures"]["compile"] is True
    assert len(calls) == 7  # 9 rows, the 2 compiled twins of the OOM rows never started


def test_report_input_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 3, 16, 16), np.uint8), y=np.zeros(2))
    with pytest.raises(gpu_report.RunError, match=r"expected x uint8 \(N, 3, 32, 32\)"):
        cifar_subset.load_subset(str(bad))
    for argv, msg in [(["--make-subset", str(tmp_path), "30000", str(tmp_path / "o.npz")], "N must be in 1..20000"),
                      (["--make-subset", str(tmp_path), "10", str(tmp_path / "o.npz")], "CIFAR-10 not found"),
                      ([str(tmp_path / "r.json")], "needs a CUDA GPU")]:
        with pytest.raises(SystemExit) as e:
            gpu_report.main(argv)
        assert str(e.value).startswith("error: ") and msg in str(e.value) and "\n" not in str(e.value)

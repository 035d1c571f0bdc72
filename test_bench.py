"""Tests for bench.py: the analytic FLOP counter against hand formulas and the papers' tables, a tiny end-to-end
benchmark run, what the CPU peak-memory figure means, the compile fallback, the one-line errors, and the peak-FLOPs
table and MFU arithmetic that gpu_report.py uses. CPU only. (gpu_report.py itself: test_gpu_report.py.)

Paper figures cited: DiT (Peebles & Xie 2023, arXiv 2212.09748) Table 4 "Gflops"; U-ViT (Bao et al. 2023,
arXiv 2209.12152) Table 7 (appendix) GFLOPs; DiffiT (Hatamizadeh et al. 2024, arXiv 2312.02139) Table 9. Numbers
marked "change detector" are our own counts, pinned so that a change shows up; they are not fidelity checks."""
import ctypes
import ctypes.util
import gc
import json
import os

import pytest
import torch
import torch.nn as nn

import bench
import dit
import diffit
import uvit


def gmacs(registry, name, **kw):
    macs, _, _ = bench.model_stats(registry[name], kw)
    return macs


# ----- The counter on single modules, by hand formula -----

def test_linear_counts_rows_times_in_times_out():
    lin = nn.Linear(7, 11)
    assert bench.count_macs(lin, torch.randn(2, 5, 7)) == dict(linear=2 * 5 * 7 * 11, conv=0, attention=0,
                                                                total=2 * 5 * 7 * 11)


def test_conv_counts_per_output_pixel_with_groups_and_stride():
    conv = nn.Conv2d(6, 9, kernel_size=3, stride=2, padding=1, groups=3)
    macs = bench.count_macs(conv, torch.randn(2, 6, 10, 10))
    # output 2 x 9 x 5 x 5; each output element reads Cin/groups x 3 x 3 = 18 inputs
    assert macs["conv"] == (2 * 9 * 5 * 5) * (6 // 3) * 9 and macs["total"] == macs["conv"]


def test_attention_counts_qk_and_av_plus_projections():
    attn = dit.Attention(16, num_heads=4, attention="math")
    B, N, D = 3, 10, 16
    macs = bench.count_macs(attn, torch.randn(B, N, D))
    assert macs["attention"] == 2 * B * N * N * D  # Q K^T and A V, all heads together
    assert macs["linear"] == B * N * D * 3 * D + B * N * D * D  # qkv + proj
    assert macs["total"] == macs["attention"] + macs["linear"]


def test_windowed_attention_is_counted_per_window():
    # DiffiT ResBlock-level block on an 8x8 token grid with 4x4 windows: 4 windows of 16 tokens per sample
    blk = diffit.DiffiTBlock(dim=32, num_heads=2, window_size=4, temb_dim=24, mlp_ratio=2.0)
    B, D = 2, 32
    macs = bench.count_macs(blk, torch.randn(B, 64, D), torch.randn(B, 24), (8, 8))
    assert macs["attention"] == 2 * (B * 4) * 16 * 16 * D
    per_token = 3 * D * D + D * D + 2 * (2 * D * D)  # qkv, proj, fc1, fc2
    assert macs["linear"] == B * 64 * per_token + B * 24 * 3 * D  # + qkv_temb once per sample


def test_meta_failure_falls_back_to_cpu(capsys):
    class NeedsData(nn.Module):  # .item() has no meta kernel
        in_channels, input_size, num_classes = 3, 4, 0

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)

        def forward(self, x, t, y=None):
            assert x.abs().sum().item() >= 0
            return self.fc(x)

    macs, n_all, _ = bench.model_stats(NeedsData, {})
    assert macs["linear"] == 3 * 4 * 4 * 5 and n_all == 25
    assert "counting on the CPU" in capsys.readouterr().out


# ----- Whole models: hand formulas and the papers' numbers -----

def dit_formula(depth, D, p, C=4, I=32, learn_sigma=True):
    N = (I // p) ** 2
    block = 12 * D * D * N + 2 * N * N * D + 6 * D * D  # qkv+proj+mlp per token, attention, adaLN per sample
    embed = C * p * p * D * N + 256 * D + D * D  # patch conv, timestep MLP
    final = 2 * D * D + D * p * p * C * (2 if learn_sigma else 1) * N
    return depth * block + embed + final


@pytest.mark.parametrize("name,depth,D,p,paper", [("DiT-S/2", 12, 384, 2, 6.06), ("DiT-B/2", 12, 768, 2, 23.01),
                                                  ("DiT-L/2", 24, 1024, 2, 80.71), ("DiT-XL/2", 28, 1152, 2, 118.64),
                                                  ("DiT-XL/4", 28, 1152, 4, 29.05)])
def test_dit_flops_match_formula_and_table4(name, depth, D, p, paper):
    macs = gmacs(dit.MODELS, name)
    assert macs["total"] == dit_formula(depth, D, p)
    assert macs["total"] / 1e9 == pytest.approx(paper, rel=2e-3)  # DiT paper Table 4 Gflops, rounded to 0.01


def test_uvit_h2_flops_match_formula_and_paper():
    D, N = 1152, 256 + 2  # label + time tokens attend too
    block = 12 * D * D * N + 2 * N * N * D
    hand = 29 * block + 14 * 2 * D * D * N + 4 * 4 * D * 256 + D * 16 * N  # + skip linears, patch conv, decoder
    macs = gmacs(uvit.MODELS, "U-ViT-H/2")
    assert macs["total"] == hand
    assert macs["total"] / 1e9 == pytest.approx(133, rel=0.01)  # U-ViT paper Table 7 (appendix), GFLOPs
    # the paper's 133 counts the 14 long-skip linears (2D -> D per token, 9.6 G): the same model built without
    # them is counted exactly that much lower, and then falls > 5% short of the paper's figure
    no_skip = gmacs(uvit.MODELS, "U-ViT-H/2", skip=False)["total"]
    assert macs["total"] - no_skip == 14 * 2 * D * D * N
    assert no_skip / 1e9 < 0.95 * 133


def test_diffit_xl2_flops_pinned_and_paper_gap_explained():
    D, N = 1152, 256
    hand = 28 * (12 * D * D * N + 2 * N * N * D + 3 * D * D) + 4 * 4 * D * N + 256 * D + D * D + D * 32 * N
    macs = gmacs(diffit.MODELS, "DiffiT-XL/2")
    assert macs["total"] == hand
    assert round(macs["total"] / 1e9, 2) == 118.51  # change detector: our count, not a paper figure
    # The paper's 114 G (DiffiT Table 9) is 3.8% below; the linear+conv part alone (no Q K^T, A V) is within 0.3%
    assert macs["total"] / 1e9 == pytest.approx(114, rel=0.05) and macs["total"] / 1e9 > 114 * 1.01
    assert (macs["linear"] + macs["conv"]) / 1e9 == pytest.approx(114, rel=3e-3)


def test_cifar_models_count_on_meta():
    assert gmacs(dit.MODELS, "DiT-S/2", **bench.CIFAR["dit"][1])["total"] == dit_formula(12, 384, 2, C=3)
    D, N = 512, 256 + 1  # U-ViT-S/2: 13 blocks, 6 skip linears, patch conv, decoder, 3x3 output conv
    hand = 13 * (12 * D * D * N + 2 * N * N * D) + 6 * 2 * D * D * N + 3 * 4 * D * 256 + D * 12 * N + 1024 * 3 * 27
    assert gmacs(uvit.MODELS, "U-ViT-S/2")["total"] == hand
    m = gmacs(diffit.MODELS, "DiffiT-CIFAR")  # 4x4 windows: 4 blocks at 32^2/128 ch, 4 at 16^2/256, 2 at 8^2/256
    assert m["attention"] == 4 * 2 * 64 * 16 ** 2 * 128 + 4 * 2 * 16 * 16 ** 2 * 256 + 2 * 2 * 4 * 16 ** 2 * 256
    assert m["conv"] > m["linear"]  # the U-shape is conv-heavy
    assert m["total"] == 3_664_838_656  # change detector: our count (DiffiT publishes no CIFAR figure)


# ----- End to end -----

TINY = ["--backbone", "dit", "--model", "DiT-Tiny", "--input-size", "16",
        "--in-channels", "3", "--num-classes", "10", "--batch-size", "2", "--steps", "1", "--warmup", "1",
        "--sample-steps", "2", "--sample-repeats", "1", "--device", "cpu"]


def test_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.json"
    res = bench.main(TINY + ["--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    for k in ("device", "torch", "threads", "nproc", "cpu", "loadavg_start", "loadavg_end", "memory"):
        assert k in res["env"]
    (row,) = res["rows"]
    assert row["model"] == "DiT-Tiny" and row["batch_size"] == 2 and row["precision"] == "fp32"
    assert row["params"] == sum(p.numel() for p in dit.MODELS["DiT-Tiny"](
        input_size=16, in_channels=3, num_classes=10, class_dropout_prob=0.1).parameters())
    assert row["gmacs"] == row["macs"]["total"] / 1e9 > 0
    for key in ("train", "sample", "sample_cfg"):  # guidance: num_classes > 0 gives a null label
        r = row[key]
        assert len(r["seconds"]) == 1 and r["images_per_s"] == pytest.approx(2 / r["median_s"])
        assert isinstance(r["peak_memory_bytes"], int) and r["mfu"] is None  # CPU: no MFU; the memory figure:
        # test_cpu_peak_memory_is_a_per_job_high_water_mark
    assert row["sample"]["sampler"] == "dpm++2m" and row["sample"]["sampler_steps"] == 2
    text = capsys.readouterr().out
    assert "| DiT-Tiny |" in text and "threads" in text and "torch" in text


def test_flops_only_and_unconditional_has_no_cfg():
    res = bench.main(["--backbone", "uvit", "--model", "U-ViT-Tiny", "--no-train", "--batch-size", "1",
                      "--sample-steps", "1", "--sample-repeats", "1", "--warmup", "0", "--device", "cpu"])
    row = res["rows"][0]
    assert "train" not in row and "sample" in row and "sample_cfg" not in row
    res = bench.main(["--backbone", "dit", "--model", "DiT-XL/2", "--no-train", "--no-sample", "--device", "cpu"])
    # 675,129,632: the official DiT-XL/2 count (reference/dit_param_counts.json, facebookresearch/DiT models.py);
    # 118.62: change detector, our count (DiT paper Table 4 says 118.64; test_dit_flops_match_formula_and_table4)
    assert res["rows"][0]["params"] == 675_129_632 and round(res["rows"][0]["gmacs"], 2) == 118.62


def status_bytes(key):
    """A kB figure of /proc/self/status (VmRSS: resident now; VmHWM: its high-water mark) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def release_free_heap():
    """gc, then glibc malloc_trim(0): memory freed by earlier tests goes back to the OS instead of staying resident
    for the next allocations to reuse, so that what a job allocates shows up as RSS growth."""
    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "malloc_trim"):
        pytest.skip("not glibc: no malloc_trim")
    libc.malloc_trim(0)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc (VmHWM, clear_refs)")
def test_cpu_peak_memory_is_a_per_job_high_water_mark():
    """On the CPU bench.py reports the process's peak RSS during each job, the mark reset when the job starts. So
    (1) a larger peak before the run does not leak into it, (2) it is in bytes and at least the RSS the process had
    before the run, (3) the training job's peak includes what the job allocates: an fp32 EMA copy of every
    parameter, plus gradients and AdamW's two moment buffers of the trainable ones. DiT-S/2 on one token (2x2
    input, patch 2): 33M parameters, 0.5 GB allocated by the job, almost no compute. About 3 s, 1.3 GB."""
    release_free_heap()
    transient = torch.ones(2 ** 28)  # 1 GiB in one block: glibc maps it on its own and unmaps it on free
    transient_peak = status_bytes("VmHWM")
    del transient
    before = status_bytes("VmRSS")
    assert transient_peak > before + 2 ** 30 * 0.95
    res = bench.main(["--backbone", "dit", "--model", "DiT-S/2", "--input-size", "2", "--in-channels", "3",
                      "--batch-size", "1", "--steps", "1", "--warmup", "0", "--sample-steps", "1",
                      "--sample-repeats", "1", "--device", "cpu"])
    (row,) = res["rows"]
    if not row["mem_reset"]:
        pytest.skip("/proc/self/clear_refs is not writable here: the mark cannot be reset per job")
    assert res["env"]["memory"] == "peak RSS (ru_maxrss), reset per row"
    for key in ("train", "sample"):
        peak = row[key]["peak_memory_bytes"]
        assert before <= peak < transient_peak - 100e6, key
    job_allocated = 4 * (row["params"] + 3 * row["params_trainable"])  # bytes: EMA + grads, AdamW m and v
    assert job_allocated > 500e6
    assert row["train"]["peak_memory_bytes"] >= before + 0.9 * job_allocated


def test_compile_failure_falls_back_to_eager(monkeypatch, capsys):
    def broken(model):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    res = bench.main(TINY + ["--compile", "--no-sample"])
    assert res["rows"][0]["compile"] == "failed->eager" and res["rows"][0]["train"]["images_per_s"] > 0
    assert "torch.compile failed on this platform" in capsys.readouterr().out


# ----- Bad input -----

@pytest.mark.parametrize("argv,msg", [
    (["--backbone", "vit"], "unknown backbone 'vit'; choose one of dit, uvit, diffit"),
    (["--backbone", "dit", "--model", "DiT-XXL/2"], "choose one of DiT-XL/2, DiT-XL/4"),
    (["--backbone", "dit", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--all", "--backbone", "dit"], "drop --backbone/--model"),
    (["--backbone", "uvit", "--model", "U-ViT-S/2", "--input-size", "33", "--no-train", "--no-sample"],
     "cannot build U-ViT-S/2"),
])
def test_bad_input_one_line_error(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--device", "cpu"])
    if e.value.code == 2:  # a bad flag value: argparse's usage, then one "error: ..." line on stderr
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: " + msg)
    else:  # a problem found while running: exits with the one-line message itself
        assert msg in str(e.value) and "\n" not in str(e.value)


# ----- Peak FLOPs table and MFU arithmetic -----

@pytest.mark.parametrize("name,key,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 80GB HBM3", "tf32", 495e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12), ("NVIDIA H100 NVL", "bf16", 835.5e12), ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA H200 NVL", "bf16", 835.5e12), ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5e12), ("NVIDIA L40S", "bf16", 362e12), ("NVIDIA L40", "bf16", 181e12),
    ("NVIDIA L4", "bf16", 121e12), ("NVIDIA A10", "bf16", 125e12), ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),
    ("NVIDIA A10G", "bf16", None), ("NVIDIA GeForce RTX 4090 D", "bf16", None), ("Tesla T4", "bf16", None)])
def test_peak_lookup_by_device_name(name, key, peak):
    # the patterns must not leak into each other: A10 is not A100 / A10G, L4 is not L40 / L40S, NVL is not SXM
    assert bench.peak_flops_by_name(name, key) == peak


def test_mfu_arithmetic():
    assert bench.mfu(1e9, 100, 1e12) == 0.6  # 3 passes x 1 GMAC x 2 FLOP x 100 img/s = 0.6 PFLOP/s of 1 PFLOP/s
    assert bench.mfu(1e9, 100, 1e12, calls=1) == 0.2 and bench.mfu(1e9, 100, None) is None
    # DiT-XL/2 (118.62 GMACs) training at 400 img/s on an H100 SXM: 284.7 TFLOP/s of 989 = 28.79%
    assert bench.mfu(118.62e9, 400, bench.peak_flops_by_name("NVIDIA H100 80GB HBM3", "bf16")) == \
        pytest.approx(0.2878543984, rel=1e-9)
    assert bench.peak_flops(torch.device("cpu"), "bf16") is None

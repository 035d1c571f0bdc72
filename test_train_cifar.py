"""
train_cifar.py end to end on the CPU, offline, on conftest.py's tiny CIFAR-10 archive: what a run writes
(checkpoints, log, grids), every backbone and formulation training, resuming and sampling through sample.py,
class-conditional and latent runs, and bad input: one line, a non-zero exit, every file left as it was.
"""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import errors
import recipes
import runs
import sample
import train_cifar
from devices import Processes
from conftest import CPU_ONLY, GENVIT_TINY, C, H, N, a_file, digest, exit_message, image, one_line_error, read_log
from conftest import same_weights, snapshot, train, write_latents

CPU = torch.device("cpu")


# ----- Training end to end -----

def test_training_writes_checkpoints_logs_grids(baseline):
    files = sorted(os.listdir(baseline))
    assert files == ["ckpt_0000010.pt", "ckpt_0000020.pt", "config.json", "latest.pt", "log.jsonl", "loss.png",
                     "samples"]                                 # no temporary files left behind
    assert sorted(os.listdir(baseline / "samples")) == ["step_0000010_ema.png", "step_0000020_ema.png"]
    assert image(baseline / "samples" / "step_0000020_ema.png").shape == (2 + 8 * 34, 2 + 8 * 34, 3)  # 8x8, 2 px gaps
    assert image(baseline / "loss.png").shape == (480, 800, 3)
    log = read_log(baseline)
    assert [r["step"] for r in log] == list(range(1, 21))
    assert set(log[0]) == {"step", "loss", "mse", "vb", "lr", "grad_norm", "img_per_s", "elapsed"}
    assert all(abs(r["loss"] - r["mse"] - r["vb"]) < 1e-5 for r in log)   # DiT: hybrid loss = mse + vb
    ck = torch.load(baseline / "latest.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 20 and ck["backbone"] == "dit" and ck["model_name"] == "DiT-Tiny"
    assert ck["model_kwargs"] == {"input_size": 32, "in_channels": 3, "num_classes": 0, "class_dropout_prob": 0.0,
                                  "learn_sigma": True, "hidden_size": 32, "depth": 2, "num_heads": 2,
                                  "patch_size": 4}
    assert ck["diffusion"] == {"formulation": "ddpm", "schedule": "linear", "timesteps": 1000, "prediction": "eps",
                               "learn_sigma": True, "loss_type": "l2", "fixed_variance": "large"}
    assert ck["args"]["lr"] == 1e-4 and ck["args"]["betas"] == [0.9, 0.999]  # DiT recipe
    assert set(ck["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert torch.load(baseline / "ckpt_0000010.pt", weights_only=True)["step"] == 10
    # EMA with EDM's ramp-up (the default): decay min(0.9999, 0.5^(20/n)) <= 0.5^(20/19) at the last of 20 steps, so
    # the EMA sits among the last steps' weights instead of next to the (zero) init
    model, ema = ck["model"]["final_layer.linear.weight"], ck["ema"]["final_layer.linear.weight"]
    assert ck["args"]["ema_rampup"] == 0.05 and ema.abs().max() > 0.3 * model.abs().max() > 0


def test_ema_without_rampup_stays_next_to_the_init(tmp_path, cifar_dir):
    train(tmp_path / "r", cifar_dir, "--steps", 20, "--ema-rampup", 0)
    ck = torch.load(tmp_path / "r" / "latest.pt", map_location="cpu", weights_only=True)
    # EMA: 0.9999 over 20 steps stays next to the init, while the raw weights moved
    model, ema = ck["model"]["final_layer.linear.weight"], ck["ema"]["final_layer.linear.weight"]
    assert model.abs().max() > 0 and ema.abs().max() < 0.01 * model.abs().max()


@pytest.mark.parametrize("backbone", ["uvit", "diffit"])
def test_other_backbones_plug_in(tmp_path, cifar_dir, backbone):
    tiny = {"uvit": ["--model", "U-ViT-Tiny", "--model-arg", "depth=2"],
            "diffit": ["--model", "DiffiT-Tiny", "--model-arg", "hidden_size=16", "--model-arg", "num_groups=4"]}
    argv = ["--backbone", backbone, *tiny[backbone], "--batch-size", "2", "--steps", "2", "--class-cond",
            "--data-dir", cifar_dir, "--out-dir", str(tmp_path / backbone), "--sample-every", "0"]
    train_cifar.main(argv)
    ck = torch.load(tmp_path / backbone / "latest.pt", weights_only=True)
    assert ck["backbone"] == backbone and ck["model_kwargs"]["num_classes"] == 10
    assert not ck["diffusion"].get("learn_sigma") and ck["diffusion"]["formulation"] == (
        "edm" if backbone == "diffit" else "ddpm")  # DiffiT trains with EDM, as its paper
    sample.main(["--ckpt", str(tmp_path / backbone / "latest.pt"), "--num-samples", "2", "--steps", "1",
                 "--cfg-scale", "2", "--out", str(tmp_path / "g.png")])
    assert image(tmp_path / "g.png").shape == (2 + 1 * 34, 2 + 2 * 34, 3)


def test_class_conditional_training_and_npz_labels(tmp_path, cifar_dir):
    out = tmp_path / "cond"
    train(out, cifar_dir, "--steps", 2, "--class-cond", "--sample-every", 2)
    assert image(out / "samples" / "step_0000002_ema.png").shape == (2 + 10 * 34, 2 + 8 * 34, 3)  # a row per class
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["model_kwargs"]["num_classes"] == 10 and ck["model_kwargs"]["class_dropout_prob"] == 0.1
    assert ck["model"]["y_embedder.embedding_table.weight"].shape == (11, 32)  # + the null row
    npz = tmp_path / "c.npz"
    args = ["--ckpt", str(out / "latest.pt"), "--num-samples", "5", "--batch-size", "4", "--steps", "2",
            "--npz", str(npz), "--out", str(tmp_path / "c.png")]
    sample.main(args + ["--cfg-scale", "1.5", "--sampler", "ddim"])
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].shape == (5,) and f["arr_1"].dtype == np.int64 and 0 <= f["arr_1"].min() <= 9
        assert f["arr_1"].max() <= 9
    sample.main(args + ["--class-label", "3", "--sampler", "ddpm", "--no-ema"])
    with np.load(npz) as f:
        assert f["arr_1"].tolist() == [3] * 5


def test_gpu_recipe_on_a_cpu_prints_the_cpu_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_cifar, "load_data", lambda args: (_ for _ in ()).throw(errors.RunError("stop here")))
    with pytest.raises(errors.RunError, match="stop here"):
        train_cifar.setup(train_cifar.parse_args(["--backbone", "uvit", "--device", "cpu"]), Processes(), CPU)
    out = capsys.readouterr().out
    assert "paper's GPU recipe" in out and train_cifar.CPU_COMMAND.format(backbone="uvit") in out


# ----- A first run on a CPU: the CPU recipe, checkpoints by time, run folders that never mix -----

def test_main_without_a_gpu_trains_the_cpu_recipe(tmp_path, cifar_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    small = {"patch_size": 4, "hidden_size": 32, "depth": 2, "num_heads": 2}  # the recipe, shrunk to a test's size
    monkeypatch.setitem(recipes.CPU_RECIPES, "dit", dict(recipes.CPU_RECIPES["dit"], steps=2, batch_size=4,
                                                         model_arg=small, sample_every=2, sample_steps=2))
    monkeypatch.chdir(tmp_path)
    train_cifar.main(["--backbone", "dit", "--data-dir", cifar_dir])
    said = [line for line in capsys.readouterr().out.splitlines() if "CPU" in line]
    assert len(said) == 1 and said[0].startswith("no GPU: the CPU-sized recipe (DiT-Tiny at batch 4 for 2 steps")
    assert "--paper-recipe trains the paper's DiT-S/2 for 500,000 steps" in said[0]
    run = tmp_path / "runs" / "dit-DiT-Tiny-cifar10-cond-depth=2-hidden_size=32-num_heads=2-patch_size=4"
    ck = torch.load(run / "latest.pt", weights_only=True)
    assert ck["args"]["recipe"] == "cpu" and ck["model_kwargs"]["num_classes"] == 10
    assert image(run / "samples" / "step_0000002_ema.png").shape == (2 + 10 * 34, 2 + 8 * 34, 3)  # a row per class


def test_cpu_notes_fit_the_dataset(monkeypatch, capsys):
    monkeypatch.setattr(train_cifar, "load_data", lambda args: (_ for _ in ()).throw(errors.RunError("stop here")))
    for argv in (["--dataset", "latents", "--data-dir", "lat256"], ["--dataset", "folder", "--data-dir", "pets"]):
        with pytest.raises(errors.RunError, match="stop here"):
            train_cifar.setup(train_cifar.parse_args(["--backbone", "dit", "--device", "cpu", *argv], gpu=False),
                              Processes(), CPU)
        out = capsys.readouterr().out
        assert f"python train_cifar.py --backbone dit {' '.join(argv)} --model DiT-Tiny" in out
        assert "cifar" not in out.replace("train_cifar.py", "") and "--class-cond" not in out  # maybe no classes


def test_checkpoints_by_time(tmp_path, cifar_dir, monkeypatch):
    """--ckpt-minutes 1, steps of 25 s (a fake clock): latest.pt and a log record at 75 s and 150 s, and the end."""
    clock, saved, real_ema, real_save = [1000.0], [], train_cifar.update_ema, runs.Run.save

    def ema_of_a_25_s_step(*a):
        clock[0] += 25.0
        return real_ema(*a)
    monkeypatch.setattr(runs.time, "time", lambda: clock[0])
    monkeypatch.setattr(train_cifar, "update_ema", ema_of_a_25_s_step)
    monkeypatch.setattr(runs.Run, "save", lambda self, elapsed: (saved.append(self.step), real_save(self, elapsed)))
    out = tmp_path / "timed"
    train(out, cifar_dir, "--steps", 8, "--ckpt-every", 100, "--log-every", 100, "--ckpt-minutes", 1)
    assert saved == [3, 6, 8] and [r["step"] for r in read_log(out)] == [3, 6, 8]
    assert torch.load(out / "latest.pt", weights_only=True)["elapsed"] == 200.0
    saved.clear()
    train(tmp_path / "steps", cifar_dir, "--steps", 8, "--ckpt-every", 100, "--log-every", 100, "--ckpt-minutes", 0)
    assert saved == [8]


def test_run_folders_never_mix(tmp_path, cifar_dir, monkeypatch, capsys):
    """The default folder names the formulation (if not the recipe's), --hybvit and every --model-arg; an explicit
    --out-dir of another run is a one-line refusal; an older version's folder of the same run is continued."""
    monkeypatch.chdir(tmp_path)
    tiny = GENVIT_TINY + ["--data-dir", cifar_dir, "--steps", "2"]
    name = lambda *argv: train_cifar.default_out_dir(train_cifar.parse_args(tiny + list(argv)))  # noqa: E731
    base, sizes = os.path.join("runs", "genvit-GenViT-Tiny-cifar10"), "-depth=2-hidden_size=32"
    plain_run = name()
    assert plain_run == base + sizes and name("--formulation", "ddpm") == plain_run  # the recipe's own formulation
    assert name("--hybvit") == base + "-hybvit" + sizes and name("--formulation", "edm") == base + "-edm" + sizes
    train_cifar.main(tiny)
    train_cifar.main(tiny + ["--hybvit"])  # a HybViT run of its own, not a silent resume of the plain one
    assert torch.load(name("--hybvit") + "/latest.pt", weights_only=True)["args"]["hybvit"]
    with pytest.raises(SystemExit) as e:
        train_cifar.main(tiny + ["--hybvit", "--out-dir", plain_run, "--steps", "4"])
    assert "is from another config (hybvit False != True)" in one_line_error(e, capsys)


def test_an_older_version_folder_of_the_same_run_is_continued(tmp_path, cifar_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = GENVIT_TINY + ["--data-dir", cifar_dir, "--hybvit"]
    old = os.path.join("runs", "genvit-GenViT-Tiny-cifar10")  # the name before --hybvit and --model-arg counted
    train_cifar.main(tiny + ["--steps", "2", "--out-dir", old])  # as an older version named this HybViT run
    assert train_cifar.default_out_dir(train_cifar.parse_args(tiny)) == old
    train_cifar.main(tiny + ["--steps", "3"])
    assert f"resumed from {os.path.join(old, 'latest.pt')} at step 2" in capsys.readouterr().out
    assert os.listdir("runs") == ["genvit-GenViT-Tiny-cifar10"]
    edm = train_cifar.parse_args(GENVIT_TINY + ["--data-dir", cifar_dir, "--formulation", "edm"])
    assert train_cifar.default_out_dir(edm) != old  # another run's folder is never taken over


def test_a_checkpoint_from_before_the_ema_rampup_resumes_as_it_was_trained(tmp_path, cifar_dir, capsys):
    full, old = tmp_path / "full", tmp_path / "old"
    train(full, cifar_dir, "--steps", 6, "--ema-rampup", 0)
    train(old, cifar_dir, "--steps", 3, "--ema-rampup", 0)
    ck = torch.load(old / "latest.pt", weights_only=True)
    del ck["args"]["ema_rampup"]  # as an older version wrote it
    torch.save(ck, old / "latest.pt")
    train(old, cifar_dir, "--steps", 6)  # today's defaults would ramp the EMA up
    assert "predates the EMA ramp-up (--ema-rampup); it continues with a constant" in capsys.readouterr().out
    assert same_weights(old / "latest.pt", full / "latest.pt")


def test_ctrl_c_during_setup_is_not_called_a_second_one(tmp_path, cifar_dir, monkeypatch):
    monkeypatch.setattr(train_cifar, "load_data", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "r", cifar_dir, "--steps", 2)
    assert e.value.code == "stopped before training began (Ctrl-C); rerun the command to start"


def test_truncated_latest_advice_names_a_checkpoint_that_exists(tmp_path, existing, cifar_dir, capsys):
    short = tmp_path / "short"
    train(short, cifar_dir, "--steps", 2)  # --keep-every 0: no kept checkpoint
    for out, then in [(short, "rerun to start the run again (it kept no ckpt_XXXXXXX.pt)"),
                      (existing, f"resume its newest kept checkpoint, --resume {existing / 'ckpt_0000020.pt'}")]:
        (out / "latest.pt").write_bytes(b"garbage")
        with pytest.raises(SystemExit) as e:
            train(out, cifar_dir, "--steps", 30)
        assert f"move it aside (mv {out / 'latest.pt'} {out / 'latest.pt'}.bad) and {then}" in one_line_error(e, capsys)


# ----- Formulations: every one trains, resumes bit-exactly and samples through sample.py -----

@pytest.mark.parametrize("formulation", ["edm", "flow"])
def test_formulation_run_resumes_exactly_and_samples(tmp_path, cifar_dir, capsys, formulation):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--formulation", formulation, "--sample-every", "0"]
    train(full, cifar_dir, "--steps", 6, *args)
    train(part, cifar_dir, "--steps", 3, *args)
    train(part, cifar_dir, "--steps", 6, *args)              # resumed from step 3
    assert [r["loss"] for r in read_log(part)] == [r["loss"] for r in read_log(full)]
    a, b = (torch.load(p / "latest.pt", weights_only=True) for p in (part, full))
    assert a["diffusion"] == {**b["diffusion"]} and a["diffusion"]["formulation"] == formulation
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    with pytest.raises(SystemExit) as e:                     # resuming under another formulation is refused
        train(part, cifar_dir, "--steps", 8, "--sample-every", "0")
    assert "diffusion.formulation" in exit_message(e, capsys)
    npz = tmp_path / "s.npz"
    sample.main(["--ckpt", str(full / "latest.pt"), "--num-samples", "2", "--steps", "2", "--npz", str(npz),
                 "--out", str(tmp_path / "g.png")])
    assert f"{'heun' if formulation == 'edm' else 'euler'} 2 steps" in capsys.readouterr().out
    with np.load(npz) as f:
        assert f["arr_0"].shape == (2, 32, 32, 3) and f["arr_0"].dtype == np.uint8


@pytest.mark.parametrize("formulation", ["edm", "flow"])
def test_genvit_trains_with_every_formulation(tmp_path, cifar_dir, formulation):
    train_cifar.main(GENVIT_TINY + ["--data-dir", cifar_dir, "--steps", "2", "--formulation", formulation,
                                    "--out-dir", str(tmp_path / formulation)])
    ck = torch.load(tmp_path / formulation / "latest.pt", weights_only=True)
    assert ck["diffusion"]["formulation"] == formulation and ck["diffusion"]["loss_type"] == "l1"


# ----- Latent runs: an extract_latents.py folder, grids decoded by the VAE named in meta.json -----

LATENT_TINY = ["--backbone", "dit", "--model", "DiT-S/2", "--model-arg", "hidden_size=32", "--model-arg", "depth=1",
               "--model-arg", "num_heads=2", "--batch-size", "4", "--log-every", "1", "--ckpt-every", "3",
               "--keep-every", "0", "--sample-steps", "2", "--sampler", "ddim"]


def test_latent_run_decodes_grids_and_sample_py_makes_images(tmp_path, tiny_vae, capsys):
    folder = write_latents(str(tmp_path / "lat"), tiny_vae)
    out = tmp_path / "run"
    train_cifar.main(LATENT_TINY + ["--dataset", "latents", "--data-dir", folder, "--out-dir", str(out), "--steps", "3",
                                    "--sample-every", "3"])
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["model_kwargs"]["num_classes"] == 3 and ck["model_kwargs"]["class_dropout_prob"] == 0.1  # default cond
    assert ck["data"]["vae"] == tiny_vae and ck["args"]["sampler"] == "ddim"
    assert ck["model_kwargs"]["in_channels"] == C and ck["model_kwargs"]["input_size"] == H
    from PIL import Image
    with Image.open(out / "samples" / "step_0000003_ema.png") as img:  # 3 classes x 8, decoded to 16x16 images
        assert img.size == (2 + 8 * 18, 2 + 3 * 18)
    npz = tmp_path / "s.npz"
    sample.main(["--ckpt", str(out / "latest.pt"), "--num-samples", "3", "--steps", "2", "--npz", str(npz),
                 "--out", str(tmp_path / "g.png")])
    with np.load(npz) as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_0"].dtype == np.uint8 and f["arr_1"].max() < 3


# ----- Bad input: one line, non-zero exit, nothing overwritten -----

@pytest.fixture
def run_with_ckpt(tmp_path, baseline):
    out = tmp_path / "existing"
    shutil.copytree(baseline, out)
    return out, digest(out / "latest.pt")


@pytest.mark.parametrize("extra, expect", [
    (["--backbone", "nope"], "invalid choice: 'nope'"),
    (["--model", "DiT-Huge/2"], "unknown dit model 'DiT-Huge/2'; choose one of DiT-XL/2"),
    (["--model-arg", "patch_size=3"], "input_size=32 must be a multiple of patch_size=3"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model-arg", "depth=3"], "is from another config (model_kwargs.depth 2 != 3)"),
    (["--backbone", "uvit", "--model", "U-ViT-Tiny"], "is from another config (backbone 'dit' != 'uvit'"),
    (["--class-cond"], "model_kwargs.num_classes 0 != 10"),
    (["--resume", "never"], "already holds a run (latest.pt); use --resume auto"),
    (["--keep-every", "15"], "--keep-every 15 must be a multiple of --ckpt-every 10"),
])
def test_bad_input_exits_with_one_line_and_keeps_the_checkpoint(run_with_ckpt, cifar_dir, capsys, extra, expect):
    out, before = run_with_ckpt
    with pytest.raises(SystemExit) as e:
        train(out, cifar_dir, "--steps", 30, *extra)
    msg = exit_message(e, capsys)
    assert expect in msg.strip().splitlines()[-1]                # the message is its last (or only) line
    assert isinstance(e.value.code, int) or "\n" not in msg
    if "invalid choice" in expect:
        assert all(name in msg for name in ("dit", "uvit", "diffit"))
    assert digest(out / "latest.pt") == before and sorted(os.listdir(out / "samples")) == [
        "step_0000010_ema.png", "step_0000020_ema.png"]


def without_rng(existing, tmp_path):
    ck = torch.load(existing / "latest.pt", weights_only=True)
    del ck["rng"]
    torch.save(ck, tmp_path / "no_rng.pt")
    return ["--resume", str(tmp_path / "no_rng.pt"), "--out-dir", str(tmp_path / "fresh")]


def non_square_latents(existing, tmp_path):
    np.savez(tmp_path / "z.npz", latents=np.zeros((4, 4, 8, 6), np.float32))
    return ["--dataset", "latents", "--data-dir", str(tmp_path / "z.npz"), "--out-dir", str(tmp_path / "z")]


def bomb_folder(existing, tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "imgs" / "bomb.png")  # 4096 px > 2 x the limit set below
    Image.MAX_IMAGE_PIXELS = 1000
    return ["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--out-dir", str(tmp_path / "b")]


TRAIN_BAD = [
    (lambda e, t: ["--out-dir", a_file(e, t)], "is a file, not a folder"),
    (lambda e, t: ["--out-dir", os.path.join(a_file(e, t), "sub")], "plain.txt is a file, not a folder"),
    (lambda e, t: ["--data-dir", a_file(e, t), "--out-dir", str(t / "x")], "is a file; give the folder"),
    pytest.param(lambda e, t: ["--device", "cuda"], "no CUDA GPU is visible", marks=CPU_ONLY),
    (lambda e, t: ["--device", "foo"], "--device 'foo' is not a device"),
    (lambda e, t: ["--betas", "1.5", "0.9"], "--betas must both lie in [0, 1)"),
    (lambda e, t: ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (lambda e, t: ["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (lambda e, t: ["--lr", "nan"], "--lr must be a finite number > 0"),
    pytest.param(lambda e, t: ["--precision", "fp16"], "--precision fp16 needs a CUDA device", marks=CPU_ONLY),
    (without_rng, "that can be resumed (missing ['rng'])"),
    (non_square_latents, "must be (N >= 1, C, S, S), square"),
    (bomb_folder, "bomb.png (DecompressionBombError"),
    (lambda e, t: ["--model-arg", "attention=xyz"], "attention is set by --attention sdpa|math, not --model-arg"),
    (lambda e, t: ["--model-arg", "learn_sigma=False"], "learn_sigma is set by --learn-sigma, not --model-arg"),
    (lambda e, t: ["--formulation", "edm", "--schedule", "cosine"], "--schedule and --fixed-variance are DDPM options"),
    (lambda e, t: ["--formulation", "flow", "--fixed-variance", "small"], "are DDPM options; --formulation flow"),
    (lambda e, t: ["--batch-size", "100000000"], "a batch of 100000000 needs about"),  # measured, not OOM-killed
]


@pytest.mark.parametrize("extra, expect", TRAIN_BAD)
def test_train_bad_input(existing, tmp_path, cifar_dir, capsys, monkeypatch, extra, expect):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after bomb_folder
    argv = extra(existing, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        train(existing, cifar_dir, "--steps", 30, *argv)
    assert expect in one_line_error(e, capsys)
    assert snapshot(tmp_path) == before  # nothing written, nothing changed (no config.json either)


@pytest.mark.parametrize("problem, expect", [
    ("no_meta", "has no meta.json: not an extract_latents.py output"),
    ("incomplete", "incomplete or unknown latents folder"),
    ("shape", "do not match meta.json"),
    ("channels", "the data are 4 x 8 x 8 but DiT-S/2 was built for 3 x 8 x 8"),
    ("empty", "has no meta.json"),
])
def test_bad_latent_folders_are_one_line(tmp_path, tiny_vae, problem, expect):
    folder = str(tmp_path / "lat")
    extra = []
    if problem == "empty":
        os.makedirs(folder)
    else:
        write_latents(folder, tiny_vae, **({"complete": False} if problem == "incomplete" else {}))
    if problem == "no_meta":
        os.remove(os.path.join(folder, "meta.json"))
    elif problem == "shape":
        np.save(os.path.join(folder, "labels.npy"), np.zeros(N - 1, np.int64))
    elif problem == "channels":
        extra = ["--model-arg", "in_channels=3"]
    before = sorted(os.listdir(folder))
    with pytest.raises(SystemExit) as e:
        train_cifar.main(LATENT_TINY + ["--dataset", "latents", "--data-dir", folder, "--out-dir", str(tmp_path / "r"),
                                        "--steps", "1", *extra])
    msg = e.value.code
    assert isinstance(msg, str) and expect in msg and "\n" not in msg
    assert sorted(os.listdir(folder)) == before and not (tmp_path / "r").exists()

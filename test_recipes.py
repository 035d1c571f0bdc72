"""
recipes.py: each backbone's paper recipe (pixels and latents) as train_cifar.py resolves it, flags overriding it,
and the recipe checks that refuse flags which do not fit.
"""
import pytest
import torch

import backbones
import recipes
import train_cifar


def test_recipes_are_the_papers_and_flags_override_them():
    uvit = train_cifar.parse_args(["--backbone", "uvit"])
    assert (uvit.model, uvit.lr, uvit.weight_decay, uvit.betas, uvit.warmup, uvit.batch_size, uvit.steps,
            uvit.ema_decay, uvit.learn_sigma) == ("U-ViT-S/2", 2e-4, 0.03, [0.99, 0.999], 2500, 128, 500_000,
                                                 0.9999, False)
    dit = train_cifar.parse_args(["--backbone", "dit", "--lr", "3e-4", "--no-learn-sigma"])
    assert (dit.model, dit.lr, dit.weight_decay, dit.warmup, dit.learn_sigma) == ("DiT-S/2", 3e-4, 0.0, 0, False)
    assert train_cifar.parse_args(["--backbone", "diffit"]).model == "DiffiT-CIFAR"
    # the default U-ViT is the paper's CIFAR-10 U-ViT-S/2: 44,255,328 parameters (U-ViT Table 1; official
    # libs/uvit.py count)
    with torch.device("meta"):
        model = backbones.build_model("uvit", "U-ViT-S/2", input_size=32, in_channels=3, num_classes=0,
                                        class_dropout_prob=0.0, learn_sigma=False)
    assert sum(p.numel() for p in model.parameters()) == 44_255_328


def test_latent_recipes_are_the_papers():
    dit = train_cifar.parse_args(["--backbone", "dit", "--dataset", "latents"])
    assert (dit.model, dit.lr, dit.weight_decay, dit.batch_size, dit.ema_decay, dit.learn_sigma, dit.sampler,
            dit.sample_steps) == ("DiT-XL/2", 1e-4, 0.0, 256, 0.9999, True, "ddpm", 250)
    uvit = train_cifar.parse_args(["--backbone", "uvit", "--dataset", "latents"])
    assert (uvit.model, uvit.schedule, uvit.betas, uvit.batch_size) == ("U-ViT-H/2", "scaled_linear", [0.99, 0.99],
                                                                        1024)
    assert train_cifar.parse_args(["--backbone", "diffit", "--dataset", "latents"]).lr == 3e-4


def test_recipe_is_genvits():
    a = train_cifar.parse_args(["--backbone", "genvit"])
    got = {k: getattr(a, k) for k in ("model", "steps", "batch_size", "lr", "weight_decay", "warmup", "grad_clip",
                                      "ema_decay", "schedule", "loss_type", "lr_schedule", "min_lr",
                                      "fixed_variance", "sampler", "sample_steps", "formulation", "class_cond")}
    assert got == dict(model="GenViT-CIFAR", steps=195_000, batch_size=128, lr=1e-3, weight_decay=0.05, warmup=3900,
                       grad_clip=1.0, ema_decay=0.999, schedule="cosine", loss_type="l1", lr_schedule="cosine",
                       min_lr=1e-6, fixed_variance="small", sampler="ddpm", sample_steps=1000, formulation="ddpm",
                       class_cond=False)
    assert a.betas == [0.9, 0.999]
    edm = train_cifar.parse_args(["--backbone", "genvit", "--formulation", "edm"])  # the recipe's DDPM sampler
    assert (edm.sampler, edm.sample_steps, edm.loss_type) == ("heun", 18, "l1")   # does not carry over
    dit = train_cifar.parse_args(["--backbone", "dit"])
    assert (dit.loss_type, dit.lr_schedule, dit.fixed_variance, dit.schedule) == ("l2", "constant", "large", "linear")


@pytest.mark.parametrize("argv, expect", [
    (["--backbone", "genvit", "--class-cond"], "denoiser is unconditional"),
    (["--backbone", "dit", "--hybvit"], "--hybvit is HybViT's objective: it needs --backbone genvit"),
    (["--backbone", "genvit", "--hybvit", "--dataset", "latents"], "classifier on images"),
    (["--backbone", "genvit", "--min-lr", "0.1"], "--min-lr must lie in [0, --lr]"),
])
def test_bad_genvit_flags(argv, expect, capsys):
    with pytest.raises(SystemExit):
        train_cifar.parse_args(argv)
    assert expect in capsys.readouterr().err


def test_ckpt_every_alone_needs_no_keep_every():
    args = train_cifar.parse_args(["--backbone", "dit", "--ckpt-every", "3000"])
    assert args.keep_every == 30_000  # the default follows --ckpt-every (10 checkpoints per kept one)


@pytest.mark.parametrize("backbone", ["dit", "uvit", "diffit", "genvit"])
def test_no_gpu_picks_the_cpu_recipe_unless_the_paper_is_asked_for(backbone):
    cpu, paper = (train_cifar.parse_args(["--backbone", backbone], gpu=g) for g in (False, True))
    want = recipes.CPU_RECIPES[backbone]
    assert (cpu.recipe, cpu.model, cpu.steps, cpu.batch_size, cpu.warmup, cpu.lr) == (
        "cpu", want["model"], want["steps"], want["batch_size"], want["warmup"], want["lr"])
    assert cpu.class_cond == (backbone != "genvit") and cpu.model_arg == want.get("model_arg", {})
    assert cpu.warmup <= cpu.steps // 10 and cpu.sample_every < cpu.steps and cpu.ema_rampup == 0.05
    assert cpu.formulation == paper.formulation and cpu.ema_decay == paper.ema_decay  # the paper's, sized down
    # with a GPU nothing changes: the paper's recipe, as parse_args gives it everywhere (test above)
    assert paper.recipe == "paper" and vars(paper) == vars(train_cifar.parse_args(["--backbone", backbone]))
    assert paper.model == recipes.RECIPES[backbone]["model"] and paper.model_arg == {}
    for forced in (["--paper-recipe"], ["--model", paper.model], ["--steps", "10"], ["--dataset", "latents"]):
        args = train_cifar.parse_args(["--backbone", backbone, *forced], gpu=False)
        assert args.recipe == "paper" and args.model == recipes.paper_recipe(backbone, args.dataset)["model"]


def test_inherited_warmups_fit_short_runs():
    """The papers' warm-ups (U-ViT 2.5k, DiffiT 19.5k, GenViT 3.9k steps) are at most a tenth of a shorter run."""
    tiny = [("uvit", "U-ViT-Tiny"), ("diffit", "DiffiT-Tiny"), ("genvit", "GenViT-Tiny"), ("dit", "DiT-Tiny")]
    got = [train_cifar.parse_args(["--backbone", b, "--model", m, "--steps", "800"]).warmup for b, m in tiny]
    assert got == [80, 80, 80, 0]
    assert train_cifar.parse_args(["--backbone", "uvit", "--steps", "800", "--warmup", "500"]).warmup == 500


def test_cpu_recipe_spelled_out_is_the_cpu_recipe():
    """recipe_flags: the flags that turn the paper's recipe into the CPU one give the same settings anywhere."""
    for b in recipes.CPU_RECIPES:
        flags = recipes.recipe_flags(recipes.CPU_RECIPES[b], recipes.RECIPES[b]).split()
        spelled = train_cifar.parse_args(["--backbone", b, *flags], gpu=True)
        cpu = train_cifar.parse_args(["--backbone", b], gpu=False)
        assert {**vars(spelled), "recipe": "cpu"} == vars(cpu)


def test_a_bad_model_is_refused_before_any_data_load(monkeypatch, capsys):
    monkeypatch.setattr(train_cifar, "load_data", lambda args: pytest.fail("data loaded before --model was checked"))
    with pytest.raises(SystemExit):
        train_cifar.main(["--backbone", "uvit", "--model", "U-ViT-Huge", "--data-dir", "nowhere"])
    assert "unknown uvit model 'U-ViT-Huge'; choose one of" in capsys.readouterr().err

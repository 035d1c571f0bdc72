"""Each paper's training recipe per backbone, on pixels (RECIPES) and on VAE latents (LATENT_RECIPES), and a
CPU-sized one (CPU_RECIPES), as plain dicts: train_cifar.py's defaults (resolve), and what bench.py measures."""
import argparse
import importlib

from backbones import BACKBONES, build_error
from diffusion import make_diffusion
from errors import RunError

# ----- Each paper's recipes (train_cifar.py's defaults; bench.py measures the same models) -----

RECIPES = {
    # DiT (Peebles & Xie §4 "Training"; facebookresearch/DiT train.py @ ed81ce2): AdamW lr 1e-4, wd 0, betas
    # (0.9, 0.999), no warm-up, no clipping, EMA 0.9999, learn_sigma with the hybrid loss, linear schedule. Ours:
    # DiT-S/2 (33M params, 256 tokens at 32x32x3) because it matches U-ViT-S/2 (44M, 256 tokens) in size; B/2 is
    # 130M and ~4x the compute per step. Batch 128 on one GPU (official: 256 global). 500k steps = U-ViT's
    # CIFAR-10 budget (DiT reports no CIFAR-10 run).
    "dit": dict(model="DiT-S/2", steps=500_000, batch_size=128, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999),
                warmup=0, grad_clip=0.0, ema_decay=0.9999, learn_sigma=True, formulation="ddpm"),
    # U-ViT CIFAR-10 (Bao et al. App. B; baofff/U-ViT configs/cifar10_uvit_small.py @ ce55170): U-ViT-S/2, AdamW
    # lr 2e-4, wd 0.03, betas (0.99, 0.999), batch 128, 2.5k warm-up then constant, 500k steps, EMA 0.9999,
    # eps-prediction, no clipping. The official run is a continuous VP-SDE; here the discrete linear schedule.
    "uvit": dict(model="U-ViT-S/2", steps=500_000, batch_size=128, lr=2e-4, weight_decay=0.03, betas=(0.99, 0.999),
                 warmup=2500, grad_clip=0.0, ema_decay=0.9999, learn_sigma=False, formulation="ddpm"),
    # DiffiT-CIFAR (DiffiT App. I.1): EDM training and EDM's Heun sampler (18 steps), Adam lr 1e-3, batch 512,
    # 200k iterations; where the paper is silent, EDM's CIFAR-10 recipe (Karras et al. 2022, train.py defaults):
    # lr ramp-up over 10 Mimg (19,531 steps at 512), EMA half-life 0.5 Mimg (decay 0.5^(512/500k) per step),
    # dropout 0.13 (the DiffiT-CIFAR default). EDM trains 200 Mimg; the paper's 200k x 512 = 102.4 Mimg is kept.
    "diffit": dict(model="DiffiT-CIFAR", steps=200_000, batch_size=512, lr=1e-3, weight_decay=0.0,
                   betas=(0.9, 0.999), warmup=19_531, grad_clip=0.0, ema_decay=0.5 ** (512 / 500_000),
                   learn_sigma=False, formulation="edm"),
    # GenViT (Yang et al. 2022; sndnyang/Diffusion_ViT gevit_main.py, utils/scheduler.py, diffusion.py @ 84a4cfe):
    # AdamW lr 1e-3, wd 0.05, batch 128, 500 epochs = 195k steps (390 per epoch), 10 warm-up epochs from 1e-6
    # then cosine to 1e-6, per step; clip 1.0, EMA 0.999; cosine schedule, L1 eps loss, 1000-step ancestral
    # sampling with the posterior ("small", clipped) variance. HybViT adds --hybvit (100 L_diff + CE).
    "genvit": dict(model="GenViT-CIFAR", steps=195_000, batch_size=128, lr=1e-3, weight_decay=0.05,
                   betas=(0.9, 0.999), warmup=3_900, grad_clip=1.0, ema_decay=0.999, learn_sigma=False,
                   formulation="ddpm", schedule="cosine", loss_type="l1", lr_schedule="cosine", min_lr=1e-6,
                   fixed_variance="small", sampler="ddpm", sample_steps=1000),
}
# On latents from extract_latents.py (256x256 images -> 4x32x32), each paper's ImageNet-256 recipe.
LATENT_RECIPES = {
    # DiT §4 / train.py: DiT-XL/2, AdamW lr 1e-4, no weight decay, global batch 256, EMA 0.9999, learned sigma,
    # linear schedule; evaluated with 250-step DDPM. 400k steps = the paper's scaling-study length (XL/2: 7M).
    "dit": dict(model="DiT-XL/2", steps=400_000, batch_size=256, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999),
                warmup=0, grad_clip=0.0, ema_decay=0.9999, learn_sigma=True, schedule="linear", sampler="ddpm",
                sample_steps=250, formulation="ddpm"),
    # U-ViT Table / configs/imagenet256_uvit_huge.py: U-ViT-H/2, AdamW lr 2e-4, wd 0.03, betas (0.99, 0.99), batch
    # 1024, 5k warm-up, 500k steps, EMA 0.9999, label dropout 0.1, the discrete scaled-linear schedule
    # (train_ldm_discrete.py); DPM-Solver 50 steps.
    "uvit": dict(model="U-ViT-H/2", steps=500_000, batch_size=1024, lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99),
                 warmup=5000, grad_clip=0.0, ema_decay=0.9999, learn_sigma=False, schedule="scaled_linear",
                 sampler="dpm++2m", sample_steps=50, formulation="ddpm"),
    # DiffiT App. I.2: DiffiT-XL/2, lr 3e-4, batch 256, EMA 0.9999, ADM's diffusion (linear, learned sigma); the
    # optimizer and length are not stated: AdamW without weight decay (DiT's) and DiT's 400k steps are ours.
    "diffit": dict(model="DiffiT-XL/2", steps=400_000, batch_size=256, lr=3e-4, weight_decay=0.0,
                   betas=(0.9, 0.999), warmup=0, grad_clip=0.0, ema_decay=0.9999, learn_sigma=True,
                   schedule="linear", sampler="ddpm", sample_steps=250,
                   formulation="ddpm"),
    # GenViT reports no latent model: its CIFAR-10 recipe and size on the 32x32x4 latents (patch 4: 64 tokens).
    "genvit": RECIPES["genvit"],
}
# Text-to-image (U-ViT only; --dataset captions: pixels or extract_latents.py latents with captions).
TEXT_RECIPES = {
    # U-ViT §4.4 / configs/mscoco_uvit_small.py + train_t2i_discrete.py @ ce55170: U-ViT-S/2 on MS-COCO latents, AdamW
    # lr 2e-4, wd 0.03, betas (0.9, 0.9), batch 256, 5k warm-up, 1M steps, EMA 0.9999, the discrete scaled-linear
    # schedule, context dropout 0.1; the empty-prompt context for guidance (official scale 1 = our 2), 50 steps.
    "captions": dict(model="U-ViT-S/2-T2I", steps=1_000_000, batch_size=256, lr=2e-4, weight_decay=0.03,
                     betas=(0.9, 0.9), warmup=5000, grad_clip=0.0, ema_decay=0.9999, learn_sigma=False,
                     schedule="scaled_linear", sampler="dpm++2m", sample_steps=50, grid_cfg_scale=2.0,
                     formulation="ddpm", class_cond=True),
    # The CPU demo: CIFAR-10 captioned from templates, U-ViT-Tiny-T2I with a small CLIP text tower (README).
    "cifar10-captions": dict(RECIPES["uvit"], model="U-ViT-Tiny-T2I", model_arg={"patch_size": 4, "conv": False},
                             class_cond=True, steps=1400, batch_size=64, lr=1e-3, betas=(0.9, 0.999), warmup=50,
                             prediction="v", sampler="dpm++2m", sample_steps=25, grid_cfg_scale=3.0,
                             sample_every=700, ckpt_every=200),
}
# ----- CPU-sized recipes: what `train_cifar.py --backbone X` trains on a machine without a GPU -----
# Each paper's recipe cut to show class-conditional CIFAR-10 samples (a grid row per class) on 2 CPU cores in
# 8-12 minutes (measured: README, "What a CPU can do"). Common to all: the backbone's Tiny model at patch 4 (64
# tokens, a quarter of patch 2's work per image), labels (GenViT's denoiser has none), about one epoch, a warm-up of
# a few percent of the run (the papers' would never end), a grid half-way and at the end (guided, cfg 3: a row per
# class that looks like its class), a checkpoint every few minutes. The EMA ramp-up (training.ema_decay) makes the
# EMA of so short a run an average of its last steps.
CPU_RECIPES = {
    # DiT's recipe (AdamW, no weight decay, learned sigma) at lr 1e-3: 1e-4 is tuned for 400k steps of DiT-XL/2.
    "dit": dict(RECIPES["dit"], model="DiT-Tiny", model_arg={"patch_size": 4}, class_cond=True, steps=1200,
                batch_size=64, lr=1e-3, warmup=50, sampler="dpm++2m", sample_steps=25, grid_cfg_scale=3.0,
                sample_every=600, ckpt_every=200),
    # U-ViT's: beta1 0.9, not 0.99 (a 100-step memory is too long for 1k steps); no output conv (its random init
    # costs a short run most of its progress); v-prediction (Salimans & Ho 2022, §4), not eps: at high noise eps
    # must reproduce the input patch, whose scale U-ViT's final LayerNorm takes away, and the sampler multiplies that
    # error by up to 156 in x0: saturated 4x4 patches after 1k steps (README, "What a CPU can do").
    "uvit": dict(RECIPES["uvit"], model="U-ViT-Tiny", model_arg={"patch_size": 4, "conv": False}, class_cond=True,
                 steps=1400, batch_size=64, lr=1e-3, betas=(0.9, 0.999), warmup=50, prediction="v",
                 sampler="dpm++2m", sample_steps=25, grid_cfg_scale=3.0, sample_every=700, ckpt_every=200),
    # DiffiT's EDM recipe (Adam lr 1e-3, Heun 18 steps) on DiffiT-Tiny, a U-shape already sized for a CPU.
    "diffit": dict(RECIPES["diffit"], model="DiffiT-Tiny", class_cond=True, steps=1500, batch_size=32, warmup=100,
                   sampler="heun", sample_steps=18, grid_cfg_scale=3.0, sample_every=750, ckpt_every=250),
    # GenViT's (L1, cosine schedule and lr, clip 1): unconditional as the paper; 100 of its 1000 DDPM steps.
    "genvit": dict(RECIPES["genvit"], model="GenViT-Tiny", steps=4000, batch_size=64, warmup=100, sample_steps=100,
                   sample_every=2000, ckpt_every=1000),
}
# What a recipe leaves unset: DDPM's linear schedule and eps-prediction, L2 loss, constant LR after the warm-up, ADM's
# 'large' variance; EDM's EMA ramp-up (training.ema_decay), grids and checkpoints every 5000 steps.
RECIPE_DEFAULTS = dict(schedule="linear", prediction="eps", loss_type="l2", lr_schedule="constant", min_lr=0.0,
                       fixed_variance="large", ema_rampup=0.05, sample_every=5000, ckpt_every=5000, grid_cfg_scale=1.0)
# The recipe's sampler, its step count and DDPM variance belong to its formulation: another one drops them.
OWN_FORMULATION = ("sampler", "sample_steps", "fixed_variance", "prediction")


def first(*values):
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def paper_recipe(backbone, dataset):
    """The backbone's recipe on latents (dataset 'latents'), captions (TEXT_RECIPES) or pixels."""
    return TEXT_RECIPES[dataset] if dataset in TEXT_RECIPES else (LATENT_RECIPES if dataset == "latents" else
                                                                   RECIPES)[backbone]


def resolve(args, gpu=True):
    """A new Namespace: train_cifar.py's unset (None) flags from the recipe (without a GPU, CIFAR-10 takes the CPU one
    unless --paper-recipe, --model or --steps), then RECIPE_DEFAULTS. Misfitting flags, an unknown --model: RunError."""
    cpu = not (gpu or args.paper_recipe or args.model or args.steps is not None) and args.dataset == "cifar10"
    paper = TEXT_RECIPES[args.dataset] if args.dataset in TEXT_RECIPES else (
        CPU_RECIPES if cpu else LATENT_RECIPES if args.dataset == "latents" else RECIPES)[args.backbone]
    formulation = first(args.formulation, paper["formulation"])
    if formulation != paper["formulation"]:
        paper = {k: v for k, v in paper.items() if k not in OWN_FORMULATION}
    recipe = {**RECIPE_DEFAULTS, **paper, "formulation": formulation}
    if formulation != "ddpm":
        recipe["learn_sigma"] = False  # learned variances are DDPM's (Improved DDPM); EDM and flows have none
    new = {k: first(getattr(args, k), v) for k, v in recipe.items() if k not in ("model_arg", "class_cond")}
    if args.backbone == "genvit" or args.hybvit or args.dataset in TEXT_RECIPES:
        check_backbone(args)
    if new["model"] not in importlib.import_module(BACKBONES[args.backbone]).MODELS:  # before any data load
        raise build_error(args.backbone, new["model"], None)
    diffusion = make_diffusion(formulation=formulation)
    if args.sampler is not None:
        check_sampler(args.sampler, diffusion, formulation)
    sampler = first(args.sampler, recipe.get("sampler"), diffusion.default_sampler)
    if formulation != "ddpm" and (new["learn_sigma"] or args.prediction not in (None, "eps") or args.schedule
                                  or args.fixed_variance):  # else silently ignored
        raise RunError(f"--learn-sigma, --prediction, --schedule and --fixed-variance are DDPM options; --formulation "
                       f"{formulation} has its own parameterisation (drop them; add --no-learn-sigma)")
    new.update(sampler=sampler, sample_steps=first(args.sample_steps, recipe.get("sample_steps"),
                                                   diffusion.default_steps(sampler)), recipe="cpu" if cpu else "paper",
               class_cond=False if args.backbone == "genvit" else first(args.class_cond, recipe.get("class_cond")),
               keep_every=first(args.keep_every, 10 * new["ckpt_every"]), betas=list(new["betas"]),
               warmup=first(args.warmup, min(recipe["warmup"], new["steps"] // 10)),  # short runs reach --lr
               model_arg={**recipe.get("model_arg", {}), **dict(args.model_arg)})
    return argparse.Namespace(**{**vars(args), **new})


def recipe_flags(recipe, base):
    """The train_cifar.py flags that turn recipe `base` into `recipe` (e.g. a CPU recipe spelled out for a note)."""
    flags = ""
    for k, v in recipe.items():
        name = k.replace("_", "-")
        if k == "model_arg":
            flags += "".join(f" --model-arg {a}={b}" for a, b in v.items())
        elif isinstance(v, bool) and v != base.get(k):
            flags += f" --{'' if v else 'no-'}{name}"
        elif v != base.get(k):
            flags += f" --{name} " + (" ".join(map(str, v)) if isinstance(v, tuple) else str(v))
    return flags


def check_backbone(args):
    """GenViT's denoiser is unconditional; HybViT (--hybvit) is GenViT's classifier objective, on images; captions
    train a text-to-image model, which only U-ViT has."""
    if args.dataset in TEXT_RECIPES and args.backbone != "uvit":
        raise RunError(f"--dataset {args.dataset} trains a text-to-image model, which only U-ViT has: --backbone uvit")
    if args.dataset in TEXT_RECIPES and args.class_cond is False:
        raise RunError(f"--dataset {args.dataset} conditions on its captions: drop --no-class-cond (--class-dropout "
                       "sets how often the empty prompt replaces them)")
    if args.backbone == "genvit" and args.class_cond:
        raise RunError("GenViT's denoiser is unconditional (Yang et al. 2022): drop --class-cond; --hybvit trains its "
                       "classifier head on the labels")
    if args.hybvit and args.backbone != "genvit":
        raise RunError("--hybvit is HybViT's objective: it needs --backbone genvit")
    if args.hybvit and args.dataset == "latents":
        raise RunError("--hybvit trains a classifier on images: use --dataset cifar10 or folder")


def check_sampler(sampler, diffusion, formulation):
    if sampler not in diffusion.SAMPLERS:
        raise RunError(f"--sampler {sampler} is not a {formulation} sampler; choose one of "
                       f"{', '.join(diffusion.SAMPLERS)}")


# Where no GPU is visible this trains the backbone's CPU recipe (8-12 minutes on 2 cores: README, "What a CPU
# can do"); on a GPU, the paper's.
CPU_COMMAND = "python train_cifar.py --backbone {backbone}"


def note_recipe(args):
    """On a CPU: the one line saying that the CPU recipe runs, or that the paper's would take months (and what fits)."""
    paper = paper_recipe(args.backbone, args.dataset)
    if args.recipe == "cpu":
        print(f"no GPU: the CPU-sized recipe ({args.model} at batch {args.batch_size} for {args.steps:,} steps, about "
              f"10 min on 2 cores; recipes.py CPU_RECIPES); --paper-recipe trains the paper's {paper['model']} for "
              f"{paper['steps']:,} steps")
    elif args.model == paper["model"] and args.dataset in TEXT_RECIPES:
        print(f"note: {args.model} for {args.steps:,} steps is the paper's GPU recipe and would run for months on a "
              "CPU; the CPU demo: python train_cifar.py --backbone uvit --dataset cifar10-captions --clip DIR (README, "
              "\"Text-to-image\")")
    elif args.model == paper["model"]:
        cpu = CPU_COMMAND.format(backbone=args.backbone)
        plain_cpu = f"where no GPU is visible `{cpu}` trains the CPU-sized recipe (about 10 min on 2 cores); "
        if args.dataset != "cifar10":  # the CPU recipe is CIFAR-10's: its sizes, spelled out, on these data
            cpu, plain_cpu = f"{cpu} --dataset {args.dataset} --data-dir {args.data_dir}", ""
        spelled = recipe_flags({k: v for k, v in CPU_RECIPES[args.backbone].items() if k != "class_cond"
                                or args.dataset == "cifar10"}, paper)
        print(f"note: {args.model} for {args.steps:,} steps at batch {args.batch_size} is the paper's GPU recipe and "
              f"would run for months on a CPU; {plain_cpu}spelled out for any machine:\n  {cpu}{spelled}")

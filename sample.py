"""
Sample from a train_cifar.py checkpoint or an official DiT / U-ViT / DiffiT / GenViT release file: a PNG grid, and
optionally an .npz in the ADM evaluation format (arr_0 uint8 (N, H, W, 3), arr_1 int64 labels (N,) when
class-conditional), with FID in the same pass.

  python sample.py --ckpt runs/uvit-U-ViT-S-2-cifar10/latest.pt                          # 64-image grid
  python sample.py --ckpt runs/.../latest.pt --num-samples 50000 --npz uvit.npz --fid-ref cifar10-train
  python sample.py --ckpt runs/dit-DiT-S-2-cifar10-cond/latest.pt --cfg-scale 1.5 --class-label 3
  python sample.py --ckpt DiT-XL-2-256x256.pt --image-size 256 --vae sd-vae-ft-ema --class-label 207 --cfg-scale 4
  torchrun --nproc_per_node 8 sample.py --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema --num-samples 50000 --npz x.npz

A train_cifar.py checkpoint records its model; an official file is recognised by its keys and shapes and
sampled with its paper's published settings (sampler, steps, guidance) unless flags override them. Latent
models decode through --vae (a diffusers folder or one weights file, see vae.py).
"""
import argparse
import importlib
import math
import os
import sys

import numpy as np
import torch

import fid
import genvit  # convert_official: GenViT's released names and patch Linear -> ours
from backbones import build_model, load_model
from checkpoints import validate_checkpoint
from devices import autocast_forward, check_precision, start_processes
from errors import RunError, first_line
from files import atomic_write, check_writable
from images import save_grid
from sampling import generate
from diffusion import GaussianDiffusion, make_diffusion, power_cosine_guidance
from vae import latent_decoder, load_safetensors

DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm++2m": 25}  # DiT's 250-step DDPM; DPM-Solver README's 20-25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True,
      help="a train_cifar.py checkpoint, or an official DiT / U-ViT / DiffiT / GenViT release file")
    a("--out", default=None, help="grid PNG path (default: next to the checkpoint)")
    a("--num-samples", type=int, default=64)
    a("--npz", default=None, help="also write all samples here in the ADM .npz format")
    a("--batch-size", type=int, default=256)
    a("--sampler", default=None, help="ddpm / ddim / dpm++2m (ddpm checkpoints), heun / euler (edm), euler / heun / "
                                      "sde (flow); default: dpm++2m, heun, euler, or the official model's paper sampler")
    a("--steps", type=int, default=None, help=f"sampler steps (default {DEFAULT_STEPS}, or the paper's)")
    a("--eta", type=float, default=0.0, help="DDIM eta")
    a("--cfg-scale", type=float, default=None,
      help="classifier-free guidance eps_u + s (eps_c - eps_u); 1 = off (default 1, or the paper's for official files)")
    a("--class-label", type=int, default=None, help="sample only this class (default: uniform random labels)")
    a("--seed", type=int, default=0)
    a("--no-ema", dest="ema", action="store_false", help="use the raw weights instead of the EMA")
    a("--vae", default=None, help="SD-VAE for latent models: a diffusers folder (e.g. sd-vae-ft-ema) or one file")
    a("--image-size", type=int, default=None, help="official latent models: the image size (checked against the file)")
    a("--model", default=None, help="official files: the registry name that supplies what shapes cannot tell "
                                    "(the head count), e.g. DiT-XL/2")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--precision", choices=["bf16", "fp16", "fp32"], default="fp32", help="fp16 needs a CUDA GPU")
    a("--nrow", type=int, default=None, help="images per grid row (default: ~sqrt of the grid size)")
    a("--fid-ref", default=None, help="also compute FID (and IS) in the same pass against this reference: "
                                      "cifar10-train, cifar10-test or a stats .npz (mu, sigma)")
    a("--data-dir", default="data", help="CIFAR-10 folder for building a named --fid-ref the first time")
    args = p.parse_args(argv)
    for ok, msg in [(args.num_samples >= 1 and args.batch_size >= 1, "--num-samples and --batch-size must be >= 1"),
                    (args.steps is None or 1 <= args.steps <= 1000, "--steps must be in 1..1000"),
                    (args.cfg_scale is None or math.isfinite(args.cfg_scale),
                     "--cfg-scale must be a finite number (1 = no guidance)"),
                    (0 <= args.eta <= 1, "--eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like)"),
                    (args.nrow is None or args.nrow >= 1, "--nrow must be >= 1"),
                    (args.image_size is None or args.image_size >= 1, "--image-size must be >= 1"),
                    (args.fid_ref is None or args.num_samples >= 2, "--fid-ref needs --num-samples >= 2")]:
        if not ok:
            p.error(msg)
    return args


# ----- Official release files, recognised by their keys and shapes -----

def read_weights(path):
    """A weights file as a dict of tensors (or a train_cifar.py checkpoint dict): .safetensors by vae.py's
    reader, anything else with torch.load(weights_only=True), which never unpickles code."""
    if not os.path.isfile(path):
        raise RunError(f"checkpoint {path} does not exist; check the path")
    try:
        if path.endswith(".safetensors"):
            return load_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, malformed header: all "not a checkpoint"
        raise RunError(f"cannot read checkpoint {path} ({first_line(e)[:140]}); it is truncated or not a "
                       "train_cifar.py checkpoint or an official release file") from None


def registry_config(backbone, name, **fields):
    """The constructor keywords of MODELS[name], or of the first entry whose config has `fields` (e.g. hidden_size
    and patch_size): they supply what the shapes cannot tell. None when nothing matches."""
    models = importlib.import_module(backbone).MODELS
    if name is not None:
        if name not in models:
            raise RunError(f"--model {name!r} is not a {backbone} model; choose one of {', '.join(models)}")
        return name, dict(models[name].keywords)
    for key, ctor in models.items():
        if all(ctor.keywords.get(k) == v for k, v in fields.items()):
            return key, dict(ctor.keywords)
    return None, None


def label_fields(rows, config):
    """(num_classes, class_dropout_prob) from the label-table rows: the registry's when they fit, else the official
    convention of a null row after the classes (DiT, U-ViT and DiffiT ImageNet tables: 1001 rows)."""
    if rows == 0:
        return 0, 0.0
    if config and config.get("num_classes", 0) + (config.get("class_dropout_prob", 0) > 0) == rows:
        return config["num_classes"], config["class_dropout_prob"]
    return rows - 1, 0.1


def recognise(sd, path, model_name=None):
    """Which official model a bare state_dict is, with its constructor keywords and its paper's sampling setup:
    -> dict(backbone, model_name, model_kwargs, diffusion, defaults, time_offset)."""
    def count(prefix):
        return len({k.split(".")[1] for k in sd if k.startswith(prefix)})

    def heads(backbone, hidden, patch):
        name, cfg = registry_config(backbone, model_name, hidden_size=hidden, patch_size=patch)
        if cfg is None:
            raise RunError(f"the weights look like {backbone} (hidden {hidden}, patch {patch}) but no registry "
                           "config has that size, so the head count is unknown; pass --model NAME")
        return name, cfg
    if "x_embedder.proj.weight" in sd and "blocks.0.attn.qkv_temb.weight" in sd:  # DiffiT: TMSA's temporal qkv
        hidden, C, p = sd["x_embedder.proj.weight"].shape[:3]
        grid = math.isqrt(sd["pos_embed"].shape[1])
        rows = sd["y_embedder.embedding_table.weight"].shape[0] if "y_embedder.embedding_table.weight" in sd else 0
        name, cfg = registry_config("diffit", model_name or "DiffiT-XL/2")
        classes, drop = label_fields(rows, {"num_classes": 1000, "class_dropout_prob": 0.1})
        kw = dict(input_size=grid * p, patch_size=p, in_channels=C, hidden_size=hidden, depth=count("blocks."),
                  num_heads=sd["blocks.0.attn.relative_position_bias_table"].shape[1],
                  mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, num_classes=classes,
                  class_dropout_prob=drop, learn_sigma=sd["final_layer.linear.weight"].shape[0] == 2 * C * p * p)
        # DiffiT §5.8: power-cosine guidance 4.6 at 256 px (the released script: 4.4), constant 1.49 at 512 px;
        # 3-channel guidance and 250 DDPM steps as DiT (App. I.2)
        cfg_scale = power_cosine_guidance(4.6) if grid * p <= 32 else 1.49
        return dict(backbone="diffit", model_name=name, model_kwargs=kw, time_offset=0,
                    diffusion=dict(schedule="linear", learn_sigma=kw["learn_sigma"]),
                    defaults=dict(sampler="ddpm", steps=250, cfg_scale=cfg_scale, cfg_channels=3,
                                  cfg_label="powcos4.6" if callable(cfg_scale) else "1.49"))
    if "x_embedder.proj.weight" in sd and "blocks.0.adaLN_modulation.1.weight" in sd:  # DiT: adaLN-Zero blocks
        hidden, C, p = sd["x_embedder.proj.weight"].shape[:3]
        name, cfg = heads("dit", hidden, p)
        rows = sd["y_embedder.embedding_table.weight"].shape[0] if "y_embedder.embedding_table.weight" in sd else 0
        classes, drop = label_fields(rows, cfg)
        kw = dict(input_size=math.isqrt(sd["pos_embed"].shape[1]) * p, patch_size=p, in_channels=C,
                  hidden_size=hidden, depth=count("blocks."), num_heads=cfg["num_heads"],
                  mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, num_classes=classes,
                  class_dropout_prob=drop, learn_sigma=sd["final_layer.linear.weight"].shape[0] == 2 * C * p * p)
        # DiT sample_ddp.py (FID): 250 DDPM steps, CFG 1.5 on 3 channels (its sample.py uses 4.0 for pictures)
        return dict(backbone="dit", model_name=name, model_kwargs=kw, time_offset=0,
                    diffusion=dict(schedule="linear", learn_sigma=kw["learn_sigma"]),
                    defaults=dict(sampler="ddpm", steps=250, cfg_scale=1.5, cfg_channels=3, cfg_label="1.5"))
    if "patch_embed.proj.weight" in sd and "mid_block.attn.qkv.weight" in sd:  # U-ViT: in / mid / out blocks
        hidden, C, p = sd["patch_embed.proj.weight"].shape[:3]
        name, cfg = heads("uvit", hidden, p)
        rows = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else 0
        classes, drop = label_fields(rows, cfg)
        out = sd["decoder_pred.weight"].shape[0] // (p * p)
        extras = 2 if classes else 1
        size = math.isqrt(sd["pos_embed"].shape[1] - extras) * p
        kw = dict(input_size=size, patch_size=p, in_channels=C, hidden_size=hidden, depth=2 * count("in_blocks."),
                  num_heads=cfg["num_heads"], mlp_ratio=sd["mid_block.mlp.fc1.weight"].shape[0] / hidden,
                  num_classes=classes, class_dropout_prob=drop, learn_sigma=out == 2 * C,
                  qkv_bias="mid_block.attn.qkv.bias" in sd, mlp_time_embed="time_embed.0.weight" in sd,
                  conv="final_layer.weight" in sd, skip="out_blocks.0.skip_linear.weight" in sd)
        # U-ViT §4 / official configs: the latent H models are discrete (Stable Diffusion's scaled-linear betas, the
        # network fed n = t + 1 in 1..1000); the others continuous VP-SDE, whose linear schedule our discrete linear
        # one discretises. DPM-Solver, 50 steps; guidance cond + s (cond - uncond) with s 0.4 (256) / 0.7 (512),
        # i.e. our 1.4 / 1.7 on all channels.
        discrete = name in ("U-ViT-H/2", "U-ViT-H/4")
        cfg_scale = (1.7 if size >= 64 else 1.4) if classes and drop > 0 else 1.0
        return dict(backbone="uvit", model_name=name, model_kwargs=kw, time_offset=1 if discrete else 0,
                    diffusion=dict(schedule="scaled_linear" if discrete else "linear", learn_sigma=kw["learn_sigma"]),
                    defaults=dict(sampler="dpm++2m", steps=50, cfg_scale=cfg_scale, cfg_channels=None,
                                  cfg_label=f"{cfg_scale:g}"))
    if "to_patch_embedding.1.weight" in sd or "denoise_fn.to_patch_embedding.1.weight" in sd:  # GenViT / HybViT
        try:
            sd = genvit.convert_official(sd)
        except ValueError as e:
            raise RunError(f"{path} looks like an official GenViT file but {e}") from None
        hidden, C, p = sd["x_embedder.proj.weight"].shape[:3]
        name, cfg = heads("genvit", hidden, p)
        kw = dict(input_size=math.isqrt(sd["pos_embed"].shape[1] - 1) * p, patch_size=p, in_channels=C,
                  hidden_size=hidden, depth=count("blocks."), num_heads=cfg["num_heads"],
                  head_dim=sd["blocks.0.attn.qkv.weight"].shape[0] // (3 * cfg["num_heads"]),
                  mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                  num_classes=sd["cls_head.weight"].shape[0] if "cls_head.weight" in sd else 0)
        # GenViT (gevit_main.py, diffusion.py): cosine schedule, 1000-step ancestral sampling with the clipped
        # posterior variance, unconditional (no guidance)
        return dict(backbone="genvit", model_name=name, model_kwargs=kw, time_offset=0, state_dict=sd,
                    diffusion=dict(schedule="cosine", fixed_variance="small"),
                    defaults=dict(sampler="ddpm", steps=1000, cfg_scale=1.0, cfg_channels=None, cfg_label=None))
    some = ", ".join(list(sd)[:4])
    raise RunError(f"{path} is not a train_cifar.py checkpoint, and its keys ({some}, ...) match no official "
                   "DiT / U-ViT / DiffiT / GenViT layout; pass one of those")


def load_official(sd, path, args, device):
    """(model, spec) of a recognised official file, loaded strictly."""
    spec = recognise(sd, path, args.model)
    model = build_model(spec["backbone"], spec["model_name"], **spec["model_kwargs"])
    try:
        model.load_state_dict(spec.get("state_dict", sd), strict=True)
    except RuntimeError as e:
        raise RunError(f"{path} looks like {spec['model_name']} but does not load into it "
                       f"({str(e).splitlines()[0][:140]}); pass --model NAME with the right config") from None
    return model.to(device).eval(), spec


def shifted(fwd, offset):
    """fwd with the network's time input moved by `offset` (U-ViT's discrete models count steps from 1)."""
    return fwd if offset == 0 else (lambda x, t, **kw: fwd(x, t + offset, **kw))


# ----- Sampling -----

def grid_path(args):
    """--out, else sample_<ckpt>_<ema|raw>_<sampler>_<K>steps_cfg<s>.png next to the checkpoint."""
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    name = f"sample_{stem}_{'ema' if args.ema else 'raw'}_{args.sampler}_{args.steps}steps_cfg{args.cfg_label}.png"
    return args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), name)


def prepare(args, device):
    """-> (model, diffusion, fwd, meta, decode) for the checkpoint; fills the sampling defaults into args."""
    raw = read_weights(args.ckpt)
    if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):  # GenViT's gevit_main.py files
        raw = raw["model_state_dict"]
    if isinstance(raw, dict) and ("backbone" in raw or "model_kwargs" in raw):  # train_cifar.py
        validate_checkpoint(raw, args.ckpt)
        model, meta, spec = load_model(raw, args.ema, device, args.ckpt), raw["data"], None
        diffusion = make_diffusion(**raw["diffusion"])  # the checkpoint's formulation (ddpm, edm or flow)
        first = "dpm++2m" if diffusion.formulation == "ddpm" else diffusion.SAMPLERS[0]
        rec = raw.get("args", {})  # the run's grid / FID sampler (e.g. the DiT latent recipe's 250-step DDPM)
        if rec.get("sampler") in diffusion.SAMPLERS:
            first = rec["sampler"]
        defaults = dict(sampler=first, steps=rec.get("sample_steps") if rec.get("sampler") == first else None,
                        cfg_scale=1.0, cfg_channels=None, cfg_label=None)
        head = f"{raw['backbone']} {raw['model_name']} at step {raw['step']} ({'EMA' if args.ema else 'raw'} weights)"
    elif isinstance(raw, dict) and raw and all(torch.is_tensor(v) for v in raw.values()):  # a bare state_dict
        model, spec = load_official(raw, args.ckpt, args, device)
        kw = spec["model_kwargs"]
        pixels = kw["in_channels"] == 3  # U-ViT's only 32x32 pixel release is its CIFAR-10 model
        classes = 0 if spec["backbone"] == "genvit" else kw["num_classes"]  # GenViT's head is a classifier's
        meta = {"channels": kw["in_channels"], "image_size": kw["input_size"], "num_classes": classes,
                "pixels": pixels, "dataset": "cifar10" if pixels and kw["input_size"] == 32 else "official"}
        diffusion, defaults = GaussianDiffusion(**spec["diffusion"]), spec["defaults"]
        head = f"official {spec['backbone']} release ({spec['model_name']} config)"
    else:
        raise RunError(f"{args.ckpt} is not a train_cifar.py checkpoint nor a bare state_dict of an official "
                       "release; pass one of those")
    args.sampler = args.sampler or defaults["sampler"]
    if args.sampler not in diffusion.SAMPLERS:
        raise RunError(f"--sampler {args.sampler} is not a {diffusion.formulation} sampler; choose one of "
                       f"{', '.join(diffusion.SAMPLERS)}")
    if args.steps is None:
        same = args.sampler == defaults["sampler"] and defaults["steps"]
        args.steps = defaults["steps"] if same else diffusion.DEFAULT_STEPS[args.sampler]
    args.cfg_channels = defaults["cfg_channels"]
    if args.cfg_scale is None:
        args.cfg_scale, args.cfg_label = defaults["cfg_scale"], defaults["cfg_label"] or "1"
    else:
        args.cfg_label = f"{args.cfg_scale:g}"
    if args.cfg_label != "1" and model.null_label is None:
        raise RunError("--cfg-scale needs a class-conditional model trained with label dropout (--class-cond, "
                       "--class-dropout)")
    decode = None
    if not meta["pixels"]:
        decode, _ = latent_decoder(args.vae or meta.get("vae"), meta["channels"], meta["image_size"], device,
                                   args.image_size)
    fwd = shifted(autocast_forward(model, device, args.precision), spec["time_offset"] if spec else 0)
    print(f"{head}, {args.sampler} {args.steps} steps, cfg {args.cfg_label}, {args.num_samples} samples on {device}")
    return model, diffusion, fwd, meta, decode


def run(args, procs=None, device=None):
    """Sample (under torchrun every process samples its share of the batches; the main one gathers and writes)."""
    if procs is None:
        procs, device = start_processes(args.device)
    check_precision(args.precision, device)
    model, diffusion, fwd, meta, decode = prepare(args, device)
    n_cls = meta["num_classes"]
    if args.class_label is not None and not 0 <= args.class_label < n_cls:
        raise RunError(f"--class-label must be in 0..{n_cls - 1}" if n_cls else
                       "--class-label needs a class-conditional model")
    if args.fid_ref and args.fid_ref.startswith("cifar10") and (meta["dataset"], meta["image_size"]) != ("cifar10", 32):
        raise RunError(f"--fid-ref {args.fid_ref} only fits CIFAR-10 at 32x32; pass a stats .npz made with fid.py")
    path = grid_path(args)
    check_writable(path, "--out")  # outputs checked before minutes of sampling
    if args.npz:
        check_writable(args.npz, "--npz")
    inception = None
    if args.fid_ref:
        if args.num_samples < 10_000:
            print(f"note: FID from {args.num_samples} samples is biased upwards; papers use 50,000 (--num-samples)")
        try:
            inception, ref = fid.fid_setup(args.fid_ref, args.data_dir, device)
        except RunError as e:
            raise RunError(f"cannot compute FID against {args.fid_ref!r}: {e}") from None

    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    batches = generate(fwd, diffusion, shape, args.num_samples, args.batch_size, num_classes=n_cls,
                       class_label=args.class_label, sampler=args.sampler, steps=args.steps, eta=args.eta,
                       cfg_scale=args.cfg_scale, cfg_channels=args.cfg_channels, null_label=model.null_label,
                       seed=args.seed, device=device, decode=decode, procs=procs)
    if not procs.main:  # this process's share; the main process gathers the batches in order and writes
        for _ in batches:
            pass
        return None
    out, labels = [], []

    def keep(batches):  # hold every batch for the grid / npz while FID streams through them
        for x, y in batches:
            out.append(x)
            labels.append(y)
            yield x
    score = None
    if inception is not None:
        score = fid.fid_score(keep(batches), inception, ref, device, args.num_samples)
    else:
        for _ in keep(batches):
            pass
    images = torch.cat(out)                                                    # (N, C, H, W) uint8
    labels = torch.cat(labels) if n_cls else None

    grid = images[:256]
    save_grid(grid, path, nrow=args.nrow or math.ceil(math.sqrt(len(grid))))
    print(f"grid of {len(grid)} samples: {path}")
    if args.npz:
        arrays = [images.permute(0, 2, 3, 1).numpy()] + ([labels.numpy().astype(np.int64)] if n_cls else [])
        os.makedirs(os.path.dirname(os.path.abspath(args.npz)), exist_ok=True)
        atomic_write(args.npz, lambda f: np.savez(f, *arrays))  # a file object: np.savez appends no .npz
        print(f"{len(images)} samples in ADM format: {args.npz} (arr_0 {tuple(arrays[0].shape)} uint8"
              f"{', arr_1 labels' if n_cls else ''})")
    if score is not None:
        print(f"FID {score[0]:.3f}" + (f", IS {score[1]:.2f}" if score[1] else "") + f" ({len(images)} samples vs "
              f"{args.fid_ref}; pytorch-fid Inception, {args.sampler} {args.steps} steps, cfg {args.cfg_label})")
    return score


def main(argv=None):
    args = parse_args(argv)
    procs = None
    try:
        procs, device = start_processes(args.device)
        if not procs.main:  # under torchrun one process reports
            sys.stdout = open(os.devnull, "w")
        return run(args, procs, device)
    except RunError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("interrupted; nothing was written (the grid and npz are written at the end)")
    finally:
        if procs is not None:
            procs.close()


if __name__ == "__main__":
    main()

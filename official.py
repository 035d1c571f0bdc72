"""
Official DiT / U-ViT / DiffiT / GenViT release files: recognised by their keys and shapes, loaded strictly into our
backbones, and given their paper's sampling settings (sampler, steps, guidance). sample.py calls load() for every
file that is not a train_cifar.py checkpoint.

  DiT     facebookresearch/DiT sample_ddp.py: 250 DDPM steps, CFG 1.5 on 3 channels
  U-ViT   baofff/U-ViT configs/imagenet*_uvit_*.py and eval scripts @ ce55170: their continuous-time DPM-Solver
          (dpm_solver.py: dpm++3s for the H models, dpm3s for the others), 50 steps, guidance 0.4 (256) / 0.7 (512)
  DiffiT  Hatamizadeh et al. 2024 §5.8, App. I.2: 250 DDPM steps, power-cosine guidance 4.6 (256) / 1.49 (512)
  GenViT  Yang et al. 2022, gevit_main.py / diffusion.py: cosine schedule, 1000 ancestral steps, unconditional
"""
import importlib
import math
import os

import torch

import genvit  # convert_official: GenViT's released names and patch Linear -> ours
from backbones import build_model, check_finite, mismatch
from checkpoints import code_refusal, load_reason
from diffusion import GaussianDiffusion, make_betas, power_cosine_guidance
from dpm_solver import DiscreteVP, LinearVP, VPSolver
from errors import RunError, first_line
from safetensors_io import load_safetensors


def read_weights(path):
    """A weights file as a dict of tensors (or whatever dict it holds): .safetensors by safetensors_io.py, anything
    else with torch.load(weights_only=True), which never unpickles code."""
    if not os.path.isfile(path):
        raise RunError(f"checkpoint {path} does not exist; check the path")
    try:
        if path.endswith(".safetensors"):
            return load_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, malformed header: all "not a checkpoint"
        raise code_refusal(path, e, "pass a train_cifar.py checkpoint or an official release file") or RunError(
            f"cannot read checkpoint {path} ({load_reason(e)}); it is truncated or not a train_cifar.py "
            "checkpoint or an official release file") from None


def registry_config(backbone, name, **fields):
    """(name, constructor keywords) of MODELS[name], or of the first entry whose config has `fields` (e.g.
    hidden_size and patch_size): they supply what the shapes cannot tell. (None, None) when nothing matches."""
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
    -> dict(backbone, model_name, model_kwargs, diffusion, defaults, time_offset[, state_dict if converted])."""
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
        # DiffiT §5.8: power-cosine guidance 4.6 at 256 px (the released script: 4.4, sample.py --cfg-scale 4.4
        # --cfg-schedule power-cosine), constant 1.49 at 512 px; 3-channel guidance and 250 DDPM steps as DiT (App. I.2)
        cfg_scale = power_cosine_guidance(4.6) if grid * p <= 32 else 1.49
        return dict(backbone="diffit", model_name=name, model_kwargs=kw, time_offset=0,
                    diffusion=dict(schedule="linear", learn_sigma=kw["learn_sigma"]),
                    defaults=dict(sampler="ddpm", steps=250, cfg_scale=cfg_scale, cfg_channels=3,
                                  cfg_label="powcos4.6" if callable(cfg_scale) else "1.49",
                                  cfg_strength=4.6 if callable(cfg_scale) else 1.49))
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
    if "context_embed.weight" in sd and "mid_block.attn.qkv.weight" in sd:  # U-ViT text-to-image (MS-COCO)
        return uvit_t2i_spec(sd, model_name, 2 * count("in_blocks."))
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
        # U-ViT §4 / official configs and eval scripts @ ce55170, all 50 steps: the latent H models are discrete
        # (Stable Diffusion's scaled-linear betas), sampled by eval_ldm_discrete.py with DPM-Solver++ (dpm++3s, the
        # network fed 1000 t, t from 1 to 1/1000); the others continuous VP-SDEs fed 999 t, the latent L and ImageNet-64
        # ones sampled by eval_ldm.py / eval.py with DPM-Solver-fast (dpm3s, t from 1 to 1e-4). CIFAR-10 and CelebA-64
        # (unconditional pixels) used 1000 Euler-Maruyama steps of the reverse SDE (eval.py, sde.py:243-267), not
        # implemented here: they keep dpm++2m. dpm++2m runs on our discrete schedules (the H models fed n = t + 1; the
        # linear one discretises the SDE). Guidance cond + s (cond - uncond), s 0.4 (256) / 0.7 (512): our 1.4 / 1.7.
        discrete = name in ("U-ViT-H/2", "U-ViT-H/4")
        sampler = "dpm++3s" if discrete else "dpm++2m" if C == 3 and not classes else "dpm3s"
        cfg_scale = (1.7 if size >= 64 else 1.4) if classes and drop > 0 else 1.0
        return dict(backbone="uvit", model_name=name, model_kwargs=kw, time_offset=1 if discrete else 0,
                    diffusion=dict(schedule="scaled_linear" if discrete else "linear", learn_sigma=kw["learn_sigma"]),
                    solver=dict(discrete=discrete, time_scale=1000 if discrete else 999,
                                t_end=1e-3 if discrete else 1e-4),
                    defaults=dict(sampler=sampler, steps=50, cfg_scale=cfg_scale, cfg_channels=None,
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


def uvit_t2i_spec(sd, model_name, depth):
    """U-ViT's MS-COCO release (libs/uvit_t2i.py, configs/mscoco_uvit_small.py, eval_t2i_discrete.py @ ce55170):
    Stable Diffusion's discrete betas (the network fed n = t + 1), DPM-Solver++ 50 steps, guidance
    cond + 1 (cond - uncond), our 2; latents scaled by 0.23010 (not 0.18215); conditioned on CLIP text (--clip)."""
    hidden, C, p = sd["patch_embed.proj.weight"].shape[:3]
    clip_dim = sd["context_embed.weight"].shape[1]
    name, cfg = registry_config("uvit", model_name, hidden_size=hidden, patch_size=p, depth=depth, clip_dim=clip_dim)
    if cfg is None:
        raise RunError(f"the weights look like a text-to-image U-ViT (hidden {hidden}, depth {depth}, CLIP width "
                       f"{clip_dim}) but no registry config has that size; pass --model NAME")
    size = math.isqrt(sd["pos_embed"].shape[1] - 1 - cfg["num_clip_token"]) * p
    kw = dict(cfg, input_size=size, in_channels=C, mlp_ratio=sd["mid_block.mlp.fc1.weight"].shape[0] / hidden,
              qkv_bias="mid_block.attn.qkv.bias" in sd, conv="final_layer.weight" in sd)
    return dict(backbone="uvit", model_name=name, model_kwargs=kw, time_offset=1, text={"latent_scale": 0.23010},
                diffusion=dict(schedule="scaled_linear", learn_sigma=False),
                solver=dict(discrete=True, time_scale=1000, t_end=1e-3),
                defaults=dict(sampler="dpm++3s", steps=50, cfg_scale=2.0, cfg_channels=None, cfg_label="2"))


def load_official(sd, path, model_name, device):
    """(model in eval mode on device, recognise()'s spec) of an official state_dict, loaded strictly; finite weights
    only. A file missing a key that recognition reads, or with a tensor of another rank, is a one-line RunError."""
    try:
        spec = recognise(sd, path, model_name)
    except (KeyError, IndexError, ValueError, TypeError) as e:
        what = f"lacks {e.args[0]!r}" if isinstance(e, KeyError) else f"has a tensor of another shape ({first_line(e)})"
        raise RunError(f"{path} looks like an official release but {what}; pass an unmodified release file") from None
    model = build_model(spec["backbone"], spec["model_name"], **spec["model_kwargs"])
    try:
        model.load_state_dict(spec.get("state_dict", sd), strict=True)
    except RuntimeError as e:
        raise RunError(f"{path} looks like {spec['model_name']} but does not load into it "
                       f"({mismatch(model, spec.get('state_dict', sd), e)}); pass --model NAME with the right config") \
            from None
    check_finite(model, path)
    return model.to(device).eval(), spec


def shifted(fwd, offset):
    """fwd with the network's time input moved by `offset` (U-ViT's discrete models count steps from 1)."""
    return fwd if offset == 0 else (lambda x, t, **kw: fwd(x, t + offset, **kw))


class ReleaseSampling:
    """What sample.py samples a U-ViT release with: its official script's sampler (dpm_solver.VPSolver: dpm++3s,
    dpm3s; the network fed time_scale * t) beside GaussianDiffusion's ddpm / ddim / dpm++2m on our discrete schedule
    (the network time shifted by `offset`). Steps default to the configs' 50, for dpm++2m too (its earlier default)."""

    formulation = "ddpm"

    def __init__(self, diffusion, offset, solver, default_sampler, steps=50):
        self.diffusion, self.offset, self.solver, self.default_sampler = diffusion, offset, solver, default_sampler
        self.SAMPLERS, self.steps, self.learn_sigma = solver.SAMPLERS + diffusion.SAMPLERS, steps, diffusion.learn_sigma

    def default_steps(self, sampler=None):
        sampler = sampler or self.default_sampler
        return self.steps if sampler in self.solver.SAMPLERS + ("dpm++2m",) else self.diffusion.default_steps(sampler)

    def nfe(self, sampler=None, steps=None):
        return steps or self.default_steps(sampler)

    def sample(self, model, shape, sampler=None, steps=None, **kwargs):
        sampler = sampler or self.default_sampler
        steps = steps or self.default_steps(sampler)
        if sampler in self.solver.SAMPLERS:
            return self.solver.sample(model, shape, sampler, steps, **kwargs)
        return self.diffusion.sample(shifted(model, self.offset), shape, sampler, steps, **kwargs)


def release_solver(discrete, time_scale, t_end):
    """U-ViT's continuous-time schedule: its discrete scaled-linear betas interpolated, or the VP-SDE 0.1 -> 20."""
    schedule = DiscreteVP(make_betas("scaled_linear")) if discrete else LinearVP(0.1, 20.0)
    return VPSolver(schedule, time_scale, t_end)


def load(path, raw, model_name, device):
    """An official release file -> (model, net, diffusion, meta, defaults, head), as sample.py gets them from a
    train_cifar.py checkpoint: net(x, t, **kw) is what sampling calls (the model; a U-ViT's time shift is applied by
    its ReleaseSampling), meta the data fields of a checkpoint, defaults the paper's sampler / steps / guidance, head
    a one-line title.
    raw is the file as torch.load read it, or None to read it here (.safetensors)."""
    raw = read_weights(path) if raw is None else raw
    if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):  # GenViT's gevit_main.py files
        raw = raw["model_state_dict"]
    if not (isinstance(raw, dict) and raw and all(torch.is_tensor(v) for v in raw.values())):
        raise RunError(f"{path} is not a train_cifar.py checkpoint nor a bare state_dict of an official "
                       "release; pass one of those")
    model, spec = load_official(raw, path, model_name, device)
    kw = spec["model_kwargs"]
    pixels = kw["in_channels"] == 3  # U-ViT's only 32x32 pixel release is its CIFAR-10 model
    classes = 0 if spec["backbone"] == "genvit" else kw["num_classes"]  # GenViT's head is a classifier's
    meta = {"channels": kw["in_channels"], "image_size": kw["input_size"], "num_classes": classes,
            "pixels": pixels, "dataset": "cifar10" if pixels and kw["input_size"] == 32 else "official"}
    meta.update(spec.get("text", {}))  # text-to-image: its latent scale
    head = f"official {spec['backbone']} release ({spec['model_name']} config)"
    net, diffusion = shifted(model, spec["time_offset"]), GaussianDiffusion(**spec["diffusion"])
    if "solver" in spec:  # U-ViT: its official script's sampler beside ours
        net, diffusion = model, ReleaseSampling(diffusion, spec["time_offset"], release_solver(**spec["solver"]),
                                                spec["defaults"]["sampler"])
    return model, net, diffusion, meta, spec["defaults"], head

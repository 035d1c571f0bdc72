"""train_cifar.py --init-from FILE: a new run that starts from the weights of an official release (official.py) or
of a train_cifar.py checkpoint (its EMA), never from its optimizer, step or RNG. The weights are moved over as they
are, except what the new data change:

  label table   new classes keep the new model's own init (DiT: N(0, 0.02), DiT models.py initialize_weights;
                U-ViT: nn.Embedding's N(0, 1), libs/uvit.py); --class-map 3,7,... keeps those old rows, in that
                order; the null row of classifier-free guidance is kept. GenViT: its classifier head, the same way.
  positions     DiT / latent DiffiT: the fixed 2D sin-cos table of the new grid (DiT §3.2); U-ViT / GenViT: the
                learned patch positions interpolated bicubically on the patch grid, the extra tokens' kept.
                DiffiT's relative position tables are sized for one grid: its size may not change.

A learned variance (Improved DDPM §3.1) or a formulation / prediction that differs from the run's is refused in
one line: the output layer would mean something else.
"""
import os

import torch
import torch.nn.functional as F

import official
from checkpoints import validate_checkpoint
from errors import RunError
from files import sha256_of

# The label-table (GenViT: classifier-head) tensors, row = class, the null row last.
LABEL_KEYS = {"dit": ("y_embedder.embedding_table.weight",), "diffit": ("y_embedder.embedding_table.weight",),
              "uvit": ("label_emb.weight",), "genvit": ("cls_head.weight", "cls_head.bias")}
FIXED_POSITIONS = ("dit", "diffit")  # sin-cos tables, recomputed for the new grid by the model itself


def init_weights(model, args, config, ckpt=None):
    """Load args.init_from into model (in place) -> the record {path, sha256, ...} that the run's checkpoints keep.
    Resuming (ckpt given) loads nothing: the run's record is returned as it is."""
    if ckpt is not None:
        if "init_from" not in ckpt:
            raise RunError(f"{args.out_dir or 'the run folder'} holds a run that did not start from --init-from; "
                           "--init-from starts a new run: pick a new --out-dir")
        return ckpt["init_from"]
    path = args.init_from
    src = read_source(path, args)
    check_source(src, args, config, path)
    class_map = parse_class_map(args.class_map, src["num_classes"], model.num_classes)
    state = transplant(model, src, class_map, path)
    model.load_state_dict(state, strict=True)
    print(f"init: weights of {src['kind']} {src['model_name']} from {path}" +
          (f", classes {class_map} of its {src['num_classes']}" if class_map else ""))
    return {"path": os.path.abspath(path), "sha256": sha256_of([path]), "kind": src["kind"],
            "model_name": src["model_name"], "class_map": class_map}


def read_source(path, args):
    """-> dict(kind, backbone, model_name, kwargs, state (a state_dict in our names), learn_sigma, formulation,
    prediction, num_classes) of a train_cifar.py checkpoint (its EMA weights) or an official release."""
    raw = official.read_weights(path)
    if isinstance(raw, dict) and ("backbone" in raw or "model_kwargs" in raw):  # one of our checkpoints
        ckpt = validate_checkpoint(raw, path)
        kw, diff = ckpt["model_kwargs"], ckpt["diffusion"]
        return dict(kind="checkpoint", backbone=ckpt["backbone"], model_name=ckpt["model_name"], kwargs=kw,
                    state=ckpt["ema"], learn_sigma=bool(diff.get("learn_sigma")), formulation=diff["formulation"],
                    prediction=diff.get("prediction", "eps"), num_classes=kw.get("num_classes", 0))
    if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):  # GenViT's gevit_main.py files
        raw = raw["model_state_dict"]
    if not (isinstance(raw, dict) and raw and all(torch.is_tensor(v) for v in raw.values())):
        raise RunError(f"--init-from {path} is neither a train_cifar.py checkpoint nor an official release file")
    found = release_backbone(raw)
    if found and found != args.backbone:
        raise RunError(f"--init-from {path} holds an official {found} release; train it with --backbone {found}")
    try:
        try:
            spec = official.recognise(raw, path)
        except RunError:  # the shapes alone do not name the config: the run's --model does
            spec = official.recognise(raw, path, args.model)
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise RunError(f"--init-from {path} looks like an official release but cannot be read ({e!r:.80}); pass "
                       "an unmodified release file") from None
    kw = spec["model_kwargs"]
    return dict(kind="official", backbone=spec["backbone"], model_name=spec["model_name"], kwargs=kw,
                state=spec.get("state_dict", raw), learn_sigma=bool(spec["diffusion"].get("learn_sigma")),
                formulation="ddpm", prediction="eps", num_classes=kw.get("num_classes", 0))


def release_backbone(sd):
    """The backbone of an official state_dict by its telltale keys (as official.recognise tells them), or None."""
    for key, backbone in (("blocks.0.attn.qkv_temb.weight", "diffit"), ("blocks.0.adaLN_modulation.1.weight", "dit"),
                          ("mid_block.attn.qkv.weight", "uvit"), ("to_patch_embedding.1.weight", "genvit"),
                          ("denoise_fn.to_patch_embedding.1.weight", "genvit")):
        if key in sd:
            return backbone
    return None


def check_source(src, args, config, path):
    """One-line refusals: another backbone, input channels, formulation, learned variance or prediction."""
    want = config["diffusion"]
    if src["backbone"] != args.backbone:
        raise RunError(f"--init-from {path} holds a {src['backbone']} model ({src['model_name']}); train it with "
                       f"--backbone {src['backbone']}")
    channels = src["kwargs"].get("in_channels", 3)
    if channels != config["data"]["channels"]:
        raise RunError(f"--init-from {path} takes {channels}-channel inputs, the data have "
                       f"{config['data']['channels']}; " + ("train on --dataset latents (extract_latents.py)"
                                                            if channels == 4 else "train on pixels"))
    if src["formulation"] != want["formulation"]:
        raise RunError(f"--init-from {path} was trained as {src['formulation']}, this run is {want['formulation']}: "
                       f"add --formulation {src['formulation']}")
    if src["learn_sigma"] != bool(want.get("learn_sigma")):
        flag = "--learn-sigma" if src["learn_sigma"] else "--no-learn-sigma"
        raise RunError(f"--init-from {path} was trained {'with' if src['learn_sigma'] else 'without'} a learned "
                       f"variance and this run {'without' if src['learn_sigma'] else 'with'}: add {flag}")
    if src["formulation"] == "ddpm" and src["prediction"] != want.get("prediction", "eps"):
        raise RunError(f"--init-from {path} predicts {src['prediction']}, this run {want.get('prediction')}: add "
                       f"--prediction {src['prediction']}")


def parse_class_map(text, old, new):
    """--class-map '3,7,...' -> [old row of new class 0, 1, ...] (one per new class), or None."""
    if not text:
        return None
    try:
        rows = [int(r) for r in text.split(",")]
    except ValueError:
        raise RunError(f"--class-map {text!r} must be comma-separated class indices, e.g. 3,7,12") from None
    if len(rows) != new:
        raise RunError(f"--class-map lists {len(rows)} classes but the data have {new}; give one old class per "
                       "new class, in the order of the new classes")
    bad = [r for r in rows if not 0 <= r < old]
    if bad:
        raise RunError(f"--class-map: class {bad[0]} is not among the {old} classes of --init-from (0..{old - 1})")
    return rows


def transplant(model, src, class_map, path):
    """The new model's state_dict with every tensor from src's, label rows and positions adapted (module doc)."""
    new, old = model.state_dict(), src["state"]
    labels = LABEL_KEYS[src["backbone"]]
    for k, v in new.items():
        if k in labels and k in old:
            new[k] = label_rows(v, old[k], src["num_classes"], model.num_classes, class_map)
        elif k == "pos_embed" and k in old and old[k].shape != v.shape:
            if src["backbone"] not in FIXED_POSITIONS:
                new[k] = positions(v, old[k], grid_tokens(src["kwargs"]),
                                   grid_tokens({"input_size": model.input_size, "patch_size": model.patch_size}))
        elif k in old and old[k].shape == v.shape:
            new[k] = old[k].to(v.dtype)
        elif k not in labels and "relative_position" in k and k in old:  # DiffiT: tables of one token grid
            raise RunError(f"--init-from {path}: DiffiT's relative position tables ({k}) fit its "
                           f"{src['kwargs']['input_size']} x {src['kwargs']['input_size']} inputs only; train at that "
                           "size (--image-size, or latents of that size)")
        elif k not in labels:
            what = f"has {k} {tuple(old[k].shape)}, this run {tuple(v.shape)}" if k in old else f"lacks {k}"
            raise RunError(f"--init-from {path} ({src['model_name']}) {what}; pass --model {src['model_name']} "
                           "with its --model-arg (only classes and image size may change)")
    extra = [k for k in old if k not in new and k not in labels]
    if extra:
        raise RunError(f"--init-from {path} has {extra[0]}, which this run's model lacks; pass --model "
                       f"{src['model_name']} with its --model-arg")
    return new


def label_rows(init, old, old_classes, new_classes, class_map):
    """Rows of the new table: mapped (or, with as many classes, the same) old rows, the old null row in the null
    row's place; the rest keep the new model's init."""
    out = init.clone()
    if class_map is None and old_classes == new_classes:
        class_map = list(range(new_classes))
    for i, j in enumerate(class_map or []):
        out[i] = old[j]
    if out.shape[0] > new_classes and old.shape[0] > old_classes:  # both have a null row, last
        out[new_classes] = old[old_classes]
    return out


def grid_tokens(kwargs):
    return (kwargs["input_size"] // kwargs["patch_size"]) ** 2


def positions(init, old, old_tokens, new_tokens):
    """Learned positions (1, extras + H*W, D) for a new grid: the patch part interpolated bicubically (as timm's
    resample_abs_pos_embed), the extra tokens (U-ViT: [label,] time; GenViT: class token) kept; the time / class
    token is the last extra in both, a new label token keeps its init."""
    out = init.clone()
    old_extras, new_extras = old.shape[1] - old_tokens, init.shape[1] - new_tokens
    for i in range(1, min(old_extras, new_extras) + 1):
        out[:, new_extras - i] = old[:, old_extras - i]
    g_old, g_new = round(old_tokens ** 0.5), round(new_tokens ** 0.5)
    grid = old[:, old_extras:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    out[:, new_extras:] = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1).to(out.dtype)
    return out

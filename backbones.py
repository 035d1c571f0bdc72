"""--backbone name -> module with a MODELS registry -> nn.Module; a train_cifar.py checkpoint's model rebuilt;
the one-line checks of a backbone's inputs (README, "The backbone contract")."""
import importlib

import torch

from errors import RunError

# --backbone name -> module with a MODELS registry; adding a backbone is one line here plus its recipe.
BACKBONES = {"dit": "dit", "uvit": "uvit", "diffit": "diffit", "genvit": "genvit"}


def build_model(backbone, model_name, **kwargs):
    """MODELS[model_name](**kwargs) from the backbone's module."""
    try:
        return importlib.import_module(BACKBONES[backbone]).MODELS[model_name](**kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise build_error(backbone, model_name, e) from None


def build_error(backbone, model_name, e):
    """The RunError for an unknown backbone or model name, or a model its kwargs cannot build."""
    if backbone not in BACKBONES:
        return RunError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    models = importlib.import_module(BACKBONES[backbone]).MODELS
    if model_name not in models:
        return RunError(f"unknown {backbone} model {model_name!r}; choose one of {', '.join(models)}")
    if isinstance(e, KeyError):  # raised inside the model's constructor: not ours to explain
        return e
    return RunError(f"cannot build {model_name}: {e} (check --image-size, --model-arg)")


def load_model(ckpt, use_ema, device, path="checkpoint"):
    """Rebuild the checkpoint's model (eval mode) on device with its EMA or raw weights (finite ones only)."""
    model = build_model(ckpt["backbone"], ckpt["model_name"], **ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise weights_error(path, ckpt, model, ckpt["ema" if use_ema else "model"], e) from None
    if not torch.isfinite(torch.stack(torch._foreach_norm(list(model.parameters())))).all():  # check_finite's test
        raise nonfinite_error(model, path)
    return model.to(device).eval()


def check_finite(model, what):
    """A one-line RunError naming the first non-finite weight (NaN weights sample black images)."""
    if not torch.isfinite(torch.stack(torch._foreach_norm(list(model.parameters())))).all():
        raise nonfinite_error(model, what)


def weights_error(path, ckpt, model, state_dict, e):
    return RunError(f"{path}: its weights do not fit {ckpt['model_name']} with the recorded model_kwargs "
                    f"({mismatch(model, state_dict, e)}); the file was edited or comes from another version: "
                    "pass an unmodified train_cifar.py checkpoint")


def mismatch(model, state_dict, e=None):
    """The first missing, unexpected and mis-shaped key of a strict load of state_dict into model, in a few words
    (torch's own message names none of them on its first line)."""
    want = model.state_dict()
    if not isinstance(state_dict, dict):
        return f"a {type(state_dict).__name__}, not a state_dict"
    missing = [k for k in want if k not in state_dict]
    unexpected = [k for k in state_dict if k not in want]
    shaped = [f"{k!r} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
              if k in state_dict and torch.is_tensor(state_dict[k]) and state_dict[k].shape != v.shape]
    missing, unexpected = [repr(k) for k in missing], [repr(k) for k in unexpected]
    parts = [f"{what} {items[0]}" + (f" (+{len(items) - 1} more)" if len(items) > 1 else "")
             for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shaped)) if items]
    return "; ".join(parts) or ("" if e is None else (str(e).strip().splitlines() or [""])[-1][:120])


def load_weights(model, state_dict, what):
    """A strict load of state_dict into model; a one-line RunError naming the first missing, unexpected and
    mis-shaped key, or the first non-finite weight."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise RunError(f"{what}: the weights do not fit {type(model).__name__} ({mismatch(model, state_dict, e)}); "
                       "pass an unmodified file") from None
    check_finite(model, what)
    return model


def nonfinite_error(model, what):
    name = next(n for n, p in model.named_parameters() if not torch.isfinite(p).all())
    return RunError(f"{what}: weight {name} holds non-finite values (NaN or inf), which would sample black images; "
                    "pass a checkpoint from before the weights diverged")


def check_inputs(model, x, t, y=None):
    """One-line RunErrors for inputs that do not fit a backbone: x (B, in_channels, input_size, input_size), t (B,),
    for a class-conditional model integer labels y (B,) in 0..num_classes - 1 or its null label, for a text-conditioned
    one a context (B, num_clip_token, clip_dim) or None. The forward passes do not check (their code is the papers'
    maths); call this once on the first batch of a run, not every step: the label range is read on the host, which
    waits for a GPU."""
    want = (model.in_channels, model.input_size, model.input_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise RunError(f"x must have shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
    B = x.shape[0]
    if not torch.is_tensor(t) or t.shape != (B,):
        got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise RunError(f"t must be a tensor of shape ({B},), one timestep per sample, got {got}")
    if getattr(model, "text_cond", False):  # uvit.TextUViT: y is a text context
        return check_context(model, y, B)
    if not model.class_cond:
        return  # unconditional: y is ignored
    rows = model.num_classes + (model.null_label is not None)  # label table rows, null label included
    if y is None:
        raise RunError(f"class-conditional model: pass y of shape ({B},) with labels in 0..{rows - 1} "
                       f"(null label {model.null_label})")
    if not torch.is_tensor(y) or y.shape != (B,) or y.dtype.is_floating_point or y.dtype.is_complex:
        got = f"{y.dtype} {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
        raise RunError(f"y must be an integer tensor of shape ({B},), got {got}")
    if B and not 0 <= int(y.min()) <= int(y.max()) < rows:
        raise RunError(f"labels must lie in 0..{rows - 1} (null label {model.null_label}), "
                       f"got min {int(y.min())} max {int(y.max())}")


def check_context(model, y, B):
    """A text-conditioned model's y: None (the empty prompt) or a float context (B, num_clip_token, clip_dim)."""
    want = (B, model.num_clip_token, model.clip_dim)
    if y is not None and not (torch.is_tensor(y) and y.is_floating_point() and tuple(y.shape) == want):
        got = f"{y.dtype} {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
        raise RunError(f"text-conditioned model: y must be a float context of shape {want} (CLIP's "
                       f"last_hidden_state, clip.py) or None for the empty prompt, got {got}")

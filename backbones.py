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
    """Rebuild the checkpoint's model (eval mode) on device with its EMA or raw weights."""
    model = build_model(ckpt["backbone"], ckpt["model_name"], **ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise weights_error(path, ckpt, e) from None
    return model.to(device).eval()


def weights_error(path, ckpt, e):
    return RunError(f"{path}: its weights do not fit {ckpt['model_name']} with the recorded model_kwargs "
                    f"({str(e).splitlines()[0][:120]}); the file was edited or comes from another version: "
                    "pass an unmodified train_cifar.py checkpoint")


def check_inputs(model, x, t, y=None):
    """One-line RunErrors for inputs that do not fit a backbone: x (B, in_channels, input_size, input_size), t (B,),
    and for a class-conditional model integer labels y (B,) in 0..num_classes - 1 or its null label. The forward
    passes do not check (their code is the papers' maths); call this once on the first batch of a run, not every
    step: the label range is read on the host, which waits for a GPU."""
    want = (model.in_channels, model.input_size, model.input_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise RunError(f"x must have shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
    B = x.shape[0]
    if not torch.is_tensor(t) or t.shape != (B,):
        got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise RunError(f"t must be a tensor of shape ({B},), one timestep per sample, got {got}")
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

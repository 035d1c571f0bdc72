"""--backbone name -> module with a MODELS registry -> nn.Module; a train_cifar.py checkpoint's model rebuilt."""
import importlib

from errors import RunError

# --backbone name -> module with a MODELS registry; adding a backbone is one line here plus its recipe.
BACKBONES = {"dit": "dit", "uvit": "uvit", "diffit": "diffit", "genvit": "genvit"}


def build_model(backbone, model_name, **kwargs):
    """MODELS[model_name](**kwargs) from the backbone's module."""
    if backbone not in BACKBONES:
        raise RunError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    models = importlib.import_module(BACKBONES[backbone]).MODELS
    if model_name not in models:
        raise RunError(f"unknown {backbone} model {model_name!r}; choose one of {', '.join(models)}")
    try:
        return models[model_name](**kwargs)
    except (ValueError, TypeError) as e:
        raise RunError(f"cannot build {model_name}: {e} (check --image-size, --model-arg)") from None


def load_model(ckpt, use_ema, device, path="checkpoint"):
    """Rebuild the checkpoint's model (eval mode) on device with its EMA or raw weights."""
    model = build_model(ckpt["backbone"], ckpt["model_name"], **ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise RunError(f"{path}: its weights do not fit {ckpt['model_name']} with the recorded model_kwargs "
                       f"({str(e).splitlines()[0][:120]}); the file was edited or comes from another version: "
                       "pass an unmodified train_cifar.py checkpoint") from None
    return model.to(device).eval()

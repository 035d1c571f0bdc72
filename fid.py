"""FID and Inception Score in plain PyTorch + numpy (no TensorFlow, scipy or torchvision): streaming float64
statistics of pytorch-fid's FID Inception-v3 features (the network and its SHA-1-checked weights: fid_inception.py),
the Frechet distance (Heusel et al. 2017) and the Inception Score (Salimans et al. 2016).

    python fid.py samples.npz --ref cifar10-train         # FID + IS of arr_0 (uint8 N,H,W,3) vs CIFAR-10 train
    python fid.py samples_dir/ --ref my_stats.npz          # image folder (PNG/JPG) vs a pytorch-fid stats npz
    python fid.py --make-ref cifar10-train --data-dir data # cache mu/sigma of the 50k training images

Numbers are "pytorch-fid-equivalent FID"; FID is biased by sample count, so compare only at a fixed N (50k).
"""
import argparse
import contextlib
import hashlib
import os
import zipfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data import center_crop_resize
from devices import resolve_device
from errors import RunError, first_line
from fid_inception import DEFAULT_CACHE_DIR, build_inception
from files import atomic_write

NAMED_REFS = {"cifar10-train": True, "cifar10-test": False}  # reference name -> load_cifar10(train=...)
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


# ----- Statistics, Frechet distance, Inception Score -----

def to_uint8_nchw(x):
    """uint8 (N, H, W, 3) or (N, 3, H, W) numpy array / tensor -> uint8 tensor (N, 3, H, W); channels-last wins ties."""
    if isinstance(x, np.ndarray):
        x = torch.tensor(x)  # copies one batch: works for read-only arrays too
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images in [0, 255], got {getattr(x, 'dtype', type(x).__name__)}; "
                         "quantize first, e.g. ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)")
    if x.dim() == 4 and x.shape[-1] == 3:
        return x.permute(0, 3, 1, 2)
    if x.dim() == 4 and x.shape[1] == 3:
        return x
    raise ValueError(f"expected RGB images (N, H, W, 3) or (N, 3, H, W), got shape {tuple(x.shape)}")


def iter_batches(images, batch_size):
    """uint8 (B, 3, H, W) tensors from one array/tensor or from an iterable of array/tensor batches."""
    for chunk in ([images] if isinstance(images, (np.ndarray, torch.Tensor)) else images):
        for i in range(0, len(chunk), batch_size):
            yield to_uint8_nchw(chunk[i:i + batch_size])


@contextlib.contextmanager
def full_fp32(device):
    """FID features are fp32: no autocast from a training loop, no TF32 cuDNN convs (torch's default on Ampere+)."""
    old = None
    with contextlib.suppress(RuntimeError):  # torch raises if its old and new TF32 APIs were mixed: leave them be
        if device.type == "cuda":
            old, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        if old is not None:
            torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def compute_statistics(images, batch_size=50, device=None, progress=False, model=None, inception_score=False,
                       total=None):
    """Mean and covariance of pool3 features (the FID Gaussian, Heusel et al. 2017) as float64 numpy arrays.

    images: uint8 (N, H, W, 3) or (N, 3, H, W) array / tensor, or an iterable of such batches (a sampler can stream
    50k images). Moments accumulate in float64 around the first batch's mean; sigma = np.cov(feats, rowvar=False).
    model: InceptionV3FID (anything mapping [0, 1] images to (features, logits)); None builds the default one.
    device: default the model's, else cuda if available. total: progress-bar length for an iterator.
    Returns (mu, sigma), or (mu, sigma, (is_mean, is_std)) with inception_score=True (keeps N x 1008 fp32 logits).
    """
    if device is None and model is not None:
        device = next((p.device for p in model.parameters()), None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = (model if model is not None else build_inception(device=device, progress=progress)).eval()
    acc = device if device.type == "cuda" else torch.device("cpu")  # float64 accumulator (MPS has no float64)
    n, shift, s1, s2, logits = 0, None, 0.0, 0.0, []
    total = len(images) if isinstance(images, (np.ndarray, torch.Tensor)) else total
    with full_fp32(device), tqdm(total=total, unit="img", desc="Inception features", disable=not progress) as bar:
        for x in iter_batches(images, batch_size):
            pool, logit = model(x.to(device).float() / 255)  # (B, D), (B, 1008)
            f = pool.to(acc, torch.float64)
            shift = f.mean(0) if shift is None else shift  # centring keeps the sum of squares well conditioned
            f = f - shift
            s1, s2, n = s1 + f.sum(0), s2 + f.T @ f, n + len(f)
            if inception_score:
                logits.append(logit.float().cpu())
            bar.update(len(x))
    if n < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {n}")
    m = s1 / n
    mu = (shift + m).cpu().numpy()
    sigma = ((s2 - n * torch.outer(m, m)) / (n - 1)).cpu().numpy()
    if not inception_score:
        return mu, sigma
    return mu, sigma, inception_score_from_logits(torch.cat(logits).numpy())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2) (Heusel et al. 2017), float64, scipy-free.

    S1 S2 is similar to the symmetric PSD M = S1^1/2 S2 S1^1/2, so Tr((S1 S2)^1/2) = sum_i sqrt(lambda_i(M)): S1^1/2
    from eigh(S1), then eigvalsh(M), round-off negatives clipped at 0 (never eigvalsh of the non-symmetric S1 S2).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("statistics contain NaN/inf; recompute them (were the images valid uint8?)")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # symmetric S1^1/2
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score_from_logits(logits, splits=10):
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016): mean, std over `splits` equal parts.

    The softmax runs over all 1008 logits of the FID network's fc: pytorch-fid's port of the TF softmax layer keeps
    the graph's 8 background/unused classes, as the original TF IS code does. Resize and numerics differ from the
    TF graph, so IS from this port is close to but not identical with the TF number: report it as such.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need (N, classes) logits with N >= splits={splits}, got shape {logits.shape}")
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))  # log p(y|x), (N, C)
    p, n, scores = np.exp(logp), len(logits), []
    for k in range(splits):
        lo, hi = k * n // splits, (k + 1) * n // splits
        log_py = np.log(np.maximum(p[lo:hi].mean(0), np.finfo(np.float64).tiny))  # log p(y) of this split
        scores.append(np.exp((p[lo:hi] * (logp[lo:hi] - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def save_stats(path, mu, sigma):
    """pytorch-fid stats format: npz with float64 `mu` (D,) and `sigma` (D, D); written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, mu=np.asarray(mu, dtype=np.float64),  # a file object: no ".npz" added
                                          sigma=np.asarray(sigma, dtype=np.float64)))


def read_npz(path):
    """{name: array} of an .npz; a truncated or foreign file is a RunError naming it."""
    if not os.path.isfile(path):
        raise RunError(f"{path} does not exist; check the path")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise RunError(f"cannot read {path} ({first_line(e)}); it is truncated or not an .npz: write it again") \
            from None


def load_stats(path):
    """(mu, sigma) float64 from a pytorch-fid-format npz (ours, or published files such as U-ViT's)."""
    z = read_npz(path)
    if "mu" not in z or "sigma" not in z:
        raise RunError(f"{path} holds {sorted(z)}; a statistics file needs 'mu' and 'sigma'")
    mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise RunError(f"{path}: mu {mu.shape} and sigma {sigma.shape} must be (D,) and (D, D)")
    return mu, sigma


def check_images(x, what):
    """uint8 RGB images (N, H, W, 3) or (N, 3, H, W), N >= 2 (a covariance needs two), else a RunError."""
    if x.dtype != np.uint8 or x.ndim != 4 or 3 not in (x.shape[1], x.shape[3]):
        raise RunError(f"{what} holds {x.dtype} {x.shape}; expected uint8 RGB images (N, H, W, 3) as sample.py "
                       "--npz writes (quantize floats with ((x + 1) * 127.5).round().clip(0, 255))")
    if len(x) < 2:
        raise RunError(f"{what} holds {len(x)} image(s); FID needs at least 2 (papers use 50,000)")
    return x

# ----- Reference statistics and the command line -----

def ref_stats_path(name, cache_dir=None):
    return os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), f"fid_stats_{name}.npz")


def reference_stats(name, data_dir="data", cache_dir=None, model=None, batch_size=50, device=None, progress=True,
                    recompute=False):
    """(mu, sigma, path) of a named reference set ('cifar10-train' = all 50k training images), cached as an npz."""
    if name not in NAMED_REFS:
        raise RunError(f"unknown reference {name!r}; choose one of {sorted(NAMED_REFS)} or pass a stats .npz")
    path = ref_stats_path(name, cache_dir)
    if os.path.isfile(path) and not recompute:
        return (*load_stats(path), path)
    from data import load_cifar10  # lazy: only needed to build reference statistics
    images, _ = load_cifar10(data_dir, train=NAMED_REFS[name], download=True)  # uint8 (N, 3, 32, 32)
    mu, sigma = compute_statistics(images, batch_size, device, progress, model)
    save_stats(path, mu, sigma)
    return mu, sigma, path


def image_folder_batches(folder, batch_size, image_size=None):
    """(iterator of uint8 (B, H, W, 3) batches, count) over the PNG/JPG files under folder, sorted. Every file's
    header is read first, so a broken file or mixed sizes fail before any network is built. image_size: each image
    center-cropped and resized to it first (data.center_crop_resize, as training and extraction; e.g. COCO val2014
    at 256 for the text-to-image FID), so sizes may differ."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
                   if f.lower().endswith(IMAGE_EXTS))
    if len(files) < 2:
        raise RunError(f"{len(files)} PNG/JPG image(s) under {folder}; FID needs at least 2")
    sizes = set()
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.add(im.size)
        except (OSError, Image.DecompressionBombError) as e:
            raise RunError(f"cannot read image {f} ({first_line(e)}); remove or replace it") from None
    if len(sizes) > 1 and not image_size:
        raise RunError(f"images under {folder} differ in size ({sorted(sizes)[:3]}...); resize them to one size")

    def batches():
        for i in range(0, len(files), batch_size):
            imgs = []
            for f in files[i:i + batch_size]:
                try:
                    with Image.open(f) as im:
                        imgs.append(center_crop_resize(im, image_size).permute(1, 2, 0).numpy() if image_size
                                    else np.asarray(im.convert("RGB")))
                except OSError as e:  # a header that reads but a body that does not
                    raise RunError(f"cannot decode image {f} ({first_line(e)}); remove or replace it") from None
            yield np.stack(imgs)
    return batches(), len(files)


def open_source(src, args):
    """Check a samples / reference argument without any network: -> ("stats", (mu, sigma)), ("named", name) or
    ("images", (batches, count))."""
    if src in NAMED_REFS:
        return "named", src
    if os.path.isdir(src):
        return "images", image_folder_batches(src, args.batch_size, getattr(args, "image_size", None))
    if src.endswith(".npz") and os.path.isfile(src):
        z = read_npz(src)
        if "mu" in z and "sigma" in z:
            return "stats", load_stats(src)
        if "arr_0" not in z:
            raise RunError(f"{src} holds {sorted(z)}; expected arr_0 (uint8 N,H,W,3 images) or mu and sigma")
        return "images", (check_images(z["arr_0"], src), len(z["arr_0"]))
    raise RunError(f"{src!r} is not a reference name {sorted(NAMED_REFS)}, an existing .npz or an image folder")


def source_stats(kind, value, args, get_model, inception_score=False):
    """(mu, sigma, IS or None) of an opened source (see open_source)."""
    if kind == "stats":
        return (*value, None)
    if kind == "named":
        model = None if os.path.isfile(ref_stats_path(value, args.cache_dir)) else get_model()
        mu, sigma, path = reference_stats(value, args.data_dir, args.cache_dir, model, args.batch_size, args.device)
        print(f"reference statistics for {value}: {path}")
        return mu, sigma, None
    images, total = value
    with_is = inception_score and total >= 10  # IS uses 10 splits
    out = compute_statistics(images, args.batch_size, args.device, True, get_model(), with_is, total)
    return out if with_is else (*out, None)


# ----- FID for the scripts (sample.py --fid-ref, train_cifar.py --fid-every) -----

def fid_setup(ref, data_dir, device, weights=None, cache_dir=None):
    """(Inception network, reference (mu, sigma)) for a named set, a stats .npz or an images .npz (the statistics
    of those two computed once and cached). Call it before long work, so a missing file fails at once."""
    if not ref.endswith(".npz") and ref not in NAMED_REFS:
        raise RunError(f"--fid-ref {ref!r}: choose {' or '.join(sorted(NAMED_REFS))}, a stats .npz (mu, sigma) "
                       "made with fid.py, or an images .npz (arr_0) such as ADM's VIRTUAL_imagenet256_labeled.npz")
    ref_stats = images = None
    if ref.endswith(".npz"):  # a bad file fails before the network is built
        z = read_npz(ref)
        if "mu" in z and "sigma" in z:
            ref_stats = load_stats(ref)
        elif "arr_0" in z:
            images = check_images(z["arr_0"], ref)
        else:
            raise RunError(f"{ref} holds {sorted(z)}; expected mu and sigma, or arr_0 (uint8 N,H,W,3 images)")
    inception = build_inception(weights, device=device, cache_dir=cache_dir)
    if images is not None:  # statistics of the reference images, computed once and cached beside the weights
        st = os.stat(ref)
        key = hashlib.sha1(f"{os.path.abspath(ref)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        stem = os.path.splitext(os.path.basename(ref))[0]
        cache = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), f"fid_stats_{stem}_{key}.npz")
        if not os.path.isfile(cache):
            save_stats(cache, *compute_statistics(images, device=device, progress=True, model=inception))
        ref_stats = load_stats(cache)
    if ref_stats is None:
        ref_stats = reference_stats(ref, data_dir, cache_dir, model=inception, device=device)[:2]
    return inception, ref_stats


def fid_score(batches, inception, ref, device, num_samples):
    """(FID, IS mean or None) of a stream of uint8 image batches; IS (10 splits) needs >= 10 samples."""
    stats = compute_statistics(batches, model=inception, device=device, inception_score=num_samples >= 10)
    return frechet_distance(*stats[:2], *ref), (stats[2][0] if len(stats) == 3 else None)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="FID / Inception Score with pytorch-fid's Inception, no scipy or TF.")
    ap.add_argument("samples", nargs="?", help="images npz (arr_0 uint8 N,H,W,3), stats npz (mu, sigma) or folder")
    ap.add_argument("--ref", default="cifar10-train", help=f"{sorted(NAMED_REFS)}, stats npz, images npz or folder")
    ap.add_argument("--make-ref", choices=sorted(NAMED_REFS), help="(re)compute and cache named reference stats")
    ap.add_argument("--data-dir", default="data", help="dataset folder for data.load_cifar10")
    ap.add_argument("--cache-dir", default=None, help=f"weights and reference stats (default {DEFAULT_CACHE_DIR})")
    ap.add_argument("--weights", default=None, help="pt_inception-2015-12-05-6726825d.pth path (or $FID_WEIGHTS)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--image-size", type=int, help="folders: center-crop and resize every image to this size first "
                                                   "(e.g. 256 for COCO val2014), as training does")
    args = ap.parse_args(argv)
    if args.samples is None and args.make_ref is None:
        ap.error("give samples to score, or --make-ref NAME")
    if args.batch_size < 1 or (args.image_size is not None and args.image_size < 1):
        ap.error("--batch-size and --image-size must be >= 1")
    return args


def run(args):
    args.device = resolve_device(args.device)
    models = []

    def get_model():  # built at most once, and only if some input needs Inception features
        if not models:
            models.append(build_inception(args.weights, args.device, args.cache_dir))
        return models[0]
    if args.make_ref:
        *_, path = reference_stats(args.make_ref, args.data_dir, args.cache_dir, get_model(), args.batch_size,
                                   args.device, recompute=True)
        print(f"reference statistics for {args.make_ref} cached at {path}")
        if args.samples is None:
            return None
    samples, ref = open_source(args.samples, args), open_source(args.ref, args)  # inputs checked first
    mu1, s1, score = source_stats(*samples, args, get_model, inception_score=True)
    mu2, s2, _ = source_stats(*ref, args, get_model)
    if mu1.shape != mu2.shape:
        raise RunError(f"the samples have {mu1.shape[0]}-d statistics and the reference {mu2.shape[0]}-d ones; "
                       "use a reference made with pytorch-fid's pool3 features (2048-d)")
    fid = frechet_distance(mu1, s1, mu2, s2)
    print(f"FID: {fid:.4f}")
    if score is not None:
        print(f"IS: {score[0]:.4f} +- {score[1]:.4f} (pytorch-fid Inception: close to, not identical with, TF IS)")
    return fid


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (RunError, ValueError) as e:  # ValueError: statistics that do not fit (see frechet_distance)
        raise SystemExit(f"fid.py: error: {e}")


if __name__ == "__main__":
    main()

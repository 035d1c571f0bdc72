"""
Training data for train_cifar.py: CIFAR-10 from the official python tarball, an image folder, or
pre-extracted latents, each held as ONE tensor (uint8 images or float latents) so that batches are drawn by
index on the device with no DataLoader.

  load_cifar10(data_dir, train=True, download=True) -> (uint8 (N, 3, 32, 32), int64 (N,))   (fid.py uses it)
  load_image_folder(root, image_size)               -> (uint8 (N, 3, S, S), int64 (N,), class names)
  load_latents(path)                                -> (float (N, C, H, W), int64 (N,) or None)
  LatentFolder(folder), LatentBatches(store, device) an extract_latents.py output, memory-mapped, and its batches
  latents_provenance(path, x), check_vae_fits(...)  what latents are and what made them; a decoding VAE checked
  load_dataset(name, data_dir, image_size)          -> one of the above as (x, labels or None, class names)
  BatchIndices(n, batch_size, seed)(step)           -> (batch_size,) int64 indices for that step
  get_batch(data, labels, indices, flip)            -> (float batch in [-1, 1], labels or None)
  Batches(x, labels, batch_size, seed, device)(step, flip)  a run's batch of a step, for one of its processes

CIFAR-10 file facts (URL, size, md5, pickle layout): https://www.cs.toronto.edu/~kriz/cifar.html
"""
import functools
import hashlib
import json
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from checkpoints import code_refusal, load_reason
from devices import memory_size
from errors import RunError
from files import sha256_of, size

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"      # 170,498,071 bytes
CIFAR_DIR = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class DataError(RunError):
    """A data problem with a message that says what to do; the scripts turn it into a one-line exit."""


# ----- CIFAR-10: download, verify, extract, parse -----

def _manual_hint(data_dir, url):
    archive = os.path.join(data_dir, ARCHIVE_NAME)
    return (f"download {url} by hand (md5 {CIFAR_MD5}) and put it at {archive}, or put an unpacked "
            f"{CIFAR_DIR}/ folder into {data_dir}/ (or train on your own images: --dataset folder)")


def _md5(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url, path, md5):
    """Stream url to path with a progress bar: written to path + '.part', md5-checked, then renamed."""
    tmp, h = path + ".part", hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {os.path.basename(path)}") as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
    except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(f"could not download {url} ({e}); {_manual_hint(os.path.dirname(path), url)}") from None
    if h.hexdigest() != md5:
        os.remove(tmp)
        raise DataError(f"md5 mismatch for {url}: got {h.hexdigest()}, expected {md5} (truncated or wrong file); "
                        f"{_manual_hint(os.path.dirname(path), url)}")
    os.replace(tmp, path)


def safe_extract(archive, dest):
    """Extract only regular files under cifar-10-batches-py/; reject absolute paths, '..', links, devices.
    Extracts into a temporary folder inside dest that is renamed at the end, so a half-extracted folder
    never looks complete."""
    for name in os.listdir(dest):  # what a killed extraction left (never looks complete: it is renamed at the end)
        if name.startswith(".extract-") and os.path.isdir(os.path.join(dest, name)):
            shutil.rmtree(os.path.join(dest, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar.getmembers():
                parts = m.name.replace("\\", "/").split("/")
                bad = m.name.startswith(("/", "\\")) or ".." in parts or parts[0] != CIFAR_DIR
                if bad or not (m.isfile() or m.isdir()):
                    raise DataError(f"refusing to extract {archive}: unsafe member {m.name!r} (only regular files "
                                    f"under {CIFAR_DIR}/ are allowed); delete the file and download it again")
                if m.isfile():
                    target = os.path.join(tmp, *[p for p in parts if p not in ("", ".")])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with tar.extractfile(m) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        if not os.path.isdir(os.path.join(tmp, CIFAR_DIR)):
            raise DataError(f"{archive} holds no {CIFAR_DIR}/ folder; delete it and download it again")
        os.replace(os.path.join(tmp, CIFAR_DIR), os.path.join(dest, CIFAR_DIR))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"cannot extract {archive} ({e}); delete it and download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# What a CIFAR-10 batch pickle may reference (_ArrayUnpickler): numpy arrays (and protocol-2 bytes from python 3),
# never code, since a folder that was not md5-checked must not run anything.
PICKLE_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def _read_batch(path):
    """One pickled batch: dict with b'data' uint8 (n, 3072) as R, G, B planes and b'labels'."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        x = torch.from_numpy(np.asarray(d.get(b"data", d.get("data")), dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
        y = torch.as_tensor(np.asarray(d.get(b"labels", d.get("labels")), dtype=np.int64))
    except Exception as e:
        raise _batch_error(path, e) from None
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels; delete the folder and download again")
    return x, y


def _batch_error(path, e):
    if isinstance(e, FileNotFoundError):
        return DataError(f"missing {path}; delete {os.path.dirname(path)} to download CIFAR-10 again")
    return DataError(f"cannot parse {path} ({type(e).__name__}: {e}); delete {os.path.dirname(path)} "
                     "to download CIFAR-10 again")


def load_cifar10(data_dir="data", train=True, download=True, url=None):
    """CIFAR-10 train (50k) or test (10k) as (uint8 (N, 3, 32, 32), int64 (N,)), downloaded first when absent."""
    root = os.path.join(data_dir, CIFAR_DIR)
    if not os.path.isdir(root):
        fetch_cifar10(data_dir, url or CIFAR_URL, download)
    xs, ys = zip(*[_read_batch(os.path.join(root, name)) for name in (CIFAR_TRAIN if train else CIFAR_TEST)])
    return torch.cat(xs), torch.cat(ys)


def fetch_cifar10(data_dir, url, download):
    """Download (unless the archive is there; md5-checked) and extract cifar-10-batches-py/ into data_dir."""
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file; give the folder that holds (or will hold) {CIFAR_DIR}/")
    archive = os.path.join(data_dir, ARCHIVE_NAME)
    if not os.path.exists(archive):
        if not download:
            raise DataError(f"CIFAR-10 not found in {data_dir}; {_manual_hint(data_dir, url)}")
        try:
            os.makedirs(data_dir, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create --data-dir {data_dir} ({e}); choose a writable folder") from None
        print(f"downloading CIFAR-10 from {url} to {data_dir}/")
        download_file(url, archive, CIFAR_MD5)
    elif _md5(archive) != CIFAR_MD5:
        raise DataError(f"{archive} has the wrong md5 (expected {CIFAR_MD5}); delete it and rerun, or "
                        f"{_manual_hint(data_dir, url)}")
    safe_extract(archive, data_dir)


# ----- Image folder -----

def center_crop_resize(img, size):
    """ADM-style preprocessing: halve with BOX while the shorter side >= 2*size, BICUBIC-resize the shorter
    side to size, then center-crop size x size. Returns uint8 (3, size, size)."""
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(max(size, round(s * scale)) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)        # (3, S, S)


def _images_under(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS))


def load_image_folder(root, image_size):
    """root/<class>/**/*.png (one sub-folder per class, labels in sorted-name order) or a flat root/*.png
    (unconditional, labels all 0). Returns (uint8 (N, 3, S, S), int64 (N,), class names or [])."""
    if not os.path.isdir(root):
        raise DataError(f"--data-dir {root} is not a folder; point it at a folder of images")
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and _images_under(os.path.join(root, d)))
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in _images_under(os.path.join(root, c))]
    else:
        files = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}; use a folder with one "
                        "sub-folder of images per class, or a flat folder of images")
    need = len(files) * 3 * image_size ** 2
    if need > memory_size():  # checked before it is allocated (or OOM-killed)
        raise DataError(f"{len(files):,} images of {image_size}x{image_size} need {size(need)} of memory, more than "
                        f"this machine's {size(memory_size())}; lower --image-size")
    x = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    for i, (f, _) in enumerate(tqdm(files, desc=f"load {root}", disable=len(files) < 1000)):
        try:
            with Image.open(f) as img:
                x[i] = center_crop_resize(img, image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # bombs: PIL's pixel-count guard
            raise DataError(f"cannot read image {f} ({type(e).__name__}: {e}); remove or fix it") from None
    return x, torch.tensor([c for _, c in files], dtype=torch.int64), classes


# ----- Pre-extracted latents -----

def load_latents(path):
    """A .npz (arrays 'latents' or 'arr_0', optional 'labels' or 'arr_1') or .pt (dict with the same keys)
    holding latents (N, C, H, W), already scaled (e.g. by 0.18215). Returns (float (N,C,H,W), int64 (N,) or None)."""
    try:
        if path.endswith(".npz"):
            with np.load(path) as f:
                d = {k: torch.from_numpy(f[k]) for k in f.files}
        else:
            d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise code_refusal(path, e, "save the latents as tensors only (a dict of 'latents' and 'labels') or as .npz") \
            or DataError(f"cannot read latents {path} ({load_reason(e)}); pass a .npz or .pt file") from None
    z = d.get("latents", d.get("arr_0")) if isinstance(d, dict) else None
    y = d.get("labels", d.get("arr_1")) if isinstance(d, dict) else None
    if not torch.is_tensor(z) or z.ndim != 4 or not z.is_floating_point():  # bool, int8, complex: refused
        raise DataError(f"{path} needs a float array 'latents' (or 'arr_0') of shape (N, C, H, W)")
    if z.shape[-1] != z.shape[-2] or len(z) == 0:
        raise DataError(f"{path}: latents {tuple(z.shape)} must be (N >= 1, C, S, S), square like the backbones' "
                        "input_size; extract them from square (center-cropped) images")
    if y is not None and (not torch.is_tensor(y) or y.shape != (len(z),)):
        raise DataError(f"{path}: labels must have shape ({len(z)},), got {tuple(getattr(y, 'shape', ()))}")
    if y is not None and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or int(y.min()) < 0):
        raise DataError(f"{path}: labels must be integers >= 0 (class indices), got {y.dtype} from {y.min().item()}")
    if not torch.isfinite(z).all():
        raise DataError(f"{path}: the latents hold NaN or inf values; extract them again")
    return z.float(), None if y is None else y.long()


def latents_provenance(path, x):
    """What a latent run records of its data (train_cifar.py refuses a resume on others): 'latents', an identity by
    content (sha256 of the file; of meta.json and the first MiB of latents.npy for a folder), and for a folder the
    VAE that made them ('latents_vae': its sha256, or its path for folders extracted before hashes were recorded)
    and the 'scaling_factor' they are multiplied by."""
    if not isinstance(x, LatentFolder):
        return {"latents": sha256_of([path])[:16]}
    files = [os.path.join(path, "meta.json"), (os.path.join(path, "latents.npy"), 1 << 20)]
    return {"latents": sha256_of(files)[:16], "latents_vae": x.meta.get("vae_sha256") or x.meta.get("vae"),
            "scaling_factor": x.scaling_factor}


def check_vae_fits(autoencoder, vae_path, latents, latent_size):
    """The decoding VAE against what made the latents (a latent run's pixel_size, scaling_factor, latents_vae: an
    absent entry is unknown): another downsampling is refused; another VAE or scaling factor is noted."""
    f, pixels, scale = autoencoder.downsample_factor, latents.get("pixel_size"), latents.get("scaling_factor")
    if pixels and pixels != latent_size * f:
        raise RunError(f"the VAE {vae_path} downsamples {f}x ({latent_size}px latents -> {latent_size * f}px images) "
                       f"but the latents were made from {pixels}px images; pass the VAE that made them (--vae)")
    maker = latents.get("latents_vae")
    if maker and maker not in (autoencoder.sha256, os.path.abspath(vae_path)):
        print(f"note: decoding with the VAE {vae_path} (sha256 {autoencoder.sha256[:12]}), not the one that made the "
              f"latents ({maker[:12] if len(maker) == 64 else maker}): right for a decoder fine-tune of the same "
              "encoder, wrong otherwise")
    if scale is not None and scale != autoencoder.scaling_factor:
        print(f"note: the latents were scaled by {scale} but the VAE {vae_path} divides by its scaling_factor "
              f"{autoencoder.scaling_factor}")


def check_meta(meta, meta_path):
    """The entries of an extract_latents.py meta.json that training reads, each of the right kind."""
    need = ("count", "latent_channels", "latent_size", "class_names", "scaling_factor", "image_size")
    missing = [k for k in need if k not in meta]
    if missing:
        raise DataError(f"{meta_path} lacks {missing}; extract the latents again")
    bad = [f"{k} {meta[k]!r} (an integer >= 1)" for k in need if k not in ("class_names", "scaling_factor")
           and (type(meta[k]) is not int or meta[k] < 1)]
    names, scale = meta["class_names"], meta["scaling_factor"]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        bad.append(f"class_names {str(names)[:40]} (a list of names)")
    if not (type(scale) in (int, float) and math.isfinite(scale) and scale > 0):
        bad.append(f"scaling_factor {scale!r} (a finite number > 0)")
    if bad:
        raise DataError(f"{meta_path}: {'; '.join(bad)}; extract the latents again")


class LatentFolder:
    """An extract_latents.py output folder, memory-mapped (nothing is read until a batch asks for it):
    latents.npy (N, 2, 2C, h, w) = posterior (mean, logvar) of each image and of its horizontal flip, unscaled;
    labels.npy (N,) int64; meta.json (class names, image and latent size, VAE path, scaling factor, counts)."""

    def __init__(self, folder):
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"{folder} has no meta.json: not an extract_latents.py output; run extract_latents.py "
                            "--out there (or pass a .npz / .pt latents file)")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {meta_path} ({e}); extract the latents again") from None
        if not isinstance(meta, dict):
            raise DataError(f"{meta_path} is not a JSON object; extract the latents again")
        if meta.get("format") != "latents-v1" or not meta.get("complete"):
            raise DataError(f"{folder} is an incomplete or unknown latents folder (meta.json: format "
                            f"{meta.get('format')!r}, complete {meta.get('complete')!r}); rerun extract_latents.py "
                            "with the same flags to finish it")
        try:
            self.moments = np.load(os.path.join(folder, "latents.npy"), mmap_mode="r")
            labels = np.load(os.path.join(folder, "labels.npy"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the arrays in {folder} ({e}); extract the latents again") from None
        check_meta(meta, meta_path)
        n, c, names = meta["count"], meta["latent_channels"], meta["class_names"]
        want = (n, 2, 2 * c, meta["latent_size"], meta["latent_size"])
        if self.moments.shape != want or labels.shape != (n,):
            raise DataError(f"{folder}: latents {self.moments.shape} / labels {labels.shape} do not match meta.json "
                            f"({want}); extract the latents again")
        if self.moments.dtype.kind != "f" or labels.dtype.kind not in "iu":  # bool, int8, complex moments: refused
            raise DataError(f"{folder}: latents.npy holds {self.moments.dtype} (float16 or float32 expected) and "
                            f"labels.npy {labels.dtype} (integers expected); extract the latents again")
        if labels.min() < 0 or labels.max() >= max(len(names), 1):  # else a label could become the null label
            raise DataError(f"{folder}: labels.npy holds labels {labels.min()}..{labels.max()} but meta.json names "
                            f"{len(names)} classes; extract the latents again")
        self.meta, self.labels, self.class_names = meta, torch.from_numpy(labels.astype(np.int64)), meta["class_names"]
        self.channels, self.size, self.scaling_factor = c, meta["latent_size"], float(meta["scaling_factor"])

    def __len__(self):
        return len(self.moments)

    @property
    def shape(self):  # what a model sees: (N, C, h, w) latents
        return (len(self), self.channels, self.size, self.size)


class LatentBatches:
    """Batches of z = scaling_factor * (mean + exp(logvar / 2) eps) from stored moments, with one of the two stored
    flips per sample (the flip augmentation of DiT and U-ViT) and fresh noise every step, as DiT's on-the-fly
    `latent_dist.sample()`. The moments live on the device when they take under a quarter of its free memory (the
    rest is the model's); otherwise each batch is gathered from the memory map into pinned host memory and copied
    asynchronously."""

    def __init__(self, store, device, labels=None):  # labels: the store's, or e.g. captions.CaptionLabels
        self.store, self.device, self.scale = store, torch.device(device), store.scaling_factor
        nbytes = store.moments.nbytes
        fits = self.device.type != "cuda" or nbytes < 0.25 * torch.cuda.mem_get_info(self.device)[0]
        self.on_device = self.device.type == "cuda" and fits
        self.moments = None
        if self.on_device:  # copied in chunks: never a second full copy in host memory
            self.moments = torch.empty(store.moments.shape, dtype=torch.from_numpy(store.moments[:1]).dtype,
                                       device=self.device)
            for i in range(0, len(store), 65536):
                self.moments[i:i + 65536] = torch.from_numpy(np.ascontiguousarray(store.moments[i:i + 65536]))
        self.labels = (store.labels if labels is None else labels).to(self.device)

    def __call__(self, indices, with_labels, flip=None, eps=None):
        """z (and labels) of `indices`; flip (B,) in {0, 1} picks the stored flips and eps (B, C, h, w) is the
        noise of the draw (both at random when not given)."""
        if self.on_device:
            m = self.moments[indices.to(self.device)]
        else:  # gather in index order from the map (sorted reads), then restore the batch order
            order = torch.argsort(indices)
            rows = torch.from_numpy(self.store.moments[np.sort(indices.numpy())])
            m = torch.empty_like(rows)
            m[order] = rows
            if self.device.type == "cuda":
                m = m.pin_memory().to(self.device, non_blocking=True)
        m = m.to(self.device).float()                                     # (B, 2, 2C, h, w)
        if flip is None:
            flip = (torch.rand(len(m), device=self.device) < 0.5).long()  # which stored flip, per sample
        m = m[torch.arange(len(m), device=self.device), flip.to(self.device)]  # (B, 2C, h, w)
        mean, logvar = m.chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * (torch.randn_like(mean) if eps is None else eps.to(mean))
        return z * self.scale, (self.labels[indices.to(self.device)] if with_labels else None)


# ----- Dispatch -----

def load_dataset(name, data_dir, image_size=32, cifar_url=None):
    """'cifar10' | 'folder' | 'latents' -> (uint8 images or float latents (N, C, H, W), labels or None, classes)."""
    if name != "cifar10":
        return load_other_dataset(name, data_dir, image_size)
    if image_size != 32:
        raise DataError("CIFAR-10 images are 32x32; use --image-size 32 (or --dataset folder for other sizes)")
    return (*load_cifar10(data_dir, train=True, url=cifar_url), CIFAR_CLASSES)


def load_other_dataset(name, data_dir, image_size):
    """An image folder, an extract_latents.py folder or a latents file, as load_dataset returns them (class names
    [] when unlabelled)."""
    if name == "folder":
        return load_image_folder(data_dir, image_size)
    if name == "latents" and os.path.isdir(data_dir):
        store = LatentFolder(data_dir)
        return store, store.labels, store.class_names
    if name == "latents":
        z, y = load_latents(data_dir)
        return z, y, [] if y is None else [str(i) for i in range(int(y.max()) + 1)]
    raise DataError(f"unknown dataset {name!r}; choose cifar10, folder or latents")


# ----- Batches by index -----

@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):  # each epoch's permutation from its own seeded generator
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class BatchIndices:
    """Step s takes positions [s*B, (s+1)*B) of the endless concatenation of seeded per-epoch permutations: a pure
    function of the step, so a resumed run draws exactly the batches the uninterrupted run would have drawn."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __call__(self, step):
        pos = step * self.batch_size + torch.arange(self.batch_size)
        epochs, offsets = pos // self.n, pos % self.n
        return torch.cat([epoch_order(self.n, self.seed, int(e))[offsets[epochs == e]] for e in torch.unique(epochs)])


def random_crop(x, pad, fill=-1.0):
    """torchvision RandomCrop(size, padding=pad) on a batch in [-1, 1]: pad each side by `pad` with `fill` (black,
    as the zero padding of the uint8 image), then take a random same-size window per image (global RNG, on x's
    device, so a resumed run crops the same)."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=fill)
    dy, dx = (torch.randint(0, 2 * pad + 1, (B,), device=x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[b, c, rows, cols]  # (B, C, H, W)


def get_batch(data, labels, indices, flip):
    """A batch on data's device, uint8 scaled to [-1, 1]; flip: a random half (or a (B,) bool mask) mirrored."""
    idx = pinned_copy(indices, data.device) if data.device.type == "cuda" else indices.to(data.device)
    x = data[idx].float() / 127.5 - 1.0 if data.dtype == torch.uint8 else data[idx].float()
    if torch.is_tensor(flip) or flip:  # on the device with the global RNG: a resumed run flips the same images
        mask = flip.to(x.device) if torch.is_tensor(flip) else torch.rand(len(x), device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x, None if labels is None else labels[idx]


def pinned_copy(indices, device):
    """Pinned + non_blocking: no host sync for the index copy to a GPU."""
    return indices.pin_memory().to(device, non_blocking=True)


class Batches:
    """Step s's batch: BatchIndices(s), this process's `part`, from images or latents held whole on the device."""

    def __init__(self, x, labels, batch_size, seed, device, flip=True, part=slice(None)):
        self.indices, self.part, self.flip = BatchIndices(len(x), batch_size, seed), part, flip
        self.shape = (batch_size, *x.shape[1:])  # the global batch
        self.latents = isinstance(x, LatentFolder)  # memory-mapped moments: LatentBatches draws z (stored flips)
        self.x = LatentBatches(x, device, labels) if self.latents else x.to(device)
        self.labels = None if labels is None else labels.to(device)

    def __call__(self, step, flip, latent_noise=None):
        """(x, labels or None) of step `step`; flip (b,) bool and latent_noise: this process's part of its draws."""
        idx = self.indices(step)[self.part]
        if self.latents:
            return self.x(idx, self.labels is not None, flip.long(), latent_noise)
        return get_batch(self.x, self.labels, idx, flip if self.flip else False)

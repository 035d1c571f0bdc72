"""
Encode an image folder once through the SD-VAE into one memory-mapped array of posterior moments, so that latent
models (DiT, latent U-ViT, DiffiT on ImageNet-256) train without running the VAE encoder at every step.

  python extract_latents.py --data-dir imagenet/train --image-size 256 --vae sd-vae-ft-ema --out latents/in256

--data-dir holds one sub-folder per class (sorted names -> labels 0..K-1, as ImageNet's train/ with its 1,000
synset folders; images found recursively below each) or, with no such sub-folders, images directly (unconditional:
labels all 0). Files are taken in sorted order. Each image is preprocessed as ADM does (data.center_crop_resize =
guided_diffusion/image_datasets.py center_crop_arr, the preprocessing of DiT train.py), scaled to [-1, 1], and
encoded together with its horizontal flip.

Text-to-image (U-ViT §4.4): with --captions FILE (a Hugging Face metadata.jsonl or a COCO captions_*.json; a bare
--captions means DATA_DIR/metadata.jsonl) the images are those FILE lists (names relative to --data-dir, sorted)
less the seeded 1% of captions.held_out, whose captions become the prompts of grids and FID; labels are all 0.
Captions are used only with the flag: a folder that merely holds a metadata.jsonl extracts as before. The texts are
stored, not CLIP features or token ids: training tokenizes them with its --clip folder's tokenizer, one vocabulary
per run (BENCHMARKS.md, "Caption storage").

What is stored, and why moments. DiT's train.py encodes on the fly, `vae.encode(x).latent_dist.sample()` of a
randomly flipped image, so every epoch sees a fresh posterior draw of either flip. fast-DiT's extract_features.py
saves one such draw per image, freezing both the flip and the noise for the whole run. U-ViT's
scripts/extract_imagenet_feature.py saves the posterior *moments* (mean and logvar) of each image and of its flip,
and its train_ldm.py draws z = mean + exp(logvar / 2) * eps afresh at every step (autoencoder.sample). We store
what U-ViT stores, in one array: the trainer picks a flip at random and draws z (then multiplies by scaling_factor),
which gives DiT's on-the-fly augmentation (random flip, fresh posterior draw) at twice fast-DiT's storage.

Output (--out folder; format "latents-v1"):
  latents.npy  (N, 2, 2C, h, w), float16 (--dtype float32 for full precision): [:, 0] the image, [:, 1] its
               horizontal flip; channels [0:C] the posterior mean, [C:2C] the logvar (clamped to [-30, 20] as LDM
               does), both unscaled (VAE space). One .npy array, memory-mapped: np.load(path, mmap_mode="r").
  labels.npy   int64 (N,).
  meta.json    {"format": "latents-v1", "complete", "count": N, "image_size", "latent_channels": C,
               "latent_size": h, "dtype", "stores": "moments", "flips": 2, "class_names", "vae" (absolute path),
               "scaling_factor", "files_sha1" (sha1 of the newline-joined relative file list), "done",
               "vae_sha256" (the VAE by content: sha256 of its config.json and weights), "downsample_factor"}.
               Folders written before the last two existed read as "unknown": nothing is compared against them.
               With --captions also "captions": true, so a rerun with or without --captions is refused.
  captions.json  with --captions, written once the latents are complete: {"format": "captions-v1", "captions":
               each image's captions (aligned with latents.npy), "held_out": the held-out prompts, "source"}.
  C x h x w = 4 x 32 x 32 for the SD-VAE at 256: 32,768 bytes per image in float16 (ImageNet's 1,281,167 training
  images: 42.0 GB), 65,536 in float32.

Nothing half-written looks complete. meta.json is written atomically first (complete false, done 0), then again
after every chunk of about --flush-every images has been flushed (memmap flush + fsync), with done = the images
stored so far; complete becomes true only after the last chunk is flushed. Rerunning the same command on an
incomplete --out resumes at done and yields a byte-identical latents.npy: the VAE runs in eval mode in float32
(TF32 off unless --tf32, deterministic cuDNN), batch i always covers images [i*B, (i+1)*B), and values are cast only
when stored (use the same --batch-size and device to resume). Rerunning on a complete --out prints that it is
complete and exits; an --out made from other files, image size, VAE (another path, or other content at the same
path) or dtype is refused (pick a new --out), and so is a second extraction while one runs there (a lock the OS drops
when its holder dies). The disk space latents.npy needs is checked before anything is written, and its blocks are
reserved before the memory map is written: a full disk is a one-line error, never a SIGBUS.
An image that cannot be decoded stops the run with its path: skipping it would silently change N and the labels.
The chunks before it stay resumable once the file is replaced with a readable image (removing it changes the file
list, so a new --out is needed).

Measurements (float16 rounding of the moments, extraction speed on 2 CPU cores): BENCHMARKS.md, "Latents".
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from captions import CAPTIONS_FORMAT, caption_images, split_held_out
from devices import memory_size, resolve_device
from errors import RunError, first_line
from files import allocate, atomic_write, check_dir, check_free_space, locked, make_dir, remove_stale_temps, size
from data import IMAGE_EXTENSIONS, _images_under, center_crop_resize
from vae import load_vae

FORMAT = "latents-v1"
DTYPES = {"float16": np.float16, "float32": np.float32}
# meta.json entries that must agree for a rerun to resume (or to count as already done)
MATCH_KEYS = ("captions", "format", "count", "image_size", "latent_channels", "latent_size", "dtype", "stores", "flips",
              "class_names", "vae", "scaling_factor", "files_sha1", "vae_sha256", "downsample_factor")
PROVENANCE_KEYS = ("vae_sha256", "downsample_factor")  # recorded since provenance: not compared in older folders


# ----- The input: files and labels -----

def list_images(root):
    """(absolute paths, relative paths, labels, class names) of root/<class>/**/<image> (classes in sorted order,
    as data.load_image_folder) or, when no sub-folder holds images, of root/<image> (labels 0, class names [])."""
    if not os.path.isdir(root):
        raise RunError(f"--data-dir {root} is not a folder; point it at a folder of class sub-folders or of images")
    per_class = [(d, _images_under(os.path.join(root, d))) for d in sorted(os.listdir(root))
                 if os.path.isdir(os.path.join(root, d))]
    per_class = [(d, files) for d, files in per_class if files]
    if per_class:
        classes = [d for d, _ in per_class]
        files = [(f, i) for i, (_, fs) in enumerate(per_class) for f in fs]
    else:
        classes = []
        files = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root))
                 if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, f))]
    if not files:
        raise RunError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in --data-dir {root}; use a folder with "
                       "one sub-folder of images per class, or a flat folder of images")
    paths = [f for f, _ in files]
    rel = [os.path.relpath(f, root).replace(os.sep, "/") for f in paths]
    return paths, rel, np.array([c for _, c in files], dtype=np.int64), classes


def caption_list(data_dir, captions):
    """list_images for --captions ("": DATA_DIR/metadata.jsonl): the listed images less the held-out ones, labels 0,
    no class names, and the bytes of their captions.json."""
    train, held = split_held_out(caption_images(data_dir, captions or None))
    source = os.path.abspath(captions or os.path.join(data_dir, "metadata.jsonl"))
    doc = {"format": CAPTIONS_FORMAT, "captions": train.captions, "held_out": held, "source": source}
    return train.paths, train.rel, np.zeros(len(train.rel), np.int64), [], json.dumps(doc).encode() + b"\n"


def files_sha1(rel):
    return hashlib.sha1("\n".join(rel).encode("utf-8", "surrogateescape")).hexdigest()


class ImageFiles(torch.utils.data.Dataset):
    """Item i (counted from start): (index, uint8 (3, S, S) ADM-preprocessed image, "" or why it failed). Decoding
    errors are returned, not raised, so the main process can name the file in one line."""

    def __init__(self, paths, image_size, start=0):
        self.paths, self.image_size, self.start = paths, image_size, start

    def __len__(self):
        return len(self.paths) - self.start

    def __getitem__(self, i):
        i += self.start
        try:
            with Image.open(self.paths[i]) as img:
                return i, center_crop_resize(img, self.image_size), ""
        except Exception as e:  # truncated, not an image, decompression bomb, ...: all "cannot read"
            return i, torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), first_line(e)


def collate(items):
    idx, images, errors = zip(*items)
    return torch.tensor(idx), torch.stack(images), [(i, e) for i, e in zip(idx, errors) if e]


# ----- Encoding -----

@contextlib.contextmanager
def exact_fp32(device, tf32=False):
    """float32 convs and matmuls (no TF32, torch's cuDNN default on Ampere+ unless tf32) with deterministic cuDNN
    algorithms, so a resumed run reproduces the same bits; the previous settings are restored afterwards."""
    flags = [(torch.backends.cudnn, "allow_tf32", tf32), (torch.backends.cuda.matmul, "allow_tf32", tf32),
             (torch.backends.cudnn, "deterministic", True), (torch.backends.cudnn, "benchmark", False)]
    old = []
    if device.type == "cuda":
        for obj, name, value in flags:
            with contextlib.suppress(RuntimeError):  # torch raises if its old and new TF32 APIs were mixed
                old.append((obj, name, getattr(obj, name)))
                setattr(obj, name, value)
    try:
        with torch.autocast(device.type, enabled=False), torch.inference_mode():
            yield
    finally:
        for obj, name, value in reversed(old):
            with contextlib.suppress(RuntimeError):
                setattr(obj, name, value)


def encode_batch(model, images, device):
    """uint8 (B, 3, S, S) -> float32 (B, 2, 2C, h, w) on the CPU: [:, 0] the image, [:, 1] its flip; channels
    [0:C] the posterior mean, [C:2C] the logvar. Image and flip go through the encoder as one batch of 2B."""
    x = images.to(device, non_blocking=True).float() / 127.5 - 1.0
    mean, logvar = model.encode(torch.cat([x, x.flip(3)]))
    m = torch.cat([mean, logvar], dim=1)  # (2B, 2C, h, w)
    return m.view(2, len(images), *m.shape[1:]).transpose(0, 1).float().cpu()


# ----- Output files -----

def read_meta(out):
    path = os.path.join(out, "meta.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path} is not a readable meta.json ({first_line(e)}); delete {out} or pick a new --out") \
            from None
    if not isinstance(meta, dict):
        raise RunError(f"{path} is not an extract_latents.py meta.json; delete {out} or pick a new --out")
    return meta


def write_meta(out, meta):
    text = json.dumps(meta, indent=1).encode("utf-8") + b"\n"
    atomic_write(os.path.join(out, "meta.json"), lambda f: f.write(text))


def open_latents(path, shape, dtype, mode="r+"):
    """The existing latents.npy, memory-mapped, if it has this shape and dtype, else None."""
    try:
        lat = np.lib.format.open_memmap(path, mode=mode)
    except (OSError, ValueError):
        return None
    return lat if lat.shape == tuple(shape) and lat.dtype == dtype else None


def reserve(path):
    """Reserve the disk blocks of the whole file (files.allocate), so writing its memory map never meets a full
    disk (which a map reports as SIGBUS)."""
    with open(path, "r+b") as fh:
        allocate(fh.fileno(), os.path.getsize(path))


def space_error(path, shape, np_dtype, e):
    need = math.prod(shape) * np.dtype(np_dtype).itemsize
    return RunError(f"cannot create {path} ({first_line(e)}); free disk space ({need:,} bytes needed) or choose "
                    "another --out (what was extracted so far is kept)")


def difference(key, old, new):
    """How a rerun's settings differ from an extraction's meta.json, naming both sides."""
    if key == "captions":
        return f"it was extracted {'with' if old else 'without'} --captions"
    if key == "files_sha1":
        return "the file list differs (files_sha1)"
    if key == "vae_sha256":
        return f"the VAE's content changed: sha256 {str(old)[:12]} when the extraction began, {new[:12]} now"
    return f"{key} {old!r} != {new!r}"


def write_captions(out, text):
    """captions.json, unless it already holds exactly this text (then nothing is rewritten)."""
    path = os.path.join(out, "captions.json")
    with contextlib.suppress(OSError), open(path, "rb") as f:
        if f.read() == text:
            return
    atomic_write(path, lambda f: f.write(text))
    print(f"wrote {path} ({len(json.loads(text)['captions']):,} images' captions)")


def sync(lat, path):
    """Everything written into the memmap is on disk when this returns."""
    lat.flush()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- The extraction -----

def extract(data_dir, image_size, vae, out, batch_size=64, device=None, workers=None, dtype="float16",
            flush_every=1024, tf32=False, progress=True, captions=None):
    """Write (or finish) the latents-v1 folder `out` for the images of data_dir, or with `captions` (a caption file;
    "": DATA_DIR/metadata.jsonl) for the images it lists, plus captions.json (see the module docstring); returns its
    meta dict. Bad input is a RunError raised before anything is written; an image that cannot be read
    is a RunError raised after the batches before it are saved (resumable)."""
    for ok, msg in [(image_size >= 1, "--image-size must be >= 1"), (batch_size >= 1, "--batch-size must be >= 1"),
                    (workers is None or workers >= 0, "--workers must be >= 0"),
                    (flush_every >= 1, "--flush-every must be >= 1"),
                    (dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}")]:
        if not ok:
            raise RunError(msg)
    device = resolve_device(device)
    if not os.path.isdir(data_dir):
        raise RunError(f"--data-dir {data_dir} is not a folder; point it at a folder of class sub-folders or of "
                       "images")
    check_dir(out, "--out")
    model = load_vae(vae, device).float()
    f, C = model.downsample_factor, model.latent_channels
    if image_size % f:
        raise RunError(f"--image-size {image_size} is not a multiple of the VAE's downsample factor {f}; use e.g. "
                       f"{max(f, image_size // f * f)} or {(image_size // f + 1) * f}")
    paths, rel, labels, classes, text = (*list_images(data_dir), None) if captions is None else \
        caption_list(data_dir, captions)
    N, h, np_dtype = len(paths), image_size // f, DTYPES[dtype]
    meta = {"format": FORMAT, "complete": False, "count": N, "image_size": image_size, "latent_channels": C,
            "latent_size": h, "dtype": dtype, "stores": "moments", "flips": 2, "class_names": classes,
            "vae": os.path.abspath(vae), "scaling_factor": model.scaling_factor, "files_sha1": files_sha1(rel),
            "vae_sha256": model.sha256, "downsample_factor": f, "done": 0,
            **({} if text is None else {"captions": True})}
    shape = (N, 2, 2 * C, h, h)
    lat_path, labels_path = os.path.join(out, "latents.npy"), os.path.join(out, "labels.npy")

    old = read_meta(out)
    start = 0
    if old is not None:
        diffs = [difference(k, old.get(k), meta.get(k)) for k in MATCH_KEYS
                 if old.get(k) != meta.get(k) and (k in old or k not in PROVENANCE_KEYS)]
        if diffs:
            raise RunError(f"{out} holds an extraction with other settings ({'; '.join(diffs)[:300]}); rerun with "
                           "the settings it was made with to resume it, or pick a new --out")
        if old.get("complete") is True:
            if open_latents(lat_path, shape, np_dtype, mode="r") is None or not os.path.isfile(labels_path):
                raise RunError(f"{out}/meta.json says complete but latents.npy or labels.npy is missing or has "
                               f"another shape; delete {out} or pick a new --out")
            print(f"{out} is already complete ({N} images); nothing to do")
            if text is not None:  # a run killed between meta.json and captions.json, or edited captions
                with locked(out, "--out"):
                    write_captions(out, text)
            return old
        done = old.get("done")
        start = min(done, N) // batch_size * batch_size if isinstance(done, int) and done > 0 else 0

    if start == 0:  # sizes checked before anything is written: no sparse file or meta.json left by a full disk
        check_sizes(out, shape, np_dtype, batch_size, image_size, labels)
    make_dir(out, "--out")
    with locked(out, "--out"):  # one writer: a second extraction into --out is refused
        meta = write_latents(out, meta, start, labels, model, paths, image_size, batch_size, device, workers,
                             flush_every, tf32, progress)
        if text is not None:
            write_captions(out, text)
        return meta


def check_sizes(out, shape, np_dtype, batch_size, image_size, labels):
    """The disk space latents.npy needs (and a batch's memory), before anything is written."""
    need = math.prod(shape) * np.dtype(np_dtype).itemsize
    check_free_space(out, need + labels.nbytes + (1 << 16), f"--out {out} (latents {shape} {np.dtype(np_dtype)})")
    batch = 2 * batch_size * 3 * image_size ** 2 * 4  # the images and their flips as float32
    if batch > memory_size():
        raise RunError(f"--image-size {image_size} at --batch-size {batch_size} needs {size(batch)} per batch, more "
                       f"than this machine's {size(memory_size())} of memory; lower them")


def write_latents(out, meta, start, labels, model, paths, image_size, batch_size, device, workers, flush_every,
                  tf32, progress):
    """extract()'s writing part, in the locked --out folder: latents.npy (its disk blocks reserved first: a full
    disk is an error now, not a SIGBUS later), labels.npy and meta.json, flushed and recorded every chunk."""
    N, C, h, dtype = meta["count"], meta["latent_channels"], meta["latent_size"], meta["dtype"]
    shape, np_dtype = (N, 2, 2 * C, h, h), DTYPES[dtype]
    lat_path, labels_path = os.path.join(out, "latents.npy"), os.path.join(out, "labels.npy")
    remove_stale_temps(out)
    lat = open_latents(lat_path, shape, np_dtype) if start > 0 else None
    if lat is None:
        if start > 0:
            print(f"{lat_path} is missing or has another shape: starting over")
            check_sizes(out, shape, np_dtype, batch_size, image_size, labels)
        start = 0
        write_meta(out, meta)  # before the arrays: whatever is there from now on belongs to an incomplete run
        atomic_write(labels_path, lambda fh: np.save(fh, labels))
        try:
            lat = np.lib.format.open_memmap(lat_path, mode="w+", dtype=np_dtype, shape=shape)
            reserve(lat_path)
        except OSError as e:
            if os.path.exists(lat_path):  # an empty, sparse file: nothing of it is worth keeping
                os.remove(lat_path)
            raise space_error(lat_path, shape, np_dtype, e) from None
    else:
        try:
            reserve(lat_path)  # an older, sparse latents.npy: a full disk is an error now, not a SIGBUS later
        except OSError as e:
            raise space_error(lat_path, shape, np_dtype, e) from None
        atomic_write(labels_path, lambda fh: np.save(fh, labels))  # cheap; repairs a run killed before it
        print(f"resuming {out} at image {start:,} of {N:,}")

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(ImageFiles(paths, image_size, start), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    chunk = -(-flush_every // batch_size)  # batches per flush
    done = saved = start

    def save(n):
        nonlocal saved
        sync(lat, lat_path)
        write_meta(out, {**meta, "done": n})
        saved = n

    t0 = time.time()
    try:
        with exact_fp32(device, tf32), tqdm(total=N, initial=start, unit="img", desc="encode", dynamic_ncols=True,
                                            disable=not progress) as bar:
            for b, (idx, images, errors) in enumerate(loader):
                if errors:
                    i, why = errors[0]
                    raise RunError(f"cannot read image {paths[i]} ({why}); replace it with a readable image and "
                                   f"rerun to resume at image {done:,} (removing it changes the file list: then "
                                   "pick a new --out)")
                assert int(idx[0]) == done, (int(idx[0]), done)
                exact = encode_batch(model, images, device).numpy()
                with np.errstate(over="ignore"):  # overflow to inf is checked just below
                    moments = exact.astype(np_dtype)
                if not np.isfinite(moments).all():
                    what = ("non-finite moments: check the VAE weights" if not np.isfinite(exact).all() else
                            "moments beyond the float16 range (65504): use --dtype float32")
                    raise RunError(f"the VAE gave {what} (images {done:,}..{done + len(idx) - 1:,}, first "
                                   f"{paths[done]})")
                lat[done:done + len(idx)] = moments
                done += len(idx)
                bar.update(len(idx))
                if (b + 1) % chunk == 0 and done < N:
                    save(done)
    except BaseException:
        if done > saved:  # keep what is finished (an interrupt, a bad image); a hard kill resumes from `saved`
            with contextlib.suppress(Exception):
                save(done)
        raise
    seconds = time.time() - t0
    sync(lat, lat_path)
    del lat
    meta = {**meta, "complete": True, "done": N}
    write_meta(out, meta)
    per_image = 2 * 2 * C * h * h * np.dtype(np_dtype).itemsize
    n = N - start
    print(f"encoded {n:,} images (and their flips) in {seconds:.1f} s ({n / max(seconds, 1e-9):.2f} images/s)")
    print(f"wrote {lat_path} ({os.path.getsize(lat_path):,} bytes: {per_image:,} bytes per image, 2 flips x "
          f"{2 * C}x{h}x{h} {dtype}), {labels_path} and {os.path.join(out, 'meta.json')}")
    return meta


# ----- What narrower storage types round away -----

def rounding_error(latents, dtypes=("float16", "bfloat16"), limit=4096):
    """For moments stored in float32 (a latents.npy of --dtype float32, or an array (N, 2, 2C, h, w)): what casting
    them to each dtype changes. Per dtype: the analytic bound on the relative error (2^-11, 2^-8) and, measured
    over the first `limit` images, the max and mean relative error (over values in the dtype's normal range), the
    max and median |error of the mean| / posterior std exp(logvar / 2), and the max relative change of that std."""
    m = np.load(latents, mmap_mode="r") if isinstance(latents, str) else latents
    if m.dtype != np.float32:
        raise RunError(f"rounding_error needs float32 moments (extract with --dtype float32), got {m.dtype}")
    m = torch.from_numpy(np.array(m[:limit]))
    C = m.shape[2] // 2
    std = torch.exp(0.5 * m[:, :, C:].double())
    stats = {"images": len(m), "logvar_min": float(m[:, :, C:].min()), "logvar_median": float(m[:, :, C:].median()),
             "logvar_max": float(m[:, :, C:].max()), "abs_mean_median": float(m[:, :, :C].abs().median()),
             "abs_mean_max": float(m[:, :, :C].abs().max())}
    for name in dtypes:
        t = getattr(torch, name)
        q = m.to(t).double()
        x = m.double()
        normal = x.abs() >= torch.finfo(t).tiny
        rel = ((q - x).abs() / x.abs())[normal]
        err_over_std = (q[:, :, :C] - x[:, :, :C]).abs() / std
        std_q = torch.exp(0.5 * q[:, :, C:])
        stats[name] = {"bound": torch.finfo(t).eps / 2, "max_rel": float(rel.max()),
                       "mean_rel": float(rel.mean()), "max_err_over_std": float(err_over_std.max()),
                       "median_err_over_std": float(err_over_std.median()),
                       "max_std_rel_change": float((std_q / std - 1).abs().max())}
    return stats


def print_rounding(latents, **kw):
    s = rounding_error(latents, **kw)
    print(f"{s['images']} images: logvar min/median/max {s['logvar_min']:.3g} / {s['logvar_median']:.3g} / "
          f"{s['logvar_max']:.3g}; |mean| median/max {s['abs_mean_median']:.3g} / {s['abs_mean_max']:.3g}")
    for name in kw.get("dtypes", ("float16", "bfloat16")):
        d = s[name]
        print(f"{name}: relative error max {d['max_rel']:.3g} (bound {d['bound']:.3g}), mean {d['mean_rel']:.3g}; "
              f"|mean error| / posterior std max {d['max_err_over_std']:.3g}, median {d['median_err_over_std']:.3g};"
              f" posterior std changed by at most {d['max_std_rel_change']:.3g} (relative)")
    return s


# ----- Command line -----

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--data-dir", required=True, help="class sub-folders (labels in sorted order) or a flat folder of images")
    a("--image-size", type=int, default=256, help="ADM center crop to this size (a multiple of the VAE's 8)")
    a("--vae", required=True, help="SD-VAE: a diffusers folder (e.g. sd-vae-ft-ema) or one weights file")
    a("--out", required=True, help="output folder: latents.npy, labels.npy, meta.json")
    a("--batch-size", type=int, default=64, help="images per encoder call (each with its flip: 2x this)")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--workers", type=int, default=None, help="image-decoding processes (default min(8, CPU count); 0 = none)")
    a("--dtype", default="float16", choices=list(DTYPES), help="storage type of the moments")
    a("--flush-every", type=int, default=1024, help="flush to disk and record progress every ~this many images")
    a("--tf32", action="store_true", help="allow TF32 convs/matmuls on CUDA (faster; no longer exact float32)")
    a("--captions", nargs="?", const="", default=None, metavar="FILE",
      help="text-to-image: extract the images a metadata.jsonl or COCO captions_*.json lists (bare --captions:\n"
           "DATA_DIR/metadata.jsonl), less a seeded 1%% held out, and write captions.json. Only with this flag:\n"
           "a folder that holds a metadata.jsonl but gets no --captions extracts as before")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        return extract(args.data_dir, args.image_size, args.vae, args.out, batch_size=args.batch_size,
                       device=args.device, workers=args.workers, dtype=args.dtype, flush_every=args.flush_every,
                       tf32=args.tf32, captions=args.captions)
    except RunError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # the chunks flushed so far are recorded in meta.json
        raise SystemExit(f"interrupted; rerun the same command to resume {args.out}")


if __name__ == "__main__":
    main()

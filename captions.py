"""
Caption datasets for text-to-image U-ViT (U-ViT §4.4: MS-COCO at 256, captions through CLIP ViT-L/14).

The official run (baofff/U-ViT @ ce55170: scripts/extract_mscoco_feature.py, then train_t2i_discrete.py) trains on
COCO train2014, 82,783 images sorted by image id (datasets.py MSCOCODatabase), with the about 5 captions per image
of captions_train2014.json. Each time an image is drawn, ONE of its captions is chosen uniformly
(MSCOCOFeatureDataset: random.randint(0, n_captions - 1)); CFGDataset gives 10% of samples the empty prompt, which
uvit.TextUViT does itself (class_dropout_prob 0.1). The official images are center-cropped to the short side and
resized to 256 with LANCZOS; we use data.center_crop_resize (ADM's BOX halving + BICUBIC), as for every dataset here.
The official run evaluates on val2014's captions; we hold out a seeded 1% of the training images instead
(held_out), so one caption file serves both. We keep caption texts and encode them at training time (the
official run stores CLIP features): BENCHMARKS.md, "Caption storage (text-to-image)", has the bytes and FLOPs
behind that choice.

  read_captions(path)                        -> {file name: [captions]}   (metadata.jsonl or COCO captions_*.json)
  read_prompts(path)                         -> [prompts]                  (.txt, one per line, or a caption file)
  caption_images(root, captions_path)        -> CaptionImages(paths, rel, captions), sorted by relative path
  held_out(n, seed), split_held_out(images)  a seeded 1% of the images whose captions are the evaluation prompts
  cifar_captions(labels, names), cifar_held_out(names)   CIFAR-10 captioned from templates (the CPU demo)
  load_caption_dataset(name, data_dir, image_size, ...)  -> (x, per-image caption lists, held-out prompts)
  CaptionLabels(counts)[idx]                 -> one caption row per image index, drawn uniformly (global RNG)
"""
import json
import os
from collections import namedtuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from data import CIFAR_CLASSES, DataError, LatentFolder, center_crop_resize, load_cifar10
from devices import memory_size
from errors import RunError, first_line
from files import size

CAPTIONS_FORMAT = "captions-v1"  # extract_latents.py's captions.json
NEED = 'each line needs "file_name" and "text"'


# ----- Caption files -----

def read_captions(path):
    """{file name (relative, '/'-separated): its captions, in file order, stripped} of a Hugging Face imagefolder
    metadata.jsonl (lines {"file_name", "text": a string or a list}; rows of one file add up) or a COCO
    captions_*.json ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]})."""
    if not os.path.isfile(path):
        raise RunError(f"caption file {path} does not exist; pass a metadata.jsonl or a COCO captions_*.json")
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    if path.endswith(".json"):
        return _read_coco(path)
    raise RunError(f"{path}: unknown caption format {os.path.splitext(path)[1]!r}; pass a metadata.jsonl (one JSON "
                   "object per line) or a COCO captions_*.json")


def _caption(text, where):
    if not isinstance(text, str) or not text.strip():
        what = "an empty caption" if isinstance(text, str) else f"a caption that is not text ({str(text)[:40]})"
        raise RunError(f"{where} has {what}; write its caption or remove it")
    return text.strip()


def _name(name, where):
    name = name.replace("\\", "/") if isinstance(name, str) else name
    if not isinstance(name, str) or not name.strip() or name.startswith("/") or ".." in name.split("/"):
        raise RunError(f"{where}: file_name {name!r} must be a path inside the image folder (relative, no '..')")
    return os.path.normpath(name).replace(os.sep, "/")


def _read_jsonl(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise RunError(f"{path} is not UTF-8 text ({first_line(e)}); {NEED}") from None
    out = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise RunError(f"{path} line {i} is not JSON ({first_line(e)}); {NEED}") from None
        if not isinstance(row, dict):
            raise RunError(f"{path} line {i} is not a JSON object; {NEED}")
        for key in ("file_name", "text"):
            if key not in row:
                raise RunError(f'{path} line {i} has no "{key}" column; {NEED}')
        name, text = _name(row["file_name"], f"{path} line {i}"), row["text"]
        texts = text if isinstance(text, list) else [text]
        if not texts:
            raise RunError(f"{path} line {i}: {name} has no caption; give it at least one or remove the line")
        out.setdefault(name, []).extend(_caption(t, f"{path} line {i} ({name})") for t in texts)
    return out


def _read_coco(path):
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except ValueError as e:
        raise RunError(f"{path} is not JSON ({first_line(e)}); pass a COCO captions_*.json") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("images"), list) and isinstance(doc.get("annotations"), list)):
        raise RunError(f'{path} has no "images" and "annotations" lists; pass a COCO captions_*.json (or a '
                       "metadata.jsonl)")
    try:
        names = {im["id"]: _name(im["file_name"], f"{path} image {im['id']}") for im in doc["images"]}
        out = {name: [] for name in names.values()}
        for k, ann in enumerate(doc["annotations"]):
            name = names[ann["image_id"]]
            out[name].append(_caption(ann["caption"], f"{path} annotation {k} ({name})"))
    except (KeyError, TypeError) as e:
        raise RunError(f'{path}: a bad entry ({first_line(e)}); images need "id" and "file_name", annotations '
                       '"image_id" (of a listed image) and "caption"; pass a COCO captions_*.json') from None
    bare = [name for name, caps in out.items() if not caps]
    if bare:
        raise RunError(f"{path}: image {bare[0]} has no caption ({len(bare)} such images); add their annotations "
                       "or remove them from \"images\"")
    return out


def read_prompts(path):
    """The prompts of a .txt (one per non-empty line, stripped) or of a caption file (all captions, in order)."""
    if not os.path.isfile(path):
        raise RunError(f"--prompts {path} does not exist; pass a text file with one prompt per line (or a "
                       "metadata.jsonl / captions_*.json)")
    if path.endswith((".json", ".jsonl")):
        return flat_captions(read_captions(path).values())
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise RunError(f"--prompts {path} is not UTF-8 text ({first_line(e)}); pass one prompt per line") from None
    if not prompts:
        raise RunError(f"--prompts {path} holds no prompt; write one prompt per line")
    return prompts


def flat_captions(per_image):
    """All captions of image 0, then of image 1, ...: the texts of CaptionLabels' rows."""
    return [c for caps in per_image for c in caps]


# ----- Images with captions -----

CaptionImages = namedtuple("CaptionImages", ["paths", "rel", "captions"])


def caption_images(root, captions_path=None):
    """The images a caption file lists (file names relative to root; default root/metadata.jsonl), sorted by
    relative path (COCO's zero-padded names: by image id, as MSCOCODatabase), with their caption lists."""
    if not os.path.isdir(root):
        raise RunError(f"--data-dir {root} is not a folder; point it at the images and pass their caption file with "
                       "--captions")
    path = captions_path or os.path.join(root, "metadata.jsonl")
    if captions_path is None and not os.path.isfile(path):
        raise RunError(f"{root} has no metadata.jsonl; pass the caption file with --captions (a metadata.jsonl or a "
                       "COCO captions_*.json)")
    caps = read_captions(path)
    rel = sorted(caps)
    if not rel:
        raise RunError(f"{path} lists no images; pass the caption file of the images in {root}")
    paths = [os.path.join(root, *r.split("/")) for r in rel]
    missing = [r for r, p in zip(rel, paths) if not os.path.isfile(p)]
    if missing:
        raise RunError(f"{path} lists {missing[0]}, which is not in {root} ({len(missing)} listed images missing); "
                       "add the images or pass the folder they are in")
    return CaptionImages(paths, rel, [caps[r] for r in rel])


def held_out(n, seed=0):
    """bool (n,): a seeded 1% of n images (at least 1 when n >= 2, at most 1,000), kept out of training: their
    captions are the prompts of training-time grids and FID. A pure function of (n, seed)."""
    k = 0 if n < 2 else min(1000, max(1, n // 100))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:k]] = True
    return mask


def split_held_out(images, seed=0):
    """(CaptionImages of the training images, held-out prompts): held_out's images leave the training set; the
    prompts are the first caption of every held-out image (in path order), then the second of each, and so on."""
    mask = held_out(len(images.rel), seed)
    train = CaptionImages(*([v for v, m in zip(field, mask) if not m] for field in images))
    held = [caps for caps, m in zip(images.captions, mask) if m]
    return train, [caps[j] for j in range(max(map(len, held), default=0)) for caps in held if j < len(caps)]


# ----- CIFAR-10 with captions (the CPU demo) -----

# Phrasings in the style of CLIP's ImageNet prompt templates (Radford et al. 2021, §3.1.4); "a" even before a vowel
# ("a photo of a airplane"): simple, the same for every class. The held-out template is in no training caption.
CIFAR_TEMPLATES = ["a photo of a {}", "a blurry photo of a {}", "a picture of a {}", "a small {}",
                   "a low resolution photo of a {}", "a close-up photo of a {}", "a cropped photo of a {}",
                   "a good photo of a {}"]
HELD_OUT_TEMPLATE = "a photo of the {}"


def cifar_captions(labels, class_names):
    """Each image's captions: its class in every training template (one shared list per class)."""
    per_class = [[t.format(name) for t in CIFAR_TEMPLATES] for name in class_names]
    return [per_class[y] for y in torch.as_tensor(labels).tolist()]


def cifar_held_out(class_names):
    """One prompt per class, in class order, from the held-out template."""
    return [HELD_OUT_TEMPLATE.format(name) for name in class_names]


def cifar_texts(class_names=CIFAR_CLASSES):
    """Every text of the demo, training and held-out: what clip.write_small_clip learns its merges on."""
    return [t.format(name) for t in CIFAR_TEMPLATES + [HELD_OUT_TEMPLATE] for name in class_names]


# ----- Datasets -----

def load_caption_dataset(name, data_dir, image_size, captions_path=None, cifar_url=None):
    """'captions' | 'cifar10-captions' -> (x, per-image caption lists, held-out prompts). 'captions': an
    extract_latents.py folder with captions.json (x a data.LatentFolder) or an image folder with a caption file (x
    uint8 (N, 3, S, S) of the images not held out); 'cifar10-captions': the 50k CIFAR-10 training images."""
    if name == "cifar10-captions":
        if image_size != 32:
            raise DataError("CIFAR-10 images are 32x32; use --image-size 32 with --dataset cifar10-captions")
        x, y = load_cifar10(data_dir, url=cifar_url)
        return x, cifar_captions(y, CIFAR_CLASSES), cifar_held_out(CIFAR_CLASSES)
    if name != "captions":
        raise DataError(f"unknown caption dataset {name!r}; choose captions or cifar10-captions")
    if os.path.isfile(os.path.join(data_dir, "meta.json")):
        if captions_path is not None:
            raise DataError(f"{data_dir} is an extract_latents.py folder (its captions are in captions.json); drop "
                            "--captions")
        store = LatentFolder(data_dir)
        return (store, *read_latent_captions(data_dir, len(store)))
    train, held = split_held_out(caption_images(data_dir, captions_path))
    need = len(train.paths) * 3 * image_size ** 2
    if need > memory_size():  # checked before it is allocated (or OOM-killed)
        raise DataError(f"{len(train.paths):,} images of {image_size}x{image_size} need {size(need)} of memory, more "
                        f"than this machine's {size(memory_size())}; lower --image-size or extract latents")
    x = torch.empty(len(train.paths), 3, image_size, image_size, dtype=torch.uint8)
    for i, f in enumerate(tqdm(train.paths, desc=f"load {data_dir}", disable=len(train.paths) < 1000)):
        try:
            with Image.open(f) as img:
                x[i] = center_crop_resize(img, image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {f} ({type(e).__name__}: {e}); remove or fix it") from None
    return x, train.captions, held


def read_latent_captions(folder, count):
    """(per-image captions, held-out prompts) of an extract_latents.py folder's captions.json, checked against its
    count of latents."""
    path = os.path.join(folder, "captions.json")
    if not os.path.isfile(path):
        raise DataError(f"{folder} has no captions.json: its latents were extracted without --captions; extract "
                        "them again with --captions (or train with --dataset latents)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        per_image, held = doc["captions"], doc["held_out"]
        ok = doc["format"] == CAPTIONS_FORMAT and isinstance(held, list) and all(isinstance(c, list) and c
                                                                                 for c in per_image)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {path} ({first_line(e)}); rerun extract_latents.py --captions") from None
    if not ok or len(per_image) != count:
        raise DataError(f"{path} ({doc['format']!r}, {len(per_image)} caption lists) does not fit the {count} "
                        f"latents ({CAPTIONS_FORMAT!r} expected); rerun extract_latents.py --captions")
    return per_image, held


# ----- The per-step caption draw -----

class CaptionLabels:
    """Caption rows as labels: rows number all captions of image 0, then of image 1, ... (flat_captions), and
    labels[idx] draws one row per image index, uniformly among that image's captions (the official random.randint)
    with the global RNG on idx's device, so a resumed run (its RNG state restored) draws the same captions."""

    def __init__(self, counts, device="cpu"):
        counts = torch.as_tensor(counts, dtype=torch.int64)
        if counts.ndim != 1 or len(counts) == 0 or int(counts.min()) < 1:
            raise RunError(f"CaptionLabels needs >= 1 caption per image, got counts of shape {tuple(counts.shape)}"
                           f"{f' with minimum {int(counts.min())}' if counts.numel() else ''}; give every image one")
        self.count = counts.to(device)
        self.start = (torch.cumsum(counts, 0) - counts).to(device)  # row of each image's first caption
        self.rows = int(counts.sum())

    def __len__(self):
        return len(self.count)

    def to(self, device):
        return CaptionLabels(self.count.cpu(), device)

    def __getitem__(self, idx):  # idx: LongTensor of image indices
        u = torch.rand(len(idx), device=idx.device)
        start, count = self.start.to(idx.device)[idx], self.count.to(idx.device)[idx]
        return start + (u * count).long()  # floor: u in [0, 1)

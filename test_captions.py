"""
captions.py: both caption formats read exactly, every bad input a one-line RunError, the seeded held-out split,
the per-step caption draw (uniform within each image, the same after an RNG restore, through data.Batches), the
CIFAR-10 template captions, load_caption_dataset on an image folder and on CIFAR-10, and extract_latents.py
--captions end to end (captions.json, a LatentFolder, a rerun without --captions refused) with the tiny VAE.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import captions
import extract_latents
from captions import CaptionLabels
from data import CIFAR_CLASSES, Batches, LatentFolder, center_crop_resize
from errors import RunError


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def coco(path, images, annotations):
    return write(path, json.dumps({"info": {}, "images": [{"id": i, "file_name": f, "width": 8, "height": 8}
                                                          for i, f in images],
                                   "annotations": [{"id": 100 + k, "image_id": i, "caption": c}
                                                   for k, (i, c) in enumerate(annotations)]}))


def one_line(fn, *a):
    with pytest.raises(RunError) as e:
        fn(*a)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def random_image(path, size, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


# ----- Caption files -----

def test_read_captions_metadata_jsonl(tmp_path):
    path = write(tmp_path / "metadata.jsonl", '{"file_name": "b.png", "text": "  a red car "}\n\n'
                 '{"file_name": "sub/a.png", "text": ["one", "two\\n"], "extra": 1}\n'
                 '{"file_name": "./b.png", "text": "a second caption"}\n')
    assert captions.read_captions(path) == {"b.png": ["a red car", "a second caption"], "sub/a.png": ["one", "two"]}


def test_read_captions_coco(tmp_path):
    path = coco(tmp_path / "captions_train2014.json", [(9, "COCO_9.jpg"), (3, "COCO_3.jpg")],
                [(3, "A dog. "), (9, "A cat."), (3, "A dog on grass.")])
    got = captions.read_captions(path)
    assert got == {"COCO_9.jpg": ["A cat."], "COCO_3.jpg": ["A dog.", "A dog on grass."]}
    assert captions.read_prompts(path) == ["A cat.", "A dog.", "A dog on grass."]


BAD_JSONL = [
    ('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", "text": "y"}\n{"file_name": "c.png"}\n',
     'metadata.jsonl line 3 has no "text" column; each line needs "file_name" and "text"'),
    ('{"text": "x"}\n', 'metadata.jsonl line 1 has no "file_name" column'),
    ('{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "x",\n', "metadata.jsonl line 2 is not JSON"),
    ('["a.png", "x"]\n', "metadata.jsonl line 1 is not a JSON object"),
    ('{"file_name": "a.png", "text": "   "}\n', "metadata.jsonl line 1 (a.png) has an empty caption"),
    ('{"file_name": "a.png", "text": ["ok", ""]}\n', "metadata.jsonl line 1 (a.png) has an empty caption"),
    ('{"file_name": "a.png", "text": null}\n', "metadata.jsonl line 1 (a.png) has a caption that is not text"),
    ('{"file_name": "a.png", "text": []}\n', "metadata.jsonl line 1: a.png has no caption"),
    ('{"file_name": "../a.png", "text": "x"}\n', "must be a path inside the image folder"),
]


@pytest.mark.parametrize("text,phrase", BAD_JSONL)
def test_bad_metadata_jsonl_is_one_line(tmp_path, text, phrase):
    assert phrase in one_line(captions.read_captions, write(tmp_path / "metadata.jsonl", text))


def test_bad_coco_and_files_are_one_line(tmp_path):
    path = coco(tmp_path / "c.json", [(1, "a.jpg"), (2, "b.jpg")], [(1, "fine")])
    assert "image b.jpg has no caption (1 such images)" in one_line(captions.read_captions, path)
    path = coco(tmp_path / "c.json", [(1, "a.jpg")], [(1, "fine"), (1, " ")])
    assert "annotation 1 (a.jpg) has an empty caption" in one_line(captions.read_captions, path)
    path = coco(tmp_path / "c.json", [(1, "a.jpg")], [(1, "fine"), (7, "lost")])
    assert "a bad entry (KeyError: 7)" in one_line(captions.read_captions, path)
    assert "is not JSON" in one_line(captions.read_captions, write(tmp_path / "captions_x.json", "{oops"))
    assert 'has no "images" and "annotations" lists' in one_line(captions.read_captions,
                                                                 write(tmp_path / "d.json", "[]"))
    assert "unknown caption format '.csv'" in one_line(captions.read_captions, write(tmp_path / "c.csv", "a,b"))
    assert f"caption file {tmp_path / 'no.jsonl'} does not exist" in one_line(captions.read_captions,
                                                                             str(tmp_path / "no.jsonl"))


def test_read_prompts(tmp_path):
    assert captions.read_prompts(write(tmp_path / "p.txt", "a cat\n\n  a dog on a sofa \n")) == ["a cat",
                                                                                                "a dog on a sofa"]
    meta = jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": ["x", "y"]},
                                                {"file_name": "b.png", "text": "z"}])
    assert captions.read_prompts(meta) == ["x", "y", "z"]
    missing = str(tmp_path / "none.txt")
    assert one_line(captions.read_prompts, missing) == (f"--prompts {missing} does not exist; pass a text file with "
                                                        "one prompt per line (or a metadata.jsonl / captions_*.json)")
    assert "holds no prompt" in one_line(captions.read_prompts, write(tmp_path / "empty.txt", "\n \n"))


# ----- Images with captions, the held-out split -----

def caption_folder(root, n=5):
    """root/img{i}.png (sizes vary), root/sub/last.png, and a metadata.jsonl listing them out of order."""
    rows = []
    for i in range(n - 1):
        random_image(str(root / f"img{i}.png"), (8 + i, 10), i)
        rows.append({"file_name": f"img{i}.png", "text": [f"image {i} caption {j}" for j in range(1 + i % 3)]})
    random_image(str(root / "sub" / "last.png"), (12, 8), 99)
    rows.append({"file_name": "sub/last.png", "text": "the last image"})
    jsonl(root / "metadata.jsonl", rows[::-1])
    return {r["file_name"]: r["text"] if isinstance(r["text"], list) else [r["text"]] for r in rows}


def test_caption_images_and_errors(tmp_path):
    listed = caption_folder(tmp_path / "d")
    got = captions.caption_images(str(tmp_path / "d"))
    assert got.rel == sorted(listed) == ["img0.png", "img1.png", "img2.png", "img3.png", "sub/last.png"]
    assert got.paths == [os.path.join(str(tmp_path / "d"), *r.split("/")) for r in got.rel]
    assert got.captions == [listed[r] for r in got.rel]

    os.remove(tmp_path / "d" / "img2.png")
    msg = one_line(captions.caption_images, str(tmp_path / "d"))
    assert "lists img2.png, which is not in" in msg and "(1 listed images missing)" in msg
    (tmp_path / "e").mkdir()
    assert "has no metadata.jsonl; pass the caption file with --captions" in one_line(captions.caption_images,
                                                                                       str(tmp_path / "e"))
    assert "pass their caption file with --captions" in one_line(captions.caption_images, str(tmp_path / "none"))


@pytest.mark.parametrize("n,k", [(0, 0), (1, 0), (2, 1), (199, 1), (250, 2), (82_783, 827), (500_000, 1000)])
def test_held_out_counts(n, k):
    mask = captions.held_out(n)
    assert mask.dtype == bool and mask.shape == (n,) and mask.sum() == k


def test_held_out_is_deterministic_and_seeded():
    a, b, c = captions.held_out(5000), captions.held_out(5000), captions.held_out(5000, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and c.sum() == 50


def test_split_held_out_order():
    images = captions.CaptionImages([f"/p/{i}" for i in range(300)], [str(i) for i in range(300)],
                                    [[f"{i}.{j}" for j in range(1 + i % 3)] for i in range(300)])
    train, held = captions.split_held_out(images)
    out = np.flatnonzero(captions.held_out(300))
    assert len(out) == 3 and train.rel == [str(i) for i in range(300) if i not in out]
    assert train.captions == [images.captions[int(r)] for r in train.rel]
    firsts = [f"{i}.0" for i in out]  # every held-out image's first caption, then the seconds, ...
    rest = [f"{i}.{j}" for j in (1, 2) for i in out if j < 1 + i % 3]
    assert held == firsts + rest


# ----- CIFAR-10 with captions -----

def test_cifar_captions():
    got = captions.cifar_captions(torch.tensor([3, 0]), CIFAR_CLASSES)
    assert got[0] == ["a photo of a cat", "a blurry photo of a cat", "a picture of a cat", "a small cat",
                      "a low resolution photo of a cat", "a close-up photo of a cat", "a cropped photo of a cat",
                      "a good photo of a cat"]
    assert got[1][0] == "a photo of a airplane" and len(got[1]) == 8
    held = captions.cifar_held_out(CIFAR_CLASSES)
    assert held[:2] == ["a photo of the airplane", "a photo of the automobile"] and len(held) == 10
    everything = {c for y in range(10) for c in captions.cifar_captions([y], CIFAR_CLASSES)[0]}
    assert len(everything) == 80 and not everything & set(held)


def test_load_caption_dataset_cifar(cifar_dir, archive):
    x, per_image, held = captions.load_caption_dataset("cifar10-captions", cifar_dir, 32)
    labels = np.concatenate([archive["arrays"][f"data_batch_{i}"][1] for i in range(1, 6)])
    assert x.shape == (len(labels), 3, 32, 32) and len(per_image) == len(labels)
    assert per_image[5] == [t.format(CIFAR_CLASSES[labels[5]]) for t in captions.CIFAR_TEMPLATES]
    assert held == captions.cifar_held_out(CIFAR_CLASSES)
    assert "use --image-size 32" in one_line(captions.load_caption_dataset, "cifar10-captions", cifar_dir, 64)


def test_load_caption_dataset_image_folder(tmp_path):
    listed = caption_folder(tmp_path / "d")
    x, per_image, held = captions.load_caption_dataset("captions", str(tmp_path / "d"), 8)
    rel = sorted(listed)
    out = int(np.flatnonzero(captions.held_out(5))[0])  # one of 5 images held out
    keep = [r for i, r in enumerate(rel) if i != out]
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 8, 8)
    want = torch.stack([center_crop_resize(Image.open(tmp_path / "d" / r), 8) for r in keep])
    assert torch.equal(x, want)
    assert per_image == [listed[r] for r in keep] and held == listed[rel[out]]
    assert "unknown caption dataset" in one_line(captions.load_caption_dataset, "coco", str(tmp_path / "d"), 8)


# ----- The per-step caption draw -----

COUNTS = [1, 3, 2, 5]
STARTS = [0, 1, 4, 6]


def test_caption_labels_rows_and_formula():
    labels = CaptionLabels(COUNTS)
    assert len(labels) == 4 and labels.rows == 11 and labels.start.tolist() == STARTS
    per_image = [[f"{i}.{j}" for j in range(c)] for i, c in enumerate(COUNTS)]
    flat = captions.flat_captions(per_image)
    idx = torch.tensor([3, 0, 1, 3, 2] * 200)
    torch.manual_seed(0)
    rows = labels[idx]
    torch.manual_seed(0)
    u = torch.rand(len(idx))
    assert torch.equal(rows, torch.tensor(STARTS)[idx] + (u * torch.tensor(COUNTS)[idx]).long())
    assert rows.dtype == torch.int64
    assert all(flat[r].startswith(f"{i}.") for r, i in zip(rows.tolist(), idx.tolist()))  # each in its image
    assert "needs >= 1 caption per image" in one_line(CaptionLabels, [2, 0])


def test_caption_labels_are_uniform_and_resume_exactly():
    labels = CaptionLabels(COUNTS).to("cpu")
    torch.manual_seed(1)
    rows = labels[torch.full((50_000,), 3)] - 6
    freq = torch.bincount(rows, minlength=5).double()
    chi2 = float(((freq - 10_000) ** 2 / 10_000).sum())
    assert freq.sum() == 50_000 and chi2 < 18.5  # chi-square, 4 degrees of freedom: p = 0.001
    assert set(labels[torch.zeros(100, dtype=torch.long)].tolist()) == {0}  # one caption: always it

    idx = torch.arange(4).repeat(250)
    state = torch.get_rng_state()
    a = labels[idx]
    torch.set_rng_state(state)  # a resumed run: its RNG state restored
    assert torch.equal(labels[idx], a) and not torch.equal(labels[idx], a)


def test_caption_labels_through_batches():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    batches = Batches(x, CaptionLabels(COUNTS), batch_size=6, seed=0, device="cpu")
    for step in range(3):
        idx = batches.indices(step)
        xb, yb = batches(step, False)
        assert torch.equal(xb, x[idx].float() / 127.5 - 1)
        start, count = torch.tensor(STARTS)[idx], torch.tensor(COUNTS)[idx]
        assert ((yb >= start) & (yb < start + count)).all() and yb.shape == (6,)


# ----- extract_latents.py --captions -----

def args(data, vae, out, *extra):
    return ["--data-dir", str(data), "--image-size", "8", "--vae", vae, "--out", str(out), "--batch-size", "2",
            "--device", "cpu", "--workers", "0", *extra]


def fails(argv):
    with pytest.raises(SystemExit) as e:
        extract_latents.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error:") and "\n" not in e.value.code
    return e.value.code


def test_extract_latents_with_captions(tmp_path, tiny_vae, capsys):
    data, out = tmp_path / "d", tmp_path / "out"
    listed = caption_folder(data)
    meta = extract_latents.main(args(data, tiny_vae, out, "--captions"))  # bare: DATA_DIR/metadata.jsonl
    rel = sorted(listed)
    held = int(np.flatnonzero(captions.held_out(5))[0])
    keep = [r for i, r in enumerate(rel) if i != held]
    assert meta["captions"] is True and meta["count"] == 4 and meta["class_names"] == [] and meta["complete"]
    assert np.load(out / "labels.npy").tolist() == [0] * 4
    with open(out / "captions.json") as f:
        assert json.load(f) == {"format": "captions-v1", "captions": [listed[r] for r in keep],
                                "held_out": listed[rel[held]], "source": str(data / "metadata.jsonl")}
    store, per_image, prompts = captions.load_caption_dataset("captions", str(out), 8)
    assert isinstance(store, LatentFolder) and len(store) == 4 and per_image == [listed[r] for r in keep]
    assert prompts == listed[rel[held]]

    msg = fails(args(data, tiny_vae, out))
    assert "it was extracted with --captions" in msg and "new --out" in msg
    stamp = os.stat(out / "captions.json").st_mtime_ns
    capsys.readouterr()
    extract_latents.main(args(data, tiny_vae, out, "--captions", str(data / "metadata.jsonl")))
    assert "already complete" in capsys.readouterr().out and os.stat(out / "captions.json").st_mtime_ns == stamp
    os.remove(out / "captions.json")  # as a run killed between meta.json and captions.json leaves it
    extract_latents.main(args(data, tiny_vae, out, "--captions"))
    assert json.loads((out / "captions.json").read_text())["captions"] == per_image


def test_extract_latents_caption_refusals(tmp_path, tiny_vae):
    data = tmp_path / "d"
    caption_folder(data)
    plain = tmp_path / "plain"
    extract_latents.main(args(data, tiny_vae, plain))  # without --captions: the folder's images, as before
    assert "captions" not in json.loads((plain / "meta.json").read_text())
    assert "it was extracted without --captions" in fails(args(data, tiny_vae, plain, "--captions"))
    assert "extracted without --captions" in one_line(captions.load_caption_dataset, "captions", str(plain), 8)
    os.remove(data / "img1.png")
    assert "lists img1.png, which is not in" in fails(args(data, tiny_vae, tmp_path / "o", "--captions"))
    assert not (tmp_path / "o").exists()

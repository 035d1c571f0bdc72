"""
Training on an extract_latents.py folder: memory-mapped moments, one stored flip per sample, z drawn from the
posterior and scaled, class-conditional by default, grids decoded by the VAE named in meta.json, and sample.py
turning the checkpoint into a uint8 npz of the image size. Bad latent folders fail with one line.
"""
import json
import os

import numpy as np
import pytest
import torch

import data
import sample
import train_cifar
import vae

N, C, H = 12, 4, 8   # 12 latents of 4 x 8 x 8 (16 x 16 images through a 2x VAE)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    folder.mkdir()
    config = dict(in_channels=3, out_channels=3, latent_channels=C, block_out_channels=[32, 32], layers_per_block=1,
                  norm_num_groups=32)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    vae.save_safetensors(vae.AutoencoderKL(**config).state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    return str(folder)


def write_latents(folder, vae_path, moments=None, labels=None, **meta):
    """An extract_latents.py output written directly in its format (latents-v1)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    if moments is None:
        moments = np.concatenate([rng.standard_normal((N, 2, C, H, H)) * 3,              # mean
                                  np.full((N, 2, C, H, H), -4.0)], axis=2).astype(np.float16)  # logvar
    labels = np.arange(len(moments)) % 3 if labels is None else labels
    np.save(os.path.join(folder, "latents.npy"), moments)
    np.save(os.path.join(folder, "labels.npy"), labels.astype(np.int64))
    info = {"format": "latents-v1", "complete": True, "count": len(moments), "image_size": 2 * moments.shape[-1],
            "latent_channels": moments.shape[2] // 2, "latent_size": moments.shape[-1], "dtype": "float16",
            "stores": "moments", "flips": 2, "class_names": ["a", "b", "c"], "vae": vae_path,
            "scaling_factor": 0.5, **meta}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(info, f)
    return folder


TINY = ["--backbone", "dit", "--model", "DiT-S/2", "--model-arg", "hidden_size=32", "--model-arg", "depth=1",
        "--model-arg", "num_heads=2", "--batch-size", "4", "--log-every", "1", "--ckpt-every", "3", "--keep-every", "0",
        "--sample-steps", "2", "--sampler", "ddim"]


def test_folder_is_memory_mapped_and_batches_follow_the_moments(tmp_path, tiny_vae):
    mean = np.stack([np.full((C, H, H), 1.0), np.full((C, H, H), -1.0)])[None].repeat(N, 0)   # flip 0: +1, 1: -1
    mean = mean * (np.arange(N) + 1)[:, None, None, None, None]                              # row i: +-(i + 1)
    moments = np.concatenate([mean, np.full_like(mean, -30.0)], axis=2).astype(np.float16)   # std ~ 3e-7
    store = data.LatentFolder(write_latents(str(tmp_path / "lat"), tiny_vae, moments=moments))
    assert isinstance(store.moments, np.memmap) and store.shape == (N, C, H, H)  # nothing read yet
    torch.manual_seed(0)
    z, y = data.LatentBatches(store, "cpu")(torch.tensor([5, 0, 11, 5, 2, 7, 7, 3]), with_labels=True)
    rows = torch.tensor([5, 0, 11, 5, 2, 7, 7, 3], dtype=torch.float32) + 1
    got = z[:, 0, 0, 0] / 0.5                                   # undo the scaling factor
    assert torch.allclose(got.abs(), rows, atol=1e-3)           # each sample's own row, scaled by 0.5
    assert (got > 0).any() and (got < 0).any()                  # both stored flips are drawn
    assert torch.allclose(z, z[:, :1].expand_as(z), atol=1e-4) and y.tolist() == [2, 0, 2, 2, 2, 1, 1, 0]


def test_latent_run_decodes_grids_and_sample_py_makes_images(tmp_path, tiny_vae, capsys):
    folder = write_latents(str(tmp_path / "lat"), tiny_vae)
    out = tmp_path / "run"
    train_cifar.main(TINY + ["--dataset", "latents", "--data-dir", folder, "--out-dir", str(out), "--steps", "3",
                             "--sample-every", "3"])
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["model_kwargs"]["num_classes"] == 3 and ck["model_kwargs"]["class_dropout_prob"] == 0.1  # default cond
    assert ck["data"]["vae"] == tiny_vae and ck["args"]["sampler"] == "ddim"
    assert ck["model_kwargs"]["in_channels"] == C and ck["model_kwargs"]["input_size"] == H
    from PIL import Image
    with Image.open(out / "samples" / "step_0000003_ema.png") as img:  # 3 classes x 8, decoded to 16x16 images
        assert img.size == (2 + 8 * 18, 2 + 3 * 18)
    npz = tmp_path / "s.npz"
    sample.main(["--ckpt", str(out / "latest.pt"), "--num-samples", "3", "--steps", "2", "--npz", str(npz),
                 "--out", str(tmp_path / "g.png")])
    with np.load(npz) as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_0"].dtype == np.uint8 and f["arr_1"].max() < 3


def test_latent_recipes_are_the_papers():
    dit = train_cifar.parse_args(["--backbone", "dit", "--dataset", "latents"])
    assert (dit.model, dit.lr, dit.weight_decay, dit.batch_size, dit.ema_decay, dit.learn_sigma, dit.sampler,
            dit.sample_steps) == ("DiT-XL/2", 1e-4, 0.0, 256, 0.9999, True, "ddpm", 250)
    uvit = train_cifar.parse_args(["--backbone", "uvit", "--dataset", "latents"])
    assert (uvit.model, uvit.schedule, uvit.betas, uvit.batch_size) == ("U-ViT-H/2", "scaled_linear", [0.99, 0.99],
                                                                        1024)
    assert train_cifar.parse_args(["--backbone", "diffit", "--dataset", "latents"]).lr == 3e-4


@pytest.mark.parametrize("problem, expect", [
    ("no_meta", "has no meta.json: not an extract_latents.py output"),
    ("incomplete", "incomplete or unknown latents folder"),
    ("shape", "do not match meta.json"),
    ("channels", "the data are 4 x 8 x 8 but DiT-S/2 was built for 3 x 8 x 8"),
    ("empty", "has no meta.json"),
])
def test_bad_latent_folders_are_one_line(tmp_path, tiny_vae, problem, expect):
    folder = str(tmp_path / "lat")
    extra = []
    if problem == "empty":
        os.makedirs(folder)
    else:
        write_latents(folder, tiny_vae, **({"complete": False} if problem == "incomplete" else {}))
    if problem == "no_meta":
        os.remove(os.path.join(folder, "meta.json"))
    elif problem == "shape":
        np.save(os.path.join(folder, "labels.npy"), np.zeros(N - 1, np.int64))
    elif problem == "channels":
        extra = ["--model-arg", "in_channels=3"]
    before = sorted(os.listdir(folder))
    with pytest.raises(SystemExit) as e:
        train_cifar.main(TINY + ["--dataset", "latents", "--data-dir", folder, "--out-dir", str(tmp_path / "r"),
                                 "--steps", "1", *extra])
    msg = e.value.code
    assert isinstance(msg, str) and expect in msg and "\n" not in msg
    assert sorted(os.listdir(folder)) == before and not (tmp_path / "r").exists()

"""
pytest setup shared by every test file, and what several test files use (no test file imports another): a tiny
official-layout CIFAR-10 archive and runs of a tiny DiT on it, the checks of a one-line error that leaves every file
as it was, weights redrawn at random, a tiny SD-VAE and latents folders, a stand-in for the FID Inception, and the
exact Gaussian-data oracles that the EDM and flow samplers are tested against.
Project modules are imported inside the fixtures, so a module that does not import breaks only the tests that use it.
"""
import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The tests use tiny tensors: one intra-op thread is faster than two, and on a 2-core machine shared with
# other work two OpenMP threads wait at barriers for each other (measured: 50 oracle DDPM steps took 22.6 s
# with 2 threads under load, 0.45 s with 1).
torch.set_num_threads(1)
REF = Path(__file__).resolve().parent / "reference"  # facts from the official code, see reference/README.md


# ----- Weights -----

def randomized(model, seed=0, gain=1.0):
    """Every parameter redrawn as N(0, gain^2 / fan_in) (vectors N(0, 0.1^2)): zero-initialised heads hide nothing
    and activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (gain * p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    return model


# ----- A tiny official-layout CIFAR-10 archive ("downloaded" through a file:// URL) and runs on it -----
# The model is a DiT-Tiny shrunk to hidden 32, depth 2.

TINY = ["--backbone", "dit", "--model", "DiT-Tiny", "--model-arg", "hidden_size=32", "--model-arg", "depth=2",
        "--model-arg", "num_heads=2", "--model-arg", "patch_size=4", "--batch-size", "4", "--log-every", "1",
        "--ckpt-every", "10", "--keep-every", "0", "--sample-every", "0", "--sample-steps", "2"]
PER_BATCH = 10                                                   # images per pickled batch: 50 train, 10 test


def make_archive(path, members):
    """tar.gz of the folder entry cifar-10-batches-py/ and {name: bytes}, like the official one; returns its md5."""
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return digest(path)


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    rng = np.random.default_rng(0)
    members, arrays = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, PER_BATCH)]
        arrays[name] = (x, y)
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(
            {b"batch_label": b"b", b"labels": y, b"data": x, b"filenames": [b"f.png"] * PER_BATCH}, protocol=2)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"c"] * 10}, protocol=2)
    path = str(tmp_path_factory.mktemp("mirror") / "cifar-10-python.tar.gz")
    md5 = make_archive(path, members)
    return {"path": path, "url": "file://" + path, "md5": md5, "arrays": arrays}


@pytest.fixture
def mirror(monkeypatch, archive):
    import data
    monkeypatch.setattr(data, "CIFAR_URL", archive["url"])
    monkeypatch.setattr(data, "CIFAR_MD5", archive["md5"])
    return archive


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory, archive):
    """A data dir with cifar-10-batches-py/ already extracted (runs use it without downloading)."""
    import data
    root = str(tmp_path_factory.mktemp("data"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "CIFAR_MD5", archive["md5"])
        data.load_cifar10(root, url=archive["url"])
    os.remove(os.path.join(root, "cifar-10-python.tar.gz"))
    return root


def train(out_dir, data_dir, *extra):
    import train_cifar
    train_cifar.main(TINY + ["--data-dir", str(data_dir), "--out-dir", str(out_dir), *map(str, extra)])


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def exit_message(excinfo, capsys):
    """SystemExit's message: the string code (sys.exit("error: ...")) or argparse's stderr (code 2)."""
    code = excinfo.value.code
    assert code not in (0, None)
    return code if isinstance(code, str) else capsys.readouterr().err


def image(path):
    """A PNG's pixels as an (H, W[, C]) uint8 array (file closed)."""
    with Image.open(path) as img:
        return np.asarray(img)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, cifar_dir):
    """The uninterrupted 20-step run, with grids at steps 10 and 20 and kept checkpoints."""
    out = tmp_path_factory.mktemp("runs") / "base"
    train(out, cifar_dir, "--steps", 20, "--sample-every", 10, "--keep-every", 10)
    return out


def same_weights(a, b):
    a, b = (torch.load(p, weights_only=True, map_location="cpu") for p in (a, b))
    return a["step"] == b["step"] and all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in b[k])


# ----- Bad input: a one-line error, non-zero exit, every file as it was -----

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="valid input where a CUDA GPU is visible")


def snapshot(*folders):
    """{path: md5} of every file below the folders."""
    out = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for f in names:
                out[os.path.join(root, f)] = digest(os.path.join(root, f))
    return out


def one_line_error(excinfo, capsys):
    """The exit message of a failed command: non-zero, a single line, no traceback."""
    code = excinfo.value.code
    assert code not in (0, None)
    msg = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.fixture
def existing(tmp_path, baseline):
    """A copy of the finished 20-step run (checkpoints, log, grids) that bad commands must leave as it is."""
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    return out


def a_file(existing, tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    return str(tmp_path / "plain.txt")


# ----- GenViT -----

GENVIT_TINY = ["--backbone", "genvit", "--model", "GenViT-Tiny", "--model-arg", "hidden_size=32",
               "--model-arg", "depth=2", "--batch-size", "4", "--log-every", "1", "--keep-every", "0",
               "--sample-every", "0"]


def genvit_official_state_dict(seed=0, scale=0.05):
    """Random float64 tensors in the official GenViT CIFAR-10 layout (131 keys)."""
    official = json.loads((REF / "genvit_cifar_keys.json").read_text())
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g, dtype=torch.float64) * scale for k, shape in official["keys"].items()}


# ----- FID: the Inception replaced by a small fixed feature map -----

class PooledPixels(torch.nn.Module):
    """Stand-in for the FID Inception: [0, 1] images -> (48 pooled pixel features, 10 logits)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(48, 10)

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return f, self.fc(f)


@pytest.fixture
def fake_inception(monkeypatch, tmp_path):
    """fid.build_inception -> PooledPixels; a reference stats npz of 50 random images in that feature space."""
    import fid
    torch.manual_seed(0)
    net = PooledPixels()
    monkeypatch.setattr(fid, "build_inception", lambda *a, **k: net)
    ref = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    path = tmp_path / "ref_stats.npz"
    fid.save_stats(str(path), *fid.compute_statistics(ref, model=net, device="cpu"))
    return net, str(path)


# ----- A tiny SD-VAE and extract_latents.py folders -----

N, C, H = 12, 4, 8   # 12 latents of 4 x 8 x 8 (16 x 16 images through a 2x VAE)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A diffusers-format folder (config.json + safetensors) of a 2x-downsampling, 4-latent-channel VAE."""
    import vae
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    folder.mkdir()
    config = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 32], layers_per_block=1,
                  norm_num_groups=32, act_fn="silu", sample_size=16)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}))
    torch.manual_seed(1)
    model = vae.AutoencoderKL(**config)
    vae.save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()},
                         str(folder / "diffusion_pytorch_model.safetensors"))
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


# ----- Exact oracles for data x0 ~ N(mu, s^2) independently per dimension -----
#   EDM   x = x0 + sigma n ~ N(mu, s^2 + sigma^2) and the optimal denoiser is
#         D*(x; sigma) = E[x0 | x] = (s^2 x + sigma^2 mu) / (s^2 + sigma^2);
#   flow  x_t = (1 - t) x0 + t eps ~ N((1 - t) mu, V_t), V_t = (1 - t)^2 s^2 + t^2, and the optimal velocity is
#         v*(x, t) = E[eps - x0 | x_t] = t r - (mu + (1 - t) s^2 r),  r = (x - (1 - t) mu) / V_t.
# The oracles see only what a network sees (c_in x and the network time for EDM; x_t and the network time for
# flow) and recover sigma, x and t by inverting the mappings written out below from the papers, so the tests
# pin network_t and the preconditioning as well. Samplers driven by them must return N(mu, s^2).
# (The DDPM oracle, GaussianOracle, is test_diffusion.py's own.)

MU = torch.tensor([-0.6, -0.2, 0.0, 0.3, 0.5, 0.8])
STD = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
SHAPE = (4000, 6, 2, 2)  # 16,000 draws per channel: mean s.e. ~ std / 126


def view(v, x):
    return v.reshape(-1, x.shape[1], *([1] * (x.ndim - 2))).to(x)


def moments(x):
    return x.double().mean(dim=(0, 2, 3)), x.double().std(dim=(0, 2, 3))


def edm_sigma_from_t(t):
    """Inverse of EDM.network_t: the network time is c_noise = ln(sigma) / 4 itself (EDM Table 1)."""
    return torch.exp(4 * t.double())


def flow_t_from_network_t(t):
    """Inverse of FlowMatching.network_t = 999 t."""
    return t.double() / 999


class EDMOracle:
    """F = (D* - c_skip x) / c_out from the network inputs (c_in x, c_noise), EDM Table 1 coefficients."""

    def __init__(self, mu=MU, std=STD, sigma_data=0.5):
        self.mu, self.std, self.sd = mu.double(), std.double(), sigma_data
        self.calls, self.batches = 0, []

    def __call__(self, x_in, t, mu=None):
        self.calls += 1
        self.batches.append(x_in.shape[0])
        sd, dtype = self.sd, x_in.dtype
        sigma = edm_sigma_from_t(t).reshape(-1, *([1] * (x_in.ndim - 1)))
        x = x_in.double() * torch.sqrt(sigma ** 2 + sd ** 2)  # undo c_in
        var, mu = view(self.std ** 2, x), view(self.mu if mu is None else mu.double(), x)
        d = (var * x + sigma ** 2 * mu) / (var + sigma ** 2)
        c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / torch.sqrt(sigma ** 2 + sd ** 2)
        return ((d - c_skip * x) / c_out).to(dtype)


class FlowOracle:
    def __init__(self, mu=MU, std=STD):
        self.mu, self.std = mu.double(), std.double()
        self.calls, self.batches = 0, []

    def __call__(self, x, t, mu=None):
        self.calls += 1
        self.batches.append(x.shape[0])
        dtype, x = x.dtype, x.double()
        t = flow_t_from_network_t(t).reshape(-1, *([1] * (x.ndim - 1)))
        var, mu = view(self.std ** 2, x), view(self.mu if mu is None else mu.double(), x)
        r = (x - (1 - t) * mu) / ((1 - t) ** 2 * var + t ** 2)
        return (t * r - (mu + (1 - t) * var * r)).to(dtype)


class TwoOracles:
    """Conditional oracle N(mu_c, s^2) for y != null, unconditional N(mu_u, s^2) for the null label."""

    def __init__(self, oracle, mu_c, mu_u, null):
        self.o, self.mu_c, self.mu_u, self.null = oracle, mu_c, mu_u, null

    def __call__(self, x, t, y):
        return self.o(x, t, mu=torch.where((y == self.null)[:, None], self.mu_u, self.mu_c))


def assert_gaussian(x, rtol, mu=MU, std=STD, atol_mean=0.012):
    mean, sd = moments(x)
    torch.testing.assert_close(mean, mu.double(), atol=atol_mean, rtol=0)
    torch.testing.assert_close(sd, std.double(), rtol=rtol, atol=2e-3)


class TimeIgnoring(torch.nn.Module):
    def __init__(self, out_channels=1):
        super().__init__()
        self.m = torch.nn.Conv2d(1, out_channels, 1)

    def forward(self, x, t):
        return self.m(x)


@contextlib.contextmanager
def small_disk(path, size):
    """A tmpfs of `size` bytes at path, where this machine allows mounting (root); else the test is skipped."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]}); the simulated full disk still runs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)

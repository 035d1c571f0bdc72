"""
pytorch-fid's FID Inception-v3 written by hand (the TF graph inception-2015-12-05; Szegedy et al. 2016,
"Rethinking the Inception Architecture for Computer Vision"), with torchvision's key names so that pytorch-fid's
pt_inception-2015-12-05-6726825d.pth loads with strict=True, and that weights file: downloaded once, SHA-1 checked.
fid.py computes the statistics, the Frechet distance and the Inception Score with it.
"""
import hashlib
import os
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from errors import RunError
from files import remove_stale_temps

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA1 = "bd836944fd6db519dfd8d924aa457f5b3c8357ff"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "dit-from-scratch")  # weights + reference statistics

# ----- Inception-v3 building blocks (pytorch-fid's FID variant of the TF graph) -----

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU: every Inception-v3 layer."""
    def __init__(self, c_in, c_out, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF's 3x3/1 average pool ignores the zero padding (torchvision's blocks count it; FID blocks must not)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d at 35x35: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1 (Szegedy et al. 2016, Fig. 5)."""
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b1, b5, b3, self.branch_pool(tf_avg_pool(x))], 1)  # (B, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """Mixed_6a, grid reduction 35->17: 3x3/2 | 1x1->3x3->3x3/2 | maxpool 3x3/2 (torchvision's, unchanged)."""
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)  # (B, 384 + 96 + c_in, 17, 17)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e at 17x17 with 7x7 factorised into 1x7 and 7x1 (Szegedy et al. 2016, Fig. 6)."""
    def __init__(self, c_in, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        return torch.cat([b1, b7, bd, self.branch_pool(tf_avg_pool(x))], 1)  # (B, 768, 17, 17)


class InceptionD(nn.Module):
    """Mixed_7a, grid reduction 17->8: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool 3x3/2 (torchvision's)."""
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)  # (B, 320 + 192 + c_in, 8, 8)


class FIDInceptionE(nn.Module):
    """Mixed_7b/7c at 8x8, expanded filter bank (Szegedy et al. 2016, Fig. 7). Mixed_7c's pool branch max-pools:
    pytorch-fid calls that TF graph detail likely an error and keeps it for fidelity, as must we."""
    def __init__(self, c_in, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)  # (B, 768, 8, 8)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)  # (B, 768, 8, 8)
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([b1, b3, bd, self.branch_pool(p)], 1)  # (B, 2048, 8, 8)

# ----- The FID network -----

def preprocess(x):
    """pytorch-fid preprocessing: float (B, 3, H, W) in [0, 1] -> bilinear 299x299 (align_corners=False) -> [-1, 1]."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected float images (B, 3, H, W) in [0, 1], got shape {tuple(x.shape)}")
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


class InceptionV3FID(nn.Module):
    """pytorch-fid's FID Inception-v3 with torchvision's key names. forward(x): float (B, 3, H, W) in [0, 1] ->
    (pool3 features (B, 2048), logits (B, 1008)). Always in eval mode (BatchNorm keeps the TF running statistics)."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # TF's softmax layer: 1000 ImageNet classes + 8 background/unused
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # a metric network: never let BatchNorm switch to batch statistics

    def forward(self, x):
        x = preprocess(x)                                                  # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                      # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                 # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                               # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                 # (B, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)                      # (B, 2048) "pool3"
        return pool, self.fc(pool)                                         # logits (B, 1008)

# ----- Weights: download, checksum, load -----

def sha1_of(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_weights(dst, url=None, sha1=None, progress=True):
    """Fetch url (default FID_WEIGHTS_URL) to a temp file beside dst, check its SHA-1, then rename atomically."""
    url, sha1 = url or FID_WEIGHTS_URL, sha1 or FID_WEIGHTS_SHA1
    hint = f"download {url} by hand and place it at {dst} (or pass --weights PATH / set $FID_WEIGHTS)"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    remove_stale_temps(os.path.dirname(os.path.abspath(dst)))  # partial downloads of killed processes
    tmp = f"{dst}.tmp{os.getpid()}"  # same folder, so the final rename is atomic
    try:
        with open(tmp, "wb") as f:
            try:
                req = urllib.request.Request(url, headers={"User-Agent": "dit-from-scratch"})
                with urllib.request.urlopen(req, timeout=60) as r, tqdm(
                        total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                        desc="FID Inception weights", disable=not progress) as bar:
                    while chunk := r.read(1 << 20):
                        bar.update(f.write(chunk))
            except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
                raise RunError(f"could not download the FID Inception weights ({e}); {hint}") from None
        if (got := sha1_of(tmp)) != sha1:
            raise RunError(f"checksum mismatch for {url}: SHA-1 {got}, expected {sha1}; {hint}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst


def fid_weights_path(weights=None, cache_dir=None, progress=True):
    """Local weights file: `weights` > $FID_WEIGHTS > <cache_dir>/pt_inception-...pth (downloaded on first use)."""
    weights = weights or os.environ.get("FID_WEIGHTS")
    if weights:
        if not os.path.isfile(weights):
            raise RunError(f"FID weights file {weights} does not exist; download {FID_WEIGHTS_URL} there")
        return weights
    dst = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), os.path.basename(FID_WEIGHTS_URL))
    return dst if os.path.isfile(dst) else download_weights(dst, progress=progress)


def load_fid_state_dict(model, state_dict):
    """Strict load; BatchNorm `num_batches_tracked` counters missing from an old checkpoint are filled with 0."""
    state_dict = dict(state_dict)
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = torch.zeros_like(v)
    model.load_state_dict(state_dict, strict=True)
    return model


def build_inception(weights=None, device="cpu", cache_dir=None, progress=True):
    """InceptionV3FID with pytorch-fid's weights (SHA-1 checked), in eval mode on `device`."""
    path = fid_weights_path(weights, cache_dir, progress)
    got = sha1_of(path)
    if got != FID_WEIGHTS_SHA1:
        if path == os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), os.path.basename(FID_WEIGHTS_URL)):
            hint = f"it is a damaged download in the cache: delete it and rerun (or fetch {FID_WEIGHTS_URL} there)"
        else:
            hint = f"point --weights / $FID_WEIGHTS at pytorch-fid's {os.path.basename(FID_WEIGHTS_URL)}"
        raise RunError(f"{path} has SHA-1 {got}, expected {FID_WEIGHTS_SHA1}: not pytorch-fid's FID Inception "
                       f"weights; {hint}")
    model = InceptionV3FID()
    load_fid_state_dict(model, torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device)

"""
The Stable Diffusion VAE: the KL-regularised "kl-f8" autoencoder of Rombach et al. 2022 (arXiv 2112.10752), §3.1
"Perceptual Image Compression" and App. G, in whose 8x-downsampled 4-channel latents DiT, U-ViT and DiffiT train.
Names follow diffusers' AutoencoderKL, so stabilityai/sd-vae-ft-ema and -mse load with strict=True; the CompVis/LDM
names (ldm/modules/diffusionmodules/model.py, also baofff/U-ViT libs/autoencoder.py) are converted on load.
  ResnetBlock, AttentionBlock, Downsample, Upsample   (diffusers ResnetBlock2D, Attention, Downsample2D, Upsample2D)
  Encoder, Decoder   conv_in, levels of ResNets, mid block (ResNet, attention, ResNet), GroupNorm-SiLU-conv_out
  AutoencoderKL      encode(x) -> posterior (mean, logvar); decode(z) -> image
  load_vae           a diffusers folder or one checkpoint file (either naming) -> frozen AutoencoderKL
Latents are unscaled here: callers multiply by `scaling_factor` (0.18215) after encoding and divide before decoding
(LDM, DiT's train.py / sample.py, U-ViT).
"""
import json
import math
import os
import pickle
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import code_refusal
from data import check_vae_fits
from errors import RunError
from files import sha256_of
from safetensors_io import load_safetensors, save_safetensors  # noqa: F401  (vae.save_safetensors too)

ATTENTION_BACKENDS = ("sdpa", "math")
# stabilityai/sd-vae-ft-{ema,mse} config.json (scaling_factor is absent there, so the class default applies)
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=256,
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


# ----- Layers -----

class ResnetBlock(nn.Module):
    """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), the skip a 1x1 conv_shortcut when the width changes
    (LDM ResnetBlock without the time embedding; dropout is 0 in kl-f8)."""

    def __init__(self, in_channels, out_channels, num_groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):  # (B, C_in, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """x + to_out(softmax(q k^T / sqrt(C)) v) with q, k, v Linear maps of GroupNorm(x) over the C channels of each
    pixel: one head, every pixel attending to every pixel. LDM's AttnBlock writes the same maps as 1x1 convs.
    attention="sdpa" calls F.scaled_dot_product_attention; "math" is the written-out reference."""

    def __init__(self, channels, num_groups, attention="sdpa"):
        super().__init__()
        self.attention = attention
        self.group_norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # "to_out.0", as diffusers names it

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        if self.attention == "sdpa":
            h = F.scaled_dot_product_attention(q, k, v)  # default scale 1 / sqrt(C)
        else:  # reference path; the softmax in float32 as diffusers' upcast_softmax
            attn = (q @ k.transpose(1, 2)) * C ** -0.5  # (B, HW, HW)
            h = attn.float().softmax(dim=-1).to(v.dtype) @ v  # (B, HW, C)
        h = self.to_out[0](h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a stride-2 3x3 conv (the asymmetric padding of LDM)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----- Blocks -----

class DownEncoderBlock(nn.Module):
    """One encoder level: num_layers ResNets, then a Downsample unless it is the last level (DownEncoderBlock2D)."""

    def __init__(self, in_channels, out_channels, num_layers, num_groups, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, num_groups)
                                      for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if add_downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpDecoderBlock(nn.Module):
    """One decoder level: num_layers ResNets, then an Upsample unless it is the last level (UpDecoderBlock2D)."""

    def __init__(self, in_channels, out_channels, num_layers, num_groups, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, num_groups)
                                      for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if add_upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """ResNet -> self-attention -> ResNet at the lowest resolution (diffusers UNetMidBlock2D; LDM block_1, attn_1,
    block_2). The only attention in kl-f8 (attn_resolutions = [])."""

    def __init__(self, channels, num_groups, attention="sdpa"):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(channels, num_groups, attention)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, num_groups) for _ in range(2)])

    def forward(self, x):  # (B, C, h, w)
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2 * latent, H/f, W/f), f = 2^(levels - 1): the mean and log-variance of a
    diagonal Gaussian posterior (LDM double_z=True)."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, num_groups, attention):
        super().__init__()
        chs, n = block_out_channels, len(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([DownEncoderBlock(chs[max(i - 1, 0)], chs[i], layers_per_block, num_groups,
                                                           add_downsample=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(chs[-1], num_groups, attention)
        self.conv_norm_out = nn.GroupNorm(num_groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)  # (B, chs[0], H, W)
        for block in self.down_blocks:
            x = block(x)  # (B, chs[-1], H/f, W/f) after the last level
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2 * latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, out, f h, f w): the encoder mirrored, with layers_per_block + 1 ResNets
    per level; levels run from the widest (lowest resolution) to chs[0]."""

    def __init__(self, out_channels, latent_channels, block_out_channels, layers_per_block, num_groups, attention):
        super().__init__()
        chs, n = list(reversed(block_out_channels)), len(block_out_channels)
        self.conv_in = nn.Conv2d(latent_channels, chs[0], 3, padding=1)
        self.up_blocks = nn.ModuleList([UpDecoderBlock(chs[max(i - 1, 0)], chs[i], layers_per_block + 1, num_groups,
                                                       add_upsample=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(chs[0], num_groups, attention)
        self.conv_norm_out = nn.GroupNorm(num_groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))  # (B, chs[0], h, w)
        for block in self.up_blocks:
            x = block(x)  # (B, block_out_channels[0], f h, f w) after the last level
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out, f h, f w)


# ----- The model -----

MAX_COUNT, MAX_PARAMETERS = 2 ** 16, 5e9  # far above any released VAE (SD: 512 channels, 83.65M parameters)


def check_numbers(block_out_channels, scaling_factor, shift_factor, **counts):
    """ValueError, before anything is allocated, for config numbers no autoencoder has: counts that are not integers
    in 1..2^16, over MAX_PARAMETERS weights, a scaling_factor that is not a finite number > 0."""
    def count(v):
        return (type(v) is int or type(v) is float and v.is_integer()) and 1 <= v <= MAX_COUNT
    bad = [f"{k}={v!r}" for k, v in counts.items() if not count(v)]
    if not (isinstance(block_out_channels, (list, tuple)) and 1 <= len(block_out_channels) <= 16
            and all(count(c) for c in block_out_channels)):
        bad.append(f"block_out_channels={block_out_channels!r}")
    if bad:
        raise ValueError(f"{', '.join(bad)}: counts must be integers in 1..{MAX_COUNT}")
    size = sum(9 * c * c * (4 * counts["layers_per_block"] + 3) for c in block_out_channels)  # ~ the 3x3 convs
    if size > MAX_PARAMETERS:
        raise ValueError(f"block_out_channels={list(block_out_channels)} would have about {size:.2g} parameters")
    for key, v in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
        if not (type(v) in (int, float) and math.isfinite(v) and (v > 0 or key == "shift_factor")
                or v is None and key == "shift_factor"):
            raise ValueError(f"{key}={v!r} must be a finite number{' > 0' if key == 'scaling_factor' else ''}")


class AutoencoderKL(nn.Module):
    """The KL autoencoder (LDM §3.1), built from the keys of a diffusers config.json. Defaults are diffusers'
    class defaults (what a config that omits a key means); AutoencoderKL(**SD_VAE_CONFIG) is the SD VAE, 83.65M params.
    Keys starting with "_" are ignored; unknown keys are ignored with a warning (a key that changes the layout then
    shows up as a strict-loading error); known settings this implementation does not have raise ValueError."""

    def __init__(self, in_channels=3, out_channels=3, down_block_types=None, up_block_types=None,
                 block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
                 sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
                 force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
                 attention="sdpa", **unknown):
        super().__init__()
        check_numbers(in_channels=in_channels, out_channels=out_channels, latent_channels=latent_channels,
                      layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
                      block_out_channels=block_out_channels, scaling_factor=scaling_factor, shift_factor=shift_factor)
        chs, n = [int(c) for c in block_out_channels], len(block_out_channels)
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={attention!r} is not supported; choose one of {ATTENTION_BACKENDS}")
        if act_fn != "silu":
            raise ValueError(f"act_fn={act_fn!r} is not supported; the kl-f8 autoencoder uses 'silu'")
        for key, types, want in (("down_block_types", down_block_types, "DownEncoderBlock2D"),
                                 ("up_block_types", up_block_types, "UpDecoderBlock2D")):
            if types is not None and (len(types) != n or any(t != want for t in types)):
                raise ValueError(f"{key}={list(types)} is not supported; expected {n} x {want!r}, "
                                 f"one per entry of block_out_channels={chs}")
        for key, value in (("use_quant_conv", use_quant_conv), ("use_post_quant_conv", use_post_quant_conv),
                           ("mid_block_add_attention", mid_block_add_attention)):
            if value is not True:
                raise ValueError(f"{key}={value!r} is not supported; only {key}=True is implemented")
        if n == 0 or any(c % norm_num_groups for c in chs):
            raise ValueError(f"block_out_channels={chs} must be non-empty multiples of "
                             f"norm_num_groups={norm_num_groups}")
        unknown = sorted(k for k in unknown if not k.startswith("_"))
        if unknown:
            warnings.warn(f"AutoencoderKL: ignoring unknown config keys {unknown}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, latent_channels=latent_channels,
                           block_out_channels=chs, layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
                           act_fn=act_fn, sample_size=sample_size, scaling_factor=scaling_factor,
                           shift_factor=shift_factor)
        self.in_channels, self.out_channels, self.latent_channels = in_channels, out_channels, latent_channels
        self.scaling_factor, self.shift_factor, self.sample_size = scaling_factor, shift_factor, sample_size
        self.downsample_factor = 2 ** (n - 1)
        self.encoder = Encoder(in_channels, latent_channels, chs, layers_per_block, norm_num_groups, attention)
        self.decoder = Decoder(out_channels, latent_channels, chs, layers_per_block, norm_num_groups, attention)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode(self, x):
        """Images (B, in, H, W) in [-1, 1], H and W multiples of downsample_factor -> the posterior (mean, logvar),
        each (B, latent, H/f, W/f), unscaled; logvar clamped to [-30, 20] as LDM's DiagonalGaussianDistribution."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"encode expects (B, {self.in_channels}, H, W) with H, W multiples of {f}, "
                             f"got {tuple(x.shape)}")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @staticmethod
    def sample(mean, logvar, generator=None):
        """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): a draw from the posterior (still unscaled)."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z):
        """Unscaled latents (B, latent, h, w) -> images (B, out, f h, f w), about [-1, 1], not clamped."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x):
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(x)[0])


# ----- CompVis/LDM <-> diffusers parameter names -----

# (LDM name, diffusers name) of every renamed module, applied in this order; {i}, {j} are indices copied as they
# are, {r} a decoder level: LDM numbers decoder.up by resolution (0 = full size), diffusers numbers up_blocks in
# execution order, so up_blocks.{k} = up.{n - 1 - k} (diffusers single_file_utils.py convert_ldm_vae_checkpoint).
NAME_MAP = [
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{r}.block.{j}.", "decoder.up_blocks.{r}.resnets.{j}."),
    ("decoder.up.{r}.upsample.", "decoder.up_blocks.{r}.upsamplers.0."),
    ("mid.block_1.", "mid_block.resnets.0."),
    ("mid.block_2.", "mid_block.resnets.1."),
    ("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
    ("mid.attn_1.q.", "mid_block.attentions.0.to_q."),
    ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
    ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
    ("mid.attn_1.proj_out.", "mid_block.attentions.0.to_out.0."),
    ("nin_shortcut.", "conv_shortcut."),
    ("norm_out.", "conv_norm_out."),
]
# diffusers Linear attention weights (C, C); LDM stores them as 1x1 convs (C, C, 1, 1)
_DIFFUSERS_ATTN_WEIGHT = re.compile(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
# names old diffusers versions saved (modeling_utils.py _fix_state_dict_keys_on_load renames them)
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _pattern(template):
    """'a.{i}.b.' -> a regex matching it at a name-segment boundary, capturing the indices."""
    body = re.sub(r"\\\{(\w)\\\}", r"(?P<\1>\\d+)", re.escape(template))
    return re.compile(r"(?<![^.])" + body)


def _rename(state_dict, to_diffusers):
    src, dst = (0, 1) if to_diffusers else (1, 0)
    rules = [(_pattern(pair[src]), pair[dst]) for pair in NAME_MAP]
    levels = 1 + max((int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up(?:_blocks)?\.(\d+)\.", k))),
                     default=-1)
    out = {}
    for name, value in state_dict.items():
        new = name
        for pattern, template in rules:
            m = pattern.search(new)
            if m:
                idx = {g: int(v) for g, v in m.groupdict().items()}
                if "r" in idx:
                    idx["r"] = levels - 1 - idx["r"]
                new = new[:m.start()] + template.format(**idx) + new[m.end():]
        if to_diffusers and _DIFFUSERS_ATTN_WEIGHT.search(new) and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value.reshape(value.shape[:2])  # (C, C, 1, 1) -> (C, C)
        elif not to_diffusers and _DIFFUSERS_ATTN_WEIGHT.search(name) and value.ndim == 2:
            value = value[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        out[new] = value
    return out


def ldm_to_diffusers(state_dict):
    """CompVis/LDM AutoencoderKL names (encoder.down.0.block.0..., 1x1-conv attention) -> diffusers names."""
    return _rename(state_dict, to_diffusers=True)


def diffusers_to_ldm(state_dict):
    """diffusers AutoencoderKL names -> CompVis/LDM names; the inverse of ldm_to_diffusers."""
    return _rename(state_dict, to_diffusers=False)


def infer_config(state_dict):
    """The AutoencoderKL config of a diffusers-named state_dict, read off tensor shapes: levels and widths from the
    encoder levels' first conv1, layers_per_block from the ResNet count, latent_channels from post_quant_conv.
    norm_num_groups cannot be seen in shapes and is taken as 32 (every kl-f* model of LDM and SD)."""
    sd, levels, layers = state_dict, 0, 0
    while f"encoder.down_blocks.{levels}.resnets.0.conv1.weight" in sd:
        levels += 1
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in sd:
        layers += 1
    try:
        if levels == 0:
            raise KeyError("encoder.down_blocks.0.resnets.0.conv1.weight")
        return dict(in_channels=sd["encoder.conv_in.weight"].shape[1],
                    out_channels=sd["decoder.conv_out.weight"].shape[0],
                    latent_channels=sd["post_quant_conv.weight"].shape[0], layers_per_block=layers,
                    block_out_channels=[sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                        for i in range(levels)])
    except KeyError as e:
        raise ValueError(f"cannot infer the architecture: no {e.args[0]!r}") from None


# ----- Loading -----

def _read_state_dict(file):
    """One checkpoint file -> {name: tensor} in diffusers names (LDM names and legacy attention names converted)."""
    ext = os.path.splitext(file)[1].lower()
    if ext == ".safetensors":
        try:
            obj = load_safetensors(file)
        except (ValueError, OSError) as e:
            raise RunError(f"{file}: not a valid safetensors file ({e}); re-download or re-save it") from None
    elif ext in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
            raise code_refusal(file, e, "this pickle needs code to load, which is refused; re-save just the tensors "
                                        "(torch.save(model.state_dict(), path)) or use .safetensors") or \
                RunError(f"{file}: torch.load cannot read it as a checkpoint ({type(e).__name__}); re-download or "
                         "re-save it") from None
    else:
        raise RunError(f"{file}: unknown checkpoint type {ext!r}; pass a diffusers folder or a .safetensors, "
                       ".bin, .pt, .pth or .ckpt file")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # PyTorch Lightning / LDM training checkpoints
    if not isinstance(obj, dict):
        raise RunError(f"{file}: holds a {type(obj).__name__}, not a state_dict of tensors")
    prefix = "first_stage_model."  # the VAE inside a full Stable Diffusion checkpoint
    if any(isinstance(k, str) and k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items() if isinstance(k, str) and k.startswith(prefix)}
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise RunError(f"{file}: entries that are not tensors: {bad[:5]}; pass a state_dict of tensors")
    keys = list(obj)
    if any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.", "decoder.up_blocks.")) for k in keys):
        return {re.sub(r"(attentions\.\d+\.)(query|key|value|proj_attn)\.",
                       lambda m: m[1] + _LEGACY_ATTENTION[m[2]] + ".", k): v for k, v in obj.items()}
    if any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.")) for k in keys):
        # LDM training checkpoints also hold the loss (LPIPS + discriminator), which is not part of the autoencoder
        return ldm_to_diffusers({k: v for k, v in obj.items() if not k.startswith("loss.")})
    raise RunError(f"{file}: its keys match no known VAE layout (first keys: {keys[:5]}); expected diffusers "
                   "AutoencoderKL names (encoder.down_blocks.0...) or CompVis/LDM names (encoder.down.0.block.0...), "
                   "bare, under 'state_dict' or prefixed 'first_stage_model.'")


def load_vae(path, device="cpu", attention="sdpa"):
    """A frozen AutoencoderKL (eval mode, requires_grad False) from a diffusers folder (config.json +
    diffusion_pytorch_model.safetensors, else .bin) or from one .safetensors / .ckpt / .pt / .pth / .bin file in
    diffusers or CompVis/LDM names (architecture inferred from the shapes). Loading is strict; problems are RunError."""
    path, config = os.fspath(path), None
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        weights = [os.path.join(path, "diffusion_pytorch_model" + e) for e in (".safetensors", ".bin")]
        weights = [w for w in weights if os.path.isfile(w)]
        if not os.path.isfile(cfg_path) or not weights:
            raise RunError(f"{path}: a diffusers VAE folder needs config.json and diffusion_pytorch_model"
                           f".safetensors (or .bin); found {sorted(os.listdir(path))[:8]} (for a full pipeline "
                           "folder, pass its vae/ subfolder)")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{cfg_path}: not a readable JSON config ({e})") from None
        if not isinstance(config, dict):
            raise RunError(f"{cfg_path}: not a JSON object of AutoencoderKL settings")
        file = weights[0]
    elif os.path.isfile(path):
        file = path
    else:
        raise RunError(f"{path}: no such file or folder; pass a diffusers VAE folder (config.json + "
                       "diffusion_pytorch_model.safetensors) or one .safetensors/.ckpt/.pt/.pth/.bin checkpoint")
    source = cfg_path if config is not None else file
    state_dict = _read_state_dict(file) if config is None else None  # with a config: check it before the weights
    try:
        model = AutoencoderKL(**(config or infer_config(state_dict)), attention=attention)
    except (ValueError, TypeError) as e:
        raise RunError(f"{source}: cannot build the AutoencoderKL: {e}") from None
    state_dict = _read_state_dict(file) if state_dict is None else state_dict
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [f"{k} has shape {tuple(state_dict[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if problems:
        raise RunError(f"{file}: the weights do not fit the AutoencoderKL of {source} ({len(problems)} problems, "
                       f"names in diffusers form): {'; '.join(problems[:4])}; pass the matching config.json and "
                       "weights, or a complete kl-f8 VAE checkpoint")
    model.load_state_dict(state_dict, strict=True)
    bad = next((k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise RunError(f"{file}: weight {bad} holds non-finite values (NaN or inf), which would decode black images; "
                       "re-download or re-save the VAE")
    model.sha256 = sha256_of([cfg_path, file] if config is not None else [file])  # its identity, by content
    return model.eval().requires_grad_(False).to(device)


def latent_decoder(vae_path, channels, latent_size, device, image_size=None, latents=None):
    """(decode, image size): images in [-1, 1] = decode(scaled latents), through the SD-VAE at vae_path (latents
    are divided by its scaling factor first, as DiT's sample.py does); image_size, if given, is checked, and so is
    what made the latents (a checkpoint's data entry, see data.check_vae_fits)."""
    if vae_path and not os.path.exists(vae_path):
        raise RunError(f"the VAE {vae_path} (from --vae, or recorded in the latents' meta.json / the checkpoint) does "
                       "not exist; pass --vae PATH")
    if not vae_path:
        raise RunError(f"this is a latent model ({channels} x {latent_size} x {latent_size}); pass --vae with the "
                       "SD-VAE that decodes it (a diffusers folder such as sd-vae-ft-ema, or one weights file)")
    autoencoder = load_vae(vae_path, device=device)
    if autoencoder.latent_channels != channels:
        raise RunError(f"--vae {vae_path} has {autoencoder.latent_channels} latent channels but the model makes "
                       f"{channels}; pass the VAE the model was trained with")
    size = latent_size * autoencoder.downsample_factor
    if image_size is not None and image_size != size:
        raise RunError(f"--image-size {image_size}: this model makes {latent_size}x{latent_size} latents, i.e. "
                       f"{size}x{size} images through a VAE that downsamples {autoencoder.downsample_factor}x")
    if latents:
        check_vae_fits(autoencoder, vae_path, latents, latent_size)  # data.py: against what made the latents

    @torch.no_grad()
    def decode(z, chunk=16):  # in chunks: a 256x256 decode holds about 240 MB of activations per image in fp32
        parts = [autoencoder.decode(c.float() / autoencoder.scaling_factor).float() for c in z.split(chunk)]
        return torch.cat(parts)  # (B, 3, H, W), about [-1, 1]
    return decode, size


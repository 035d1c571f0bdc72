"""
DiT: "Scalable Diffusion Models with Transformers", Peebles & Xie 2023 (arXiv 2212.09748).

A plain-PyTorch re-implementation whose parameter names, shapes, layouts and initialisation match the
official facebookresearch/DiT models.py, so the released DiT-XL/2 state_dicts load with strict=True.
What implements which part of the paper:
  PatchEmbed + pos_embed     §3.2 "Patchify" (Fig. 4): p x p patches -> tokens, fixed 2D sin-cos positions
  TimestepEmbedder           256-d frequency embedding of t followed by a 2-layer SiLU MLP
  LabelEmbedder              class embedding; the extra null row implements label dropout for CFG (§3.1)
  DiTBlock                   §3.2 "DiT block design": the adaLN-Zero block (Fig. 3, right)
  FinalLayer + unpatchify    §3.2 "Transformer decoder": adaLN + linear to p*p*2C, rearranged to (2C, H, W)
  forward_with_cfg           §3.1 "Classifier-free guidance" in the official 3-channel form (App. A)
  MODELS                     §3.2 "Model size", Table 1: S/B/L/XL x patch 2/4/8, plus a CPU-sized DiT-Tiny
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ATTENTION_BACKENDS = ("sdpa", "math")


def modulate(x, shift, scale):
    """adaLN modulation x * (1 + scale) + shift; shift/scale (B, D) broadcast over the tokens of x (B, N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----- Embedding layers -----

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens via Conv2d(kernel = stride = p) (DiT §3.2 "Patchify")."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):                                   # (B, C, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)      # (B, T, D), tokens row-major over the (h, w) grid


class TimestepEmbedder(nn.Module):
    """Raw integer timestep t -> D-dim vector: 256-d [cos, sin] frequency embedding, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(B,) timesteps -> (B, dim): [cos(t f_k), sin(t f_k)] with f_k = max_period^(-k/half), cos first."""
        half = dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * k / half)                  # (half,)
        angles = t.float()[:, None] * freqs[None, :]                        # (B, half)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)   # (B, 2 * half)

    def forward(self, t):                                   # (B,)
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))                # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> D-dim vector. With dropout_prob > 0 an extra row (index num_classes) is the null label."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(has_null), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null index: at random with dropout_prob, or where force_drop_ids == 1."""
        if self.dropout_prob <= 0:
            raise ValueError("label dropout needs a null row: build the model with class_dropout_prob > 0")
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train, force_drop_ids=None):  # (B,)
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)                # drop only while training (or forced)
        return self.embedding_table(labels)                 # (B, D)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2D sin-cos table (grid_size^2, D), MAE-style: channels [0, D/2) encode the column w,
    [D/2, D) the row h; each half is [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k/(D/4))."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))    # (D/4,)
    h, w = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                       indexing="ij")                                                       # row-major tokens
    def axis(pos):                                          # (T,) -> (T, D/2)
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return np.concatenate([axis(w), axis(h)], axis=1)       # (T, D)


# ----- Transformer layers -----

class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear: rows [q; k; v], each split into heads contiguously."""

    def __init__(self, dim, num_heads, backend="sdpa"):
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                   # (B, N, D)
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                    # each (B, H, N, hd)
        if self.backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:                                               # reference path: softmax(Q K^T / sqrt(d)) V
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            out = att.softmax(dim=-1) @ v                   # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Token-wise MLP fc1 -> GELU (tanh approximation, as the official weights were trained) -> fc2."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT §3.2): c regresses shift/scale/gate for both residual branches; the gates start at 0."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attention="sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, backend=attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):                                # x (B, N, D), c (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Decoder (DiT §3.2): adaLN (shift, scale; no gate) on a non-affine LN, then Linear D -> p*p*C_out."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))     # (B, N, p*p*C_out)


# ----- The model -----

class DiT(nn.Module):
    """Diffusion transformer over latent (or pixel) patches; returns eps (and the variance interpolation v)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
                 attention="sdpa", grad_checkpoint=False):
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={attention!r} is not supported; choose one of {ATTENTION_BACKENDS}")
        if patch_size < 1 or input_size % patch_size:
            raise ValueError(f"input_size={input_size} must be a multiple of patch_size={patch_size}")
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of 4 for the 2D sin-cos pos_embed")
        if depth < 1 or in_channels < 1 or num_classes < 0:
            raise ValueError(f"need depth >= 1, in_channels >= 1, num_classes >= 0; "
                             f"got {depth}, {in_channels}, {num_classes}")
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob={class_dropout_prob} must lie in [0, 1]")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes, self.class_dropout_prob, self.learn_sigma = num_classes, class_dropout_prob, learn_sigma
        self.attention, self.grad_checkpoint = attention, grad_checkpoint
        self.grid_size = input_size // patch_size
        # Same module and init order as the official code (meant to keep seeded inits comparable; unverified).
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Frozen parameter (not a buffer) so it is in state_dict and in the official "total params" count.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, attention) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_label(self):
        """Index of the null (unconditional) label row, or None when the model has none."""
        return self.num_classes if self.num_classes > 0 and self.class_dropout_prob > 0 else None

    def initialize_weights(self):
        """The official initialisation; adaLN-Zero and the zero decoder make a fresh model output exactly 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        pe = get_2d_sincos_pos_embed(self.hidden_size, self.grid_size)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(pe).float().unsqueeze(0))
            w = self.x_embedder.proj.weight                 # treat the conv as a Linear over (C*p*p) inputs
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x):
        """(B, T, p*p*C_out) -> (B, C_out, H, W); each token vector is laid out as (p_row, p_col, channel)."""
        B, g, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)          # (B, C, h, p_row, w, p_col)
        return x.reshape(B, c, g * p, g * p)

    def forward(self, x, t, y=None):
        """x (B, C, H, W), t (B,) DDPM indices (long or float), y (B,) labels -> (B, C_out, H, W)."""
        want = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape (B, {want[0]}, {want[1]}, {want[2]}); got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) (one timestep per sample); got {tuple(t.shape)}")
        x = self.x_embedder(x) + self.pos_embed             # (B, T, D)
        c = self.t_embedder(t)                              # (B, D)
        if self.y_embedder is not None:
            if y is None or y.shape != (x.shape[0],):
                raise ValueError(f"class-conditional model needs y of shape ({x.shape[0]},); got "
                                 f"{None if y is None else tuple(y.shape)} (null label = {self.null_label})")
            rows = self.y_embedder.embedding_table.num_embeddings
            if y.dtype.is_floating_point or y.dtype.is_complex:
                raise ValueError(f"y must hold integer class labels, got {y.dtype}")
            if y.device.type == "cpu" and len(y) and (int(y.min()) < 0 or int(y.max()) >= rows):  # no GPU sync
                raise ValueError(f"labels must lie in 0..{rows - 1}, got min {int(y.min())} max {int(y.max())}")
            c = c + self.y_embedder(y, self.training)       # unconditional models ignore y
        for block in self.blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)     # recompute activations in backward
            else:
                x = block(x, c)
        x = self.final_layer(x, c)                          # (B, T, p*p*C_out)
        return self.unpatchify(x)                           # (B, C_out, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Official batched CFG: the first half of x is duplicated and run once with y = [labels; nulls];
        eps = uncond + s (cond - uncond) on eps channels 0..2, written into both halves of the full batch."""
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond]; got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        # Guiding only channels 0..2 is a GLIDE (RGB) leftover that the official code keeps for exact
        # reproducibility of its reported numbers; we keep it for parity. The shared diffusion sampler
        # (diffusion.py, cfg_channels) offers all-channel guidance. Channel 3+ and variances pass through.
        g = min(3, self.in_channels)                        # never guide the variance channels
        cond, uncond = out[:, :g].chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), out[:, g:]], dim=1)


# ----- Registry: DiT §3.2 Table 1 configs (depth, hidden, heads) x patch sizes -----

_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _config(depth, hidden_size, num_heads, patch_size):
    def build(**overrides):
        kw = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)
        return DiT(**{**kw, **overrides})
    return build


MODELS = {f"DiT-{s}/{p}": _config(*_SIZES[s], p) for s in ("XL", "L", "B", "S") for p in (2, 4, 8)}
# CPU-trainable size. At CIFAR-10 settings (input_size=32, in_channels=3, num_classes=10, learn_sigma=True,
# class_dropout_prob=0.1) it has 4,217,496 parameters in total: 4,168,344 trainable + 49,152 frozen pos_embed.
MODELS["DiT-Tiny"] = _config(6, 192, 3, 2)

"""
DiT: "Scalable Diffusion Models with Transformers", Peebles & Xie 2023 (arXiv 2212.09748).

A plain-PyTorch re-implementation whose parameter names, shapes, layouts and initialisation match the
official facebookresearch/DiT models.py, so the released DiT-XL/2 state_dicts load with strict=True (modules are
built and initialised in the official order).
What implements which part of the paper:
  PatchEmbed + pos_embed     §3.2 "Patchify" (Fig. 4): p x p patches -> tokens, fixed 2D sin-cos positions (a
                             frozen Parameter, not a buffer: in state_dict and the official "total params" count)
  TimestepEmbedder           256-d frequency embedding of t followed by a 2-layer SiLU MLP
  LabelEmbedder              class embedding; the extra null row implements label dropout for CFG (§3.1)
  DiTBlock                   §3.2 "DiT block design": the adaLN-Zero block (Fig. 3, right)
  FinalLayer + unpatchify    §3.2 "Transformer decoder": adaLN + linear to p*p*2C, rearranged to (2C, H, W)
  MODELS                     §3.2 "Model size", Table 1: S/B/L/XL x patch 2/4/8, plus a CPU-sized DiT-Tiny
Classifier-free guidance (§3.1), the official 3-channel form included, is diffusion.classifier_free_guidance with
cfg_channels=3: one guidance path for every backbone. The forward follows README "The backbone contract".
The small primitives (timestep_embedding, PatchEmbed, unpatchify, Attention, Mlp, run_block, ...) are written
identically in dit.py, uvit.py, diffit.py and genvit.py (each file has those it uses), so each file stands alone
and a diff between two backbones shows only what the papers change.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ATTENTION_BACKENDS = ("sdpa", "math")


# ----- Embedding layers -----

def timestep_embedding(t, dim, max_period=10000):
    """(B,) timesteps, integer or float -> (B, dim) float32 sinusoids [cos(t f_k), sin(t f_k)], cos first, with
    f_k = max_period^(-k/half), k < half = dim // 2 (GLIDE/ADM form, as the official code); odd dim: a zero channel."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:  # odd width: one zero channel keeps the shape
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Timestep t -> D-dim vector: a frequency_embedding_size-d timestep_embedding, then Linear -> SiLU -> Linear
    (the official DiT TimestepEmbedder, keys mlp.0 and mlp.2)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t):  # (B,)
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, frequency_embedding_size), float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> D-dim vector. With dropout_prob > 0 the table has one extra row, index num_classes: the null
    label that label dropout swaps in for classifier-free guidance (DiT §3.1; the official LabelEmbedder)."""

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
            labels = self.token_drop(labels, force_drop_ids)  # drop only while training (or when forced)
        return self.embedding_table(labels)  # (B, D)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2D sin-cos table (grid_size^2, embed_dim), MAE layout as official DiT: channels [0, D/2) the column w,
    [D/2, D) the row h, each [sin, cos](pos / 10000^(k / (D/4))); float64 on the CPU (same bits anywhere) -> float32."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64, device="cpu") / (embed_dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    h, w = torch.meshgrid(coords, coords, indexing="ij")  # token n = h * grid_size + w, row-major as PatchEmbed

    def axis(pos):  # (N,) -> (N, D/2)
        angles = pos.flatten()[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.cat([axis(w), axis(h)], dim=1).float()  # (N, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens with one Conv2d(kernel = stride = p, with bias) (ViT; DiT §3.2
    "Patchify"); tokens are row-major over the (H/p, W/p) patch grid."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):  # (B, C, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), N = H * W / p^2


def unpatchify(x, patch_size, channels):
    """Inverse of PatchEmbed's token order, as the official unpatchify: (B, N, p*p*C) -> (B, C, H, W) for a square
    grid of N patches (row-major), each token vector laid out (p_row, p_col, channel)."""
    B, N, p, c = x.shape[0], x.shape[1], patch_size, channels
    g = int(N ** 0.5)  # patches per side
    x = x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, g_row, p_row, g_col, p_col)
    return x.reshape(B, c, g * p, g * p)  # (B, C, H, W)


# ----- Transformer layers -----

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # adaLN: (B, D) shift/scale broadcast over tokens


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear: output rows [q; k; v], each split into heads contiguously.
    attention="sdpa" calls F.scaled_dot_product_attention (fused kernels); "math" is the written-out reference
    softmax(q k^T / sqrt(head_dim)) v, the same maths."""

    def __init__(self, dim, num_heads, qkv_bias=True, attention="sdpa", head_dim=None):
        super().__init__()
        self.num_heads, self.head_dim, self.attention = num_heads, head_dim or dim // num_heads, attention
        inner = num_heads * self.head_dim  # = dim unless head_dim is given (GenViT's dim_head)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x):  # (B, N, D)
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, H, N, head_dim)
        if self.attention == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)  # default scale 1 / sqrt(head_dim)
        else:  # reference path: softmax(q k^T / sqrt(head_dim)) v
            attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, N, N)
            x = attn.softmax(dim=-1) @ v  # (B, H, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))  # (B, N, D)


class Mlp(nn.Module):
    """Token-wise MLP fc1 -> GELU -> fc2 (timm's Mlp without dropout). approximate="tanh" is the tanh GELU that the
    official DiT and DiffiT weights were trained with; approximate="none" is the exact erf GELU (U-ViT)."""

    def __init__(self, dim, hidden_dim, approximate):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):  # (B, N, dim)
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT §3.2): c regresses shift/scale/gate for both residual branches; the gates start at 0."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attention="sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, attention=attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):  # x (B, N, D), c (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Decoder (DiT §3.2): adaLN (shift, scale; no gate) on a non-affine LN, then Linear D -> p*p*C_out."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):  # x (B, N, D), c (B, D)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)


# ----- Model helpers -----

def run_block(model, block, *args):
    """block(*args), recomputed in backward (non-reentrant checkpoint) while training with model.grad_checkpoint on."""
    if model.grad_checkpoint and model.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)  # keeps only the block inputs: memory for compute
    return block(*args)


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
        if in_channels < 1 or num_classes < 0:
            raise ValueError(f"need in_channels >= 1 and num_classes >= 0 (0 = unconditional); "
                             f"got {in_channels}, {num_classes}")
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob={class_dropout_prob} must lie in [0, 1]")
        if hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of 4 for the 2D sin-cos pos_embed")
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels, self.grid_size = in_channels * 2 if learn_sigma else in_channels, input_size // patch_size
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes, self.class_dropout_prob, self.learn_sigma = num_classes, class_dropout_prob, learn_sigma
        self.class_cond, self.attention, self.grad_checkpoint = num_classes > 0, attention, grad_checkpoint
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, attention) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_label(self):
        """Index of the null (unconditional) label row used by classifier-free guidance, or None without one."""
        return self.num_classes if self.num_classes > 0 and self.class_dropout_prob > 0 else None

    def initialize_weights(self):
        """The official initialisation; adaLN-Zero and the zero decoder make a fresh model output exactly 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.grid_size).unsqueeze(0))
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.data.view(self.hidden_size, -1))  # as a Linear on C*p*p
        nn.init.zeros_(self.x_embedder.proj.bias)
        normal = [self.y_embedder.embedding_table] if self.y_embedder is not None else []
        for m in normal + [self.t_embedder.mlp[0], self.t_embedder.mlp[2]]:
            nn.init.normal_(m.weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]
        for m in zero + [self.final_layer.linear]:  # adaLN-Zero and the zero decoder (biases are already 0)
            nn.init.zeros_(m.weight)

    def forward(self, x, t, y=None, force_drop_ids=None):
        """x (B, C, H, W), t (B,), y (B,) labels -> (B, C_out, H, W) (DiT Fig. 3); force_drop_ids: LabelEmbedder's."""
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D), N = (H/p)^2 tokens
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:  # unconditional models ignore y
            c = c + self.y_embedder(y, self.training, force_drop_ids)  # (B, D): conditioning c = t_emb + y_emb
        for block in self.blocks:
            x = run_block(self, block, x, c)  # (B, N, D)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)  # (B, C_out, H, W)


# ----- Registry: DiT §3.2 Table 1 configs (depth, hidden, heads) x patch sizes -----

MODELS = {
    "DiT-XL/2": partial(DiT, depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "DiT-XL/4": partial(DiT, depth=28, hidden_size=1152, patch_size=4, num_heads=16),
    "DiT-XL/8": partial(DiT, depth=28, hidden_size=1152, patch_size=8, num_heads=16),
    "DiT-L/2": partial(DiT, depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "DiT-L/4": partial(DiT, depth=24, hidden_size=1024, patch_size=4, num_heads=16),
    "DiT-L/8": partial(DiT, depth=24, hidden_size=1024, patch_size=8, num_heads=16),
    "DiT-B/2": partial(DiT, depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "DiT-B/4": partial(DiT, depth=12, hidden_size=768, patch_size=4, num_heads=12),
    "DiT-B/8": partial(DiT, depth=12, hidden_size=768, patch_size=8, num_heads=12),
    "DiT-S/2": partial(DiT, depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "DiT-S/4": partial(DiT, depth=12, hidden_size=384, patch_size=4, num_heads=6),
    "DiT-S/8": partial(DiT, depth=12, hidden_size=384, patch_size=8, num_heads=6),
    # CPU-trainable size. At CIFAR-10 settings (input_size=32, in_channels=3, num_classes=10, learn_sigma=True,
    # class_dropout_prob=0.1) it has 4,217,496 parameters in total: 4,168,344 trainable + 49,152 frozen pos_embed.
    "DiT-Tiny": partial(DiT, depth=6, hidden_size=192, patch_size=2, num_heads=3),
}

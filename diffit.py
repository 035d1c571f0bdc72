"""
DiffiT: Diffusion Vision Transformers for Image Generation (Hatamizadeh et al., ECCV 2024), in plain PyTorch.

Both models are built from one transformer block with TMSA (time-dependent multi-head self-attention, §3.2
Eqs. 3-8):
- ImageDiffiT: the image-space U-shaped encoder/decoder of DiffiT ResBlocks with window TMSA (§3.2 "Image Space",
  Eqs. 9-10, App. H.1/I.1, Tables S.2/S.3). No public code exists for it; where the paper is silent we take the
  choices marked ★ (they are ours, not the paper's) and expose them as keywords.
- LatentDiffiT: the isotropic latent ViT with global TMSA (§3.2 "Latent Space", App. H.2). It matches the
  state_dict layout of the official NVlabs/DiffiT release (`Diffit`: depth 28, 561,330,144 parameters at input 32),
  so the released weights load with strict=True.
Both follow README "The backbone contract": forward(x, t, y=None, force_drop_ids=None) with t the network time of
the formulation they are trained with (the DDPM index 0..999, EDM's c_noise = ln(sigma)/4, or 999 t of flow
matching); classifier-free guidance is diffusion.classifier_free_guidance.
The small primitives (timestep_embedding, PatchEmbed, unpatchify, Mlp, run_block, ...) are written identically in
dit.py, uvit.py, diffit.py and genvit.py (each file has those it uses), so each file stands alone and a diff
between two backbones shows only what the papers change.
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


# ----- TMSA: time-dependent multi-head self-attention -----

def relative_position_index(window_size):
    """Swin index (W², W²): entry [i, j] is the bias-table row of the offset between tokens i and j of a window,
    (dh + W - 1) * (2W - 1) + (dw + W - 1) with (dh, dw) = pos_i - pos_j."""
    ar = torch.arange(window_size)
    coords = torch.stack(torch.meshgrid(ar, ar, indexing="ij")).flatten(1)  # (2, W²)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, W², W²) in [0, 2W-2]
    return rel[0] * (2 * window_size - 1) + rel[1]


def window_partition(x, window_size):
    """(B, H, W, C) -> (B * H/ws * W/ws, ws*ws, C): non-overlapping windows, batch-major, row-major inside."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


def window_reverse(windows, window_size, H, W):
    """Inverse of window_partition: (B * nW, ws*ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


class TMSA(nn.Module):
    """TMSA, DiffiT §3.2 Eqs. 3-6: q,k,v = x_s W_s + x_t W_t (one fused spatial `qkv` and one fused temporal
    `qkv_temb` Linear, both with bias, added before the head split), Softmax(q k^T / sqrt(head_dim) + B) v with B a
    learned Swin relative position bias ((2W-1)² x heads, not time-dependent), then `proj`.
    Input: windows x (B*nW, W*W, D) of B samples, time token c (B, D_t) taken as is (no SiLU, as the official code)."""

    def __init__(self, dim, num_heads, window_size, temb_dim, attention="sdpa"):
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={attention!r} is not supported; choose one of {ATTENTION_BACKENDS}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim, self.attention = num_heads, dim // num_heads, attention
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        # registration order = official state_dict order: table, index, qkv_temb, qkv, proj
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv_temb = nn.Linear(temb_dim, 3 * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def relative_bias(self):
        """B of Eq. 6 gathered from the table -> (heads, W², W²)."""
        n = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x, c):  # x (Bw, N, D) windows of B samples, c (B, D_t)
        Bw, N, D = x.shape
        B = c.shape[0]
        # Eqs. 3-5: the temporal term is one vector per sample, shared by all its windows, tokens and heads
        qkv = self.qkv(x).view(B, Bw // B, N, 3 * D) + self.qkv_temb(c)[:, None, None, :]
        qkv = qkv.view(Bw, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (Bw, H, N, head_dim)
        bias = self.relative_bias().to(q.dtype)  # (H, N, N)
        if self.attention == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # B enters as an additive float mask
        else:  # reference path, Eq. 6: softmax(q k^T / sqrt(head_dim) + B) v
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias  # (Bw, H, N, N)
            x = attn.softmax(dim=-1) @ v  # (Bw, H, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(Bw, N, D))  # (Bw, N, D)


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


class DiffiTBlock(nn.Module):
    """DiffiT transformer block, Eqs. 7-8 (pre-LN): x = x + TMSA(LN(x), c); x = x + MLP(LN(x)).
    LayerNorm without affine, eps 1e-6 (official code). TMSA runs inside ws×ws windows of the (H, W) token grid,
    or globally when the window covers the grid."""

    def __init__(self, dim, num_heads, window_size, temb_dim, mlp_ratio=4.0, attention="sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(dim, num_heads, window_size, temb_dim, attention)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")

    def forward(self, x, c, grid):  # x (B, N, D) tokens of an (H, W) grid, c (B, D_t)
        B, N, D = x.shape
        H, W = grid
        ws = self.attn.window_size
        h = self.norm1(x)  # (B, N, D)
        if (H, W) != (ws, ws):  # local attention in non-overlapping windows (no shift, §3.2 "Local Attention")
            h = window_reverse(self.attn(window_partition(h.view(B, H, W, D), ws), c), ws, H, W).reshape(B, N, D)
        else:
            h = self.attn(h, c)
        x = x + h
        return x + self.mlp(self.norm2(x))


# ----- Model helpers -----

def run_block(model, block, *args):
    """block(*args), recomputed in backward (non-reentrant checkpoint) while training with model.grad_checkpoint on."""
    if model.grad_checkpoint and model.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)  # keeps only the block inputs: memory for compute
    return block(*args)


def _init_common(model):
    """Official `_initialize_weights`: xavier_uniform Linear weights with zero biases, trunc-normal(0.02) bias
    tables, normal(0.02) time-MLP weights and label table."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, TMSA):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    if model.y_embedder is not None:
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)


# ----- Image-space DiffiT (U-shape) -----

class DiffiTResBlock(nn.Module):
    """DiffiT ResBlock, Eqs. 9-10: x + DiffiTBlock(Conv3x3(SiLU(GN(x))), x_t), with window TMSA over the pixels
    of the feature map. Time enters only through TMSA (no separate time injection into the conv path)."""

    def __init__(self, channels, num_heads, window_size, temb_dim, mlp_ratio, num_groups, dropout, attention):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels)
        self.drop = nn.Dropout(dropout)  # ★ ours: EDM-style dropout on the conv branch, before the conv
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = DiffiTBlock(channels, num_heads, window_size, temb_dim, mlp_ratio, attention)

    def forward(self, x, c):  # x (B, C, H, W), c (B, D_t)
        B, C, H, W = x.shape
        h = self.conv(self.drop(F.silu(self.norm(x))))  # (B, C, H, W)
        h = self.block(h.flatten(2).transpose(1, 2), c, (H, W))  # (B, H*W, C): every pixel is a token
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class ImageDiffiT(nn.Module):
    """Image-space DiffiT, §3.2 "Image Space", Fig. 4, Tables S.2/S.3, App. I.1: Conv3x3 tokenizer; encoder of
    L_l ResBlocks per resolution with stride-2 conv downsampling; decoder (no blocks at the bottleneck) of
    upsample -> merge with the encoder skip of that resolution -> L_l ResBlocks; head GN -> SiLU -> Conv3x3.
    One 512-d time token (sinusoid -> MLP with SiLU) is shared by every TMSA; class labels are added to it.

    Keywords: hidden_size = base channels (level l has hidden_size * channel_mult[l]); num_blocks = ResBlocks per
    level (encoder and decoder); depth, if given, sets every level to `depth` blocks (4 = App. H.1's reading);
    num_heads, if given, fixes the heads at every level, else channels // head_dim; patch_size must be 1 (tokens
    are the pixels of each resolution). Attributes: depth = total ResBlocks, num_heads = heads at level 0.
    The paper trains this model with EDM, and so does train_cifar.py by default: t is then EDM's c_noise =
    ln(sigma)/4 (EDM Table 1); under DDPM the index 0..999, under flow matching 999 t. EDM's augmentation labels
    are not modelled.
    ★ ours (paper silent): head_dim 32, concat + 1x1 conv skip merge, nearest x2 + Conv3x3 upsampling, GroupNorm
    32 groups, dropout on the conv branch (0.13 CIFAR / 0.05 FFHQ, EDM's rates), sinusoid of hidden_size dims,
    LayerNorm without affine (as the latent code), zero-initialised head (output exactly 0 at init)."""

    def __init__(self, input_size=32, patch_size=1, in_channels=3, hidden_size=128, depth=None, num_heads=None,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=0, learn_sigma=False, attention="sdpa",
                 grad_checkpoint=False, channel_mult=(1, 2, 2), num_blocks=(2, 2, 2), window_size=4, temb_dim=512,
                 head_dim=32, num_groups=32, dropout=0.0, frequency_embedding_size=None):
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={attention!r} is not supported; choose one of {ATTENTION_BACKENDS}")
        if in_channels < 1 or num_classes < 0:
            raise ValueError(f"need in_channels >= 1 and num_classes >= 0 (0 = unconditional); "
                             f"got {in_channels}, {num_classes}")
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob={class_dropout_prob} must lie in [0, 1]")
        if patch_size != 1:
            raise ValueError(f"image-space DiffiT tokenizes pixels: patch_size must be 1, got {patch_size}")
        levels = len(channel_mult)
        num_blocks = (depth,) * levels if depth is not None else tuple(num_blocks)
        if len(num_blocks) != levels or min(num_blocks) < 1:
            raise ValueError(f"need one block count >= 1 per level ({levels} levels), got {num_blocks}")
        if input_size % 2 ** (levels - 1):
            raise ValueError(f"input_size={input_size} must be divisible by 2^{levels - 1} for {levels} levels")
        chans = [hidden_size * m for m in channel_mult]
        res = [input_size // 2 ** l for l in range(levels)]
        wins = [min(window_size, r) for r in res]  # a window covering the grid is global attention
        for ch, r, w in zip(chans, res, wins):
            if r % w:
                raise ValueError(f"resolution {r} must be divisible by window_size={w}")
            if num_heads is None and ch % head_dim:
                raise ValueError(f"channels {ch} must be divisible by head_dim={head_dim} (or pass num_heads)")
            if ch % num_groups:
                raise ValueError(f"channels {ch} must be divisible by num_groups={num_groups}")
        heads = [num_heads or ch // head_dim for ch in chans]
        self.input_size, self.patch_size, self.in_channels = input_size, 1, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, 2 * sum(num_blocks) - num_blocks[-1], heads[0]
        self.num_classes, self.class_dropout_prob, self.learn_sigma = num_classes, class_dropout_prob, learn_sigma
        self.class_cond, self.attention, self.grad_checkpoint = num_classes > 0, attention, grad_checkpoint
        self.num_blocks, self.window_sizes = num_blocks, wins

        self.t_embedder = TimestepEmbedder(temb_dim, frequency_embedding_size or hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, temb_dim, class_dropout_prob) if num_classes > 0 else None
        self.tokenizer = nn.Conv2d(in_channels, chans[0], 3, padding=1)

        def stage(l):
            return nn.ModuleList([DiffiTResBlock(chans[l], heads[l], wins[l], temb_dim, mlp_ratio, num_groups,
                                                 dropout, attention) for _ in range(num_blocks[l])])
        self.encoder = nn.ModuleList([stage(l) for l in range(levels)])
        self.downsample = nn.ModuleList([nn.Conv2d(chans[l], chans[l + 1], 3, stride=2, padding=1)
                                         for l in range(levels - 1)])
        dec = list(reversed(range(levels - 1)))  # decoder levels, bottleneck side first
        self.upsample = nn.ModuleList([nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                     nn.Conv2d(chans[l + 1], chans[l], 3, padding=1)) for l in dec])
        self.skip_merge = nn.ModuleList([nn.Conv2d(2 * chans[l], chans[l], 1) for l in dec])
        self.decoder = nn.ModuleList([stage(l) for l in dec])
        self.head = nn.Sequential(nn.GroupNorm(num_groups, chans[0]), nn.SiLU(),
                                  nn.Conv2d(chans[0], self.out_channels, 3, padding=1))
        self.initialize_weights()

    @property
    def null_label(self):
        """Index of the null (unconditional) label row used by classifier-free guidance, or None without one."""
        return self.num_classes if self.num_classes > 0 and self.class_dropout_prob > 0 else None

    def initialize_weights(self):
        _init_common(self)  # ★ ours: the latent code's init for Linear/time/label/bias tables; convs keep defaults
        nn.init.zeros_(self.head[-1].weight)  # ★ ours: zero head (EDM uses a 1e-5 scale, DiT zero)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x, t, y=None, force_drop_ids=None):
        """x (B, C, H, W), t (B,) network time (float or integer), y (B,) labels or None -> (B, C_out, H, W);
        force_drop_ids (B,) 0/1 drops exactly those labels instead of at random (DiT's LabelEmbedder argument)."""
        c = self.t_embedder(t)  # (B, temb_dim) time token shared by every TMSA
        if self.y_embedder is not None:  # unconditional models ignore y
            c = c + self.y_embedder(y, self.training, force_drop_ids)  # (B, temb_dim): c = t_emb + y_emb
        h = self.tokenizer(x)  # (B, C0, H, W)
        skips = []
        for l, blocks in enumerate(self.encoder):
            for blk in blocks:
                h = run_block(self, blk, h, c)
            if l < len(self.downsample):
                skips.append(h)  # skip = output of the last encoder ResBlock at this resolution
                h = self.downsample[l](h)
        for up, merge, blocks in zip(self.upsample, self.skip_merge, self.decoder):
            h = merge(torch.cat([up(h), skips.pop()], dim=1))  # ★ ours: concat then 1x1 conv back to C
            for blk in blocks:
                h = run_block(self, blk, h, c)
        return self.head(h)  # (B, C_out, H, W)


# ----- Latent DiffiT (isotropic ViT) -----

class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> SiLU -> Linear to p*p*C_out, no adaLN (official FinalLayer; "a simple linear
    layer", §3.2)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x):  # (B, N, D)
        return self.linear(F.silu(self.norm_final(x)))  # (B, N, p*p*C_out)


class LatentDiffiT(nn.Module):
    """Latent DiffiT, §3.2 "Latent Space", App. H.2, Fig. 3: patch embed + fixed 2D sin-cos pos_embed, `depth`
    DiffiT blocks with global TMSA (window = token grid, no long skips), final layer, unpatchify.
    Conditioning c = t_emb + y_emb is the time token of every TMSA. Defaults are the released model (depth 28,
    not the paper's 30); learn_sigma gives 2C outputs (eps, then ADM variance interpolation)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, attention="sdpa",
                 grad_checkpoint=False):
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
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes, self.class_dropout_prob, self.learn_sigma = num_classes, class_dropout_prob, learn_sigma
        self.class_cond, self.attention, self.grad_checkpoint = num_classes > 0, attention, grad_checkpoint
        self.grid_size = input_size // patch_size  # TMSA window = whole grid -> global attention (official comment)

        # registration order = official state_dict order
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size), requires_grad=False)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, 256)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.blocks = nn.ModuleList([DiffiTBlock(hidden_size, num_heads, self.grid_size, hidden_size, mlp_ratio,
                                                 attention) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_label(self):
        """Index of the null (unconditional) label row used by classifier-free guidance, or None without one."""
        return self.num_classes if self.num_classes > 0 and self.class_dropout_prob > 0 else None

    def initialize_weights(self):
        """Official `_initialize_weights` (NVlabs/DiffiT diffit/diffit.py); the zero head is as DiT's."""
        _init_common(self)
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.grid_size).unsqueeze(0))
            w = self.x_embedder.proj.weight  # treat the conv as a Linear over (C*p*p) inputs
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)  # zero head: a fresh model outputs exactly 0
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x, t, y=None, force_drop_ids=None):
        """x (B, C, H, W) latents, t (B,) network time, y (B,) labels or None -> (B, C_out, H, W);
        force_drop_ids (B,) 0/1 drops exactly those labels instead of at random (DiT's LabelEmbedder argument)."""
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D), N = (H/p)^2 tokens
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:  # unconditional models ignore y
            c = c + self.y_embedder(y, self.training, force_drop_ids)  # (B, D): t_emb + y_emb, every TMSA's time token
        for block in self.blocks:
            x = run_block(self, block, x, c, (self.grid_size, self.grid_size))  # (B, N, D)
        x = self.final_layer(x)  # (B, N, p*p*C_out)
        return unpatchify(x, self.patch_size, self.out_channels)  # (B, C_out, H, W)


# ----- Model registry -----

MODELS = {
    # App. I.1: 32/16/8 px, 128/256/256 channels, 2 blocks per level, window 4, time token 512; ★ dropout 0.13 (EDM)
    "DiffiT-CIFAR": partial(ImageDiffiT, input_size=32, hidden_size=128, channel_mult=(1, 2, 2), num_blocks=(2, 2, 2),
                            window_size=4, temb_dim=512, dropout=0.13),
    # App. I.1 / Table S.2: 64/32/16/8 px, 128/256/256/256 channels, blocks 1/2/2/2, window 8; ★ dropout 0.05 (EDM)
    "DiffiT-FFHQ64": partial(ImageDiffiT, input_size=64, hidden_size=128, channel_mult=(1, 2, 2, 2),
                             num_blocks=(1, 2, 2, 2), window_size=8, temb_dim=512, dropout=0.05),
    # official `Diffit`: ImageNet-256 at input_size=32, ImageNet-512 at input_size=64
    "DiffiT-XL/2": partial(LatentDiffiT, depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    # ours: CPU-trainable U-shape at 32x32 (32/64/64 channels, 1 block per level)
    "DiffiT-Tiny": partial(ImageDiffiT, input_size=32, hidden_size=32, channel_mult=(1, 2, 2), num_blocks=(1, 1, 1),
                           window_size=4, temb_dim=128, head_dim=16, num_groups=8, dropout=0.0),
}


if __name__ == "__main__":
    for name, ctor in MODELS.items():
        with torch.device("meta"):  # count without allocating
            model = ctor()
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{name:14s} {total:>12,d} parameters ({trainable:,d} trainable)")

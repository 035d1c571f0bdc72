"""U-ViT backbone: "All are Worth Words: A ViT Backbone for Diffusion Models" (Bao et al., CVPR 2023, arXiv 2209.12152).

U-ViT treats everything as a token (§3.1). The diffusion time, the class label and the noisy image patches form one
sequence for a plain pre-norm ViT. Long skip connections join shallow and deep blocks (§3.1, Fig. 1). Parameter
names and shapes follow the official baofff/U-ViT libs/uvit.py, so the released .pth state_dicts load with
strict=True. The official ImageNet tables have 1001 rows; load them with num_classes=1000 and class_dropout_prob > 0.
TextUViT is the text-to-image U-ViT (§4.4, MS-COCO; official libs/uvit_t2i.py): the same blocks, skips and head,
conditioned on 77 CLIP text tokens (clip.py) instead of a label.
The forward follows README "The backbone contract"; classifier-free guidance is diffusion.classifier_free_guidance.
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


class Block(nn.Module):
    """Pre-norm ViT block. Out-blocks first merge the long skip: x = Linear(concat(x, skip)) (U-ViT §3.1)."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, attention, skip=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # affine, eps 1e-5
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attention=attention)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none")
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None  # defined last: official key order

    def forward(self, x, skip=None):  # x, skip (B, L, D)
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, L, 2D) -> (B, L, D), x first
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ----- Model helpers -----

def run_block(model, block, *args):
    """block(*args), recomputed in backward (non-reentrant checkpoint) while training with model.grad_checkpoint on."""
    if model.grad_checkpoint and model.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)  # keeps only the block inputs: memory for compute
    return block(*args)


# ----- The model -----

class UViT(nn.Module):
    """U-ViT (Bao et al. §3): tokens [label, time, patches] -> in-blocks -> mid-block -> out-blocks with long skips."""

    def __init__(self, input_size=32, patch_size=2, in_channels=3, hidden_size=512, depth=12, num_heads=8,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=0, learn_sigma=False, qkv_bias=False,
                 mlp_time_embed=False, conv=True, skip=True, attention="sdpa", grad_checkpoint=False, **condition):
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
        if depth < 2 or depth % 2:
            raise ValueError(f"depth={depth} must be even and >= 2 (depth // 2 in-blocks + mid-block + "
                             f"depth // 2 out-blocks)")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes, self.class_dropout_prob, self.learn_sigma = num_classes, class_dropout_prob, learn_sigma
        self.class_cond, self.attention, self.grad_checkpoint = num_classes > 0, attention, grad_checkpoint
        num_patches = (input_size // patch_size) ** 2
        block = partial(Block, hidden_size, num_heads, mlp_ratio, qkv_bias, attention)

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        # The time token is the raw sinusoid unless mlp_time_embed (off in every official config).
        self.time_embed = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(),
                                        nn.Linear(4 * hidden_size, hidden_size)) if mlp_time_embed else nn.Identity()
        self.extras = self.init_condition(**condition)  # the conditioning layer; built here for the official key order
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, hidden_size))  # learned
        self.in_blocks = nn.ModuleList([block() for _ in range(depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(skip=skip) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(hidden_size)
        self.decoder_pred = nn.Linear(hidden_size, patch_size ** 2 * self.out_channels)
        # Optional 3x3 conv smoothing across patch borders (U-ViT §3.1); the Huge configs have none. Default init
        # (as official): the net must first learn to undo a random filter, which slows short runs (README).
        self.final_layer = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1) if conv else nn.Identity()
        self.initialize_weights()

    def init_condition(self):
        """The label table (None when unconditional) -> the number of tokens before the patches: label + time, or
        time only. With CFG dropout the table gets one extra "null" row at index num_classes (official: 1001 rows)."""
        rows = self.num_classes + int(self.class_dropout_prob > 0)
        self.label_emb = nn.Embedding(rows, self.hidden_size) if self.num_classes else None
        return 2 if self.num_classes > 0 else 1

    @property
    def null_label(self):
        """Index of the null (unconditional) label row used by classifier-free guidance, or None without one."""
        return self.num_classes if self.num_classes > 0 and self.class_dropout_prob > 0 else None

    def initialize_weights(self):
        """Official init: trunc-normal(0.02) pos_embed and Linear weights, zero Linear biases, LayerNorm (1, 0).
        Convs and label_emb keep PyTorch defaults (Embedding ~ N(0, 1)); there is no zero-init anywhere."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def token_drop(self, labels, force_drop_ids=None):
        """CFG label dropout, as LabelEmbedder.token_drop in dit.py: each label becomes the null index num_classes
        with probability class_dropout_prob, or where force_drop_ids == 1. Our addition; the official code drops
        labels in its CFGDataset."""
        return torch.where(self.drop_mask(labels, force_drop_ids), torch.full_like(labels, self.num_classes), labels)

    def drop_mask(self, y, force_drop_ids=None):
        """(B,) bool: the samples whose condition is dropped, at random with probability class_dropout_prob, or
        exactly where force_drop_ids == 1."""
        if force_drop_ids is None:
            return torch.rand(y.shape[0], device=y.device) < self.class_dropout_prob
        return force_drop_ids.to(y.device) == 1

    def condition_tokens(self, time, y, force_drop_ids):
        """The tokens before the patches: [label, time] (label first, as official), or [time] when unconditional
        (y is ignored). Labels are dropped only while training (or when forced)."""
        if self.label_emb is None:
            return [time]
        if (self.training and self.class_dropout_prob > 0) or force_drop_ids is not None:
            y = self.token_drop(y, force_drop_ids)
        return [self.label_emb(y)[:, None], time]

    def forward(self, x, t, y=None, force_drop_ids=None):
        """x (B, C, H, W), t (B,) network time, y (B,) labels or None -> (B, C_out, H, W);
        force_drop_ids (B,) 0/1 drops exactly those labels instead of at random (DiT's LabelEmbedder argument).

        The official CIFAR-10 model was trained in continuous VP-SDE time and fed t*999 as a float. Under DDPM our
        diffusion module feeds the integer index, on the same 0..999 scale, so the embedding sees the same range
        (the official discrete-time H models take an integer n as well); flow matching feeds 999 t, EDM ln(sigma)/4."""
        x = self.patch_embed(x)  # (B, N, D)
        time_token = self.time_embed(timestep_embedding(t, self.hidden_size).to(x.dtype))  # (B, D)
        tokens = self.condition_tokens(time_token[:, None], y, force_drop_ids) + [x]
        x = torch.cat(tokens, dim=1) + self.pos_embed  # (B, L, D), L = extras + N
        skips = []
        for blk in self.in_blocks:
            x = run_block(self, blk, x)
            skips.append(x)
        x = run_block(self, self.mid_block, x)
        for blk in self.out_blocks:
            x = run_block(self, blk, x, skips.pop())  # LIFO: the deepest in-block feeds the first out-block
        x = self.decoder_pred(self.norm(x))[:, self.extras:]  # drop extra tokens: (B, N, p*p*C_out)
        return self.final_layer(unpatchify(x, self.patch_size, self.out_channels))  # (B, C_out, H, W)


class TextUViT(UViT):
    """Text-to-image U-ViT (U-ViT §4.4, MS-COCO; official libs/uvit_t2i.py): tokens [time, 77 context tokens,
    patches]. The context is CLIP's last_hidden_state (B, num_clip_token, clip_dim) at every position, padding
    included (clip.py), each vector mapped by context_embed, a Linear(clip_dim -> D); pos_embed covers all
    1 + num_clip_token + N tokens. Every block, skip and the head are UViT's.

    forward(x, t, y=None, force_drop_ids=None): y is that context. null_context, the CLIP encoding of the empty
    prompt (the official unconditional input, its empty_context.npy), is a buffer outside the state_dict, zeros
    until the caller sets it: y=None means the empty prompt, and dropped samples (probability class_dropout_prob
    while training, the official p_uncond 0.1, or force_drop_ids == 1) get it instead of their caption."""

    def init_condition(self, clip_dim=768, num_clip_token=77):
        if self.num_classes:
            raise ValueError(f"a text-conditioned U-ViT takes no labels: num_classes must be 0, got {self.num_classes}")
        if clip_dim < 1 or num_clip_token < 1:
            raise ValueError(f"need clip_dim >= 1 and num_clip_token >= 1, got {clip_dim}, {num_clip_token}")
        self.clip_dim, self.num_clip_token, self.text_cond = clip_dim, num_clip_token, True
        self.label_emb = None
        self.context_embed = nn.Linear(clip_dim, self.hidden_size)
        self.register_buffer("null_context", torch.zeros(num_clip_token, clip_dim), persistent=False)
        return 1 + num_clip_token  # time + context tokens

    def condition_tokens(self, time, y, force_drop_ids):
        """[time, context_embed(y)] (time first, as official); dropped samples and y=None get null_context."""
        null = self.null_context.to(time.dtype).expand(time.shape[0], -1, -1)
        context = null if y is None else y.to(time.dtype)
        if y is not None and ((self.training and self.class_dropout_prob > 0) or force_drop_ids is not None):
            context = torch.where(self.drop_mask(context, force_drop_ids)[:, None, None], null, context)
        return [time, self.context_embed(context)]  # (B, 1, D), (B, num_clip_token, D)


# ----- Configs (U-ViT Table 2 widths/depths/heads; data settings from the official configs) -----
# depth has the official meaning: depth 12 -> 6 in + 1 mid + 6 out = 13 blocks.
# U-ViT-L/4 defaults to ImageNet-64 pixels; for the ImageNet-512 latent model pass
# in_channels=4, class_dropout_prob=0.15 (its official label table has 1001 rows).

MODELS = {
    "U-ViT-S/2": partial(UViT, input_size=32, patch_size=2, in_channels=3, hidden_size=512, depth=12, num_heads=8,
                         num_classes=0, class_dropout_prob=0.0),  # CIFAR-10
    "U-ViT-S/2-Deep": partial(UViT, input_size=32, patch_size=2, in_channels=3, hidden_size=512, depth=16,
                              num_heads=8, num_classes=0, class_dropout_prob=0.0),  # CIFAR-10
    "U-ViT-S/4": partial(UViT, input_size=64, patch_size=4, in_channels=3, hidden_size=512, depth=12, num_heads=8,
                         num_classes=0, class_dropout_prob=0.0),  # CelebA 64
    "U-ViT-M/4": partial(UViT, input_size=64, patch_size=4, in_channels=3, hidden_size=768, depth=16, num_heads=12,
                         num_classes=1000, class_dropout_prob=0.0),  # ImageNet 64, no CFG (1000 rows)
    "U-ViT-L/4": partial(UViT, input_size=64, patch_size=4, in_channels=3, hidden_size=1024, depth=20,
                         num_heads=16, num_classes=1000, class_dropout_prob=0.0),  # ImageNet 64, no CFG
    "U-ViT-L/2": partial(UViT, input_size=32, patch_size=2, in_channels=4, hidden_size=1024, depth=20,
                         num_heads=16, num_classes=1000, class_dropout_prob=0.15),  # ImageNet 256 latent, p_uncond 0.15
    "U-ViT-H/2": partial(UViT, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                         num_heads=16, num_classes=1000, class_dropout_prob=0.1, conv=False),  # ImageNet 256 latent
    "U-ViT-H/4": partial(UViT, input_size=64, patch_size=4, in_channels=4, hidden_size=1152, depth=28,
                         num_heads=16, num_classes=1000, class_dropout_prob=0.1, conv=False),  # ImageNet 512 latent
    "U-ViT-Tiny": partial(UViT, input_size=32, patch_size=2, in_channels=3, hidden_size=128, depth=6, num_heads=4,
                          num_classes=0, class_dropout_prob=0.0),  # CPU-sized, CIFAR-10 geometry
    # MS-COCO 256 text-to-image (configs/mscoco_uvit_small.py; Deep: --config.nnet.depth=16): 4x32x32 SD latents,
    # CLIP ViT-L/14 context (77 x 768), context dropout 0.1 (the official p_uncond)
    "U-ViT-S/2-T2I": partial(TextUViT, input_size=32, patch_size=2, in_channels=4, hidden_size=512, depth=12,
                             num_heads=8, num_classes=0, class_dropout_prob=0.1, clip_dim=768, num_clip_token=77),
    "U-ViT-S/2-Deep-T2I": partial(TextUViT, input_size=32, patch_size=2, in_channels=4, hidden_size=512, depth=16,
                                  num_heads=8, num_classes=0, class_dropout_prob=0.1, clip_dim=768,
                                  num_clip_token=77),
    # CPU-sized text-to-image (README, "Text-to-image"): a small CLIP text tower's context (clip.write_small_clip)
    "U-ViT-Tiny-T2I": partial(TextUViT, input_size=32, patch_size=2, in_channels=3, hidden_size=128, depth=6,
                              num_heads=4, num_classes=0, class_dropout_prob=0.1, clip_dim=64, num_clip_token=16),
}

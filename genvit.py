"""
GenViT / HybViT: "Your ViT is Secretly a Hybrid Discriminative-Generative Diffusion Model", Yang et al. 2022
(arXiv 2208.07791; official code sndnyang/Diffusion_ViT @ 84a4cfe, models/DifViT.py and models/vit.py).

GenViT is the plain-ViT diffusion baseline (CIFAR-10 FID 20.20, U-ViT Table 1): a pre-norm ViT over patch tokens
plus one class token, no long skips, no output conv and no class conditioning of the denoiser. HybViT is the same
network trained as a classifier too: its class token, through LayerNorm and a Linear head, gives the logits.
What implements which part of the paper (§3, Fig. 2):
  PatchEmbed + pos_embed + cls_token   ViT tokens: p x p patches -> D, one class token, learned positions (randn)
  TimeEmbedder                         sinusoid of t -> Linear -> GELU -> Linear, to (N + 1) * 4 features
  GenViTBlock                          the time enters as a per-token scalar scale and shift of the residual
                                       stream before the pre-norm attention (x (1 + s) + b), then attention, MLP
  recon_head + unpatchify              Linear on the patch tokens -> p*p*C noise prediction -> (C, H, W)
  classify                             HybViT: class token -> LayerNorm -> Linear on the clean image, no time
  convert_official                     the official state_dict (bare, or "denoise_fn."-prefixed) -> ours
  MODELS                               the official README's configs (CIFAR-10, STL-10, CelebA, ImageNet 128/224)
The forward follows README "The backbone contract" (class_cond False: the denoiser ignores y).
The small primitives (PatchEmbed, unpatchify, Attention, Mlp, run_block) are written identically in dit.py,
uvit.py, diffit.py and genvit.py, so each file stands alone and a diff between two backbones shows only what the
papers change.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ATTENTION_BACKENDS = ("sdpa", "math")


# ----- Embedding layers -----

def genvit_time_embedding(t, dim, max_period=10000):
    """(B,) timesteps -> (B, dim) float32 [sin(t f_k), cos(t f_k)], sin first, f_k = max_period^(-k/(half - 1)),
    k < half = dim // 2: the official SinusoidalPosEmb (lucidrains' DDPM form), which differs from DiT's
    cos-first, /half embedding; odd dim: a zero channel."""
    half = dim // 2
    step = math.log(max_period) / max(half - 1, 1)  # the official order of operations, bit for bit
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -step)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # (B, dim)


class TimeEmbedder(nn.Module):
    """t -> (B, time_dim): sinusoid of width hidden_size, Linear -> GELU -> Linear (the official time_mlp);
    time_dim = 4 (N + 1), N patch tokens, so that each block's Linear can emit one scale and shift per token."""

    def __init__(self, hidden_size, time_dim):
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp = nn.Sequential(nn.Linear(hidden_size, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))

    def forward(self, t):  # (B,)
        return self.mlp(genvit_time_embedding(t, self.hidden_size).to(self.mlp[0].weight.dtype))  # (B, time_dim)


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


def time_modulate(x, scale, shift):
    """x * (1 + scale) + shift with one scalar per token: scale, shift (B, N) over x (B, N, D)."""
    return x * (1 + scale.unsqueeze(-1)) + shift.unsqueeze(-1)


class GenViTBlock(nn.Module):
    """Pre-norm ViT block whose input is first modulated by the time (official Transformer.forward):
    x <- x (1 + s) + b;  x <- x + Attn(LN(x));  [x <- x (1 + s) + b if ffn_time];  x <- x + MLP(LN(x)).
    (s, b) (B, N) come from SiLU -> Linear on the time features; no time (mod=None) is the plain ViT (HybViT's
    classifier). LayerNorms are affine with eps 1e-5 (nn.LayerNorm defaults, as the official)."""

    def __init__(self, hidden_size, num_heads, head_dim, mlp_ratio, time_dim, num_tokens, ffn_time, attention):
        super().__init__()
        self.ffn_time = ffn_time
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * num_tokens))
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=False, attention=attention, head_dim=head_dim)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="none")

    def forward(self, x, temb=None):  # x (B, N, D), temb (B, time_dim) or None
        if temb is not None:
            scale, shift = self.time_modulation(temb).chunk(2, dim=1)  # each (B, N): scale first, as official
            x = time_modulate(x, scale, shift)
        x = x + self.attn(self.norm1(x))
        if temb is not None and self.ffn_time:
            x = time_modulate(x, scale, shift)  # the same (s, b) again before the MLP
        return x + self.mlp(self.norm2(x))


# ----- Model helpers -----

def run_block(model, block, *args):
    """block(*args), recomputed in backward (non-reentrant checkpoint) while training with model.grad_checkpoint on."""
    if model.grad_checkpoint and model.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)  # keeps only the block inputs: memory for compute
    return block(*args)


# ----- The model -----

class GenViT(nn.Module):
    """GenViT denoiser (eps prediction) with HybViT's classifier head; the denoiser ignores class labels.

    num_classes is the size of the classifier head (0: no head). ffn_time applies the time modulation again before
    each MLP. In sndnyang/Diffusion_ViT, models/vit.py hard-codes it off at 5b7556f, tests `self.ffn_time is True`
    from 1bbecf0 to 2bc7e0d (on only for a bool), and its truth value from 93b3b44; gevit_main.py and eval_model.py
    (from abed204) parse --ffnt as an int, default 1. So at 84a4cfe, the commit cited here, --ffnt 1 turns it on.
    The default (also for official files) is False nonetheless: the released CIFAR-10 logs come from older code
    (logs/CIFAR10_genvit_sampling_FID.log, 2022-07-24, lacks the "Use time embedding before FFN?" line models/vit.py
    logs from 93b3b44 on, so it ran an `is True` or hard-coded test: off for the int --ffnt 1 that eval_model.py
    parses; the HybViT training log, 2022-06-23, predates 5b7556f), and our checkpoints, whose model_kwargs record
    ffn_time only when --model-arg set it, were trained with False. ffn_time=True is 84a4cfe's computation.
    learn_sigma doubles the output channels (DDPM's learned variance); the official model has none.
    class_dropout_prob is accepted for the shared training interface and must be 0 (no label conditioning)."""

    def __init__(self, input_size=32, patch_size=4, in_channels=3, hidden_size=384, depth=9, num_heads=12,
                 head_dim=None, mlp_ratio=2.0, num_classes=10, ffn_time=False, learn_sigma=False,
                 class_dropout_prob=0.0, attention="sdpa", grad_checkpoint=False):
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={attention!r} is not supported; choose one of {ATTENTION_BACKENDS}")
        if patch_size < 1 or input_size % patch_size:
            raise ValueError(f"input_size={input_size} must be a multiple of patch_size={patch_size}")
        if num_heads < 1 or (head_dim is None and hidden_size % num_heads):
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads} (or pass head_dim)")
        if in_channels < 1 or num_classes < 0 or depth < 1:
            raise ValueError(f"need in_channels >= 1, num_classes >= 0 (0 = no classifier head) and depth >= 1; "
                             f"got {in_channels}, {num_classes}, {depth}")
        if class_dropout_prob:
            raise ValueError("GenViT's denoiser is unconditional (Yang et al. 2022): class_dropout_prob must be 0; "
                             "its labels train only the HybViT classifier head")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.num_classes, self.ffn_time, self.learn_sigma = num_classes, ffn_time, learn_sigma
        self.class_dropout_prob, self.attention, self.grad_checkpoint = 0.0, attention, grad_checkpoint
        self.class_cond = False  # num_classes is the classifier head's size; the denoiser takes no labels
        num_tokens = (input_size // patch_size) ** 2 + 1  # patches + the class token
        time_dim = 4 * num_tokens  # official: (num_patches + 1) * 4

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimeEmbedder(hidden_size, time_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))  # learned, class token first
        self.blocks = nn.ModuleList([GenViTBlock(hidden_size, num_heads, self.head_dim, mlp_ratio, time_dim,
                                                 num_tokens, ffn_time, attention) for _ in range(depth)])
        self.recon_head = nn.Linear(hidden_size, patch_size ** 2 * self.out_channels)  # no final norm (official)
        self.cls_norm = nn.LayerNorm(hidden_size) if num_classes else None
        self.cls_head = nn.Linear(hidden_size, num_classes) if num_classes else None
        self.initialize_weights()

    @property
    def null_label(self):
        """No label conditioning, so no null label: classifier-free guidance does not apply to GenViT."""
        return None

    def initialize_weights(self):
        """Official init (models/vit.py init_weights): xavier-normal Linear weights (the patch conv as the Linear
        over C*p*p inputs it replaces), zero biases, LayerNorm (1, 0); cls_token and pos_embed ~ N(0, 1). There is
        no zero-init: a fresh model's prediction is not 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        with torch.no_grad():
            nn.init.xavier_normal_(w.view(w.shape[0], -1))  # fans (C*p*p, D), as the official Linear(C*p*p, D)
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.cls_token)
        nn.init.normal_(self.pos_embed)

    def tokens(self, x):
        """(B, C, H, W) -> (B, 1 + N, D): [class token; patch tokens] + pos_embed."""
        x = self.x_embedder(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, D)

    def forward(self, x, t, y=None, force_drop_ids=None):
        """x (B, C, H, W), t (B,) timesteps (long or float) -> eps (B, C_out, H, W); y and force_drop_ids are ignored
        (unconditional)."""
        x = self.tokens(x)  # (B, 1 + N, D)
        temb = self.t_embedder(t)  # (B, 4 (1 + N))
        for block in self.blocks:
            x = run_block(self, block, x, temb)  # (B, 1 + N, D)
        x = self.recon_head(x[:, 1:])  # (B, N, p*p*C_out): patch tokens only
        return unpatchify(x, self.patch_size, self.out_channels)  # (B, C_out, H, W)

    def classify(self, x):
        """HybViT logits (B, num_classes) of clean images x in [-1, 1]: the blocks without time modulation, then
        the class token -> LayerNorm -> Linear (the official forward(img, t=None) -> mlp_head(x[:, 0]))."""
        if self.cls_head is None:
            raise ValueError("this GenViT has no classifier head: build it with num_classes > 0")
        x = self.tokens(x)
        for block in self.blocks:
            x = run_block(self, block, x)
        return self.cls_head(self.cls_norm(x[:, 0]))  # (B, num_classes)


# ----- Official checkpoints -----

# Official DifViT names -> ours; {i} is the block index. The patch Linear becomes the patch conv (same numbers).
OFFICIAL_NAMES = {
    "pos_embedding": "pos_embed", "cls_token": "cls_token",
    "time_mlp.1.weight": "t_embedder.mlp.0.weight", "time_mlp.1.bias": "t_embedder.mlp.0.bias",
    "time_mlp.3.weight": "t_embedder.mlp.2.weight", "time_mlp.3.bias": "t_embedder.mlp.2.bias",
    "to_patch_embedding.1.weight": "x_embedder.proj.weight", "to_patch_embedding.1.bias": "x_embedder.proj.bias",
    "recon_head.0.weight": "recon_head.weight", "recon_head.0.bias": "recon_head.bias",
    "mlp_head.0.weight": "cls_norm.weight", "mlp_head.0.bias": "cls_norm.bias",
    "mlp_head.1.weight": "cls_head.weight", "mlp_head.1.bias": "cls_head.bias",
    "transformer.time_layers.{i}.1.weight": "blocks.{i}.time_modulation.1.weight",
    "transformer.time_layers.{i}.1.bias": "blocks.{i}.time_modulation.1.bias",
    "transformer.layers.{i}.0.norm.weight": "blocks.{i}.norm1.weight",
    "transformer.layers.{i}.0.norm.bias": "blocks.{i}.norm1.bias",
    "transformer.layers.{i}.0.fn.to_qkv.weight": "blocks.{i}.attn.qkv.weight",
    "transformer.layers.{i}.0.fn.to_out.0.weight": "blocks.{i}.attn.proj.weight",
    "transformer.layers.{i}.0.fn.to_out.0.bias": "blocks.{i}.attn.proj.bias",
    "transformer.layers.{i}.1.norm.weight": "blocks.{i}.norm2.weight",
    "transformer.layers.{i}.1.norm.bias": "blocks.{i}.norm2.bias",
    "transformer.layers.{i}.1.fn.net.0.weight": "blocks.{i}.mlp.fc1.weight",
    "transformer.layers.{i}.1.fn.net.0.bias": "blocks.{i}.mlp.fc1.bias",
    "transformer.layers.{i}.1.fn.net.3.weight": "blocks.{i}.mlp.fc2.weight",
    "transformer.layers.{i}.1.fn.net.3.bias": "blocks.{i}.mlp.fc2.bias",
}
# The official GaussianDiffusion's (1000,) schedule buffers, stored beside "denoise_fn." keys; ours recomputes them.
DIFFUSION_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2")


def _official_pattern(key):
    """'transformer.layers.3.0.norm.weight' -> ('transformer.layers.{i}.0.norm.weight', '3'); others -> (key, None)."""
    for prefix in ("transformer.layers.", "transformer.time_layers."):
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            if index.isdigit():
                return f"{prefix}{{i}}.{rest}", index
    return key, None


def convert_official(state_dict, in_channels=3):
    """The official DifViT state_dict -> ours, for load_state_dict(strict=True). Accepts the bare ViT or the
    training checkpoints' GaussianDiffusion layout (every key "denoise_fn."-prefixed, plus the 12 schedule
    buffers, dropped here); a {'model_state_dict': ...} wrapper (gevit_main.py) is unwrapped. The patch Linear
    (D, p*p*C) with inputs ordered (p_row, p_col, channel) becomes the conv weight (D, C, p, p); C = in_channels
    (3 in every official model). Unknown keys raise a ValueError naming them."""
    if "model_state_dict" in state_dict:
        state_dict = state_dict["model_state_dict"]
    prefixed = any(k.startswith("denoise_fn.") for k in state_dict)
    out, unknown = {}, []
    for key, value in state_dict.items():
        if prefixed:
            if key in DIFFUSION_BUFFERS:
                continue
            if not key.startswith("denoise_fn."):
                unknown.append(key)
                continue
            key = key[len("denoise_fn."):]
        pattern, index = _official_pattern(key)
        if pattern not in OFFICIAL_NAMES:
            unknown.append(key)
            continue
        if key == "to_patch_embedding.1.weight":
            D, K = value.shape
            p = math.isqrt(K // in_channels)
            if p * p * in_channels != K:
                raise ValueError(f"to_patch_embedding.1.weight {tuple(value.shape)} is not (D, p*p*{in_channels})")
            value = value.reshape(D, p, p, in_channels).permute(0, 3, 1, 2).contiguous()  # (D, C, p, p)
        out[OFFICIAL_NAMES[pattern].replace("{i}", index or "")] = value
    if unknown:
        raise ValueError(f"not an official GenViT state_dict: unknown keys {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    return out


# ----- Registry: the official ReadMe's configs (models/create_model.py 'difvit': depth 9, MLP ratio 2, 12 heads
# when dim % 12 == 0 else 8, head_dim = dim // heads, patch 4 at 32x32 else 8; ImageNet 224 uses patch 14) -----

MODELS = {
    # CIFAR-10, 11,185,068 parameters (logs/CIFAR10_genvit_sampling_FID.log)
    "GenViT-CIFAR": partial(GenViT, input_size=32, patch_size=4, hidden_size=384, depth=9, num_heads=12, head_dim=32),
    "GenViT-STL10": partial(GenViT, input_size=96, patch_size=8, hidden_size=384, depth=9, num_heads=12),
    "GenViT-CelebA": partial(GenViT, input_size=128, patch_size=8, hidden_size=384, depth=9, num_heads=12),
    "GenViT-ImageNet128": partial(GenViT, input_size=128, patch_size=8, hidden_size=512, depth=9, num_heads=8),
    "GenViT-ImageNet224": partial(GenViT, input_size=224, patch_size=14, hidden_size=1024, depth=9, num_heads=8),
    # CPU-trainable size
    "GenViT-Tiny": partial(GenViT, input_size=32, patch_size=4, hidden_size=96, depth=4, num_heads=4),
}

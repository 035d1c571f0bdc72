"""
The CLIP text encoder that text-to-image U-ViT conditions on (U-ViT §4.4; official libs/clip.py: Hugging Face
openai/clip-vit-large-patch14, its last_hidden_state at all 77 positions), written with torch alone: the text
transformer of Radford et al. 2021 (CLIP, §2.4: a causal GPT-2-style transformer over lower-cased byte-level BPE),
its loader for a Hugging Face CLIP folder, and the BPE tokenizer (openai/CLIP clip/simple_tokenizer.py, as the
transformers CLIPTokenizer that U-ViT calls: padding with <|endoftext|>).
"""
import gzip
import html
import json
import os
import re
import unicodedata

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import RunError
from files import atomic_write
from safetensors_io import load_safetensors, save_safetensors

# openai/clip-vit-large-patch14 text_config (the ViT-L/14 text tower: 123,060,480 parameters)
VIT_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, layer_norm_eps=1e-5)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


# ----- The text transformer (CLIP §2.4; parameter names as transformers' CLIPTextModel) -----

class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: separate q/k/v/out projections with bias; token i sees tokens <= i."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.k_proj, self.v_proj, self.q_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        q, k, v = (p(x).reshape(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                     self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1 / sqrt(head_dim)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))


class CLIPMlp(nn.Module):
    """fc1 -> quick GELU x * sigmoid(1.702 x) (the activation CLIP was trained with) -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))


class CLIPLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim, num_heads, hidden, eps):
        super().__init__()
        self.self_attn, self.layer_norm1 = CLIPAttention(dim, num_heads), nn.LayerNorm(dim, eps=eps)
        self.mlp, self.layer_norm2 = CLIPMlp(dim, hidden), nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """Token + learned position embeddings -> causal pre-norm layers -> final LayerNorm: forward(ids (B, L)) is the
    last_hidden_state (B, L, hidden_size) that U-ViT reads, every position included. No pooling, no projection."""

    def __init__(self, vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, layer_norm_eps=1e-5):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_attention_heads="
                             f"{num_attention_heads}")
        self.hidden_size, self.max_position_embeddings = hidden_size, max_position_embeddings
        self.embeddings = nn.ModuleDict(dict(token_embedding=nn.Embedding(vocab_size, hidden_size),
                                             position_embedding=nn.Embedding(max_position_embeddings, hidden_size)))
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList([
            CLIPLayer(hidden_size, num_attention_heads, intermediate_size, layer_norm_eps)
            for _ in range(num_hidden_layers)])))
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, ids):  # (B, L) int64, L <= max_position_embeddings
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.embeddings["token_embedding"](ids) + self.embeddings["position_embedding"](pos)
        for layer in self.encoder["layers"]:
            x = layer(x)
        return self.final_layer_norm(x)  # (B, L, D)


def text_state_dict(sd):
    """The text tower's tensors of a CLIPModel / CLIPTextModel state_dict, named as CLIPTextModel's: text_model.*
    (or bare embeddings.* / encoder.* / final_layer_norm.*) with the prefix dropped; the vision tower, projections,
    logit_scale and an older file's position_ids buffer are left out."""
    out = {}
    for k, v in sd.items():
        name = k[len("text_model."):] if k.startswith("text_model.") else k
        if name.split(".")[0] in ("embeddings", "encoder", "final_layer_norm") and not name.endswith("position_ids"):
            out[name] = v
    return out


def config_from_weights(sd, folder):
    """CLIPTextModel keywords: from the folder's config.json (text_config) when present, checked against the
    weights' shapes; without one, read from the shapes (heads: 64 per head, as every OpenAI CLIP)."""
    vocab, width = sd["embeddings.token_embedding.weight"].shape
    kw = dict(vocab_size=vocab, hidden_size=width, intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
              num_hidden_layers=len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")}),
              num_attention_heads=max(1, width // 64), layer_norm_eps=1e-5,
              max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0])
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg = cfg.get("text_config", cfg)
        if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise RunError(f"{path}: hidden_act {cfg['hidden_act']!r}; clip.py implements OpenAI CLIP's quick_gelu "
                           "text tower: pass an openai/clip-vit-* folder")
        kw.update({k: cfg[k] for k in ("num_attention_heads", "layer_norm_eps") if k in cfg})
    return kw


def load_clip_text(folder, device="cpu", width=None):
    """The CLIP text tower of a Hugging Face CLIP folder (model.safetensors via safetensors_io, or pytorch_model.bin
    read with weights_only), loaded strictly, in eval mode, frozen. width: the hidden size the caller needs (768 for
    U-ViT's clip_dim); another width is a one-line error naming the folder's model."""
    files = [os.path.join(folder, f) for f in ("model.safetensors", "pytorch_model.bin")]
    path = next((f for f in files if os.path.isfile(f)), None)
    if path is None:
        raise RunError(f"{folder}: no model.safetensors or pytorch_model.bin; pass the folder of a Hugging Face "
                       "CLIP model (openai/clip-vit-large-patch14)")
    try:
        sd = load_safetensors(path) if path.endswith(".safetensors") else torch.load(path, "cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise RunError(f"cannot read {path} ({type(e).__name__}: {str(e)[:120]}); download it again") from None
    sd = text_state_dict(sd) if isinstance(sd, dict) else {}
    if "embeddings.token_embedding.weight" not in sd or "encoder.layers.0.mlp.fc1.weight" not in sd:
        raise RunError(f"{path} holds no CLIP text tower (text_model.* weights); pass the "
                       "openai/clip-vit-large-patch14 folder")
    kw = config_from_weights(sd, folder)
    if width is not None and kw["hidden_size"] != width:
        raise RunError(f"{folder} is a CLIP whose text width is {kw['hidden_size']}, but the model needs {width} "
                       "(U-ViT's MS-COCO models: openai/clip-vit-large-patch14); pass that folder")
    model = CLIPTextModel(**kw)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise RunError(f"{path}: the text weights do not fit a CLIP text tower ({str(e).splitlines()[0][:120]}); "
                       "pass an unmodified Hugging Face CLIP folder") from None
    return model.requires_grad_(False).eval().to(device)


# ----- The tokenizer (CLIP's byte-level BPE, as transformers 4.23 CLIPTokenizer + ftfy 6.1, U-ViT's versions) -----

def byte_chars():
    """byte -> printable character: 33-126, 161-172 and 174-255 stand for themselves, the other 68 bytes for
    U+0100 onward in byte order (GPT-2's map; no BPE symbol is whitespace or a control character)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}, keep + rest


# ftfy's default fixes, restated with the standard library (ftfy.fixes: ligatures, width, quotes, controls, ANSI)
LIGATURES = {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
             "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl",
             "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}
FIXES = str.maketrans({**LIGATURES, "\u3000": " ", "\u02bc": "'", **{chr(c): "'" for c in range(0x2018, 0x201C)},
                       **{chr(c): '"' for c in range(0x201C, 0x2020)},
                       **{chr(c): unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)},
                       **{chr(c): None for c in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                                                 *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]}})
ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")  # only entities ending in ';' (html.unescape also takes "&amp")
ANSI = re.compile("\x1b\\[[0-9;]*[A-Za-z]")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def clean(text):
    """ftfy.fix_text's default fixes, then whitespace collapsed, lower-cased (transformers CLIPTokenizer). Per line:
    HTML entities ending in ';' decoded (switched off from the first line holding a '<'), ANSI escapes and
    control characters removed, Latin ligatures split, full/half-width forms mapped, curly quotes uncurled, NFC;
    repeated until nothing changes. Only ftfy's heuristic mojibake repair ("doesnâ€™t" -> "doesn't") and its C1
    control mapping are left out: text holding those tokenizes differently."""
    out, entities = [], True
    for line in text.splitlines(keepends=True) or [""]:
        entities = entities and "<" not in line
        while True:
            before = line
            if entities:
                line = ENTITY.sub(lambda m: html.unescape(m.group()), line)
            line = unicodedata.normalize("NFC", ANSI.sub("", line).translate(FIXES))
            if line == before:
                break
        out.append(line)
    return " ".join("".join(out).split()).lower()


def char_class(c):
    cat = unicodedata.category(c)[0]
    return "L" if cat == "L" else "N" if cat == "N" else " " if c.isspace() else "P"


def pre_tokenize(text):
    """CLIP's pattern <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+
    scanned by hand (the standard library's re has no \\p{..}): at each position the special strings, then the
    contractions, then a run of letters, one number character, or a run of other non-space characters."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        cls = char_class(text[i])
        head = next((s for s in (SOT, EOT, *CONTRACTIONS) if text.startswith(s, i)), None)
        if head:
            j = i + len(head)
        elif cls == " ":
            i += 1
            continue
        else:
            j = i + 1
            while cls != "N" and j < n and char_class(text[j]) == cls:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


class CLIPTokenizer:
    """Text -> (B, 77) ids as U-ViT's CLIP call (transformers CLIPTokenizer, truncation=True, max_length=77,
    padding="max_length"): [<|startoftext|>] + BPE ids, cut to 75, + [<|endoftext|>], padded with <|endoftext|>
    (49407; OpenAI's clip.tokenize pads with 0). vocab: symbol -> id; merges: pairs in rank order."""

    def __init__(self, vocab, merges, context_length=77):
        self.vocab, self.context_length = vocab, context_length
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.byte_char = byte_chars()[0]
        self.sot, self.eot = vocab[SOT], vocab[EOT]
        self.cache = {}

    @classmethod
    def from_folder(cls, path):
        """From a Hugging Face CLIP folder (vocab.json + merges.txt) or CLIP's bpe_simple_vocab_16e6.txt.gz (the file,
        or a folder holding it). The gz holds the merges only; the vocabulary is built from them as CLIP does."""
        gz = path if path.endswith(".gz") else os.path.join(path, "bpe_simple_vocab_16e6.txt.gz")
        if os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
            with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
                lines = f.read().strip().split("\n")
        elif os.path.isfile(gz):
            with gzip.open(gz, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
            vocab = None
        else:
            raise RunError(f"{path}: no vocab.json + merges.txt (nor bpe_simple_vocab_16e6.txt.gz); pass the "
                           "openai/clip-vit-large-patch14 folder")
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # header line, then 48,894 merges
        if vocab is None:  # ids: 256 byte symbols, the same with </w>, one per merge, then the two special tokens
            chars = [byte_chars()[0][b] for b in byte_chars()[1]]
            symbols = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
            vocab = {s: i for i, s in enumerate(symbols)}
        full = len(vocab) == 49408  # OpenAI's; a smaller one (e.g. write_small_clip's) needs the specials too
        if (vocab.get(SOT), vocab.get(EOT)) != ((49406, 49407) if full else (len(vocab) - 2, len(vocab) - 1)):
            raise RunError(f"{path}: a vocabulary of {len(vocab)} symbols without CLIP's special tokens at "
                           f"{len(vocab) - 2}/{len(vocab) - 1}; pass the openai/clip-vit-large-patch14 tokenizer files")
        return cls(vocab, merges)

    def bpe(self, piece):
        """Byte-level BPE of one pre-token (its bytes mapped to characters), </w> on the last symbol: merge the
        lowest-ranked adjacent pair everywhere, left to right, until no pair is ranked."""
        if piece in self.cache:
            return self.cache[piece]
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            word = self.merge(word, pair)
        self.cache[piece] = word
        return word

    @staticmethod
    def merge(word, pair):
        """word (a list of symbols) with every occurrence of pair joined, left to right."""
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        return merged

    def encode(self, text):
        """The BPE ids of text, without start/end tokens. The literal strings <|startoftext|> / <|endoftext|> are
        split out first and become their special ids (transformers' added tokens)."""
        ids = []
        for k, part in enumerate(re.split(f"({re.escape(SOT)}|{re.escape(EOT)})", text)):
            if k % 2:
                ids.append(self.vocab[part])
                continue
            for piece in pre_tokenize(clean(part)):
                if piece in (SOT, EOT):
                    ids.append(self.vocab[piece])
                else:
                    ids += [self.vocab[s] for s in self.bpe("".join(self.byte_char[b] for b in piece.encode()))]
        return ids

    def __call__(self, texts):
        """A prompt or a list of prompts -> (B, context_length) int64 ids."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), self.context_length), self.eot, dtype=np.int64)  # padded with <|endoftext|>
        for row, text in zip(out, texts):
            ids = [self.sot] + self.encode(text)[:self.context_length - 2] + [self.eot]
            row[:len(ids)] = ids
        return torch.from_numpy(out)


class FrozenCLIPEmbedder:
    """Prompts -> U-ViT's context: CLIP's last_hidden_state (B, L, width), float32, no gradients (official
    libs/clip.py FrozenCLIPEmbedder; L = the tower's positions, 77). encode([""]) is the unconditional context (its
    empty_context.npy)."""

    def __init__(self, folder, device="cpu", width=None):
        self.tokenizer, self.model = CLIPTokenizer.from_folder(folder), load_clip_text(folder, device, width)
        self.device, self.folder = device, os.path.abspath(folder)
        self.width, vocab = self.model.final_layer_norm.normalized_shape[0], len(self.model.embeddings[
            "token_embedding"].weight)
        self.tokenizer.context_length = len(self.model.embeddings["position_embedding"].weight)
        if max(self.tokenizer.vocab.values()) >= vocab:
            raise RunError(f"{folder}: the tokenizer's vocabulary ({len(self.tokenizer.vocab)} symbols) does not fit "
                           f"the text tower's {vocab} embeddings; pass a folder whose files belong together")

    @torch.no_grad()
    def encode(self, texts):
        return self.context(self.tokenizer(texts))

    @torch.no_grad()
    def context(self, ids):  # (B, L) token ids -> (B, L, width), in float32 whatever autocast says
        with torch.autocast(torch.device(self.device).type, enabled=False):
            return self.model(ids.to(self.device)).float()


class TextContext:
    """Labels -> CLIP contexts, encoded on the fly: label i is texts[i] (tokenized once) and label len(texts) the
    empty prompt (the null label of guidance). A batch's contexts are kept while the same labels come back, so a
    sampler's steps encode each batch once. wrap(fwd) is fwd with labels y turned into contexts."""

    def __init__(self, encoder, texts):
        self.encoder, self.last = encoder, None
        distinct = {t: i for i, t in enumerate(dict.fromkeys(list(texts) + [""]))}  # each text tokenized once
        rows = torch.tensor([distinct[t] for t in list(texts) + [""]])
        self.ids = encoder.tokenizer(list(distinct))[rows].int().to(encoder.device)  # int32 rows, where y will be

    def __call__(self, y):
        if self.last is None or self.last[0].shape != y.shape or not torch.equal(self.last[0], y):
            self.last = (y.clone(), self.encoder.context(self.ids[y.to(self.ids.device)].long()))
        return self.last[1]

    def wrap(self, fwd):
        return lambda x, t, y=None, **kw: fwd(x, t, y=None if y is None else self(y), **kw)


def prompt_conditioning(fwd, encoder, prompts, model):
    """Prompts as labels for a text-to-image model: -> fwd'(x, t, y) where y (B,) in 0..P-1 picks that prompt's
    context and y == P the empty prompt's (the null label of guidance), encoded batch by batch (TextContext); the
    empty prompt's encoding also becomes model.null_context (y=None, dropped samples)."""
    model.null_context.copy_(encoder.encode([""])[0])
    return TextContext(encoder, prompts).wrap(fwd)


def write_small_clip(folder, texts, width=64, layers=2, heads=2, context_length=16, seed=0):
    """A small CLIP text tower with random weights, frozen, in the Hugging Face folder layout, for CPU demos and
    tests: the byte symbols, BPE merges learned on the words of `texts` (most frequent pair first, until each of
    those words is one token, as CLIP's were learned on its corpus) and the two special tokens. It tells prompts apart
    but knows no language; a real model conditions on openai/clip-vit-large-patch14."""
    chars = [byte_chars()[0][b] for b in byte_chars()[1]]
    symbols, merges = chars + [c + "</w>" for c in chars], []
    words = [list("".join(byte_chars()[0][b] for b in w.encode())) for w in {p for t in texts
                                                                              for p in pre_tokenize(clean(t))}]
    words = [w[:-1] + [w[-1] + "</w>"] for w in words]
    while True:
        pairs = [p for w in words for p in zip(w, w[1:])]
        if not pairs:
            break
        pair = max(sorted(set(pairs)), key=pairs.count)  # the most frequent pair (ties: the first in sorted order)
        merges.append(" ".join(pair))
        symbols.append("".join(pair))
        words = [CLIPTokenizer.merge(w, pair) for w in words]
    symbols += [SOT, EOT]
    config = dict(vocab_size=len(symbols), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=context_length, layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    weights = {f"text_model.{k}": v.contiguous() for k, v in CLIPTextModel(**config).state_dict().items()}
    os.makedirs(folder, exist_ok=True)
    files = {"vocab.json": json.dumps({s: i for i, s in enumerate(symbols)}, ensure_ascii=False),
             "merges.txt": "\n".join(["#version: 0.2"] + merges) + "\n",
             "config.json": json.dumps({**config, "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu"})}
    for name, text in files.items():
        atomic_write(os.path.join(folder, name), lambda f, text=text: f.write(text.encode("utf-8")))
    save_safetensors(weights, os.path.join(folder, "model.safetensors"))
    return folder

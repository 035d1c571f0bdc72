"""Tests for clip.py: the ViT-L/14 text tower's size and layout, parity with transformers' CLIPTextModel, loading a
Hugging Face CLIP folder, and the tokenizer against the ids of the official path (transformers 4.23.1 slow
CLIPTokenizer + ftfy 6.1.1, the versions baofff/U-ViT pins) on the real vocabulary."""
import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from clip import (VIT_L14, CLIPTextModel, CLIPTokenizer, FrozenCLIPEmbedder, clean, load_clip_text, pre_tokenize,
                  prompt_conditioning, text_state_dict)
from errors import RunError
from safetensors_io import save_safetensors

SMALL = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=12)


def hf_keys(layers):
    """transformers CLIPTextModel's parameter names (4.23.1, as in openai/clip-vit-large-patch14), in order."""
    keys = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    for i in range(layers):
        pre = f"encoder.layers.{i}."
        keys += [pre + f"self_attn.{p}_proj.{w}" for p in ("k", "v", "q", "out") for w in ("weight", "bias")]
        keys += [pre + f"{m}.{w}" for m in ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")
                 for w in ("weight", "bias")]
    return keys + ["final_layer_norm.weight", "final_layer_norm.bias"]


# ----- The text transformer -----

def test_vit_l14_text_tower_size_and_layout():
    with torch.device("meta"):
        m = CLIPTextModel(**VIT_L14)
    sd = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == 123_060_480 and len(sd) == 196
    assert list(sd) == hf_keys(12)
    assert sd["embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd["embeddings.position_embedding.weight"].shape == (77, 768)
    assert sd["encoder.layers.0.mlp.fc1.weight"].shape == (3072, 768)
    layer = sum(p.numel() for p in m.encoder["layers"][0].parameters())
    assert layer == 7_087_872 and m.embeddings["token_embedding"].weight.numel() == 37_945_344


def filled(model):
    """Every tensor of the state_dict, in order, drawn 0.2 * randn from Generator(0), as the reference was made."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in model.state_dict().values():
            v.copy_(torch.randn(v.shape, generator=g) * 0.2)
    return model.eval()


IDS = torch.tensor([[22, 14, 27, 77, 25, 1, 38, 23, 44, 0, 20, 12], [37, 71, 49, 72, 66, 87, 2, 52, 78, 96, 71, 43]])


def check_reference(h):
    """transformers 4.23.1 CLIPTextModel(CLIPTextConfig(**SMALL)) (quick_gelu, eps 1e-5) with its state_dict filled
    as filled() does (position_ids skipped), last_hidden_state on IDS, computed in a throwaway environment."""
    first = [-0.005813241470605135, 0.02398047223687172, 0.11626166105270386, 0.4481295645236969,
             -0.12641768157482147, -0.04889092966914177, 0.5653112530708313, 0.3039398193359375]
    last = [0.030831672251224518, 0.4391884207725525, -0.19968220591545105, 0.2789851725101471, 0.26014313101768494,
            0.2907160222530365, -0.15348683297634125, -0.11695154011249542]
    mid = [0.21527916193008423, -0.34625986218452454, -0.2943137288093567, 0.2597193419933319, 0.062448229640722275,
           -0.13368959724903107, 0.3113309442996979, 0.15221166610717773]
    assert h.shape == (2, 12, 32)
    for got, want in ((h[0, 0, :8], first), (h[1, -1, -8:], last), (h[0, 5, 10:18], mid)):
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert h.sum().item() == pytest.approx(43.39926528930664, abs=1e-3)
    assert h.abs().sum().item() == pytest.approx(175.82899475097656, abs=1e-3)


def test_text_model_matches_transformers():
    m = filled(CLIPTextModel(**SMALL))
    with torch.no_grad():
        check_reference(m(IDS))


def test_causal_mask():
    m = filled(CLIPTextModel(**SMALL))
    other = IDS.clone()
    other[:, 6:] = 5  # later tokens (padding) never change earlier positions
    with torch.no_grad():
        a, b = m(IDS), m(other)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


# ----- Loading a Hugging Face CLIP folder -----

def write_folder(path, model, fmt="safetensors", config=None):
    """A CLIPModel-style folder: text_model.* with an older file's position_ids buffer, plus vision tensors."""
    sd = {"text_model." + k: v.clone() for k, v in model.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(model.max_position_embeddings)[None]
    sd.update({"vision_model.embeddings.patch_embedding.weight": torch.randn(8, 3, 2, 2),
               "text_projection.weight": torch.randn(4, model.hidden_size), "logit_scale": torch.tensor(2.6)})
    path.mkdir(exist_ok=True)
    if fmt == "safetensors":
        save_safetensors(sd, str(path / "model.safetensors"))
    else:
        torch.save(sd, path / "pytorch_model.bin")
    if config is not None:
        (path / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"], "text_config": config}))
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_hf_folder(tmp_path, fmt):
    folder = write_folder(tmp_path / "clip", filled(CLIPTextModel(**SMALL)), fmt,
                          config={**SMALL, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5})
    m = load_clip_text(str(folder), width=32)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        check_reference(m(IDS))
    bare = {k: v for k, v in filled(CLIPTextModel(**SMALL)).state_dict().items()}  # transformers 5: no prefix
    assert list(text_state_dict({**bare, "embeddings.position_ids": torch.arange(12)})) == hf_keys(2)


def test_load_errors_are_one_line(tmp_path):
    small = filled(CLIPTextModel(**SMALL))
    cases = [(tmp_path / "empty", "no model.safetensors or pytorch_model.bin")]
    (tmp_path / "empty").mkdir()
    vae = tmp_path / "vae"
    vae.mkdir()
    save_safetensors({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(vae / "model.safetensors"))
    cases.append((vae, "holds no CLIP text tower"))
    cases.append((write_folder(tmp_path / "narrow", small), "text width is 32, but the model needs 768"))
    gelu = write_folder(tmp_path / "gelu", small, config={**SMALL, "hidden_act": "gelu"})
    cases.append((gelu, "hidden_act 'gelu'"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases.append((bad, "cannot read"))
    for folder, msg in cases:
        with pytest.raises(RunError, match=msg) as e:
            load_clip_text(str(folder), width=768)
        assert "\n" not in str(e.value)
    with pytest.raises(RunError, match="no vocab.json"):
        CLIPTokenizer.from_folder(str(tmp_path / "empty"))


def test_prompt_conditioning_maps_labels_to_contexts():
    """sample.py's prompts as labels: y in 0..P-1 -> that prompt's context, y == P -> the empty prompt's."""
    from uvit import TextUViT
    model = TextUViT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, clip_dim=16,
                     num_clip_token=5).eval()

    class Encoder:  # ids: each text's length at every position; context: those as floats, 16 wide
        device = "cpu"

        def tokenizer(self, texts):
            return torch.tensor([[len(t)] * 5 for t in texts])

        def context(self, ids):
            return ids[..., None].float().expand(-1, -1, 16)

        def encode(self, texts):
            return self.context(self.tokenizer(texts))
    calls = []
    fwd = prompt_conditioning(lambda x, t, y=None: calls.append(y) or x, Encoder(), ["cat", "a dog"], model)
    fwd(torch.zeros(3), torch.zeros(3), y=torch.tensor([1, 2, 0]))
    assert calls[0][:, 0, 0].tolist() == [5.0, 0.0, 3.0] and calls[0].shape == (3, 5, 16)
    assert torch.equal(model.null_context, torch.zeros(5, 16))  # the empty prompt's encoding
    fwd(torch.zeros(1), torch.zeros(1))
    assert calls[1] is None


# ----- The tokenizer: cleanup and pre-tokenizer (no vocabulary needed) -----

def test_clean_and_pre_tokenize():
    assert clean("  A\tPhoto\n\nof  ") == "a photo of"
    assert clean("&amp;amp; caf&eacute; “q” ‘s’ ﬁne ＡＢ\u3000x") == "& café \"q\" 's' fine ab x"
    assert clean("&amp\x07 \x1b[31mred\x1b[0m") == "&amp red"  # entities need ';'; controls and ANSI removed
    assert clean("<b>&amp;</b>\n&amp;") == "<b>&amp;</b> &amp;"  # ftfy: no entities once a line holds '<'
    assert clean("ΟΔΥΣΣΕΥΣ") == "οδυσσευς"  # str.lower's final sigma, as the official path
    assert pre_tokenize("it's 3.14!!! don't") == ["it", "'s", "3", ".", "1", "4", "!!!", "don", "'t"]
    assert pre_tokenize("''s a<|endoftext|>b ²½") == ["''", "s", "a", "<|endoftext|>", "b", "²", "½"]
    assert pre_tokenize("") == [] and pre_tokenize("猫 👍🏽") == ["猫", "👍🏽"]


def test_bpe_truncation_and_padding_on_a_toy_vocabulary():
    merges = [("c", "a"), ("ca", "t</w>")]
    vocab = {s: i for i, s in enumerate(["c", "a", "t", "c</w>", "a</w>", "t</w>", "ca", "cat</w>",
                                         "<|startoftext|>", "<|endoftext|>"])}
    tok = CLIPTokenizer(vocab, merges, context_length=6)
    assert tok.bpe("cat") == ["cat</w>"] and tok.bpe("tac") == ["t", "a", "c</w>"] and tok.bpe("a") == ["a</w>"]
    assert tok.encode("Cat  cat") == [7, 7]
    assert tok(["cat", "", "cat cat cat cat cat"]).tolist() == [[8, 7, 9, 9, 9, 9], [8, 9, 9, 9, 9, 9],
                                                                 [8, 7, 7, 7, 7, 9]]  # the end token is kept


# ----- The tokenizer on the real vocabulary -----

VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # open_clip 3.3.0's copy


@pytest.fixture(scope="session")
def clip_vocab():
    """CLIP's bpe_simple_vocab_16e6.txt.gz, taken from the open_clip_torch 3.3.0 wheel on PyPI (the wheel is only
    unzipped, never installed), kept in ~/.cache/clip_vocab; the test is skipped where PyPI cannot be reached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clip_vocab"
    cache.mkdir(parents=True, exist_ok=True)
    gz = cache / "bpe_simple_vocab_16e6.txt.gz"
    if not gz.is_file():
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "open_clip_torch==3.3.0",
                            "-d", str(cache)], check=True, timeout=300, capture_output=True)
            wheel = next(cache.glob("open_clip_torch-3.3.0-*.whl"))
            gz.write_bytes(zipfile.ZipFile(wheel).read("open_clip/bpe_simple_vocab_16e6.txt.gz"))
        except (subprocess.SubprocessError, StopIteration, KeyError, OSError) as e:
            pytest.skip(f"cannot fetch the CLIP vocabulary from PyPI ({type(e).__name__})")
    assert hashlib.sha256(gz.read_bytes()).hexdigest() == VOCAB_SHA256
    return gz


# prompt -> the official ids between the start and end tokens (transformers 4.23.1 slow CLIPTokenizer, ftfy 6.1.1,
# vocab.json / merges.txt made from the gz as clip.py does; those two files hash to the Hub's published sha256)
OFFICIAL = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "A green train is coming down the tracks.": [320, 1901, 3231, 533, 1171, 1136, 518, 7579, 269],
    "A small kitchen with a low ceiling.": [320, 2442, 4485, 593, 320, 1042, 12374, 269],
    "": [], "   \t\n  ": [],
    "Hello, World!!! What's up?": [3306, 267, 1002, 995, 768, 568, 705, 286],
    "It's 3.14 or 1,000,000 dollars in 2023": [585, 568, 274, 269, 272, 275, 541, 272, 267, 271, 271, 271, 267, 271,
                                               271, 271, 10669, 530, 273, 271, 273, 274],
    "I'm sure they'll've done it; we'd've, you're, they've, isn't, don't": [
        328, 880, 1650, 889, 1342, 1200, 1700, 585, 282, 649, 1896, 1200, 267, 592, 982, 267, 889, 1200, 267, 2923,
        713, 267, 847, 713],
    "''s 'S 'T 'RE it'S": [8445, 338, 568, 713, 982, 585, 568],
    "Café naïve résumé coöperate Ångström": [15304, 1097, 35689, 563, 29106, 7054, 4166, 622, 7255, 703, 671, 23176,
                                             10352, 807, 7255, 332],
    "Cafe\u0301 nai\u0308ve": [15304, 1097, 35689, 563],  # combining accents: NFC
    "İstanbul ıI straße STRASSE": [328, 16384, 11231, 18562, 328, 1894, 127, 253, 324, 1894, 8938],
    "ΟΔΥΣΣΕΥΣ ΣΟΦΟΣ": [138, 123, 138, 112, 139, 227, 139, 225, 139, 225, 138, 113, 139, 227, 139, 480, 139, 225, 138,
                        123, 139, 228, 138, 123, 139, 480],
    "Москва — столица России": [38018, 13506, 23669, 27152, 39813, 27080, 2005, 23669, 17875, 20978, 119, 16701, 141,
                                228, 27080, 16370, 13506, 23669, 23669, 29503, 372],
    "مرحبا بالعالم": [12986, 10948, 25722, 16378, 22625, 16378, 12973, 18843, 12973, 29945],
    "一只猫坐在桌子上 東京タワー": [19759, 222, 34517, 103, 163, 234, 104, 161, 251, 238, 37746, 101, 162, 94, 234,
                                    35751, 238, 19759, 488, 48338, 21078, 105, 34941, 2429, 107, 30391],
    "고양이 사진": [36216, 254, 31625, 239, 34746, 31061, 105, 38890],
    "a 🐱 and a 👨\u200d👩\u200d👧 with 👍🏽 and 🇫🇷": [320, 22979, 537, 320, 25023, 26304, 964, 356, 593, 43722,
                                                         537, 16223],
    "non\u00a0breaking\u200bzero width": [3353, 2755, 9844, 5848, 23571],
    "“smart quotes” and ‘single’ — dashes… ellipsis": [257, 4115, 5808, 257, 537, 568, 17005, 262, 2005, 925, 2502,
                                                        959, 3367, 33041],
    "&amp; &lt;b&gt; caf&eacute; &amp;amp; &#39;x&#39;": [261, 283, 321, 285, 15304, 261, 262, 343, 262],
    "<b>bold</b> &amp; tags": [283, 321, 285, 8911, 34308, 321, 285, 261, 6259, 282, 11606],
    "ﬁne ﬂour ĳssel": [3797, 18592, 7337, 19373],
    "ＦＵＬＬＷＩＤＴＨ\u3000ｔｅｘｔ １２３": [9407, 23571, 4160, 272, 273, 274],
    "\x1b[31mred\x1b[0m text\x07 bell": [736, 4160, 3718],
    "a <|endoftext|> in the middle <|startoftext|>": [320, 49407, 530, 518, 3694, 49406],
    "²½Ⅻ ① superscripts and fractions": [41175, 33613, 158, 227, 375, 158, 239, 510, 1642, 20109, 537, 936, 6271],
    "Dr. Smith's 2nd-floor office @ 10:30am #meeting $50 100% C++ e-mail user@example.com": [
        1701, 269, 2915, 568, 273, 1764, 268, 4125, 2171, 287, 272, 271, 281, 274, 271, 687, 258, 2071, 259, 276, 271,
        272, 271, 271, 260, 322, 19056, 324, 268, 2614, 7031, 287, 6228, 269, 2464],
    "OMG!!!!! ??? ... --- ***": [3186, 5203, 3824, 678, 11079, 7829],
    "x" * 300: [32035] * 74 + [22819],  # exactly 75 content tokens: nothing cut
    " ".join(["word"] * 100): [2653] * 75,  # cut to 75, the end token kept
    " ".join(["cat"] * 74): [2368] * 74, " ".join(["cat"] * 75): [2368] * 75, " ".join(["cat"] * 76): [2368] * 75,
}


def test_tokenizer_matches_official_ids(clip_vocab, tmp_path):
    prompts = list(OFFICIAL)
    want = torch.full((len(prompts), 77), 49407)  # padded with <|endoftext|>, as transformers' CLIPTokenizer
    for row, p in zip(want, prompts):
        ids = [49406] + OFFICIAL[p] + [49407]
        row[:len(ids)] = torch.tensor(ids)
    from_gz = CLIPTokenizer.from_folder(str(clip_vocab))
    assert torch.equal(from_gz(prompts), want)
    assert from_gz("").tolist() == [[49406] + [49407] * 76]  # U-ViT's empty context
    # the Hub folder's files, written as the reference hashes them
    hf = tmp_path / "clip"
    hf.mkdir()
    (hf / "vocab.json").write_text(json.dumps(from_gz.vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(from_gz.ranks, key=from_gz.ranks.get)
    (hf / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    assert hashlib.sha256((hf / "vocab.json").read_bytes()).hexdigest() == \
        "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69"
    assert hashlib.sha256((hf / "merges.txt").read_bytes()).hexdigest() == \
        "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
    assert torch.equal(CLIPTokenizer.from_folder(str(hf))(prompts), want)
    # a whole folder: tokenizer + text tower -> U-ViT's (B, 77, width) context
    cfg = {**SMALL, "vocab_size": 49408, "max_position_embeddings": 77}
    write_folder(hf, filled(CLIPTextModel(**cfg)), config=cfg)
    ctx = FrozenCLIPEmbedder(str(hf)).encode(["a photo of a cat", ""])
    assert ctx.shape == (2, 77, 32) and ctx.dtype == torch.float32 and not ctx.requires_grad
    with gzip.open(clip_vocab, "rt", encoding="utf-8") as f:
        assert len(f.read().split("\n")) > 48895  # header + 48,894 merges used + unused tail

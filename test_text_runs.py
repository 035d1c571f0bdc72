"""
text_runs.py, clip.TextContext / write_small_clip and their use by train_cifar.py, evaluation.py and sample.py:
text-to-image training on captions end to end (caption rows -> CLIP contexts on the fly, the empty prompt as the
null context, grids with a captioned row per held-out prompt, resume), sampling our checkpoint with its recorded CLIP
and prompts, and the one-line refusals.
"""
import json
import os

import pytest
import torch

import captions
import clip
import sample
import train_cifar
from conftest import image, one_line_error
from data import CIFAR_CLASSES

TEXTS = [t.format(c) for t in captions.CIFAR_TEMPLATES + [captions.HELD_OUT_TEMPLATE] for c in CIFAR_CLASSES]
T2I = ["--backbone", "uvit", "--dataset", "cifar10-captions", "--model-arg", "hidden_size=32", "--model-arg",
       "depth=2", "--model-arg", "num_heads=2", "--batch-size", "4", "--log-every", "1", "--keep-every", "0",
       "--sample-steps", "2"]


@pytest.fixture(scope="session")
def small_clip(tmp_path_factory):
    return clip.write_small_clip(str(tmp_path_factory.mktemp("clip") / "small-clip"), TEXTS, width=16, layers=1,
                                 heads=2, context_length=8)


def test_small_clip_folder_loads_with_its_own_vocabulary(small_clip):
    enc = clip.FrozenCLIPEmbedder(small_clip)
    assert (enc.width, enc.tokenizer.context_length) == (16, 8)
    vocab = enc.tokenizer.vocab
    assert (vocab[clip.SOT], vocab[clip.EOT]) == (len(vocab) - 2, len(vocab) - 1)
    ids = enc.tokenizer(["a photo of the cat", ""])
    assert ids.shape == (2, 8)
    assert ids[1].tolist() == [vocab[clip.SOT]] + [vocab[clip.EOT]] * 7  # the empty prompt: start, then end/padding
    words = [vocab[w + "</w>"] for w in ("a", "photo", "of", "the", "cat")]  # each word of TEXTS: one token
    assert ids[0].tolist() == [vocab[clip.SOT], *words, vocab[clip.EOT], vocab[clip.EOT]]
    unseen = enc.tokenizer.encode("zebras, 42!")  # other text falls back to byte symbols and short merges
    assert len(unseen) >= 4 and max(unseen) < len(vocab)
    ctx = enc.encode(["a photo of the cat", "a photo of the dog"])
    assert ctx.shape == (2, 8, 16) and ctx.dtype == torch.float32
    assert torch.equal(ctx[0, :5], ctx[1, :5]) and not torch.allclose(ctx[0, 5], ctx[1, 5])  # causal: same prefix


def test_text_context_encodes_each_batch_once(small_clip):
    enc = clip.FrozenCLIPEmbedder(small_clip)
    calls = []
    enc.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    ctx = clip.TextContext(enc, ["a small cat", "a small dog"])
    y = torch.tensor([1, 0, 2])  # 2 = the empty prompt (the null label)
    first = ctx(y)
    assert torch.equal(first, enc.encode(["a small dog", "a small cat", ""]))
    assert ctx(y.clone()) is first and calls == [3, 3]  # the same labels again (a sampler's next step): cached
    ctx(torch.tensor([0, 0, 1]))
    assert calls == [3, 3, 3]
    seen = {}
    fwd = ctx.wrap(lambda x, t, y=None, **kw: seen.update(y=y, kw=kw))
    fwd(None, None, y=torch.tensor([0]), force_drop_ids=1)
    assert torch.equal(seen["y"], enc.encode(["a small cat"])) and seen["kw"] == {"force_drop_ids": 1}
    fwd(None, None)
    assert seen["y"] is None  # y=None: the model's own null context


def test_training_on_captions_end_to_end(tmp_path, cifar_dir, small_clip):
    out = tmp_path / "run"
    train_cifar.main(T2I + ["--data-dir", cifar_dir, "--clip", small_clip, "--out-dir", str(out), "--steps", "2",
                            "--sample-every", "2"])
    ckpt = torch.load(out / "latest.pt", weights_only=False)
    assert ckpt["model_name"] == "U-ViT-Tiny-T2I"
    assert ckpt["model_kwargs"]["clip_dim"] == 16 and ckpt["model_kwargs"]["num_clip_token"] == 8
    held = [captions.HELD_OUT_TEMPLATE.format(c) for c in CIFAR_CLASSES]
    assert ckpt["text"] == {"clip": os.path.abspath(small_clip), "prompts": held}
    assert "context_embed.weight" in ckpt["model"] and "null_context" not in ckpt["model"]  # recomputed, not stored
    grid = image(out / "samples" / "step_0000002_ema.png")
    assert grid.shape == (2 + 10 * (32 + 2) + 10 * 12, 2 + 8 * (32 + 2), 3)  # 10 prompt rows of 8, a strip each
    assert (grid[:12] > 200).mean() > 0.8 and (grid[:12] < 80).any()  # the first strip: white with black text
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["class_cond"] is True and config["data"]["num_classes"] == 0
    train_cifar.main(T2I + ["--data-dir", cifar_dir, "--clip", small_clip, "--out-dir", str(out), "--steps", "3"])
    assert torch.load(out / "latest.pt", weights_only=False)["step"] == 3  # resumed

    s = tmp_path / "s.png"  # our checkpoint: its CLIP and held-out prompts by default, a captioned row per prompt
    sample.main(["--ckpt", str(out / "latest.pt"), "--num-samples", "20", "--steps", "1", "--out", str(s)])
    assert image(s).shape == (2 + 10 * 34 + 10 * 12, 2 + 2 * 34, 3)
    few = tmp_path / "few.png"  # fewer samples than prompts: a row for each prompt that has one
    sample.main(["--ckpt", str(out / "latest.pt"), "--num-samples", "8", "--steps", "1", "--out", str(few)])
    assert image(few).shape == (2 + 8 * 34 + 8 * 12, 2 + 34, 3)
    npz = tmp_path / "s.npz"
    sample.main(["--ckpt", str(out / "latest.pt"), "--num-samples", "4", "--steps", "1", "--prompt", "a small cat",
                 "--prompt", "a small dog", "--npz", str(npz), "--out", str(tmp_path / "p.png")])
    import numpy as np
    with np.load(npz) as f:
        assert f["arr_1"].tolist() == [0, 0, 1, 1]  # grouped by prompt


def test_the_null_context_is_the_empty_prompt(tmp_path, cifar_dir, small_clip):
    import backbones
    out = tmp_path / "run"
    train_cifar.main(T2I + ["--data-dir", cifar_dir, "--clip", small_clip, "--out-dir", str(out), "--steps", "1"])
    ckpt = torch.load(out / "latest.pt", weights_only=False)
    model = backbones.load_model(ckpt, True, "cpu")
    enc = clip.FrozenCLIPEmbedder(small_clip)
    clip.prompt_conditioning(lambda *a, **k: None, enc, ["a small cat"], model)
    assert torch.equal(model.null_context, enc.encode([""])[0])


@pytest.mark.parametrize("extra, phrase", [
    (["--backbone", "dit"], "only U-ViT has"),
    (["--no-clip"], "needs --clip DIR"),
    (["--no-class-cond"], "drop --no-class-cond"),
])
def test_caption_runs_refuse_in_one_line(tmp_path, cifar_dir, small_clip, capsys, extra, phrase):
    argv = T2I + ["--data-dir", cifar_dir, "--out-dir", str(tmp_path / "r"), "--steps", "1"]
    argv += [] if "--no-clip" in extra else ["--clip", small_clip]
    argv += [a for a in extra if a != "--no-clip"]
    with pytest.raises(SystemExit) as e:
        train_cifar.main(argv)
    assert phrase in one_line_error(e, capsys)


def test_sampling_refuses_a_clip_of_another_width(tmp_path, cifar_dir, small_clip, capsys):
    out = tmp_path / "run"
    train_cifar.main(T2I + ["--data-dir", cifar_dir, "--clip", small_clip, "--out-dir", str(out), "--steps", "1"])
    wide = clip.write_small_clip(str(tmp_path / "wide"), TEXTS, width=32, layers=1, heads=2, context_length=8)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(out / "latest.pt"), "--num-samples", "2", "--steps", "1", "--clip", wide,
                     "--out", str(tmp_path / "x.png")])
    assert "text width is 32, but the model needs 16" in one_line_error(e, capsys)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(out / "latest.pt"), "--num-samples", "2", "--prompts", str(tmp_path / "none.txt"),
                     "--out", str(tmp_path / "x.png")])
    assert "does not exist" in one_line_error(e, capsys)


def test_training_on_extracted_latents_with_captions(tmp_path, tiny_vae, small_clip):
    """An image folder with metadata.jsonl -> extract_latents.py --captions -> --dataset captions on the latents:
    the held-out image's two captions are the grid's two rows, decoded through the VAE."""
    import numpy as np
    from PIL import Image

    import extract_latents
    data = tmp_path / "photos"
    data.mkdir()
    rows = []
    for i in range(24):
        name = CIFAR_CLASSES[i % 10]
        Image.fromarray(np.full((16, 16, 3), 20 * (i % 10), np.uint8)).save(data / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": [f"a photo of a {name}", f"a small {name}"]})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lat = tmp_path / "lat"
    extract_latents.main(["--data-dir", str(data), "--image-size", "16", "--vae", tiny_vae, "--out", str(lat),
                          "--batch-size", "4", "--device", "cpu", "--workers", "0", "--captions"])
    out = tmp_path / "run"
    train_cifar.main(["--backbone", "uvit", "--dataset", "captions", "--data-dir", str(lat), "--clip", small_clip,
                      "--model", "U-ViT-Tiny-T2I", "--model-arg", "hidden_size=32", "--model-arg", "depth=2",
                      "--model-arg", "num_heads=2", "--batch-size", "4", "--steps", "2", "--sample-every", "2",
                      "--sample-steps", "2", "--out-dir", str(out)])
    ckpt = torch.load(out / "latest.pt", weights_only=False)
    assert ckpt["data"]["pixels"] is False and ckpt["model_kwargs"]["in_channels"] == 4
    assert len(ckpt["text"]["prompts"]) == 2  # 24 images: one held out, with its two captions
    assert image(out / "samples" / "step_0000002_ema.png").shape == (2 + 2 * (16 + 2) + 2 * 12, 2 + 8 * 18, 3)


def test_captioned_grid_needs_a_caption_per_row(tmp_path):
    from images import save_grid
    with pytest.raises(ValueError, match="3 captions for 2 rows"):
        save_grid(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), str(tmp_path / "g.png"), nrow=2, captions=["a", "b", "c"])


def test_v_prediction_runs_get_their_own_folder():
    """U-ViT's CPU recipes predict v: a run folder apart from the eps runs an earlier version wrote."""
    from runs import default_out_dir
    cpu = train_cifar.parse_args(["--backbone", "uvit"], gpu=False)
    assert default_out_dir(cpu) == "runs/uvit-U-ViT-Tiny-cifar10-cond-prediction=v-conv=False-patch_size=4"
    eps = train_cifar.parse_args(["--backbone", "uvit", "--prediction", "eps"], gpu=False)
    assert default_out_dir(eps) == "runs/uvit-U-ViT-Tiny-cifar10-cond-conv=False-patch_size=4"
    assert default_out_dir(train_cifar.parse_args(["--backbone", "uvit"])) == "runs/uvit-U-ViT-S-2-cifar10"


def test_fid_during_a_caption_run_draws_held_out_prompts(tmp_path, cifar_dir, small_clip, fake_inception):
    out = tmp_path / "run"
    train_cifar.main(T2I + ["--data-dir", cifar_dir, "--clip", small_clip, "--out-dir", str(out), "--steps", "2",
                            "--fid-every", "2", "--fid-samples", "6", "--fid-ref", str(fake_inception[1])])
    with open(out / "log.jsonl") as f:
        fids = [r for r in map(json.loads, f) if "fid" in r]
    assert [r["step"] for r in fids] == [2] and fids[0]["fid_samples"] == 6 and fids[0]["fid"] > 0


def test_sampling_the_official_release_layout_with_prompts(tmp_path, tiny_vae, capsys):
    """A file in the layout of mscoco_uvit_small.pth (random weights) samples through sample.py with --prompt,
    --clip and --vae: the official settings (dpm++3s, cfg 2), a captioned row per prompt."""
    import uvit
    from conftest import randomized
    torch.manual_seed(0)
    model = randomized(uvit.MODELS["U-ViT-S/2-T2I"](), gain=0.02)
    torch.save(model.state_dict(), tmp_path / "mscoco_uvit_small.pth")
    wide = clip.write_small_clip(str(tmp_path / "clip-768"), TEXTS, width=768, layers=1, heads=12, context_length=77)
    out = tmp_path / "t.png"
    sample.main(["--ckpt", str(tmp_path / "mscoco_uvit_small.pth"), "--vae", tiny_vae, "--clip", wide,
                 "--prompt", "a photo of the cat", "--prompt", "a small dog", "--num-samples", "2", "--steps", "3",
                 "--out", str(out)])
    said = capsys.readouterr().out
    assert "dpm++3s 3 steps, cfg 2" in said
    assert image(out).shape == (2 + 2 * (64 + 2) + 2 * 12, 2 + 66, 3)  # 32x32 latents -> 64 px; a row per prompt

"""
The Stable Diffusion VAE (vae.py): the exact diffusers layout and parameter count of sd-vae-ft-ema/-mse (on the
meta device), every checkpoint route giving bit-identical outputs, the CompVis/LDM <-> diffusers name map both
ways, the attention maths, and the errors a user sees for bad input (malformed configs, non-finite weights, hostile
pickles: one line, nothing allocated, no code run), the content fingerprint, and the decoding checks against what made
the latents. Tiny configs only; nothing is downloaded.
The safetensors reader and writer (safetensors_io.py): test_safetensors_io.py.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vae
from conftest import randomized
from errors import RunError
from safetensors_io import load_safetensors, save_safetensors
from vae import AutoencoderKL, diffusers_to_ldm, ldm_to_diffusers, load_vae

REF = Path(__file__).resolve().parent / "reference"  # facts from the official code, see reference/README.md
# norm_num_groups 32: a config-less file is read as 32 groups (the only value in released kl-f* VAEs)
TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64], layers_per_block=1,
            norm_num_groups=32, act_fn="silu", sample_size=16, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2)


def ref_json(name):
    return json.loads((REF / name).read_text())


def shapes(state_dict):
    return {k: list(v.shape) for k, v in state_dict.items()}


def tiny(seed=0, **kw):
    return randomized(AutoencoderKL(**{**TINY, **kw}), seed).eval()


def image(B=2, C=3, size=16, seed=1):
    return torch.randn(B, C, size, size, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def outputs(model, x):
    with torch.no_grad():
        mean, logvar = model.encode(x)
        return mean, logvar, model.decode(mean)


# ----- The SD VAE layout, on the meta device -----

def test_sd_vae_keys_shapes_and_counts():
    ref = ref_json("sd_vae_keys.json")
    with torch.device("meta"):
        model = AutoencoderKL(**vae.SD_VAE_CONFIG)
    assert shapes(model.state_dict()) == ref["keys"] and len(ref["keys"]) == 248

    def count(m):
        return sum(p.numel() for p in m.parameters())
    assert count(model) == ref["total_params"] == 83_653_863
    assert count(model.encoder) == ref["encoder_params"] == 34_163_592
    assert count(model.decoder) == ref["decoder_params"] == 49_490_179
    assert count(model.quant_conv) == 72 and count(model.post_quant_conv) == 20
    assert (model.scaling_factor, model.downsample_factor, model.latent_channels) == (0.18215, 8, 4)


def test_config_json_keys_are_accepted_and_architecture_keys_checked():
    ref = ref_json("sd_vae_keys.json")
    with torch.device("meta"):
        model = AutoencoderKL(**ref["resolved_config"], _class_name="AutoencoderKL", _diffusers_version="0.4.2")
        assert shapes(model.state_dict()) == ref["keys"]
        with pytest.warns(UserWarning, match="not_a_vae_key"):
            AutoencoderKL(**TINY, not_a_vae_key=1)
        for bad in [dict(act_fn="relu"), dict(down_block_types=["DownBlock2D"] * 2), dict(up_block_types=["x"]),
                    dict(use_quant_conv=False), dict(mid_block_add_attention=False), dict(norm_num_groups=24),
                    dict(attention="flash")]:
            with pytest.raises(ValueError, match=next(iter(bad))):
                AutoencoderKL(**{**TINY, **bad})


# ----- Shapes and maths -----

@pytest.mark.parametrize("chs", [[32], [32, 64], [32, 32, 64]])
def test_encode_decode_shapes(chs):
    model = tiny(block_out_channels=chs, down_block_types=None, up_block_types=None)
    f = 2 ** (len(chs) - 1)
    assert model.downsample_factor == f
    mean, logvar, rec = outputs(model, image(size=8))
    assert mean.shape == logvar.shape == (2, 4, 8 // f, 8 // f) and rec.shape == (2, 3, 8, 8)
    if f > 1:
        with pytest.raises(ValueError, match="multiples"):
            model.encode(image(size=8 + 1))
    with pytest.raises(ValueError, match="decode expects"):
        model.decode(mean[:, :3])


def test_logvar_is_clamped():
    model = tiny()
    for bias, bound in [(1e4, 20.0), (-1e4, -30.0)]:
        with torch.no_grad():
            model.quant_conv.bias[4:] = bias  # the logvar half of the moments
        _, logvar, _ = outputs(model, image())
        assert torch.all(logvar == bound)
    z = AutoencoderKL.sample(torch.zeros(2, 4, 3, 3), torch.full((2, 4, 3, 3), -30.0))
    assert z.abs().max() < 1e-5


def test_sdpa_matches_math():
    model = tiny()
    math_model = AutoencoderKL(**TINY, attention="math")
    math_model.load_state_dict(model.state_dict())
    x = image()
    for a, b in zip(outputs(model, x), outputs(math_model.eval(), x)):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("attention", vae.ATTENTION_BACKENDS)
def test_attention_closed_forms(attention):
    torch.manual_seed(0)
    block = vae.AttentionBlock(32, 8, attention)
    x = torch.randn(2, 32, 3, 5)
    with torch.no_grad():
        h = block.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # LDM's AttnBlock: q, k, v, proj_out as 1x1 convs over (B, C, H, W), softmax over the key pixels
        w = {n: getattr(block, n).weight[:, :, None, None] for n in ("to_q", "to_k", "to_v")}
        q, k, v = (F.conv2d(block.group_norm(x), w[n], getattr(block, n).bias).flatten(2) for n in w)  # (B, C, HW)
        attn = torch.softmax(q.transpose(1, 2) @ k / 32 ** 0.5, dim=-1)  # (B, HW_q, HW_k)
        out = F.conv2d((v @ attn.transpose(1, 2)).reshape(x.shape), block.to_out[0].weight[:, :, None, None],
                       block.to_out[0].bias)
        assert torch.allclose(block(x), x + out, atol=1e-5)
        # q = k = 0: uniform attention, every pixel receives the mean of v over the pixels
        for layer in (block.to_q, block.to_k):
            layer.weight.zero_(), layer.bias.zero_()
        mean_v = block.to_v(h).mean(dim=1, keepdim=True)  # (B, 1, C)
        expected = x + block.to_out[0](mean_v).transpose(1, 2)[..., None]  # broadcast over H, W
        assert torch.allclose(block(x), expected, atol=1e-5)


# ----- The LDM <-> diffusers name map -----

def test_name_map_round_trips_on_the_full_key_set():
    ldm_ref, diff_ref = ref_json("sd_vae_ldm_keys.json")["keys"], ref_json("sd_vae_keys.json")["keys"]
    with torch.device("meta"):
        diffusers_sd = AutoencoderKL(**vae.SD_VAE_CONFIG).state_dict()
        ldm_sd = {k: torch.empty(s) for k, s in ldm_ref.items()}
    as_ldm = diffusers_to_ldm(diffusers_sd)
    assert shapes(as_ldm) == ldm_ref
    assert shapes(ldm_to_diffusers(as_ldm)) == diff_ref
    assert shapes(ldm_to_diffusers(ldm_sd)) == diff_ref
    assert shapes(diffusers_to_ldm(ldm_to_diffusers(ldm_sd))) == ldm_ref
    # decoder levels are index-reversed; the widest-first diffusers block 0 is LDM's lowest-resolution level 3
    assert as_ldm["decoder.up.3.block.0.conv1.weight"] is diffusers_sd["decoder.up_blocks.0.resnets.0.conv1.weight"]
    assert "decoder.up.0.block.0.nin_shortcut.weight" in as_ldm and "encoder.norm_out.bias" in as_ldm


def test_name_map_keeps_values():
    sd = tiny().state_dict()
    back = ldm_to_diffusers(diffusers_to_ldm(sd))
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# ----- Every loading route -----

def legacy(sd):
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in sd.items():
        for new, old in names.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        out[k] = v
    return out


def write_folder(folder, sd, config, ext):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}))
    if ext == ".safetensors":
        save_safetensors(sd, str(folder / "diffusion_pytorch_model.safetensors"))
        (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read: the safetensors file comes first")
    else:
        torch.save(sd, folder / "diffusion_pytorch_model.bin")
    return folder


def other(shape):
    return torch.ones(shape)


ROUTES = {  # name -> writes the tiny model's state_dict one way and returns the path to load
    "folder-safetensors": lambda d, sd: write_folder(d / "vae", sd, TINY, ".safetensors"),
    "folder-bin": lambda d, sd: write_folder(d / "vae", sd, TINY, ".bin"),
    "folder-legacy-attention": lambda d, sd: write_folder(d / "vae", legacy(sd), TINY, ".bin"),
    "safetensors-diffusers": lambda d, sd: save_safetensors(sd, str(d / "v.safetensors")) or d / "v.safetensors",
    "safetensors-legacy-attention":
        lambda d, sd: save_safetensors(legacy(sd), str(d / "v.safetensors")) or d / "v.safetensors",
    "pt-ldm": lambda d, sd: torch.save(diffusers_to_ldm(sd), d / "v.pt") or d / "v.pt",
    "pth-ldm-with-loss": lambda d, sd: torch.save(
        {**diffusers_to_ldm(sd), "loss.logvar": other(())}, d / "v.pth") or d / "v.pth",
    "ckpt-state_dict": lambda d, sd: torch.save(
        {"state_dict": diffusers_to_ldm(sd), "global_step": 7}, d / "v.ckpt") or d / "v.ckpt",
    "ckpt-first_stage_model": lambda d, sd: torch.save({"state_dict": {
        **{"first_stage_model." + k: v for k, v in diffusers_to_ldm(sd).items()},
        "model.diffusion_model.out.0.weight": other(3), "cond_stage_model.proj": other((2, 2))}}, d / "sd.ckpt")
        or d / "sd.ckpt",
    "safetensors-first_stage_model": lambda d, sd: save_safetensors(
        {"model.diffusion_model.x": other(2), **{"first_stage_model." + k: v for k, v in diffusers_to_ldm(sd).items()}},
        str(d / "sd.safetensors")) or d / "sd.safetensors",
    "bin-diffusers-config-less": lambda d, sd: torch.save(sd, d / "v.bin") or d / "v.bin",
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_route_loads_bit_identically(route, tmp_path):
    model, x = tiny(), image()
    path = ROUTES[route](tmp_path, model.state_dict())
    loaded = load_vae(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.config["block_out_channels"] == TINY["block_out_channels"]
    for a, b in zip(outputs(model, x), outputs(loaded, x)):
        assert torch.equal(a, b)


def test_folder_config_is_used(tmp_path):
    model, x = tiny(norm_num_groups=8), image()
    loaded = load_vae(write_folder(tmp_path / "vae", model.state_dict(), {**TINY, "norm_num_groups": 8,
                                                                          "scaling_factor": 0.5}, ".safetensors"),
                      attention="math")
    assert loaded.encoder.conv_norm_out.num_groups == 8 and loaded.scaling_factor == 0.5
    assert loaded.encoder.mid_block.attentions[0].attention == "math"
    for a, b in zip(outputs(model, x), outputs(loaded, x)):
        assert torch.allclose(a, b, atol=1e-5)


# ----- Bad input: one RunError naming the file -----

def test_bad_paths_and_folders(tmp_path):
    with pytest.raises(RunError, match="no such file"):
        load_vae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="empty.*config.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(RunError, match="cfg.*diffusion_pytorch_model"):
        load_vae(tmp_path / "cfg")
    (tmp_path / "cfg" / "diffusion_pytorch_model.bin").write_bytes(b"")
    (tmp_path / "cfg" / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="config.json.*JSON"):
        load_vae(tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**TINY, "act_fn": "gelu"}))
    with pytest.raises(RunError, match="config.json.*act_fn"):
        load_vae(tmp_path / "cfg")
    (tmp_path / "v.txt").write_text("x")
    with pytest.raises(RunError, match="v.txt.*unknown checkpoint type"):
        load_vae(tmp_path / "v.txt")


class NotATensor:
    pass


def test_bad_files(tmp_path):
    cases = {
        "other.safetensors": lambda p: save_safetensors({"unet.conv.weight": other(2)}, str(p)),
        "tensor.pt": lambda p: torch.save(other(2), p),
        "code.ckpt": lambda p: torch.save({"state_dict": {}, "obj": NotATensor()}, p),
        "garbage.bin": lambda p: p.write_bytes(b"\x00not a pickle"),
        "bad.safetensors": lambda p: p.write_bytes(b"\x01\x00"),
        "partial.pt": lambda p: torch.save({"encoder.down_blocks.0.resnets.0.conv1.weight": other((8, 8, 3, 3))}, p),
    }
    expected = {"other.safetensors": "no known VAE layout", "tensor.pt": "not a state_dict",
                "code.ckpt": "needs code", "garbage.bin": "torch.load cannot read", "bad.safetensors": "shorter",
                "partial.pt": "cannot infer"}
    for name, write in cases.items():
        write(tmp_path / name)
        with pytest.raises(RunError, match=f"{name}.*{expected[name]}"):
            load_vae(tmp_path / name)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_strict_loading(problem, tmp_path):
    sd = dict(tiny().state_dict())
    if problem == "missing":
        del sd["decoder.up_blocks.1.resnets.1.conv2.bias"]
        key = "missing decoder.up_blocks.1.resnets.1.conv2.bias"
    elif problem == "unexpected":
        sd["encoder.extra.weight"] = other(3)
        key = "unexpected encoder.extra.weight"
    else:
        sd["encoder.conv_in.weight"] = other((32, 3, 1, 1))
        key = r"encoder.conv_in.weight has shape \(32, 3, 1, 1\)"
    folder = write_folder(tmp_path / "vae", sd, TINY, ".safetensors")
    with pytest.raises(RunError, match=f"diffusion_pytorch_model.safetensors.*{key}"):
        load_vae(folder)


def test_vae_keeps_the_safetensors_names():
    """vae.load_safetensors / vae.save_safetensors stay importable where they were."""
    assert vae.load_safetensors is load_safetensors and vae.save_safetensors is save_safetensors


# ----- Hostile and malformed files: one line, nothing allocated, no code run -----

BAD_CONFIGS = {  # config entry -> what the message names
    "norm_num_groups=0": (dict(norm_num_groups=0), "norm_num_groups=0"),
    "latent_channels<0": (dict(latent_channels=-4), "latent_channels=-4"),
    "huge widths": (dict(block_out_channels=[1e9, 1e9]), r"block_out_channels=\[1000000000.0, 1000000000.0\]"),
    "widths too large": (dict(block_out_channels=[65536, 65536], norm_num_groups=1), "would have about"),
    "widths a string": (dict(block_out_channels="abc"), "block_out_channels='abc'"),
    "layers a float": (dict(layers_per_block=1.5), "layers_per_block=1.5"),
    "channels a bool": (dict(in_channels=True), "in_channels=True"),
    "scaling abc": (dict(scaling_factor="abc"), "scaling_factor='abc' must be a finite number > 0"),
    "scaling NaN": (dict(scaling_factor=float("nan")), "scaling_factor=nan must be a finite number > 0"),
    "scaling 0": (dict(scaling_factor=0), "scaling_factor=0 must be a finite number > 0"),
    "shift abc": (dict(shift_factor="abc"), "shift_factor='abc' must be a finite number"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_numbers_are_one_line_before_anything_is_allocated(case, tmp_path):
    change, expect = BAD_CONFIGS[case]
    folder = write_folder(tmp_path / "vae", tiny().state_dict(), {**TINY, **change}, ".safetensors")
    with pytest.raises(RunError, match=f"config.json: cannot build the AutoencoderKL: .*{expect}") as e:
        load_vae(folder)
    assert "\n" not in str(e.value)


def test_non_finite_weights_are_refused(tmp_path):
    sd = dict(tiny().state_dict())
    sd["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"].clone()
    sd["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(RunError, match="weight decoder.conv_out.weight holds non-finite values"):
        load_vae(write_folder(tmp_path / "vae", sd, TINY, ".safetensors"))


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, on the raw protocol-4 pickle
def test_hostile_pickles_are_refused_as_code_without_advice(tmp_path, capsys):
    import pickle
    zipped, raw = tmp_path / "zip.pt", tmp_path / "raw.bin"
    torch.save({"encoder.conv_in.weight": Evil()}, zipped)
    raw.write_bytes(pickle.dumps(Evil(), protocol=4))
    for path in (zipped, raw):
        with pytest.raises(RunError) as e:
            load_vae(path)
        msg = str(e.value)
        assert "not a plain tensor file (would run code: " in msg and "print)" in msg and "needs code" in msg
        assert "\x1b" not in msg and "weights_only" not in msg and "\n" not in msg
    assert "never run" not in capsys.readouterr().out


def test_fingerprint_is_the_content_of_config_and_weights(tmp_path):
    import hashlib
    folder = write_folder(tmp_path / "vae", tiny().state_dict(), TINY, ".safetensors")
    files = [folder / "config.json", folder / "diffusion_pytorch_model.safetensors"]
    assert load_vae(folder).sha256 == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    save_safetensors(tiny(seed=1).state_dict(), str(files[1]))  # same path, other content: another identity
    assert load_vae(folder).sha256 == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def test_decoding_checks_what_made_the_latents(tmp_path, capsys):
    """Another downsampling factor is refused naming both sides; another VAE of the same kind is noted."""
    folder = write_folder(tmp_path / "vae", tiny().state_dict(), TINY, ".safetensors")  # 2x, 4 channels
    made = load_vae(folder)
    decode, size = vae.latent_decoder(str(folder), 4, 8, "cpu", latents={"pixel_size": 16, "latents_vae": made.sha256,
                                                                         "scaling_factor": made.scaling_factor})
    assert size == 16 and decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 16, 16)
    assert capsys.readouterr().out == ""
    with pytest.raises(RunError, match=r"downsamples 2x \(8px latents -> 16px images\) but the latents were made "
                                       r"from 64px images"):
        vae.latent_decoder(str(folder), 4, 8, "cpu", latents={"pixel_size": 64})
    vae.latent_decoder(str(folder), 4, 8, "cpu", latents={"pixel_size": 16, "latents_vae": "0" * 64})
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"not the one that made the latents ({'0' * 12})" in out and made.sha256[:12] in out

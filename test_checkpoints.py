"""
checkpoints.py: a truncated, garbage or foreign checkpoint is refused by train_cifar.py and sample.py with one line
naming it (a pickle that would run code as such), checkpoints written before an entry existed still resume, an edited
checkpoint is refused before anything is written, and a latent run refuses to resume on other latents.
"""
import os
import pickle

import numpy as np
import pytest
import torch

import checkpoints
import errors
import sample
import train_cifar
import vae
from conftest import C, digest, exit_message, one_line_error, snapshot, train, write_latents


@pytest.mark.parametrize("corrupt", ["truncated", "garbage", "not_a_checkpoint"])
def test_corrupt_checkpoint_is_refused(tmp_path, cifar_dir, baseline, capsys, corrupt):
    bad = tmp_path / "bad.pt"
    raw = (baseline / "latest.pt").read_bytes()
    if corrupt == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif corrupt == "garbage":
        bad.write_bytes(os.urandom(1000))
    else:
        torch.save({"weights": torch.zeros(2)}, bad)
    before = digest(bad)
    for run in (lambda: train(tmp_path / "out", cifar_dir, "--steps", 30, "--resume", bad),
                lambda: sample.main(["--ckpt", str(bad)])):
        with pytest.raises(SystemExit) as e:
            run()
        msg = exit_message(e, capsys)
        assert msg.startswith("error:") and str(bad) in msg and "\n" not in msg
        assert "cannot read checkpoint" in msg or "not a train_cifar.py checkpoint" in msg
    assert digest(bad) == before and not (tmp_path / "out").exists()


def test_checkpoints_from_before_loss_type_still_resume():
    """A checkpoint recorded before loss_type / fixed_variance existed was trained with l2 and 'large': resuming it
    with those values is accepted, with others refused naming the entry."""
    old = {"diffusion": {"formulation": "ddpm", "schedule": "linear", "timesteps": 1000, "prediction": "eps",
                         "learn_sigma": False}}
    new = {**old["diffusion"], "loss_type": "l2", "fixed_variance": "large"}
    checkpoints.check_compatible(old, {"diffusion": new}, "old.pt")
    with pytest.raises(errors.RunError, match=r"diffusion.loss_type 'l2' != 'l1'"):
        checkpoints.check_compatible(old, {"diffusion": {**new, "loss_type": "l1"}}, "old.pt")
    edm = {"diffusion": {"formulation": "edm", "sigma_data": 0.5}}  # no fixed_variance key for EDM
    checkpoints.check_compatible(edm, {"diffusion": {**edm["diffusion"], "loss_type": "l2"}}, "old.pt")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, on the raw protocol-4 pickle
@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_a_pickle_that_would_run_code_is_refused_as_such(tmp_path, cifar_dir, capsys, kind):
    evil = tmp_path / "evil.pt"
    if kind == "zip":
        torch.save({"step": 1, "model": Evil()}, evil)
    else:
        evil.write_bytes(pickle.dumps(Evil(), protocol=4))
    for run in (lambda: train(tmp_path / "out", cifar_dir, "--steps", 30, "--resume", evil),
                lambda: sample.main(["--ckpt", str(evil)])):
        with pytest.raises(SystemExit) as e:
            run()
        msg = one_line_error(e, capsys)
        assert f"{evil} is not a plain tensor file (would run code: " in msg and "print)" in msg
        assert "truncated" not in msg and "weights_only" not in msg and "\x1b" not in msg
    assert "never run" not in capsys.readouterr().out and not (tmp_path / "out").exists()


# ----- Edited checkpoints: refused in one line before anything is written -----

def nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


W = "final_layer.linear.weight"
EDITS = {  # name -> (edit of the checkpoint dict, what the one-line refusal says)
    "ema wrong shape": (lambda ck: ck["ema"].update({W: torch.zeros(3, 3)}), f"ema['{W}'] has shape (3, 3) but model"),
    "both wrong shape": (lambda ck: [ck[k].update({W: torch.zeros(3, 3)}) for k in ("model", "ema")],
                         f"(model): the weights do not fit DiT (shape '{W}' (3, 3) != (96, 32))"),
    "key missing": (lambda ck: [ck[k].pop("final_layer.linear.bias") for k in ("model", "ema")],
                    "(model): the weights do not fit DiT (missing 'final_layer.linear.bias')"),
    "key in ema only": (lambda ck: ck["ema"].update({"extra": torch.zeros(1)}), "'extra' is in ema only"),
    "NaN model": (lambda ck: ck["model"].update({W: nan(ck["model"][W])}), f"model['{W}'] holds non-finite"),
    "inf ema": (lambda ck: ck["ema"].update({W: ck["ema"][W] * float("inf")}), f"ema['{W}'] holds non-finite"),
    "model a tensor": (lambda ck: ck.update(model=torch.zeros(2)), "'model' is not a state_dict of tensors"),
    "opt empty dict": (lambda ck: ck.update(opt={}), "'opt' is not an optimizer state"),
    "opt state emptied": (lambda ck: ck["opt"].update(state={}), "optimizer state is empty although the run is at"),
    "opt no groups": (lambda ck: ck["opt"].update(param_groups=[]), "'opt' is not an optimizer state"),
    "opt fewer params": (lambda ck: ck["opt"]["param_groups"][0].update(params=[0, 1]),
                         "its optimizer state does not fit the model"),
    "opt moment shape": (lambda ck: ck["opt"]["state"][min(ck["opt"]["state"])].update(exp_avg=torch.zeros(7)),
                         "has shape (7,), the parameter ("),
    "rng empty": (lambda ck: ck.update(rng={}), "its RNG state cannot be restored"),
    "rng torch short": (lambda ck: ck["rng"].update(torch=torch.zeros(10, dtype=torch.uint8)),
                        "its RNG state cannot be restored"),
    "rng numpy bad": (lambda ck: ck["rng"].update(numpy=[1, 2]), "its RNG state cannot be restored"),
    "rng python bad": (lambda ck: ck["rng"].update(python=["x"]), "its RNG state cannot be restored"),
    "step x": (lambda ck: ck.update(step="x"), "step 'x' is not a number of steps"),
    "step -5": (lambda ck: ck.update(step=-5), "step -5 is not a number of steps"),
    "step 2.5": (lambda ck: ck.update(step=2.5), "step 2.5 is not a number of steps"),
    "elapsed abc": (lambda ck: ck.update(elapsed="abc"), "elapsed 'abc' is not a number of seconds"),
    "args a list": (lambda ck: ck.update(args=[1]), "'args' or 'scaler' is not a dict"),
    "diffusion a string": (lambda ck: ck.update(diffusion="x"), "is from another config (diffusion 'x' != "),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_an_edited_checkpoint_is_refused_in_one_line(existing, cifar_dir, capsys, case):
    edit, expect = EDITS[case]
    ck = torch.load(existing / "latest.pt", weights_only=True)
    edit(ck)
    torch.save(ck, existing / "latest.pt")
    before = snapshot(existing)
    with pytest.raises(SystemExit) as e:
        train(existing, cifar_dir, "--steps", 30)
    msg = one_line_error(e, capsys)
    assert expect in msg and str(existing / "latest.pt") in msg
    assert snapshot(existing) == before  # no log trimmed, no config.json, no checkpoint written


# ----- Provenance: a latent run records its latents and refuses others on resume -----

LATENT = ["--backbone", "dit", "--model", "DiT-S/2", "--model-arg", "hidden_size=32", "--model-arg", "depth=1",
          "--model-arg", "num_heads=2", "--batch-size", "4", "--log-every", "1", "--keep-every", "0",
          "--sample-every", "0", "--dataset", "latents"]


def test_a_latent_run_refuses_other_latents_and_a_vae_of_another_downsampling(tmp_path, tiny_vae, capsys):
    a = write_latents(str(tmp_path / "a"), tiny_vae)
    b = write_latents(str(tmp_path / "b"), tiny_vae, vae_sha256="f" * 64)  # the same shapes, made by another VAE
    out = tmp_path / "run"
    train_cifar.main(LATENT + ["--data-dir", a, "--out-dir", str(out), "--steps", "2"])
    data = torch.load(out / "latest.pt", weights_only=True)["data"]
    assert data["latents_vae"] == tiny_vae and data["scaling_factor"] == 0.5 and len(data["latents"]) == 16
    before = snapshot(out, tmp_path / "a", tmp_path / "b")
    with pytest.raises(SystemExit) as e:
        train_cifar.main(LATENT + ["--data-dir", b, "--out-dir", str(out), "--steps", "4"])
    msg = one_line_error(e, capsys)
    assert "trained on other latents" in msg and f"data.latents_vae {tiny_vae!r} != {'f' * 64!r}" in msg
    assert f"data.latents {data['latents']!r} != " in msg and "--data-dir it trained on" in msg
    assert snapshot(out, tmp_path / "a", tmp_path / "b") == before

    # decoding through a VAE of another downsampling factor (4x: 8px latents -> 32px, not the latents' 16px)
    model = vae.AutoencoderKL(block_out_channels=[32, 32, 32], latent_channels=C)
    other = tmp_path / "vae4x"
    other.mkdir()
    (other / "config.json").write_text('{"block_out_channels": [32, 32, 32], "latent_channels": 4}')
    vae.save_safetensors(model.state_dict(), str(other / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(out / "latest.pt"), "--vae", str(other), "--num-samples", "1", "--steps", "1",
                     "--out", str(tmp_path / "g.png")])
    assert "downsamples 4x (8px latents -> 32px images) but the latents were made from 16px images" in \
        one_line_error(e, capsys)
    assert not (tmp_path / "g.png").exists()

    # a checkpoint from before provenance was recorded: unknown, not compared (documented)
    ck = torch.load(out / "latest.pt", weights_only=True)
    for k in checkpoints.UNKNOWN_BEFORE:
        del ck["data"][k.split(".")[1]]
    torch.save(ck, out / "latest.pt")
    train_cifar.main(LATENT + ["--data-dir", b, "--out-dir", str(out), "--steps", "3"])
    assert "resumed from" in capsys.readouterr().out


def test_latents_files_are_identified_by_content(tmp_path):
    from data import LatentFolder, latents_provenance
    z = np.zeros((4, 4, 8, 8), np.float32)
    np.savez(tmp_path / "a.npz", latents=z)
    np.savez(tmp_path / "b.npz", latents=z + 1)
    ids = [latents_provenance(str(tmp_path / f), torch.zeros(1))["latents"] for f in ("a.npz", "b.npz", "a.npz")]
    assert ids[0] == ids[2] != ids[1]
    folder = write_latents(str(tmp_path / "f"), "/some/vae")
    assert latents_provenance(folder, LatentFolder(folder)) == {
        "latents": latents_provenance(folder, LatentFolder(folder))["latents"], "latents_vae": "/some/vae",
        "scaling_factor": 0.5}

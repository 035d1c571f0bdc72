"""
evaluation.py: FID during training (the Inception replaced by conftest.py's small fixed feature map) is logged and
equals what sample.py computes from the same weights, sampler, seed and batching; a bad FID setup fails before
training starts, with train_cifar.py's advice; grids and FID show their progress in sampler steps.
"""
import numpy as np
import pytest

import fid
import sample
from diffusion import GaussianDiffusion
from conftest import exit_message, read_log, train


def test_fid_during_training_is_logged_and_matches_sample_py(tmp_path, cifar_dir, fake_inception, capsys):
    out, ref = tmp_path / "fid", fake_inception[1]
    train(out, cifar_dir, "--steps", 4, "--fid-every", 2, "--fid-samples", 6, "--fid-ref", ref,
          "--sampler", "ddim", "--sample-steps", 3, "--sample-every", 4)
    err = capsys.readouterr().err  # progress in sampler steps: the FID's 6 samples in one batch, the grid at step 4
    assert "sampling: 100%|██████████| 3/3" in err and "grid at step 4" in err
    fids = [r for r in read_log(out) if "fid" in r]
    assert [r["step"] for r in fids] == [2, 4] and all(np.isfinite(r["fid"]) for r in fids)
    assert fids[0]["fid_samples"] == 6 and fids[0]["sampler"] == "ddim-3"
    # the same EMA weights, sampler, seed and batching through sample.py give the same number
    score, _ = sample.main(["--ckpt", str(out / "latest.pt"), "--num-samples", "6", "--batch-size", "8",
                            "--sampler", "ddim", "--steps", "3", "--fid-ref", ref, "--out", str(tmp_path / "g.png")])
    assert score == pytest.approx(fids[1]["fid"], abs=1e-4)


def test_fid_setup_fails_before_training(tmp_path, cifar_dir, capsys):
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "r", cifar_dir, "--steps", 2, "--fid-every", 1, "--fid-ref", str(tmp_path / "missing.npz"))
    assert "cannot compute FID" in exit_message(e, capsys)
    assert not (tmp_path / "r" / "latest.pt").exists()


def test_fid_error_gives_train_cifars_advice(tmp_path, cifar_dir, capsys, monkeypatch):
    """fid.py's --weights flag is not train_cifar.py's: the advice names $FID_WEIGHTS, which both read."""
    (tmp_path / "not_inception.pth").write_bytes(b"x")
    monkeypatch.setenv("FID_WEIGHTS", str(tmp_path / "not_inception.pth"))
    fid.save_stats(str(tmp_path / "ref.npz"), np.zeros(4), np.eye(4))
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "r", cifar_dir, "--steps", 2, "--fid-every", 1, "--fid-ref", tmp_path / "ref.npz")
    msg = exit_message(e, capsys)
    assert "cannot compute FID" in msg and "point $FID_WEIGHTS at pytorch-fid's" in msg and "--weights" not in msg


def test_grid_guidance(tmp_path, cifar_dir, monkeypatch):
    """--grid-cfg-scale guides the class rows of the grid (the CPU recipes' 3) with the model's null label; 1 (the
    default) samples them unguided, as before; an unconditional grid has nothing to guide."""
    seen, real = [], GaussianDiffusion.sample

    def spy(self, *a, **kw):
        seen.append((kw.get("cfg_scale", 1.0), kw.get("null_label")))
        return real(self, *a, **kw)
    monkeypatch.setattr(GaussianDiffusion, "sample", spy)
    for extra in (["--class-cond", "--grid-cfg-scale", 3], ["--class-cond"], ["--grid-cfg-scale", 3]):
        train(tmp_path / str(len(seen)), cifar_dir, "--steps", 2, "--sample-every", 2, *extra)
    assert seen == [(3.0, 10), (1.0, 10), (1.0, None)]

"""
evaluation.py: FID during training (the Inception replaced by conftest.py's small fixed feature map) is logged and
equals what sample.py computes from the same weights, sampler, seed and batching; a bad FID setup fails before
training starts.
"""
import numpy as np
import pytest

import sample
from conftest import exit_message, read_log, train


def test_fid_during_training_is_logged_and_matches_sample_py(tmp_path, cifar_dir, fake_inception):
    out, ref = tmp_path / "fid", fake_inception[1]
    train(out, cifar_dir, "--steps", 4, "--fid-every", 2, "--fid-samples", 6, "--fid-ref", ref,
          "--sampler", "ddim", "--sample-steps", 3)
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

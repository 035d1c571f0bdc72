"""
checkpoints.py: a truncated, garbage or foreign checkpoint is refused by train_cifar.py and sample.py with one line
naming it, and checkpoints written before an entry existed still resume.
"""
import os

import pytest
import torch

import checkpoints
import errors
import sample
from conftest import digest, exit_message, train


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

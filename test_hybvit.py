"""
hybvit.py: HybViT's joint objective (Yang et al. 2022), its gradient through training.train_step against the
written-out sum of the diffusion loss and the label-smoothed cross-entropy, and a CPU run that logs test accuracy,
resumes exactly and samples.
"""
import json

import numpy as np
import torch
import torch.nn.functional as F

import genvit
import hybvit
import sample
import train_cifar
import training
from conftest import GENVIT_TINY
from diffusion import make_diffusion


def test_hybvit_joint_objective_gradient():
    """train_step with joint: the gradient is px * grad(diffusion loss) + pyx * grad(label-smoothed CE)."""
    torch.manual_seed(0)
    model = genvit.MODELS["GenViT-Tiny"](hidden_size=32, depth=2)
    diffusion = make_diffusion(schedule="cosine", loss_type="l1")
    x, xc, yc = torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.tensor([1, 5, 9])
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(1)
    terms, _ = training.train_step(model, diffusion, opt, scaler, params, x, None, 0.0,
                                   joint=hybvit.JointLoss(model.classify, xc, yc, 100.0, 1.0, 0.1))
    got = [p.grad.clone() for p in params]
    torch.manual_seed(1)  # the same t and noise
    diff = diffusion.training_losses(model, x)["loss"].mean()
    ce = F.cross_entropy(model.classify(xc), yc, label_smoothing=0.1)
    want = torch.autograd.grad(100.0 * diff + ce, params)
    assert torch.allclose(terms["ce"].mean(), ce) and terms["train_acc"].shape == (3,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_hybvit_cpu_run_logs_test_accuracy_and_resumes_exactly(tmp_path, cifar_dir):
    common_args = GENVIT_TINY + ["--hybvit", "--data-dir", cifar_dir, "--ckpt-every", "2", "--warmup", "2"]
    train_cifar.main(common_args + ["--steps", "4", "--out-dir", str(tmp_path / "a")])
    train_cifar.main(common_args + ["--steps", "2", "--out-dir", str(tmp_path / "b")])
    train_cifar.main(common_args + ["--steps", "4", "--out-dir", str(tmp_path / "b")])  # resumes at step 2
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    accs = [r for r in logs[0] if "test_acc" in r]
    assert [r["step"] for r in accs] == [2, 4] and all(0 <= r["test_acc"] <= 100 for r in accs)
    losses = [[(r["step"], r["loss"], r["ce"]) for r in log if "loss" in r] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = (torch.load(tmp_path / d / "latest.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["diffusion"] == {"formulation": "ddpm", "loss_type": "l1", "schedule": "cosine", "timesteps": 1000,
                              "prediction": "eps", "learn_sigma": False, "fixed_variance": "small"}
    assert a["model_kwargs"]["num_classes"] == 10 and a["data"]["num_classes"] == 0  # a head, no conditioning
    sample.main(["--ckpt", str(tmp_path / "a" / "latest.pt"), "--num-samples", "2", "--steps", "2",
                 "--npz", str(tmp_path / "s.npz")])
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 32, 32, 3)

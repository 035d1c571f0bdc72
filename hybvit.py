"""HybViT's classifier half of training (Yang et al. 2022 §3.2): a second batch per step, the joint loss
px_weight x L_diff + ce_weight x cross-entropy of GenViT's classifier head, and its test accuracy."""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data import BatchIndices, get_batch, load_cifar10, random_crop
from devices import autocast_forward


@dataclass
class JointLoss:
    """px_weight x the diffusion loss + ce_weight x the label-smoothed cross-entropy of classify(x) on labels y."""
    classify: Callable
    x: torch.Tensor
    y: torch.Tensor
    px_weight: float = 100.0
    ce_weight: float = 1.0
    label_smoothing: float = 0.1

    def __call__(self, diffusion_loss, terms):
        """The joint loss (for training.train_step's joint); adds the per-sample terms 'ce' and 'train_acc'."""
        logits = self.classify(self.x).float()
        terms["ce"] = F.cross_entropy(logits, self.y, label_smoothing=self.label_smoothing, reduction="none")
        terms["train_acc"] = (logits.argmax(1) == self.y).float()
        return self.px_weight * diffusion_loss + self.ce_weight * terms["ce"].mean()


class HybViT:
    """The classifier's batches: their own order (seed + 1), flips and 4-pixel crops (the paper's base augmentation)
    of the run's images on the device; the test accuracy on CIFAR-10's test split (other datasets have none)."""
    KEYS = ["ce", "train_acc"]  # what JointLoss adds to the logged loss terms

    def __init__(self, model, images, labels, args, device):
        self.args, self.images, self.labels = args, images, labels.to(device)
        self.indices = BatchIndices(len(images), args.batch_size, args.seed + 1)
        self.classify = autocast_forward(model.classify, device, args.precision)
        self.test_set = None
        if args.dataset == "cifar10":
            self.test_set = load_cifar10(args.data_dir, train=False, url=args.cifar_url)

    def joint(self, step):
        """The JointLoss of training step `step` (its flips and crops use the global RNG: resumes replay them)."""
        a = self.args
        x, y = get_batch(self.images, self.labels, self.indices(step), a.flip)
        return JointLoss(self.classify, random_crop(x, 4), y, a.px_weight, a.ce_weight, a.label_smoothing)

    def evaluate(self, run, log):
        """At checkpoint steps: the test accuracy of the model and of its EMA, logged."""
        if self.test_set is None or not (run.step % self.args.ckpt_every == 0 or run.step == self.args.steps):
            return
        accs = [test_accuracy(m, *self.test_set, run.device, self.args.precision) for m in (run.model, run.ema)]
        log.append({"step": run.step, "test_acc": accs[0], "test_acc_ema": accs[1]})
        tqdm.write(f"step {run.step}: test accuracy {accs[0]:.2f}% (EMA {accs[1]:.2f}%)")


@torch.no_grad()
def test_accuracy(model, images, labels, device, precision, batch_size=500):
    """Top-1 accuracy (%) of model.classify on uint8 images (N, C, H, W) scaled to [-1, 1], in eval mode."""
    was_training, correct = model.training, 0
    model.eval()
    classify = autocast_forward(model.classify, device, precision)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1.0
        correct += int((classify(x).argmax(1).cpu() == labels[i:i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(images)

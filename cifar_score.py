"""
Score CIFAR-10 samples offline with a small classifier of our own (README, "What a CPU can do"): no Inception
weights needed. Train it once on the CIFAR-10 training set, then score sample.py npz files (arr_0 uint8 images,
arr_1 labels):
  - accuracy: how often the classifier names the class a sample was drawn for (class-conditional npz; chance 10%);
  - FD: the Frechet distance in its 256-d pooled features to 5,000 test images (FID's formula, another network);
  - colour: the correlation of per-class mean colours (minus their mean) with the real training images'.
  python cifar_score.py --train --data-dir D               # -> cifar_clf.pt, 3 epochs, about 4 min on 2 cores
  python cifar_score.py s.npz [more.npz] --data-dir D      # one JSON line per file
"""
import argparse
import json

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import load_cifar10
from errors import RunError
from files import atomic_write


class Classifier(nn.Module):
    """7 conv-BN-ReLU layers (32 to 256 channels, three max-pools), global average pool, a linear head."""

    def __init__(self):
        super().__init__()
        conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
        self.f = nn.Sequential(conv(3, 32), nn.MaxPool2d(2), conv(32, 64), conv(64, 64), nn.MaxPool2d(2),
                               conv(64, 128), conv(128, 128), nn.MaxPool2d(2), conv(128, 256),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(256, 10)

    def features(self, x):  # uint8 (N, 3, 32, 32) -> (N, 256)
        return self.f(x.float() / 127.5 - 1)

    def forward(self, x):
        return self.fc(self.features(x))


def train(data_dir, out, epochs=3, seed=0):
    """SGD + Nesterov, one-cycle lr 0.1, batch 128, flips and 4-pixel crops, label smoothing 0.1 -> test accuracy."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    (x, y), (xte, yte) = load_cifar10(data_dir), load_cifar10(data_dir, train=False)
    net, steps = Classifier(), max(1, len(x) // 128)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * steps)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(steps):
            idx = perm[i * 128:(i + 1) * 128]
            xb = torch.where((torch.rand(len(idx)) < 0.5)[:, None, None, None], x[idx].flip(3), x[idx])
            dx, dy = gen.integers(0, 9, 2)
            xb = F.pad(xb, (4, 4, 4, 4))[:, :, dy:dy + 32, dx:dx + 32]
            loss = F.cross_entropy(net(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    atomic_write(out, lambda f: torch.save(net.state_dict(), f))
    return accuracy(net.eval(), xte, yte)


@torch.no_grad()
def predict(net, x, what="forward"):
    return torch.cat([getattr(net, what)(x[i:i + 500]) for i in range(0, len(x), 500)])


def accuracy(net, x, y):
    return float((predict(net, x).argmax(1) == y).float().mean())


def frechet(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 (FID's formula)."""
    a, b = a.double().numpy(), b.double().numpy()
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ sb @ root)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb)
                 - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def class_colours(x, y):
    """(10, 3) per-class mean RGB minus the mean over classes."""
    c = torch.stack([x[y == k].float().mean((0, 2, 3)) for k in range(10)])
    return c - c.mean(0)


def score(net, path, ref_features, real_colours):
    """The scores of one sample.py npz: FD always, accuracy and colour correlation when it holds labels."""
    with np.load(path) as f:
        x = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(f["arr_1"]).long() if "arr_1" in f.files else None
    if x.shape[1:] != (3, 32, 32) or x.dtype != torch.uint8:
        raise RunError(f"{path}: arr_0 must be uint8 (N, 32, 32, 3) CIFAR-sized samples, got {x.dtype} "
                       f"{tuple(x.permute(0, 2, 3, 1).shape)}")
    out = {"npz": path, "n": len(x), "fd": round(frechet(predict(net, x, "features"), ref_features), 3)}
    if y is not None:
        out["accuracy"] = round(accuracy(net, x, y), 4)
        corr = np.corrcoef(class_colours(x, y).ravel().numpy(), real_colours.ravel().numpy())[0, 1]
        out["colour_corr"] = round(float(corr), 3)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("npz", nargs="*", help="sample.py --npz files to score")
    p.add_argument("--train", action="store_true", help="train the classifier first (writes --weights)")
    p.add_argument("--data-dir", default="data", help="the CIFAR-10 folder (data.load_cifar10)")
    p.add_argument("--weights", default="cifar_clf.pt")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    try:
        if args.train:
            print(f"classifier: test accuracy {train(args.data_dir, args.weights, args.epochs):.4f} -> {args.weights}")
        if not args.npz:
            return
        net = Classifier()
        net.load_state_dict(torch.load(args.weights, weights_only=True))
        net.eval()
        (x, y), (xte, _) = load_cifar10(args.data_dir), load_cifar10(args.data_dir, train=False)
        ref, colours = predict(net, xte[:5000], "features"), class_colours(x, y)
        for path in args.npz:
            print(json.dumps(score(net, path, ref, colours)))
    except (RunError, OSError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()

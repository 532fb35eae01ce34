"""Recipe that trained the feature classifier behind ``ttfm-distill eval``'s Frechet distance.

A small CNN (:class:`ttfm_distill.features.FashionFeatureNet`) on Fashion-MNIST
at 16x16 in [-1, 1], the embedded teacher's data (28x28 zero-padded to 32 and
2x2 mean-pooled), with random horizontal flips like the teacher's training.
Deterministic: one CPU thread, every draw from one seeded generator.  Writes
``model.safetensors`` (weights, plus the mean and covariance of its features on
the 10k test images and their mirror images) and ``card.json`` (test accuracy,
recipe) to ``--output``.

    apt-get install dataset-fashion-mnist
    python examples/train_feature_classifier.py --output ttfm_distill/assets/fashion16_classifier
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ttfm_distill.data.fashion_mnist import load_fashion_mnist
from ttfm_distill.features import FashionFeatureNet, mirrored
from ttfm_distill.fileio import atomic_path, save_tensors
from ttfm_distill.metrics import gaussian_stats


@torch.no_grad()
def accuracy(net, images, labels, batch_size=2000) -> float:
    hits = sum(int((net(x).argmax(1) == y).sum()) for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return hits / len(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="ttfm_distill/assets/fashion16_classifier")
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = (torch.from_numpy(a) for a in load_fashion_mnist("train", resolution=16))
    test_x, test_y = (torch.from_numpy(a) for a in load_fashion_mnist("test", resolution=16))
    net = FashionFeatureNet(width=args.width)
    steps_per_epoch = len(train_x) // args.batch_size
    total = args.epochs * steps_per_epoch
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1)
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(train_x), generator=gen)
        for k in range(steps_per_epoch):
            idx = order[k * args.batch_size:(k + 1) * args.batch_size]
            x, y = train_x[idx], train_y[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x, x.flip(-1))
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {accuracy(net, test_x, test_y):.4f}, "
              f"{time.time() - t0:.0f}s", flush=True)
    net.eval()
    acc = accuracy(net, test_x, test_y)
    acc_mirror = accuracy(net, test_x.flip(-1), test_y)
    with torch.no_grad():
        mu, sigma = gaussian_stats(net.features(mirrored(test_x)).double())
    out = Path(args.output)
    tensors = {**{f"net.{k}": v for k, v in net.state_dict().items()},
               "stats.test_mu": mu.float(), "stats.test_sigma": sigma.float()}
    save_tensors(out / "model.safetensors", tensors)
    card = {
        "what": "feature classifier for ttfm-distill eval's Frechet distance (FD) on 16x16 Fashion-MNIST",
        "architecture": f"FashionFeatureNet: conv3x3(1->{args.width})-relu-maxpool, conv3x3({args.width}->{2 * args.width})"
                        f"-relu-maxpool, linear({2 * args.width * 16}->64) [features, pre-ReLU], relu, linear(64->10)",
        "config": net.config,
        "parameters": sum(p.numel() for p in net.parameters()),
        "test_accuracy": round(acc, 4),
        "test_accuracy_mirrored": round(acc_mirror, 4),
        "stats": "mean and covariance (float32) of the features of the 10k test images and their 10k mirror images",
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist), 60k train images, 16x16 in [-1, 1], random horizontal flips",
        "recipe": "python examples/train_feature_classifier.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "training_seconds": round(time.time() - t0, 1),
        "torch_threads": 1,
    }
    with atomic_path(out / "card.json") as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    print(f"test accuracy {acc:.4f} (mirrored {acc_mirror:.4f}); wrote {out}")


if __name__ == "__main__":
    main()

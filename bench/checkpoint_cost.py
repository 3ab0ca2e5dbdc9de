"""Checkpoint size, save time (with fsync) and load time for the seed CNN + Adam.

    python bench/checkpoint_cost.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cnn import checkpoint  # noqa: E402
from cnn.model import CNN  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    model = CNN()
    opt = torch.optim.Adam(model.parameters())
    F.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()  # Adam's moment buffers exist now, as in a real checkpoint
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "step": 0, "epoch": 0,
             "step_in_epoch": 0, "config": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        saves, loads = [], []
        for i in range(args.repeats):
            state["step"] = i
            t0 = time.perf_counter()
            path = checkpoint.save(state, tmp, keep=2)
            t1 = time.perf_counter()
            loaded = checkpoint.load(path, lambda sd: CNN().load_state_dict(sd))
            model.load_state_dict(loaded["model"])
            opt.load_state_dict(loaded["optimizer"])
            t2 = time.perf_counter()
            saves.append(t1 - t0)
            loads.append(t2 - t1)
        size = path.stat().st_size
    print(f"checkpoint {size / 2**20:.1f} MiB ({sum(p.numel() for p in model.parameters()):,} parameters + Adam moments); "
          f"save {min(saves) * 1e3:.0f} ms (median {sorted(saves)[len(saves) // 2] * 1e3:.0f}), "
          f"load + restore {min(loads) * 1e3:.0f} ms (median {sorted(loads)[len(loads) // 2] * 1e3:.0f})")


if __name__ == "__main__":
    main()

"""W&B cost per run (init + finish) and per logged step, in offline mode.

    python bench/wandb_overhead.py [--steps 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cnn.config import WandbConfig  # noqa: E402
from cnn.rundir import RunDir, record  # noqa: E402
from cnn.tracking import Tracker  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--mode", default="offline", choices=["offline", "disabled"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tracker = Tracker(RunDir(tmp), "a: 1\n", WandbConfig(mode=args.mode), {"a": 1}, group="")
        t1 = time.perf_counter()
        for step in range(1, args.steps + 1):
            tracker.log(record("train", step, 0, train_loss=1.0 / step, train_accuracy=0.5, lr=1e-3))
        t2 = time.perf_counter()
        tracker.finish()
        t3 = time.perf_counter()
    print(f"W&B {args.mode}: init {t1 - t0:.2f} s, finish {t3 - t2:.2f} s, "
          f"{(t2 - t1) / args.steps * 1e3:.3f} ms per logged step ({args.steps} steps)")


if __name__ == "__main__":
    main()

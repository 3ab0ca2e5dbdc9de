"""W&B cost per run (init + finish) and per logged step, in offline mode; and the CPU that
W&B's system metrics take.

    python bench/wandb_overhead.py [--steps 200]                 # init, finish, per logged step
    python bench/wandb_overhead.py --system-metrics 60 [--reps 2]
        # CPU time of W&B's own processes over 60 s of an open run, system metrics on vs off
        # (interleaved; the sampling interval is W&B's default, 15 s, unless WANDB__STATS_SAMPLING_INTERVAL is set)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cnn.config import WandbConfig  # noqa: E402
from cnn.rundir import RunDir, record  # noqa: E402
from cnn.tracking import Tracker  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    """Every process below `root` (W&B's wandb-core service and its helpers), from /proc."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds used so far by these processes (those still alive)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15 of stat)
        except (OSError, IndexError, ValueError):
            continue
    return total


def per_step(steps: int, mode: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tracker = Tracker(RunDir(tmp), "a: 1\n", WandbConfig(mode=mode), {"a": 1})
        t1 = time.perf_counter()
        for step in range(1, steps + 1):
            tracker.log(record("train", step, 0, train_loss=1.0 / step, train_accuracy=0.5, lr=1e-3))
        t2 = time.perf_counter()
        tracker.finish()
        t3 = time.perf_counter()
    print(f"W&B {mode}: init {t1 - t0:.2f} s, finish {t3 - t2:.2f} s, "
          f"{(t2 - t1) / steps * 1e3:.3f} ms per logged step ({steps} steps)")


def system_metrics_cpu(seconds: float, on: bool) -> float:
    """CPU seconds W&B's processes use per wall second of an open offline run (one record a second)."""
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(RunDir(tmp), "a: 1\n", WandbConfig(mode="offline", system_metrics=on), {"a": 1})
        time.sleep(2.0)  # past start-up
        pids = descendants(os.getpid())
        c0, t0, step = cpu_seconds(pids), time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            step += 1
            tracker.log(record("train", step, 0, train_loss=1.0 / step))
            time.sleep(1.0)
        used = (cpu_seconds(pids) - c0) / (time.perf_counter() - t0)
        tracker.finish()
    return used


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--mode", default="offline", choices=["offline", "disabled"])
    p.add_argument("--system-metrics", type=float, default=0, metavar="SECONDS",
                   help="measure W&B's CPU use over this many seconds, system metrics on vs off")
    p.add_argument("--reps", type=int, default=2, help="rounds of the on/off pair (interleaved)")
    args = p.parse_args()
    if not args.system_metrics:
        per_step(args.steps, args.mode)
        return
    used: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.reps):
        for on in (True, False):
            used[on].append(system_metrics_cpu(args.system_metrics, on))
    for on in (True, False):
        ms = [u * 1e3 for u in used[on]]
        print(f"system metrics {'on ' if on else 'off'}: W&B processes use {statistics.median(ms):.1f} ms CPU per "
              f"second (runs: {', '.join(f'{m:.1f}' for m in ms)})")
    extra = statistics.median(used[True]) - statistics.median(used[False])
    print(f"system metrics cost {extra * 1e3:.1f} ms CPU per second = {extra:.2%} of one core")


if __name__ == "__main__":
    main()

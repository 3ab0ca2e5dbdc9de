"""What the per-rank straggler figures (train.rank_stats, cnn.perf.RankStats) cost, measured
directly: training steps with and without its hooks, interleaved in blocks in one job, and
the window close (one all-gather) on its own.  A wall-clock A/B of whole runs cannot resolve
this on a shared machine (bench/ab.py: run-to-run noise of +-20% here).

    torchrun --standalone --nproc_per_node=2 bench/rank_stats_cost.py [--blocks 10 --block-steps 20]
    python bench/rank_stats_cost.py          # world size 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cnn import distributed, perf  # noqa: E402
from cnn.model import CNN  # noqa: E402
from cnn.perf import NullRankStats, RankStats  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=10, help="blocks per variant, interleaved")
    p.add_argument("--block-steps", type=int, default=20, help="training steps per block")
    p.add_argument("--batch", type=int, default=64, help="images per rank per step (the default run's on 2 ranks)")
    args = p.parse_args()
    d = distributed.setup("cpu")
    perf.keep_heap(True)  # as the trainer (train.keep_heap): else glibc's history decides the page faults
    try:
        torch.manual_seed(0)
        x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
        variants = {}
        for name in ("without", "with"):
            raw = CNN().to(memory_format=torch.channels_last)
            stats = RankStats(raw, d.device, d.world_size, lambda m: None) if name == "with" else NullRankStats()
            model = DDP(raw, gradient_as_bucket_view=True)  # the trainer's flags
            variants[name] = (model, torch.optim.Adam(raw.parameters()), stats)

        def block(name: str) -> float:
            model, opt, stats = variants[name]
            t0 = time.perf_counter()
            for _ in range(args.block_steps):
                F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
                stats.after_backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return (time.perf_counter() - t0) / args.block_steps * 1e3

        for name in variants:  # warm-up, and RankStats learns its last gradient
            block(name)
        ms = {name: [] for name in variants}
        for _ in range(args.blocks):
            for name in variants:
                ms[name].append(block(name))
        stats = variants["with"][2]
        param, n = next(variants["with"][0].module.parameters()), 10_000
        t0 = time.perf_counter()
        for _ in range(n):  # what one step adds on the host: the last gradient's hook and after_backward
            stats._on_grad(param)
            stats.after_backward()
        per_step_us = (time.perf_counter() - t0) / n * 1e6
        stats._steps = 0
        closes = []
        for _ in range(20):
            stats.after_backward()  # one step in the window, as close() requires
            t0 = time.perf_counter()
            stats.close(1.0, 0)
            closes.append((time.perf_counter() - t0) * 1e3)
        if d.is_main:
            a, b = statistics.median(ms["without"]), statistics.median(ms["with"])
            diffs = [w - wo for w, wo in zip(ms["with"], ms["without"])]
            print(f"world size {d.world_size}, {args.batch} images/rank/step, {args.blocks} x {args.block_steps} "
                  f"steps per variant, interleaved")
            print(f"step without RankStats: {a:.2f} ms (median block), with: {b:.2f} ms; per-block difference "
                  f"median {statistics.median(diffs):+.3f} ms (range {min(diffs):+.2f} to {max(diffs):+.2f})")
            print(f"instrumentation per step (hook + after_backward, {n} in a loop): {per_step_us:.1f} us "
                  f"= {per_step_us / 1e3 / a:.4%} of a step")
            print(f"window close (one all-gather + figures): median {statistics.median(closes):.3f} ms, "
                  f"max {max(closes):.3f} ms, once per train.log_every steps")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()

"""Side-by-side benchmark: the tutorial's pipeline vs ours, and 1 vs 2 ranks.

    python bench/benchmark.py            # full: time-to-99% for both (about 6 minutes on 2 cores)
    python bench/benchmark.py --quick    # seconds: throughput only, for CI

Runs, one after another in this process tree on this machine:
  (a) the tutorial's pipeline (bench/tutorial.py: DataLoader, batch 32, Adam 1e-3);
  (b) ours, default config, one process using every core;
  (c) ours under torchrun --nproc_per_node=1 and =2, one thread per rank: strong scaling
      (the same global batch of 128, so 64 per rank on 2 ranks) and weak scaling (128 per
      rank, global batch 256: the usual DDP way to add ranks).
For each: steady-state images/s (warm-up excluded), seconds of training to 99.0% test
accuracy (evaluated every ~15,000 images), achieved GFLOP/s and its fraction of a
matmul roofline measured here in the same run, peak resident memory per rank.
Prints a table with the ratios and writes the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cnn.model import TRAIN_FLOPS_PER_IMAGE  # noqa: E402
from cnn.perf import matmul_peak_gflops  # noqa: E402
from cnn.tracking import read_metrics  # noqa: E402

EVAL_IMAGES = 15_000  # evaluate about every 15k training images, in both pipelines


def sh(cmd: list[str], threads: int | None = None) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark step failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc.stdout


def ours(run_dir: Path, nproc: int | None, overrides: list[str], threads: int | None) -> dict:
    launch = [sys.executable, "train_ddp.py"] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_ddp.py"]
    sh([*launch, "--config", "configs/default.yaml", f"run.dir={run_dir}", "wandb.mode=disabled", *overrides], threads)
    summary = json.loads((run_dir / "summary.json").read_text())
    windows = [r["images_per_sec"] for r in read_metrics(run_dir) if "images_per_sec" in r and "event" not in r]
    steady = statistics.median(windows[1:] or windows)  # the first window holds the warm-up
    return {"images_per_sec": steady, "seconds_to_99": summary["seconds_to_99"],
            "test_accuracy": summary["test_accuracy"], "peak_rss_mb": summary["peak_rss_mb"],
            "train_seconds": summary["train_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description="tutorial pipeline vs mnist-ddp, side by side")
    p.add_argument("--quick", action="store_true", help="a few hundred steps each, no time-to-99 (CI)")
    p.add_argument("--root", default="datasets")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "benchmark.json")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    peak = {cores: matmul_peak_gflops(torch.device("cpu"), seconds=1.0)}
    torch.set_num_threads(1)
    peak[1] = matmul_peak_gflops(torch.device("cpu"), seconds=1.0)
    torch.set_num_threads(cores)

    steps = "train.max_steps=120" if args.quick else "train.max_steps=0"
    common = [f"data.root={args.root}", steps]
    eval_every = EVAL_IMAGES // 128
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tut = ["--root", args.root, "--epochs", "0.1" if args.quick else "3"]
        if not args.quick:
            tut += ["--eval-every", str(EVAL_IMAGES)]
        rows["tutorial"] = json.loads(sh([sys.executable, "bench/tutorial.py", *tut], cores).strip().splitlines()[-1])
        rows["ours"] = ours(Path(tmp) / "ours", None,
                            [*common, f"train.eval_every={0 if args.quick else eval_every}"], cores)
        scal = [*common, "train.threads=1", "train.eval_every=0"]
        if not args.quick:
            scal[1] = "train.max_steps=300"
        rows["ours_1rank"] = ours(Path(tmp) / "r1", 1, scal, 1)
        rows["ours_2rank"] = ours(Path(tmp) / "r2", 2, scal, 1)
        rows["ours_2rank_weak"] = ours(Path(tmp) / "r2w", 2, [*scal, "train.batch_size=256"], 1)
    for name, row in rows.items():
        roof = peak[1] * (2 if "2rank" in name else 1) if "rank" in name else peak[cores]
        row["gflops"] = row["images_per_sec"] * TRAIN_FLOPS_PER_IMAGE / 1e9
        row["roofline_gflops"] = roof
        row["mfu"] = row["gflops"] / roof
    ratios = {
        "ours/tutorial images_per_sec": rows["ours"]["images_per_sec"] / rows["tutorial"]["images_per_sec"],
        "2rank/1rank scaling efficiency": rows["ours_2rank"]["images_per_sec"] / (2 * rows["ours_1rank"]["images_per_sec"]),
        "2rank/1rank weak scaling efficiency": rows["ours_2rank_weak"]["images_per_sec"]
        / (2 * rows["ours_1rank"]["images_per_sec"]),
    }
    if rows["ours"]["seconds_to_99"] and rows["tutorial"]["seconds_to_99"]:
        ratios["tutorial/ours seconds_to_99"] = rows["tutorial"]["seconds_to_99"] / rows["ours"]["seconds_to_99"]

    print(f"matmul roofline: {peak[cores]:.0f} GFLOP/s on {cores} threads, {peak[1]:.0f} on 1 thread")
    print(f"{'pipeline':<15} {'images/s':>9} {'GFLOP/s':>8} {'MFU':>6} {'s to 99%':>9} {'test acc':>9} {'peak RSS MiB':>13}")
    for name, r in rows.items():
        t99 = f"{r['seconds_to_99']:.1f}" if r.get("seconds_to_99") else "-"
        acc = f"{r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else "-"
        print(f"{name:<15} {r['images_per_sec']:>9.0f} {r['gflops']:>8.1f} {r['mfu']:>6.1%} {t99:>9} {acc:>9} "
              f"{r['peak_rss_mb']:>13.0f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"quick": args.quick, "roofline_gflops": peak, "rows": rows, "ratios": ratios},
                                    indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

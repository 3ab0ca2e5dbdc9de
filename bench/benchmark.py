"""Side-by-side benchmark: the tutorial's pipeline vs ours, and 1 vs 2 ranks.

    python bench/benchmark.py            # full: time-to-99% for both (about 7 minutes on 2 cores)
    python bench/benchmark.py --quick    # about a minute: proves the script runs and computes its ratios (CI)

Runs, one after another in this process tree on this machine:
  (a) the tutorial's pipeline (bench/tutorial.py: DataLoader, batch 32, Adam 1e-3);
  (b) ours, default config, one process using every core;
  (c) ours under torchrun --nproc_per_node=1 and =2, one thread per rank: strong scaling
      (the same global batch of 128, so 64 per rank on 2 ranks) and weak scaling (128 per
      rank, global batch 256: the usual DDP way to add ranks); and, as the machine's own
      ceiling for two busy cores, two independent one-thread jobs at once (no communication).
For each: steady-state images/s (warm-up excluded), seconds of training to 99.0% test
accuracy (evaluated every 6,400 images), achieved GFLOP/s and its fraction of a
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
from cnn.rundir import read_metrics, read_summary  # noqa: E402
from data import mnist  # noqa: E402

QUICK_STEPS = 30  # --quick: three log windows of 10 steps, a median of the last two; no time-to-99
EVAL_IMAGES = 6_400  # evaluate every 6,400 training images (50 of our steps, 200 of the tutorial's), in both


def start(cmd: list[str], threads: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"benchmark step failed: {' '.join(proc.args)}\n{err[-2000:]}")
    return out


def sh(cmd: list[str], threads: int | None = None) -> str:
    return finish(start(cmd, threads))


def ours_cmd(run_dir: Path, nproc: int | None, overrides: list[str]) -> list[str]:
    launch = [sys.executable, "train_ddp.py"] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_ddp.py"]
    return [*launch, "--config", "configs/default.yaml", f"run.dir={run_dir}", "wandb.mode=disabled", *overrides]


def ours(run_dir: Path, nproc: int | None, overrides: list[str], threads: int | None) -> dict:
    sh(ours_cmd(run_dir, nproc, overrides), threads)
    return report(run_dir)


def independent_pair(run_dir: Path, overrides: list[str]) -> dict:
    """Two one-thread single-process jobs at the same time: what two busy cores give without DDP."""
    procs = [start(ours_cmd(run_dir / str(i), None, overrides), 1) for i in range(2)]
    for proc in procs:
        finish(proc)
    a, b = report(run_dir / "0"), report(run_dir / "1")
    return {"images_per_sec": a["images_per_sec"] + b["images_per_sec"], "seconds_to_99": None,
            "test_accuracy": None, "peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"]),
            "train_seconds": max(a["train_seconds"], b["train_seconds"])}


def report(run_dir: Path) -> dict:
    summary = read_summary(run_dir)
    windows = [r["images_per_sec"] for r in read_metrics(run_dir, "train")]
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
    try:  # every row reads MNIST from --root: a missing or damaged copy is one line, before any run
        if missing := mnist.verify(args.root):
            raise mnist.DataError(f"{mnist.raw_dir(args.root) / missing[0]} is missing: "
                                  f"run python -m data.prepare --root {args.root}")
    except mnist.DataError as exc:
        print(f"error: --root: {exc}", file=sys.stderr)
        sys.exit(2)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    roof_s = 0.2 if args.quick else 1.0
    peak = {cores: matmul_peak_gflops(torch.device("cpu"), seconds=roof_s)}
    torch.set_num_threads(1)
    peak[1] = matmul_peak_gflops(torch.device("cpu"), seconds=roof_s)
    torch.set_num_threads(cores)

    # the runs need no roofline of their own (this script measures it once); --quick evaluates 1,000 images
    quick = ["data.test_subset=1000", "train.log_every=10"] if args.quick else []
    steps = f"train.max_steps={QUICK_STEPS if args.quick else 0}"
    common = [f"data.root={args.root}", steps, "train.roofline=false", *quick]
    eval_every = EVAL_IMAGES // 128
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tut = ["--root", args.root, "--epochs", "0.05" if args.quick else "3"]
        if not args.quick:
            tut += ["--eval-every", str(EVAL_IMAGES)]
        rows["tutorial"] = json.loads(sh([sys.executable, "bench/tutorial.py", *tut], cores).strip().splitlines()[-1])
        rows["ours"] = ours(Path(tmp) / "ours", None,
                            [*common, f"train.eval_every={0 if args.quick else eval_every}"], cores)
        scal = [f"data.root={args.root}", f"train.max_steps={QUICK_STEPS if args.quick else 300}", "train.threads=1",
                "train.eval_every=0", "train.roofline=false", *quick]
        rows["ours_1rank"] = ours(Path(tmp) / "r1", 1, scal, 1)
        rows["ours_2rank"] = ours(Path(tmp) / "r2", 2, scal, 1)
        rows["ours_2rank_weak"] = ours(Path(tmp) / "r2w", 2, [*scal, "train.batch_size=256"], 1)
        rows["2x1rank_nodist"] = independent_pair(Path(tmp) / "pair", scal)
    for name, row in rows.items():
        # one-thread rows against the one-thread roofline, times the number of processes
        roof = peak[cores] if name in ("tutorial", "ours") else peak[1] * (1 if name == "ours_1rank" else 2)
        row["gflops"] = row["images_per_sec"] * TRAIN_FLOPS_PER_IMAGE / 1e9
        row["roofline_gflops"] = roof
        row["mfu"] = row["gflops"] / roof
    ratios = {
        "ours/tutorial images_per_sec": rows["ours"]["images_per_sec"] / rows["tutorial"]["images_per_sec"],
        "2rank/1rank scaling efficiency": rows["ours_2rank"]["images_per_sec"] / (2 * rows["ours_1rank"]["images_per_sec"]),
        "2rank/1rank weak scaling efficiency": rows["ours_2rank_weak"]["images_per_sec"]
        / (2 * rows["ours_1rank"]["images_per_sec"]),
        "machine ceiling: 2 independent jobs/2x1rank": rows["2x1rank_nodist"]["images_per_sec"]
        / (2 * rows["ours_1rank"]["images_per_sec"]),
        "DDP efficiency: 2rank_weak/2 independent jobs": rows["ours_2rank_weak"]["images_per_sec"]
        / rows["2x1rank_nodist"]["images_per_sec"],
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

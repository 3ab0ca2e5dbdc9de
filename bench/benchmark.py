"""Side-by-side benchmark: the tutorial's pipeline vs ours in each precision, and 1 vs 2 ranks.

    python bench/benchmark.py            # full: time-to-99% for each (about 8 minutes on 2 cores)
    python bench/benchmark.py --quick    # about a minute: proves the script runs and computes its ratios (CI)

Runs, one after another in this process tree on this machine:
  (a) the tutorial's pipeline (bench/tutorial.py: DataLoader, batch 32, Adam 1e-3, fp32);
  (b) ours, default config, one process using every core, once per precision: fp32 and
      bf16 on a CPU; fp32, bf16 and fp16 where a CUDA device is there (the rows then run on it);
  (c) ours on the CPU under torchrun --nproc_per_node=1 and =2, one thread per rank, in the
      precision `auto` picks: strong scaling (the same global batch of 128, so 64 per rank on
      2 ranks) and weak scaling (128 per rank, global batch 256: the usual DDP way to add
      ranks); and, as the machine's own ceiling for two busy cores, two independent
      one-thread jobs at once (no communication).
For each: steady-state images/s (warm-up excluded), training seconds and training images to
99.0% test accuracy (evaluated every 6,400 images), achieved GFLOP/s and its fraction of the
matmul roofline of the dtype the row computes in, measured here in the same run, and peak
resident memory per rank.  Prints a table with the ratios and writes the same figures as JSON.
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
from cnn.precision import DTYPES  # noqa: E402
from cnn.rundir import read_metrics, read_summary  # noqa: E402
from data import mnist  # noqa: E402

QUICK_STEPS = 9  # --quick: three log windows of 3 steps, a median of the last two; no time-to-99
EMULATED_STEPS = 15  # the full run's throughput-only row for a dtype this machine emulates
QUICK_BATCH = 32  # --quick: 32 images per global step (bf16 autocast on an AVX2 CPU trains ~100 images/s)
EVAL_IMAGES = 6_400  # evaluate every 6,400 training images (50 of our steps, 200 of the tutorial's), in both
DTYPE = {"fp32": torch.float32, **DTYPES}


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
    return {"precision": a["precision"], "images_per_sec": a["images_per_sec"] + b["images_per_sec"],
            "seconds_to_99": None, "images_to_99": None, "test_accuracy": None,
            "peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"]), "train_seconds": max(a["train_seconds"], b["train_seconds"])}


def report(run_dir: Path) -> dict:
    summary = read_summary(run_dir)
    windows = [r["images_per_sec"] for r in read_metrics(run_dir, "train")]
    steady = statistics.median(windows[1:] or windows)  # the first window holds the warm-up
    return {"precision": summary["precision"], "images_per_sec": steady, "seconds_to_99": summary["seconds_to_99"],
            "images_to_99": summary.get("images_to_99"), "test_accuracy": summary["test_accuracy"],
            "peak_rss_mb": summary["peak_rss_mb"], "train_seconds": summary["train_seconds"]}


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
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precisions = ("fp32", "bf16", "fp16") if cuda else ("fp32", "bf16")
    roof_s = 0.2 if args.quick else 1.0
    # rooflines: (b) per dtype on `device` with every core; (c) fp32 and bf16 on one CPU thread
    torch.set_num_threads(cores)
    peak = {("all", p): matmul_peak_gflops(device, DTYPE[p], seconds=roof_s) for p in precisions}
    torch.set_num_threads(1)
    for p in ("fp32", "bf16"):
        peak[(1, p)] = matmul_peak_gflops(torch.device("cpu"), DTYPE[p], seconds=roof_s)
    torch.set_num_threads(cores)

    def emulated(p: str) -> bool:
        return peak[("all", p)] < peak[("all", "fp32")]

    # the runs need no roofline of their own (this script measures it once); --quick evaluates 200 images
    # (in an emulated dtype, 1,000 would take ~4 s)
    batch = QUICK_BATCH if args.quick else 128
    quick = ["data.test_subset=200", f"train.log_every={QUICK_STEPS // 3}", f"train.batch_size={batch}"] \
        if args.quick else []
    steps = f"train.max_steps={QUICK_STEPS if args.quick else 0}"
    common = [f"data.root={args.root}", steps, "train.roofline=false", *quick]
    eval_every = 0 if args.quick else EVAL_IMAGES // batch
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tut = ["--root", args.root, "--epochs", "0.02" if args.quick else "3"]  # quick: 37 batches, 20 of warm-up
        if not args.quick:
            tut += ["--eval-every", str(EVAL_IMAGES)]
        rows["tutorial"] = {"precision": "fp32",
                            **json.loads(sh([sys.executable, "bench/tutorial.py", *tut], cores).strip().splitlines()[-1])}
        for p in precisions:
            # a dtype this machine only emulates (its matmuls slower than fp32's: bf16 on an AVX2 CPU
            # trains at ~100 images/s) gets a throughput row only, of EMULATED_STEPS steps
            short = [f"train.max_steps={EMULATED_STEPS}", "train.eval_every=0", "train.log_every=5"] \
                if emulated(p) and not args.quick else [f"train.eval_every={eval_every}"]
            rows[f"ours_{p}"] = ours(Path(tmp) / p, None, [*common, f"precision={p}", *short], cores)
        scal = [f"data.root={args.root}", "train.epochs=1", f"train.max_steps={QUICK_STEPS if args.quick else 300}",
                "train.threads=1", "device=cpu", "train.eval_every=0", "train.roofline=false", *quick]
        rows["ours_1rank"] = ours(Path(tmp) / "r1", 1, scal, 1)
        rows["ours_2rank"] = ours(Path(tmp) / "r2", 2, scal, 1)
        rows["ours_2rank_weak"] = ours(Path(tmp) / "r2w", 2, [*scal, f"train.batch_size={2 * batch}"], 1)
        rows["2x1rank_nodist"] = independent_pair(Path(tmp) / "pair", scal)
    for name, row in rows.items():
        # one-thread rows against the one-thread roofline of their dtype, times the number of processes
        procs = 1 if name == "ours_1rank" else 2
        roof = peak[(1, row["precision"])] * procs if name.startswith(("ours_1", "ours_2", "2x1")) else \
            peak[("all", row["precision"])]
        row["gflops"] = row["images_per_sec"] * TRAIN_FLOPS_PER_IMAGE / 1e9
        row["roofline_gflops"] = roof
        row["mfu"] = row["gflops"] / roof
    ratios = {
        "ours/tutorial images_per_sec (both fp32)": rows["ours_fp32"]["images_per_sec"] / rows["tutorial"]["images_per_sec"],
        **{f"{p}/fp32 images_per_sec": rows[f"ours_{p}"]["images_per_sec"] / rows["ours_fp32"]["images_per_sec"]
           for p in precisions[1:]},
        "2rank/1rank scaling efficiency": rows["ours_2rank"]["images_per_sec"] / (2 * rows["ours_1rank"]["images_per_sec"]),
        "2rank/1rank weak scaling efficiency": rows["ours_2rank_weak"]["images_per_sec"]
        / (2 * rows["ours_1rank"]["images_per_sec"]),
        "machine ceiling: 2 independent jobs/2x1rank": rows["2x1rank_nodist"]["images_per_sec"]
        / (2 * rows["ours_1rank"]["images_per_sec"]),
        "DDP efficiency: 2rank_weak/2 independent jobs": rows["ours_2rank_weak"]["images_per_sec"]
        / rows["2x1rank_nodist"]["images_per_sec"],
    }
    for p in precisions[1:]:
        if rows["ours_fp32"]["seconds_to_99"] and rows[f"ours_{p}"]["seconds_to_99"]:
            ratios[f"fp32/{p} seconds_to_99"] = rows["ours_fp32"]["seconds_to_99"] / rows[f"ours_{p}"]["seconds_to_99"]
    if rows["ours_fp32"]["seconds_to_99"] and rows["tutorial"]["seconds_to_99"]:
        ratios["tutorial/ours seconds_to_99 (both fp32)"] = (rows["tutorial"]["seconds_to_99"]
                                                            / rows["ours_fp32"]["seconds_to_99"])

    where = torch.cuda.get_device_name() if cuda else f"{cores} threads"
    print("matmul roofline, GFLOP/s: " + ", ".join(
        f"{p} {peak[('all', p)]:.0f} on {where}" for p in precisions) + "; " + ", ".join(
        f"{p} {peak[(1, p)]:.0f} on 1 thread" for p in ("fp32", "bf16")))
    print(f"{'pipeline':<15} {'prec':>5} {'images/s':>9} {'GFLOP/s':>8} {'MFU':>6} {'s to 99%':>9} "
          f"{'img to 99%':>11} {'test acc':>9} {'peak RSS MiB':>13}")
    for name, r in rows.items():
        t99 = f"{r['seconds_to_99']:.1f}" if r.get("seconds_to_99") else "-"
        i99 = f"{r['images_to_99']:,}" if r.get("images_to_99") else "-"
        acc = f"{r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else "-"
        print(f"{name:<15} {r['precision']:>5} {r['images_per_sec']:>9.0f} {r['gflops']:>8.1f} {r['mfu']:>6.1%} "
              f"{t99:>9} {i99:>11} {acc:>9} {r['peak_rss_mb']:>13.0f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    for p in filter(emulated, precisions[1:]):
        print(f"note: {p} matmuls run at {peak[('all', p)]:.0f} GFLOP/s here, below fp32's {peak[('all', 'fp32')]:.0f} "
              f"(emulated: no native {p}), so the ours_{p} row ran {QUICK_STEPS if args.quick else EMULATED_STEPS} steps "
              "for its throughput only and its MFU against that roofline says little")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    roofline = {f"{p}@{threads}": v for (threads, p), v in peak.items()}
    args.json.write_text(json.dumps({"quick": args.quick, "roofline_gflops": roofline, "rows": rows, "ratios": ratios},
                                    indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

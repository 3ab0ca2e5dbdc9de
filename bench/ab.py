"""Interleaved A/B(/C...) of trainer overrides: what does a switch cost in throughput?

    python bench/ab.py --nproc 2 --reps 3 --steps 200 -- "" "train.rank_stats=false" "wandb.system_metrics=false"

Each variant is a space-separated list of overrides on configs/default.yaml ("" = the default
run, W&B offline as configured).  Every round runs each variant once, in turn, so a shared
machine's drift hits all of them alike; the report gives each variant's images/s over the
whole run (median and range over rounds) and its per-round ratio to the first variant.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cnn.rundir import read_summary  # noqa: E402


def run_once(run_dir: Path, nproc: int, steps: int, overrides: list[str]) -> float:
    launch = [sys.executable, "train_ddp.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_ddp.py"]
    cmd = [*launch, "--config", "configs/default.yaml", f"run.dir={run_dir}", f"train.max_steps={steps}", *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true",
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return read_summary(run_dir)["images_per_sec"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help='override lists, e.g. "" "train.rank_stats=false"')
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun) per run; 1 = python train_ddp.py")
    p.add_argument("--reps", type=int, default=3, help="rounds")
    p.add_argument("--steps", type=int, default=0, help="train.max_steps (0 = the default config's full epoch)")
    args = p.parse_args()
    ips: list[list[float]] = [[] for _ in args.variants]
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.reps):
            for i, variant in enumerate(args.variants):
                ips[i].append(run_once(Path(tmp) / f"{rnd}-{i}", args.nproc, args.steps, shlex.split(variant)))
                print(f"round {rnd + 1} {variant or '(default)'}: {ips[i][-1]:.0f} img/s", flush=True)
    print(f"\n{args.nproc} rank(s), {args.steps or 'all'} steps, {args.reps} interleaved rounds:")
    for i, variant in enumerate(args.variants):
        ratios = [v / base for v, base in zip(ips[i], ips[0])]
        print(f"  {variant or '(default)':32s} {statistics.median(ips[i]):6.0f} img/s "
              f"(range {min(ips[i]):.0f}-{max(ips[i]):.0f}), vs first: median x{statistics.median(ratios):.3f} "
              f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()

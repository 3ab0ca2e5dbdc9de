"""Per-seed sample efficiency of a recipe: images until the test accuracy first reads >= 99%,
and the final accuracy, over several seeds of the trainer itself.

    python bench/seeds.py                              # the default config, seeds 0-4 (~5 minutes on 2 cores)
    python bench/seeds.py --seeds 3 -- optim.muon_lr=0  # any overrides after --, e.g. Adam alone

Each seed is one `python train_ddp.py --config configs/default.yaml` process (every core,
W&B off), evaluated on all 10,000 test images every --eval-every steps.  The global batches
are the same at every world size (data/sharding.py), so one process reads what torchrun
would, up to dropout masks and reduction order.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cnn.progress import TARGET_ACCURACY  # noqa: E402
from cnn.rundir import read_metrics, read_summary  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description="images to 99% and final accuracy per seed")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--eval-every", type=int, default=25, help="optimizer steps between evaluations")
    p.add_argument("--root", default="datasets")
    p.add_argument("overrides", nargs="*", help="trainer overrides (key=value), after --")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            run_dir = Path(tmp) / str(seed)
            cmd = [sys.executable, "train_ddp.py", "--config", "configs/default.yaml", f"data.root={args.root}",
                   f"run.dir={run_dir}", "wandb.mode=disabled", "train.roofline=false", f"seed={seed}",
                   f"train.eval_every={args.eval_every}", *args.overrides]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"seed {seed} failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
            s = read_summary(run_dir)
            evals = read_metrics(run_dir, "eval", "epoch")
            first = next((r["step"] for r in evals if r["test_accuracy"] >= TARGET_ACCURACY), None)
            rows.append({"seed": seed, "step_to_99": first, "images_to_99": s["images_to_99"],
                         "final": s["test_accuracy"], "train_seconds": s["train_seconds"]})
            print(f"seed {seed}: 99% first at step {first} ({s['images_to_99']} images), final "
                  f"{s['test_accuracy']:.4f}, {s['train_seconds']:.1f} s training", flush=True)
    print(f"\noverrides: {' '.join(args.overrides) or '(none: the default config)'}")
    print("| seed | images to 99% | final test accuracy |\n|---:|---:|---:|")
    for r in rows:
        i99 = f"{r['images_to_99']:,}" if r["images_to_99"] else "not reached"
        print(f"| {r['seed']} | {i99} | {r['final']:.2%} |")
    reached = [r["images_to_99"] for r in rows if r["images_to_99"]]
    median = f"{statistics.median(reached):,.0f}" if len(reached) == len(rows) else "-"
    print(f"median images to 99%: {median}; final >= 99.0% in {sum(r['final'] >= 0.99 for r in rows)}/{len(rows)} seeds")


if __name__ == "__main__":
    main()

"""Offline figures from a run folder, without W&B: training curves and a prediction grid.

    python -m cnn.plot runs/<id>        # writes loss.png, accuracy.png, predictions.png there

Needs matplotlib (pip install -e '.[plot]').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnn.rundir import METRICS, PLOTS, PREDICTIONS, RunDir

GRID = (4, 8)  # rows x columns of test images in predictions.png


def curves(run: RunDir, plt) -> list[Path]:
    train, evals = run.read_metrics("train"), run.read_metrics("eval", "epoch")
    written = []
    for metric in ("loss", "accuracy"):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r[f"train_{metric}"] for r in train], label=f"train {metric}")
        ax.plot([r["step"] for r in evals], [r[f"test_{metric}"] for r in evals], "o-", label=f"test {metric}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        if metric == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run.file(PLOTS[metric]), dpi=100)
        plt.close(fig)
        written.append(run.file(PLOTS[metric]))
    return written


def prediction_grid(run: RunDir, plt) -> Path:
    from data import mnist

    images, labels = mnist.load(run.read_config()["data"]["root"], train=False)
    preds = run.read_predictions()
    rows, cols = GRID
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.4))
    for i, ax in enumerate(axes.flat):
        ax.imshow(images[i].numpy(), cmap="gray")
        ok = int(preds[i]) == int(labels[i])
        ax.set_title(f"{int(preds[i])} / {int(labels[i])}", fontsize=9, color="black" if ok else "red")
        ax.axis("off")
    fig.suptitle("predicted / true")
    fig.tight_layout()
    out = run.file(PLOTS["predictions"])
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    run = RunDir(args.run_dir)
    if not run.file(METRICS).is_file():
        print(f"error: {args.run_dir} has no {METRICS} (not a run folder?)", file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: matplotlib is needed: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    try:
        written = curves(run, plt)
        if run.file(PREDICTIONS).is_file():
            written.append(prediction_grid(run, plt))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # a damaged run folder or data.root
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        print(f"error: {args.run_dir}: cannot draw this run ({type(exc).__name__}: {detail})", file=sys.stderr)
        return 1
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

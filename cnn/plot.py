"""Offline figures from a run folder, without W&B: training curves and a prediction grid.

    python -m cnn.plot runs/<id>        # writes loss.png, accuracy.png, predictions.png there

Needs matplotlib (pip install -e '.[plot]').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cnn.tracking import read_metrics

GRID = (4, 8)  # rows x columns of test images in predictions.png


def curves(run_dir: Path, plt) -> list[Path]:
    recs = read_metrics(run_dir)
    train = [r for r in recs if "train_loss" in r and "event" not in r]
    evals = [r for r in recs if "test_accuracy" in r]
    written = []
    for metric, name in (("loss", "loss.png"), ("accuracy", "accuracy.png")):
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
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(run_dir / name)
    return written


def prediction_grid(run_dir: Path, plt) -> Path:
    from data import mnist

    root = OmegaConf.load(run_dir / "config.yaml").data.root
    images, labels = mnist.load(root, train=False)
    preds = torch.load(run_dir / "predictions.pt", weights_only=True)
    rows, cols = GRID
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.4))
    for i, ax in enumerate(axes.flat):
        ax.imshow(images[i].numpy(), cmap="gray")
        ok = int(preds[i]) == int(labels[i])
        ax.set_title(f"{int(preds[i])} / {int(labels[i])}", fontsize=9, color="black" if ok else "red")
        ax.axis("off")
    fig.suptitle("predicted / true")
    fig.tight_layout()
    out = run_dir / "predictions.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir} has no metrics.jsonl (not a run folder?)", file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: matplotlib is needed: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    written = curves(args.run_dir, plt)
    if (args.run_dir / "predictions.pt").is_file():
        written.append(prediction_grid(args.run_dir, plt))
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs side by side without W&B: the config keys that differ, the key results, overlay plots.

    python -m cnn.compare runs/a runs/b [runs/c ...] [--out DIR]     # DIR defaults to ./compare

Writes DIR/compare.md (both tables and the figures) and DIR/accuracy.png (test accuracy
against step and against training seconds), DIR/loss.png (train loss, the same two ways)
and DIR/throughput.png (images/s per log window), and prints the tables.  Runs may differ
in world size (steps count global batches, the same at every world size), be unfinished
(results then come from metrics.jsonl) or restarted (one curve per run: each step once,
the latest attempt's record).  Plots need matplotlib (pip install -e '.[plot]').
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from cnn.files import write_atomic
from cnn.progress import TARGET_ACCURACY
from cnn.rundir import RunDir

IGNORED_KEYS = ("run.dir",)  # differs between any two runs: the runs' labels say it
JOB_SKIPPED = ("event", "step", "epoch")  # the start record's bookkeeping, not facts about the job


@dataclass
class Run:
    label: str
    path: Path
    config: dict[str, Any]  # flattened: "optim.lr" -> 0.004, and the start record's facts: "job.world_size" -> 2
    summary: dict[str, Any]  # {} for an unfinished run
    facts: dict[str, Any]  # the latest start record
    train: list[dict[str, Any]] = field(default_factory=list)  # one per step, step order
    evals: list[dict[str, Any]] = field(default_factory=list)  # "eval" and "epoch" records, one per step


class CompareError(ValueError):
    """A folder that is not a run, or too few runs: a one-line message."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def one_per_step(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each step once, the last record written for it (a restarted attempt's), in step order."""
    latest = {int(r["step"]): r for r in records}
    return [latest[s] for s in sorted(latest)]


def with_seconds(train: list[dict[str, Any]], global_batch: int) -> list[dict[str, Any]]:
    """Fill train_seconds (training time so far) where a run predates it: from each window's
    images (steps x global batch) and images/s."""
    seconds, prev, out = 0.0, 0, []
    for r in train:
        if "train_seconds" in r:
            seconds = r["train_seconds"]
        elif r.get("images_per_sec"):
            seconds += (r["step"] - prev) * global_batch / r["images_per_sec"]
        out.append({**r, "train_seconds": seconds})
        prev = r["step"]
    return out


def load(path: Path, label: str) -> Run:
    run = RunDir(path)
    if not run.is_run():
        raise CompareError(f"{path} is not a run folder (no config.yaml and metrics.jsonl)")
    records = run.read_metrics()
    starts = [r for r in records if r["event"] == "start"]
    summary = run.read_summary() if run.has_summary() else {}
    facts = {**(starts[-1] if starts else {}), **summary}
    config = flatten(run.read_config())
    batch = int(facts.get("global_batch_size") or config.get("train.batch_size", 0))
    # what the job was (world size, launcher, threads, device, commit...) differs as much as its config
    config.update({f"job.{k}": v for k, v in (starts[-1] if starts else {}).items() if k not in JOB_SKIPPED})
    train = with_seconds(one_per_step(r for r in records if r["event"] == "train"), batch)
    evals = one_per_step(r for r in records if r["event"] in ("eval", "epoch") and "test_accuracy" in r)
    for r in evals:  # eval records of older runs carry no train_seconds: the train window at or before them
        if "train_seconds" not in r:
            before = [t["train_seconds"] for t in train if t["step"] <= r["step"]]
            r["train_seconds"] = before[-1] if before else 0.0
    return Run(label, path, config, summary, facts, train, evals)


def labels(paths: list[Path]) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell them apart."""
    for depth in range(1, 1 + max(len(p.resolve().parts) for p in paths)):
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config} - set(IGNORED_KEYS))
    return [k for k in keys if len({repr(r.config.get(k, "(absent)")) for r in runs}) > 1]


def results(run: Run) -> dict[str, Any]:
    """The key figures of a run: from summary.json when it finished, else from its metrics."""
    s, f, accs = run.summary, run.facts, [r["test_accuracy"] for r in run.evals]
    reached = [r["train_seconds"] for r in run.evals if r["test_accuracy"] >= TARGET_ACCURACY]
    gpu = [r["gpu_mem_peak_mb"] for r in run.train if "gpu_mem_peak_mb" in r]
    rss = [r["rss_peak_mb"] for r in run.train if "rss_peak_mb" in r]
    return {
        "world size": f.get("world_size"),
        "precision": f.get("precision"),
        "steps": s.get("steps", run.train[-1]["step"] if run.train else None),
        "final acc": s.get("test_accuracy", accs[-1] if accs else None),
        "best acc": s.get("best_test_accuracy", max(accs) if accs else None),
        "s to 99%": s["seconds_to_99"] if "seconds_to_99" in s else (reached[0] if reached else None),
        "train s": s.get("train_seconds", run.train[-1]["train_seconds"] if run.train else None),
        "images/s": s.get("images_per_sec"),
        "MFU": s.get("mfu") if f.get("peak_gflops") else None,  # no roofline measured: no MFU
        "peak RSS MiB": s.get("peak_rss_mb", max(rss) if rss else None),
        "peak GPU MiB": s.get("peak_gpu_mb", max(gpu) if gpu else None),
        "finished": "yes" if s else "no",
    }


def _fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key in ("final acc", "best acc"):
        return f"{v:.4f}"
    if key == "MFU":
        return f"{v:.1%}"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
    return str(v)


def _cell(v: Any, width: int = 40) -> str:
    text = (f"{v:.6g}" if isinstance(v, float) else str(v)).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def tables(runs: list[Run], keys: list[str]) -> str:
    """Markdown: the differing config keys and job facts (a row per key), then the results (a row per run)."""
    head = "| key | " + " | ".join(r.label for r in runs) + " |\n|---|" + "---|" * len(runs) + "\n"
    diff = "".join(f"| `{k}` | " + " | ".join(_cell(r.config.get(k, "(absent)")) for r in runs) + " |\n"
                   for k in keys) or "| (none) |" + " |" * len(runs) + "\n"
    res = [results(r) for r in runs]
    cols = [c for c in res[0] if c != "peak GPU MiB" or any(x[c] is not None for x in res)]
    table = "| run | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    table += "".join(f"| {r.label} | " + " | ".join(_fmt(c, x[c]) for c in cols) + " |\n" for r, x in zip(runs, res))
    return f"### Config keys and job facts that differ\n\n{head}{diff}\n### Results\n\n{table}"


def plots(runs: list[Run], out: Path, plt) -> list[Path]:
    def overlay(name: str, panels: list[tuple[str, str, Callable[[Run], list], str, str]], log: bool = False) -> Path:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (title, xkey, recs, ykey, style) in zip(axes[0], panels):
            for run in runs:
                rows = recs(run)
                ax.plot([r[xkey] for r in rows], [r[ykey] for r in rows], style, label=run.label, markersize=3)
            ax.set_title(title)
            ax.set_xlabel({"step": "optimizer step (global batches)", "train_seconds": "training seconds"}[xkey])
            ax.grid(alpha=0.3)
            if log:
                ax.set_yscale("log")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    evals, train = (lambda r: r.evals), (lambda r: r.train)
    return [
        overlay("accuracy.png", [("test accuracy", "step", evals, "test_accuracy", "o-"),
                                 ("test accuracy", "train_seconds", evals, "test_accuracy", "o-")]),
        overlay("loss.png", [("train loss", "step", train, "train_loss", "-"),
                             ("train loss", "train_seconds", train, "train_loss", "-")], log=True),
        overlay("throughput.png", [("images/s per log window", "step", train, "images_per_sec", "-")]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])  # prog: python -m cnn.compare, or mnist-ddp compare
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders (run.dir of each run)")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="where to write compare.md and the PNGs")
    args = parser.parse_args(argv)
    paths = list(dict.fromkeys(p.resolve() for p in args.run_dirs))  # the same folder twice is one run
    try:
        if len(paths) < 2:
            raise CompareError(f"compare needs at least 2 different run folders, got {len(paths)}")
        runs = [load(p, label) for p, label in zip(paths, labels(paths))]
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable config.yaml / summary.json / metrics.jsonl
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = tables(runs, differing_keys(runs))
    print(text, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figures = plots(runs, args.out, plt)
    except ImportError:
        print("warning: matplotlib is not installed, no plots (pip install -e '.[plot]')", file=sys.stderr)
    runs_list = "".join(f"- **{r.label}**: `{r.path}`\n" for r in runs)
    images = "".join(f"![{p.stem}]({p.name})\n\n" for p in figures)
    md = write_atomic(args.out / "compare.md", f"# Runs compared\n\n{runs_list}\n{text}\n{images}")
    print("\n".join(str(p) for p in [md, *figures]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

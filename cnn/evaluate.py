"""Distributed evaluation: every test image counted exactly once, at any world size.

``evaluate()`` is what the trainer runs; ``main()`` is ``mnist-ddp evaluate CKPT|RUN_DIR``,
the same function on a saved checkpoint, under ``python`` or ``torchrun`` at any
world size:

    mnist-ddp evaluate runs/<id>                                  # newest checkpoint, test split
    torchrun --standalone --nproc_per_node=2 -m cnn.cli evaluate runs/<id> --split train
    mnist-ddp evaluate runs/<id>/checkpoints/step-00000468.pt data.root=/data precision=fp32

The model settings come from the checkpoint (``cnn.inference.load_model``), and so do
the settings that decide its numerics (eval batch, memory format, and the precision the
run computed in: ``precision=auto``, the default, means the run's, not this machine's
choice), so the final checkpoint's accuracy equals the run's summary.json
``test_accuracy`` when both count the whole split.  The report names the precision used
and why.  It prints accuracy, loss, per-class accuracy and the
confusion matrix, and writes them to eval.json in the checkpoint's run folder (or
--out).  Exit codes as the trainer's: 0 done, 1 error, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cnn import config, console, distributed, precision, rundir
from cnn.checkpoint import CheckpointError
from cnn.config import Config, ConfigError
from cnn.inference import Trained, load_model
from data import mnist
from data.sharding import DeviceDataset, eval_shard


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    count: int  # test images evaluated, over all ranks
    predictions: torch.Tensor | None = None  # this rank's shard, if asked for


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: DeviceDataset,
    rank: int,
    world_size: int,
    batch_size: int,
    autocast: Callable[[], ContextManager],
    keep_predictions: bool = False,
) -> EvalResult:
    """Run the raw (un-wrapped) model in eval mode over this rank's contiguous shard.

    Loss and correct counts are summed in float64 and all-reduced; the shards
    are disjoint and cover the set, so nothing is padded or counted twice.
    """
    start, stop = eval_shard(len(data), rank, world_size)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=data.labels.device)  # loss, correct, count
    preds = []
    for i in range(start, stop, batch_size):
        x, y = data.images[i : min(i + batch_size, stop)], data.labels[i : min(i + batch_size, stop)]
        with autocast():
            logits = model(x)
        pred = logits.argmax(dim=1)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1] += (pred == y).sum()
        sums[2] += y.numel()
        if keep_predictions:
            preds.append(pred)
    model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss, correct, count = sums.tolist()
    count = int(count)
    return EvalResult(
        loss=loss / max(1, count),
        accuracy=correct / max(1, count),
        count=count,
        predictions=torch.cat(preds) if keep_predictions and preds else None,
    )


# ---------------------------------------------------------------- metrics of the gathered predictions


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """int64 classes x classes: row = true class, column = predicted class."""
    return torch.bincount(labels.long() * classes + preds.long(), minlength=classes * classes).view(classes, classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Recall of each class: its diagonal entry over its row (0 for a class with no images)."""
    rows = confusion.sum(dim=1)
    return (confusion.diagonal().double() / rows.clamp(min=1)).tolist()


# ---------------------------------------------------------------- `mnist-ddp evaluate`

# The overrides evaluate takes; everything else (model.*) is the checkpoint's.
EVAL_KEYS = ("device", "precision", "data.root", "data.download", "data.test_subset", "data.train_subset",
             "train.eval_batch_size", "train.channels_last", "train.threads", "dist.timeout_s", "dist.data_timeout_s")
# What evaluate keeps of the run's config: the model, what decides the numerics of the run's own
# evaluation (so the accuracies agree), and where the data was.  The subsets are not kept:
# evaluate counts the whole split unless told otherwise.  Not the config's precision (`auto`
# there is what was asked): the precision the run computed in, Trained.precision.
FROM_CHECKPOINT = ("model", "device", "data.root", "data.download", "train.eval_batch_size",
                   "train.channels_last", "dist")


def eval_config(saved: Config, overrides: Sequence[str]) -> Config:
    """The checkpoint's FROM_CHECKPOINT settings <- overrides of EVAL_KEYS; raises ConfigError.
    Its precision is `auto` unless overridden: the run's (``run_evaluation`` resolves it)."""
    full, base = config.to_dict(saved), {}
    for key in FROM_CHECKPOINT:
        *parents, leaf = key.split(".")
        src, dst = full, base
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[leaf] = src[leaf]
    # world size 1: the training-only checks (global batch divisible by the ranks) do not apply
    return config.build(overrides=overrides, base=base, allowed=EVAL_KEYS, world_size=1)


def report_text(r: dict[str, Any]) -> str:
    """What evaluate prints: the figures, per-class accuracy and the confusion matrix."""
    classes = range(len(r["per_class_accuracy"]))
    lines = [
        f"{r['checkpoint']} (step {r['step']}), {r['split']} split: {r['count']} images on {r['world_size']} "
        f"rank(s), {r['device']}, {r['precision']}, {r['seconds']:.1f} s",
        f"precision {r['precision']}: {r['precision_reason']}",
        f"accuracy {r['accuracy']:.4f}   loss {r['loss']:.4f}",
        "class     " + "".join(f"{c:>7}" for c in classes),
        "accuracy  " + "".join(f"{a:>7.4f}" for a in r["per_class_accuracy"]),
        "images    " + "".join(f"{sum(row):>7}" for row in r["confusion_matrix"]),
        "confusion matrix (rows: true digit, columns: predicted digit)",
        "          " + "".join(f"{c:>7}" for c in classes),
    ]
    lines += [f"{c:>10}" + "".join(f"{n:>7}" for n in row) for c, row in enumerate(r["confusion_matrix"])]
    return "\n".join(lines)


def run_evaluation(trained: Trained, cfg: Config, d: distributed.Dist, split: str) -> dict[str, Any]:
    """Evaluate on every rank; the report (on every rank) from all ranks' predictions."""
    distributed.set_cpu_threads(cfg.train.threads, d)
    error = distributed.once_per_node(lambda: mnist.ensure(cfg.data.root, cfg.data.download, log=console.say),
                                      d.local_rank, cfg.dist.data_timeout_s)
    if error:
        raise mnist.DataError(error)
    train = split == "train"
    subset_key = "data.train_subset" if train else "data.test_subset"
    images, labels = mnist.load(cfg.data.root, train, cfg.data.train_subset if train else cfg.data.test_subset)
    if len(labels) < d.world_size:  # same numbers on every rank: all stop here, none waits
        raise ConfigError(f"{subset_key}: {len(labels)} {split} image(s) for {d.world_size} ranks; "
                          "every rank needs at least one")
    data = DeviceDataset.from_uint8(images, labels, d.device, cfg.train.channels_last)
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = trained.model.to(d.device, memory_format=layout)
    name, why = precision.for_trained(cfg.precision, trained.precision, trained.precision_source)
    prec = precision.build(name, d.device, why)
    start = time.perf_counter()
    result = evaluate(model, data, d.rank, d.world_size, cfg.train.eval_batch_size, prec.autocast,
                      keep_predictions=True)
    shards: list = [None] * d.world_size
    dist.all_gather_object(shards, result.predictions.cpu())  # rank order = data order
    confusion = confusion_matrix(labels, torch.cat(shards))
    return {
        "checkpoint": str(trained.path), "step": trained.step, "split": split, "count": result.count,
        "accuracy": result.accuracy, "loss": result.loss, "per_class_accuracy": per_class_accuracy(confusion),
        "confusion_matrix": confusion.tolist(), "world_size": d.world_size, "device": str(d.device),
        "precision": prec.name, "precision_reason": prec.reason, "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-ddp evaluate",
        description="Evaluate a checkpoint (or a run folder's newest) on the whole test or train split, under "
                    "python or torchrun at any world size. Model settings come from the checkpoint.",
        epilog=config.keys_epilog(EVAL_KEYS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CKPT|RUN_DIR", help="a checkpoint file, or a run folder (its newest)")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="which MNIST split (default test)")
    parser.add_argument("--out", type=Path, help="the JSON report (default: eval.json in the checkpoint's run folder)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings (see below), applied last")
    try:
        args, overrides = config.split_argv(parser, argv, EVAL_KEYS)
        trained = load_model(args.checkpoint)
        cfg = eval_config(trained.config, overrides)
    except ConfigError as exc:
        console.error(exc, prefix="config error")
        return 2
    except CheckpointError as exc:
        console.error(exc)
        return 1
    try:
        d = distributed.setup(cfg.device, cfg.dist.timeout_s)
    except ValueError as exc:
        console.error(exc)
        return 2
    try:
        report = run_evaluation(trained, cfg, d, args.split)
        out = console.make_console(d.is_main)
        out.info(report_text(report))
        if d.is_main:  # one file, one writer
            target = args.out or rundir.of_checkpoint(trained.path).file(rundir.eval_name(args.split))
            out.info(f"wrote {rundir.write_json(target, report)}")
        return 0
    except ConfigError as exc:
        console.error(exc, prefix="config error")
        return 2
    except (mnist.DataError, CheckpointError, OSError) as exc:
        console.error(exc)
        return 1
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())

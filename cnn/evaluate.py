"""Distributed evaluation: every test image counted exactly once, at any world size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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

"""The DDP wrapper, with its gradient buckets in their final layout before the first real step."""

from __future__ import annotations

from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def wrap(model: torch.nn.Module, device: torch.device, sample: torch.Tensor,
         autocast: Callable[[], ContextManager]) -> DDP:
    """`model` in DDP (gradients as bucket views), then one silent backward on `sample` so that
    every training step, the first one of a process included, all-reduces in the same bucket
    layout (collective). Changes no weight, no optimizer state, no RNG stream.

    Why: DDP reduces a process's first backward in its *initial* bucket layout (parameters in
    reverse registration order) and then rebuilds the buckets once, in the order gradients became
    ready (reducer.hpp `rebuild_buckets`: "only rebuilt once"), at the next forward: from the
    second backward on the layout is the final one (measured, torch 2.14 CPU gloo, 3 ranks:
    tests/test_ddp.py). gloo's ring all-reduce sums each element of three or more ranks in an order
    set by its offset in the bucket, so a job restarted at step k ran step k+1 in another layout
    than the uninterrupted job did, and lost bitwise equality at world size >= 3 (two ranks' sum
    is exact in any order). With the layout settled here, step 1 and a resumed step k+1 are
    reduced like every other step. Cost: one forward and backward pass of one batch at start-up.

    Not static_graph=True (used until 2026-12-04): it helps where parameters go unused or the
    backward is reentrant (activation checkpointing), neither here, and it cost 20 host-side ops
    every backward (a `select` and a `_local_scalar_dense` per parameter: 212 -> 192 ops a step in
    fp32, tests/test_ops.py); under it the first backward only records the graph, and the layout
    settled from the third.
    """
    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
    )
    if dist.get_world_size() > 1:
        settle_buckets(ddp, sample, autocast)
    return ddp


SETTLING_BACKWARDS = 1  # records the gradient-ready order; the next forward rebuilds the buckets


def settle_buckets(ddp: DDP, sample: torch.Tensor, autocast: Callable[[], ContextManager]) -> None:
    """SETTLING_BACKWARDS forward and backward passes of a zero loss through `ddp` (all ranks:
    their all-reduces are collectives), after which DDP has rebuilt its buckets in their final
    layout; the gradients they leave are dropped and the RNG streams (dropout) restored."""
    devices = [sample.device] if sample.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for _ in range(SETTLING_BACKWARDS):
            with autocast():
                loss = ddp(sample).float().sum() * 0.0
            loss.backward()
    for p in ddp.module.parameters():
        p.grad = None

"""The DDP wrapper, with its gradient buckets in their final layout before the first real step."""

from __future__ import annotations

from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def wrap(model: torch.nn.Module, device: torch.device, sample: torch.Tensor,
         autocast: Callable[[], ContextManager]) -> DDP:
    """`model` in DDP (gradients as bucket views, static graph), then one silent backward on
    `sample` so that every training step, the first one of a process included, all-reduces in the
    same bucket layout (collective). Changes no weight, no optimizer state, no RNG stream.

    Why: DDP reduces a process's first backwards in its *initial* bucket layout (parameters in
    reverse registration order) and then rebuilds the buckets once, in the order gradients became
    ready (reducer.hpp `rebuild_buckets`: "only rebuilt once"); under static_graph the first
    backward only records the graph and reduces every bucket at its end, so the new layout is used
    from the third backward on (measured, torch 2.14 CPU gloo, 3 ranks: a process's backwards 1
    and 2 reduce identically, 3 onward differently, and stay). gloo's ring all-reduce sums each
    element of three or more ranks in an order set by its offset in the bucket, so a job restarted
    at step k ran steps k+1, k+2 in another layout than the uninterrupted job did, and lost bitwise
    equality at world size >= 3 (two ranks' sum is exact in any order). With the layout settled
    here, step 1 and a resumed step k+1 are reduced like every other step. Cost: two forward and
    backward passes of one batch at start-up.
    """
    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
        static_graph=True,  # same graph every step: lets DDP skip per-step unused-parameter search
    )
    if dist.get_world_size() > 1:
        settle_buckets(ddp, sample, autocast)
    return ddp


SETTLING_BACKWARDS = 2  # under static_graph: the graph is recorded, then the gradient-ready order


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

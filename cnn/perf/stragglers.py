"""Per-rank timing: each rank's compute and wait time per step, and the straggler warning."""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from cnn.perf.window import memory_mb


STRAGGLER_RATIO = 1.2  # a rank whose compute time per step exceeds the other ranks' median by 20% ...


STRAGGLER_WINDOWS = 3  # ... for this many consecutive log windows gets a warning


class Stragglers:
    """Which rank, if any, has been slower than the others' median by `ratio` for `windows` log
    windows in a row.  The others' median, not everyone's: with two ranks it is the other rank.

    Pure: `update` returns the rank to warn about once, when its streak reaches `windows`
    (a new streak, or another rank, warns again)."""

    def __init__(self, ratio: float = STRAGGLER_RATIO, windows: int = STRAGGLER_WINDOWS) -> None:
        self.ratio, self.windows = ratio, windows
        self.rank, self.streak = -1, 0

    @staticmethod
    def slowest(compute_ms: list[float]) -> tuple[int, float]:
        """(the slowest rank, the median of the other ranks' times; its own time if alone)."""
        rank = max(range(len(compute_ms)), key=compute_ms.__getitem__)
        others = compute_ms[:rank] + compute_ms[rank + 1:]
        return rank, statistics.median(others) if others else compute_ms[rank]

    def update(self, compute_ms: list[float]) -> int | None:
        rank, median = self.slowest(compute_ms)
        if median > 0 and compute_ms[rank] > self.ratio * median:
            self.streak = self.streak + 1 if rank == self.rank else 1
            self.rank = rank
        else:
            self.rank, self.streak = -1, 0
        return self.rank if self.streak == self.windows else None


class NullRankStats:
    """train.rank_stats=false: no hooks, no gather, no fields."""

    def after_backward(self) -> None: ...

    def close(self, seconds: float, step: int) -> dict[str, Any]:
        return {}


class RankStats(NullRankStats):
    """Each rank's own compute time and its time blocked in DDP's gradient all-reduce, per log
    window, gathered to every rank in one small all-gather (no per-step collective).

    DDP overlaps the all-reduce with backward, and a fast rank's waiting for a slow one is
    hidden inside `backward()`.  What is measured, per step:
      wait    = from the moment this rank's last gradient is ready (a post-accumulate-grad
                hook) to the return of backward(), which DDP holds until every bucket's
                all-reduce is done: the last bucket's transfer plus any waiting for slower
                ranks.  Host clock on CPU (gloo blocks the host there); CUDA events on a GPU
                (NCCL blocks the stream, not the host: the events time the stream's stall);
      compute = step time (the window's Clock / its steps) - wait: the rank's own work
                (data slicing, forward, backward, optimizer, logging).
    The slowest rank is the one with the largest compute; it waits least.  Waiting in the
    few other collectives (the stop check every 10 steps, DDP's one-time bucket rebuild in an
    early forward, a checkpoint's) counts as compute.  `close` returns min/median/max over
    ranks, the slowest rank and its host and the largest rank's memory (memory_mb), and warns
    on rank 0's console about a straggler (Stragglers).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, world_size: int, warn: Callable[[str], None],
                 delay_ms: float = 0.0) -> None:
        self.device, self.world_size, self.warn = device, world_size, warn
        self.cuda = device.type == "cuda"
        self.delay_s = delay_ms / 1e3  # a rehearsed straggler (train.debug_delay_ms), on this rank only
        hosts: list[Any] = [None] * world_size
        dist.all_gather_object(hosts, socket.gethostname())  # once, at start-up
        self.hosts: list[str] = hosts
        self.stragglers = Stragglers()
        self._ready: Any = None
        self._pairs: list[tuple[Any, Any]] = []  # CUDA: (last gradient ready, backward returned) events per step
        self._wait_s, self._steps, self._delayed = 0.0, 0, False
        # Every parameter is hooked for the first backward, to learn which gradient comes last
        # (the order is fixed: the same graph every step); after it only that one stays hooked.
        self._last: torch.Tensor | None = None
        self._handles = {id(p): p.register_post_accumulate_grad_hook(self._on_grad)
                         for p in model.parameters() if p.requires_grad}

    def _stamp(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # on the current stream: the autograd thread's, the forward's stream
            return event
        return time.perf_counter()

    def _on_grad(self, param: torch.Tensor) -> None:
        if self.delay_s and not self._delayed:  # in backward: the others wait in the all-reduce, as for a real straggler
            self._delayed = True
            time.sleep(self.delay_s)
        self._last = param
        self._ready = self._stamp()

    def after_backward(self) -> None:
        """Call right after backward() returns: closes this step's wait."""
        end = self._stamp()
        if self._ready is not None:
            if self.cuda:
                self._pairs.append((self._ready, end))
            else:
                self._wait_s += end - self._ready
        self._ready, self._steps = None, self._steps + 1
        self._delayed = False
        if len(self._handles) > 1 and self._last is not None:
            for key in [k for k in self._handles if k != id(self._last)]:
                self._handles.pop(key).remove()

    def close(self, seconds: float, step: int) -> dict[str, Any]:
        """The window's figures over all ranks (collective); `seconds` is this rank's window time."""
        if self._steps == 0:
            return {}
        if self.cuda:  # the window's close has synchronized the stream: every event has completed
            self._wait_s = sum(a.elapsed_time(b) for a, b in self._pairs) / 1e3
        step_ms = seconds * 1e3 / self._steps
        wait_ms = min(self._wait_s * 1e3 / self._steps, step_ms)
        mem = memory_mb(self.device)
        mine = torch.tensor([step_ms - wait_ms, wait_ms, *mem.values()], dtype=torch.float64, device=self.device)
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine)
        table = torch.stack(rows).cpu().tolist()
        self._pairs, self._wait_s, self._steps = [], 0.0, 0
        compute, wait = [r[0] for r in table], [r[1] for r in table]
        slowest = max(range(self.world_size), key=compute.__getitem__)
        figures: dict[str, Any] = {}
        for name, values in (("compute", compute), ("wait", wait)):
            figures.update({f"rank_{name}_ms_min": min(values), f"rank_{name}_ms_median": statistics.median(values),
                            f"rank_{name}_ms_max": max(values)})
        figures.update(slowest_rank=slowest, slowest_host=self.hosts[slowest])
        figures.update({key: max(r[2 + i] for r in table) for i, key in enumerate(mem)})
        if self.stragglers.update(compute) is not None:
            _, others = Stragglers.slowest(compute)
            self.warn(f"straggler: rank {slowest} on {self.hosts[slowest]} computes {compute[slowest]:.1f} ms/step, "
                      f"{compute[slowest] / others - 1:.0%} above the other ranks' median {others:.1f} ms, for "
                      f"{self.stragglers.windows} log windows (to step {step}); they wait for it")
        return figures


def make_rank_stats(enabled: bool, model: torch.nn.Module, device: torch.device, world_size: int,
                    warn: Callable[[str], None], delay_ms: float = 0.0) -> NullRankStats:
    """RankStats on every rank (all take part in its gather), or the no-op on every rank when switched off.
    `warn` is rank 0's console (a no-op elsewhere); `delay_ms` slows this rank (train.debug_delay_ms, for tests)."""
    return RankStats(model, device, world_size, warn, delay_ms) if enabled else NullRankStats()

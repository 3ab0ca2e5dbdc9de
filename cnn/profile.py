"""A torch.profiler trace of a few training steps, on every rank (train.profile_steps=[START,END]).

    python train_ddp.py train.profile_steps=[20,22]

Each rank records global steps START..END (counted from 1, inclusive): CPU operators, and
CUDA kernels on a GPU, with input shapes and memory.  It writes
run.dir/profile/rank<R>.pt.trace.json (Chrome trace JSON: open it in https://ui.perfetto.dev
or chrome://tracing); rank 0 prints the operators with the most self time and attaches the
traces to the W&B run.  The recorded steps run slower than the others (the profiler's own
cost) and so does their log window's images/s: pick steps after the first few (warm-up) and
read throughput from other windows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity

from cnn import console
from cnn.files import write_atomic
from cnn.rundir import RunDir

TOP_OPS = 12  # operators printed by self time


def activities(device_type: str) -> list[ProfilerActivity]:
    """CPU always; CUDA kernels too when training on a GPU."""
    return [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device_type == "cuda" else [ProfilerActivity.CPU]


def top_operators(averages: Sequence[Any], device_type: str, n: int = TOP_OPS) -> str:
    """A table of the `n` operators with the most self time (device time on CUDA, else CPU time).

    `averages` is prof.key_averages(): events with key, count and self_*_time_total in microseconds.
    ``self_device_time_total`` is the name since torch 2.4 (2.11 maps sort_by="...cuda..." onto it)."""
    attr, clock = ("self_device_time_total", "CUDA") if device_type == "cuda" else ("self_cpu_time_total", "CPU")
    rows = sorted(averages, key=lambda e: getattr(e, attr), reverse=True)[:n]
    total = sum(getattr(e, attr) for e in averages) or 1.0
    lines = [f"{'self ms':>9} {'share':>6} {'calls':>6}  operator (self {clock} time)"]
    lines += [f"{getattr(e, attr) / 1e3:9.2f} {getattr(e, attr) / total:6.1%} {e.count:6d}  {e.key}" for e in rows]
    return "\n".join(lines)


class NullProfiler:
    """No train.profile_steps: nothing to do."""

    def step(self, step: int) -> None: ...


class Profiler(NullProfiler):
    def __init__(self, first: int, last: int, run: RunDir, rank: int, device: torch.device, out: console.NullConsole,
                 tracker) -> None:
        self.first, self.last = first, last
        self.run, self.rank, self.device, self.out, self.tracker = run, rank, device, out, tracker
        self.prof: torch.profiler.profile | None = None

    def step(self, step: int) -> None:
        """Call after global step `step` (counted from 1) is done, and once with the resumed step before the loop."""
        if step == self.first - 1:
            if self.device.type == "cpu":  # kineto's only message there is a spurious "gpuGetDeviceCount failed"
                os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            self.prof = torch.profiler.profile(activities=activities(self.device.type), record_shapes=True,
                                               profile_memory=True)
            self.prof.start()
        elif step == self.last and self.prof is not None:
            self._finish()

    def _finish(self) -> None:
        prof, self.prof = self.prof, None
        prof.stop()
        path = self.run.profile_trace(self.rank)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            try:
                prof.export_chrome_trace(tmp)
                with open(tmp, "rb") as src:
                    write_atomic(path, lambda f: shutil.copyfileobj(src, f))
            finally:
                os.unlink(tmp)
        except OSError as exc:  # a trace is not worth the run: say so and carry on
            console.warn(f"profiler trace not written ({exc})")
        self.out.info(f"profile of steps {self.first}-{self.last} (rank 0), traces in {self.run.profile_dir}:\n"
                      + top_operators(prof.key_averages(), self.device.type))
        dist.barrier()  # every rank has written its trace (all reach this step together)
        self.tracker.attach_profile(self.run.profile_traces())


def make_profiler(steps: Sequence[int], total_steps: int, start_step: int, run: RunDir, rank: int,
                  device: torch.device, out: console.NullConsole, tracker) -> NullProfiler:
    """A Profiler for train.profile_steps, already started if its first step is the next one; a
    NullProfiler when none is asked for or the steps lie outside what this attempt runs."""
    if not steps:
        return NullProfiler()
    first, last = steps[0], min(steps[1], total_steps)
    if first <= start_step or first > total_steps:
        out.warn(f"train.profile_steps={list(steps)}: outside steps {start_step + 1}-{total_steps} of this attempt; "
                 f"no profile")
        return NullProfiler()
    prof = Profiler(first, last, run, rank, device, out, tracker)
    prof.step(start_step)
    return prof

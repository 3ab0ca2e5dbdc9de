"""Training windows (loss, accuracy and images between log points, reduced over the ranks) and memory."""

from __future__ import annotations

import math
import resource

import torch
import torch.distributed as dist

from cnn.perf.clock import Clock


def memory_mb(device: torch.device) -> dict[str, float]:
    """This process's memory so far, MiB: peak resident set (ru_maxrss, KiB on Linux) and, on
    CUDA, torch's peak and current allocation.  Peaks are never reset here: other readers
    (the summary) rely on the whole run's peak."""
    mem = {"rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        mem["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        mem["gpu_mem_mb"] = torch.cuda.memory_allocated(device) / 2**20
    return mem


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """The largest peak memory of any rank, MiB (collective): resident set, and torch's GPU
    allocation on CUDA (None on CPUs)."""
    mine = memory_mb(device)
    t = torch.tensor([mine["rss_peak_mb"], mine.get("gpu_mem_peak_mb", 0.0)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    rss, gpu = t.tolist()
    return {"peak_rss_mb": rss, "peak_gpu_mb": gpu if device.type == "cuda" else None}


class Window:
    """Train loss and accuracy summed on the device between log points: no host sync per step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.steps = 0
        self.clock = Clock(device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.detach().float()
        self.correct += (logits.argmax(dim=1) == y).sum()
        self.steps += 1

    def close(self, world_size: int, global_batch: int) -> tuple[float, float, int, float]:
        """(mean train loss, accuracy, images, seconds) over all ranks since the last close (collective).

        Raises FloatingPointError on a non-finite loss, on every rank alike."""
        sums = torch.stack([self.loss, self.correct.float()])
        dist.all_reduce(sums)  # the whole job's figures, not rank 0's
        loss = sums[0].item() / (self.steps * world_size)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss}) in the last {self.steps} steps")
        acc, images = sums[1].item() / (self.steps * global_batch), self.steps * global_batch
        seconds = self.clock.seconds()
        self.loss.zero_(), self.correct.zero_()
        self.steps = 0
        return loss, acc, images, seconds

    def restart_clock(self) -> None:
        """Evaluation and checkpointing are not training time."""
        self.clock.restart()

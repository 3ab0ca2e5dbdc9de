"""Throughput accounting: a matmul roofline measured on the spot, MFU, training windows, memory."""

from __future__ import annotations

import math
import resource
import time

import torch
import torch.distributed as dist

from cnn.model import TRAIN_FLOPS_PER_IMAGE


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Elapsed training time: CUDA events on a GPU (device time, no host-side jitter),
    perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.restart()

    def restart(self) -> None:
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.start.elapsed_time(end) / 1e3
        return time.perf_counter() - self.t0


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.6) -> float:
    """Achieved GFLOP/s of a large square matmul on this process's threads / device.

    The compute roofline that MFU is measured against: measured, not a data-sheet
    figure, so it reflects this machine's clocks and thread settings.
    """
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    sync(device)
    best = 0.0
    for _ in range(3):  # best of three: a shared machine only ever makes it slower
        iters, t0 = 0, time.perf_counter()
        while True:
            a @ b
            iters += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds / 3:
                break
        best = max(best, 2 * n**3 * iters / elapsed / 1e9)
    return best


def throughput(images: int, seconds: float, peak_gflops: float) -> dict[str, float]:
    """images/s, achieved GFLOP/s (forward + backward) and its share of the roofline."""
    ips = images / seconds if seconds > 0 else 0.0
    gflops = ips * TRAIN_FLOPS_PER_IMAGE / 1e9
    return {
        "images_per_sec": ips,
        "gflops": gflops,
        "mfu": gflops / peak_gflops if peak_gflops > 0 else 0.0,
    }


def job_peak_gflops(device: torch.device, dtype: torch.dtype, measure: bool = True) -> float:
    """The job's roofline: the sum of every rank's measured peak (each rank's share of the
    machines); 0 when not measured (train.roofline=false: MFU is then reported as 0)."""
    peak = torch.tensor([matmul_peak_gflops(device, dtype) if measure else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(peak)
    return float(peak.item())


def peak_rss_mb(device: torch.device) -> float:
    """The largest peak resident memory of any rank, in MiB (collective)."""
    t = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class SyncCheck:
    """train.sync_debug: proof that the loop never waits for the GPU between log points.

    ``forbid()`` at the top of each step turns any host-device synchronisation into an
    error (``torch.cuda.set_sync_debug_mode("error")``: blocking copies, ``.item()`` of a
    device tensor, ``torch.cuda.synchronize``); ``allow()`` at a log, eval or checkpoint
    point lifts it.  Armed at the first log point, so one-time warm-up (DDP's first
    steps, torch.compile) is not counted.  A no-op on CPU or when off.  torch.distributed
    collectives are not covered by the debug mode; the stop check uses a CPU tensor on a
    gloo group (cnn.distributed.StopRequest.agreed).
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled, self.armed = enabled and device.type == "cuda", False

    def forbid(self) -> None:
        if self.armed:
            torch.cuda.set_sync_debug_mode("error")

    def allow(self) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
            self.armed = True


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

"""Throughput accounting: a matmul roofline measured on the spot, and MFU."""

from __future__ import annotations

import time

import torch

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

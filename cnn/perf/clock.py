"""The device's clock: a synchronize where it matters, and CUDA-event (or wall) timing of training windows."""

from __future__ import annotations

import time

import torch



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

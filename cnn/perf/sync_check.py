"""train.sync_debug: a host-device synchronisation between log points raises."""

from __future__ import annotations


import torch



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

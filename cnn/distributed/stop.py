"""SIGTERM (torchrun, SLURM) and Ctrl-C, acted on at step boundaries where every rank agrees on them."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist


class StopRequest:
    """SIGTERM (torchrun, SLURM) and Ctrl-C, read at step boundaries where all ranks agree on them.

    The first SIGINT acts like SIGTERM: every rank stops at the same agreed step with a
    checkpoint.  A second SIGINT exits at once (code 130, one line, no traceback); it is
    acted on when the main thread next runs Python code, i.e. within a step, or once a
    collective that waits on a hung peer times out.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0  # the strongest stop signal received (SIGTERM > SIGINT)
        self.announce = announce  # print the Ctrl-C hint (launch rank 0 only: one line per job)
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame) -> None:
        # Repeated SIGTERMs are expected (slurmstepd and the torchrun agent may both forward
        # one); torchrun and SLURM escalate to SIGKILL themselves if we never reach a boundary.
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                _write_stderr("second interrupt: exiting now, without a checkpoint\n")
                os._exit(128 + signal.SIGINT)  # at once: no finally blocks, no collectives, no traceback
            if self.announce and self.signum == 0:
                _write_stderr("interrupt: all ranks will stop at the next stop check (every few steps) and "
                              "save a checkpoint; press Ctrl-C again to exit at once without one\n")
        self.signum = max(self.signum, signum)

    def agreed(self, group) -> int:
        """The stop signal any rank received (0: carry on); the same value on every rank (collective).

        A CPU tensor on a gloo group: the host takes part in a tiny all-reduce (~0.1 ms on one
        node) while the GPU keeps working through its queue; no device copy, no .item() of a
        device tensor, so the training loop never waits for the GPU here.
        """
        t = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())


def _write_stderr(msg: str) -> None:
    # os.write, not print: a signal handler may run while the main thread is inside a write
    # to sys.stderr, and re-entering the buffered writer raises.
    try:
        os.write(2, msg.encode())
    except OSError:
        pass

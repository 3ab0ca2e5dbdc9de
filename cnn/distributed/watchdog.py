"""A rank that stops making progress ends itself, with every thread's stack in its log."""

from __future__ import annotations

import faulthandler
import os
import threading
import time

GRACE_S = 5.0  # past the collective timeout: a healthy rank waiting on a hung peer times out first
POLL_S = 1.0
EXIT_CODE = 1
# where the stacks and lines go: the process's stderr itself, not sys.stderr, which may not be a file
# (a notebook's, pytest's capture, a wrapper): faulthandler then raised io.UnsupportedOperation on
# the watchdog's thread, which died and watched nothing
STDERR_FD = 2


class Watchdog:
    """Fed at every step boundary (``beat()``: one clock read and one assignment); when
    ``timeout_s + GRACE_S`` pass without a beat, a thread prints one line and every thread's
    Python stack to stderr and ends the process (exit 1) -- the stack of a hung rank, which the
    launcher's SIGKILL would never show, and an end within about dist.timeout_s + 6 s instead of
    torchrun's 30 s grace on top.

    The peers of a hung rank wait in a collective that times out after timeout_s and report it in
    one line (cnn.distributed.failures): GRACE_S lets them go first.  A hang that holds the GIL
    (a C extension that never releases it) stops this thread too; faulthandler's own C thread,
    re-armed from this thread at each beat it sees, then dumps and exits a few seconds later.
    ``NullWatchdog`` (dist.watchdog=false) does nothing: for breakpoints and debuggers.
    """

    def __init__(self, timeout_s: float, rank: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> None:
        self.rank, self.poll_s, self.grace_s = rank, poll_s, grace_s
        self.timeout_s = timeout_s
        self.step: int | None = None  # the last step boundary seen (for the line)
        self.deadline = time.monotonic() + timeout_s + grace_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mnist-ddp-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int | None = None, allowance_s: float | None = None) -> None:
        """Progress: the next beat is due within timeout_s (or `allowance_s`, for slow work)."""
        self.step = step if step is not None else self.step
        self.deadline = time.monotonic() + (self.timeout_s if allowance_s is None else allowance_s) + self.grace_s

    def set_timeout(self, timeout_s: float) -> None:
        """From the next beat on (after the first step's warm-up allowance)."""
        self.timeout_s = timeout_s

    def stop(self) -> None:
        self._stopped.set()
        faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        armed = None
        while not self._stopped.wait(self.poll_s):
            deadline, now = self.deadline, time.monotonic()
            if now > deadline:
                self._fire(now - deadline + self.timeout_s + self.grace_s)
            if deadline != armed:  # the C-level backstop, should this thread never run again
                faulthandler.dump_traceback_later(deadline - now + 3 * self.poll_s, exit=True, file=STDERR_FD)
                armed = deadline

    def _fire(self, idle_s: float) -> None:
        where = f"after step {self.step}" if self.step is not None else "before the first step"
        _write(f"rank {self.rank}: no progress for {idle_s:.0f} s ({where}; dist.timeout_s {self.timeout_s:g} "
               f"+ {self.grace_s:g} s): this rank is hung. Every thread's stack follows; exiting "
               f"({EXIT_CODE}). dist.watchdog=false turns this off (for debuggers).\n")
        faulthandler.dump_traceback(file=STDERR_FD, all_threads=True)
        _write(f"rank {self.rank}: watchdog exit\n")
        os._exit(EXIT_CODE)


class NullWatchdog:
    """dist.watchdog=false: no thread, nothing ends the process."""

    timeout_s = 0.0

    def beat(self, step: int | None = None, allowance_s: float | None = None) -> None:
        pass

    def set_timeout(self, timeout_s: float) -> None:
        pass

    def stop(self) -> None:
        pass


def make_watchdog(enabled: bool, timeout_s: float, rank: int) -> Watchdog | NullWatchdog:
    return Watchdog(timeout_s, rank) if enabled else NullWatchdog()


def _write(msg: str) -> None:
    try:
        os.write(STDERR_FD, msg.encode())
    except OSError:
        pass

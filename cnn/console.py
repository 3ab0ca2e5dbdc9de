"""What the job prints: one console on global rank 0, a null console elsewhere.

``Console`` prints job-level lines once (a progress bar on a terminal, plain
one-line records in logs such as SLURM's), ``NullConsole`` swallows them, so the
training code never asks which rank it is on.  ``error`` and ``warn`` are for
what one process has to say about itself (a bad config, a failed file), and
print on whichever rank calls them.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def _emit(msg: str, stream) -> None:
    tqdm.write(msg, file=stream)  # above a live progress bar, plain print otherwise
    stream.flush()


def say(msg: str) -> None:
    _emit(msg, sys.stdout)


def note(msg: str) -> None:
    """Information on stderr, for a command whose stdout is its data (predict's JSON or CSV)."""
    _emit(msg, sys.stderr)


def warn(msg: str) -> None:
    _emit(f"warning: {msg}", sys.stderr)


def error(msg: object, prefix: str = "error") -> None:
    _emit(f"{prefix}: {msg}", sys.stderr)


class NullConsole:
    """What ranks other than 0 get: every call does nothing."""

    def info(self, msg: str) -> None: ...
    def warn(self, msg: str) -> None: ...
    def start(self, total: int, initial: int) -> None: ...
    def advance(self) -> None: ...
    def status(self, line: str, **postfix: Any) -> None: ...
    def close(self) -> None: ...


class Console(NullConsole):
    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def info(self, msg: str) -> None:
        say(msg)

    def warn(self, msg: str) -> None:
        warn(msg)

    def start(self, total: int, initial: int) -> None:
        """A progress bar over the optimizer steps, on a terminal only."""
        if sys.stdout.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def status(self, line: str, **postfix: Any) -> None:
        """A periodic record: the bar's postfix on a terminal, `line` in a log."""
        if self.bar is not None:
            self.bar.set_postfix(**postfix)
        else:
            say(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def make_console(is_main: bool) -> NullConsole:
    return Console() if is_main else NullConsole()

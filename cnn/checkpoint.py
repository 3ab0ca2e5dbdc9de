"""Atomic checkpoints and resume.

Global rank 0 writes ``<run.dir>/checkpoints/step-XXXXXXXX.pt``: temp file in
the same folder, flush + fsync, ``os.replace``, fsync of the folder; then only
the newest ``keep`` are kept.  A kill at any moment leaves the previous
checkpoint intact.

Rank 0 also reads them and broadcasts the state to the other ranks, so nodes
that do not share a filesystem resume too.

The dropout masks are seeded from (seed, step, rank) at every step (see
``train_ddp.step_seed``), and the data order is a pure function of (seed, epoch),
so a checkpoint needs no RNG state to continue identically.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

FORMAT_VERSION = 1
PATTERN = re.compile(r"^step-(\d{8})\.pt$")
REQUIRED = ("format_version", "model", "optimizer", "scaler", "step", "epoch", "step_in_epoch", "config")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def folder(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def path_for(run_dir: str | os.PathLike, step: int) -> Path:
    return folder(run_dir) / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in run_dir, newest (highest step) first."""
    d = folder(run_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if PATTERN.match(p.name)), reverse=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: dict[str, Any], run_dir: str | os.PathLike, keep: int) -> Path:
    """Write state atomically as step-<state['step']>.pt and prune to `keep` files."""
    d = folder(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = path_for(run_dir, state["step"])
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{final.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(d)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return final


def load(path: str | os.PathLike, check_model: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Read and validate one checkpoint; raises CheckpointError naming the file.

    check_model(state_dict) should raise if the weights do not fit the model
    (a checkpoint of another model); its message is folded into ours.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, not a torch file at all
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt ({first})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"{path}: not an mnist-ddp checkpoint (missing keys)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {state['format_version']} is newer than this code's {FORMAT_VERSION}; upgrade mnist-ddp"
        )
    if check_model is not None:
        try:
            check_model(state["model"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).splitlines()[0][:160]
            raise CheckpointError(f"{path}: weights do not fit this model ({first})") from None
    return state


def find_resume(
    resume: str, run_dir: str | os.PathLike, check_model: Callable[[dict], None] | None, warn: Callable[[str], None]
) -> dict[str, Any] | None:
    """The state to resume from, following checkpoint.resume (auto | never | a path)."""
    if resume == "never":
        return None
    if resume != "auto":
        return load(resume, check_model)  # an explicit path must be good: no silent fallback
    for path in list_checkpoints(run_dir):
        try:
            return load(path, check_model)
        except CheckpointError as exc:
            warn(f"skipping {exc}; trying an older checkpoint")
    return None

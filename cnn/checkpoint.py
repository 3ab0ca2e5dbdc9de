"""Checkpoints: atomic writes on global rank 0, validation, and the resume policy.

Global rank 0 writes ``<run.dir>/checkpoints/step-XXXXXXXX.pt`` through
``cnn.files.write_atomic`` (temp file, fsync, rename, fsync of the folder), then
keeps only the newest ``checkpoint.keep``: a kill at any moment leaves the
previous checkpoint intact.  Other ranks hold a ``NullSaver``.

``resume()`` is the policy: rank 0 picks the checkpoint (``checkpoint.resume``:
auto | never | a path), validates it (readable, ours, not newer, weights that fit
the model, a config that matches where it must), and broadcasts it, so nodes that
do not share a filesystem resume too.  Dropout masks are seeded from (seed, step,
rank) at every step (``data.sharding.step_seed``) and the data order is a pure
function of (seed, epoch), so a checkpoint needs no RNG state to continue
identically.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from cnn import distributed
from cnn.files import write_atomic
from cnn.model import CNN

FORMAT_VERSION = 1
PATTERN = re.compile(r"^step-(\d{8})\.pt$")
REQUIRED = ("format_version", "model", "optimizer", "scaler", "step", "epoch", "step_in_epoch", "config")
# Config keys that must match between a checkpoint and the run resuming from it:
# anything else would silently make a different training run.
RESUME_MUST_MATCH = ("seed", "model", "optim", "data.train_subset", "train.batch_size", "train.epochs")


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


def save(state: dict[str, Any], run_dir: str | os.PathLike, keep: int) -> Path:
    """Write state atomically as step-<state['step']>.pt and prune to `keep` files."""
    final = write_atomic(path_for(run_dir, state["step"]),
                         lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))
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


def check_config(saved: dict[str, Any], now: dict[str, Any], source: str) -> None:
    """Refuse to resume a different training run: the RESUME_MUST_MATCH keys must be equal."""
    for key in RESUME_MUST_MATCH:
        a, b = saved, now
        for part in key.split("."):
            a, b = a.get(part), b.get(part)
        if a != b:
            raise CheckpointError(
                f"{source}: {key} was {a} when saved but is {b} now; use a new run.dir or checkpoint.resume=never"
            )


def fits_model(state_dict: dict) -> None:
    """Raise if the weights are not the seed CNN's (for load()'s check_model)."""
    CNN().load_state_dict(state_dict)


def resume(resume_from: str, config: dict[str, Any], run_dir: Path, is_main: bool,
           warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The checkpoint state this run continues from, on every rank (None: start fresh).

    Rank 0 picks, reads and validates it, then broadcasts it (or its error, which
    every rank raises as CheckpointError): nodes need not share a filesystem.
    """
    payload: dict[str, Any] | str | None = None
    if is_main:
        try:
            payload = find_resume(resume_from, run_dir, fits_model, warn)
            if payload is not None:
                check_config(payload["config"], config, str(resume_from if resume_from != "auto" else run_dir))
        except CheckpointError as exc:
            payload = str(exc)
    payload = distributed.broadcast_object(payload)
    if isinstance(payload, str):
        raise CheckpointError(payload)
    return payload


class NullSaver:
    """What ranks other than 0 get: saving does nothing."""

    def save(self, step: int, extra: dict[str, Any]) -> Path | None:
        return None


class Saver(NullSaver):
    """Global rank 0's checkpoint writer, bound to the live training objects."""

    def __init__(self, run_dir: Path, keep: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, config: dict[str, Any], world_size: int, steps_per_epoch: int) -> None:
        self.run_dir, self.keep = run_dir, keep
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.config, self.world_size, self.spe = config, world_size, steps_per_epoch

    def save(self, step: int, extra: dict[str, Any]) -> Path:
        """The raw model's state_dict (loads without DDP or compile), optimizer, scaler, position, config."""
        return save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "step": step, "epoch": step // self.spe,
            "step_in_epoch": step % self.spe, "config": self.config, "world_size": self.world_size, **extra,
        }, self.run_dir, self.keep)


def make_saver(is_main: bool, *args: Any) -> NullSaver:
    return Saver(*args) if is_main else NullSaver()

"""Checkpoints: atomic writes on global rank 0, validation, and the resume policy.

Global rank 0 writes ``<run.dir>/checkpoints/step-XXXXXXXX.pt`` through
``cnn.files.write_atomic`` (temp file, fsync, rename, fsync of the folder), then
keeps only the newest ``checkpoint.keep``: a kill at any moment leaves the
previous checkpoint intact.  Other ranks hold a ``NullSaver``.  When a collective fails because a
peer is gone, every surviving rank writes the state of the last completed optimizer step
(``Saver.save_emergency``): a lost peer then costs the step in flight, not the work since the
last checkpoint.

``resume()`` is the policy: rank 0 picks the checkpoint (``checkpoint.resume``:
auto | never | a path), validates it (readable, ours, not newer, weights that fit
the model, a config that matches where it must), and broadcasts it, so nodes that
do not share a filesystem resume too; ``restore()`` loads it into the live objects,
adapting to a changed precision or memory format.  Dropout masks are seeded from (seed, step,
rank) at every step (``data.sharding.step_seed``) and the data order is a pure
function of (seed, epoch), so a checkpoint needs no RNG state to continue
identically.  A checkpoint records the precision its run computed in (``precision``:
requested, resolved, reason; ``run_precision`` reads it, also from checkpoints saved before it
was recorded).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from cnn import distributed
from cnn.files import write_atomic
from cnn.model import CNN
from cnn.precision import NAMES as PRECISIONS
from cnn.rundir import CONFIG, RunDir, of_checkpoint

FORMAT_VERSION = 1
PATTERN = re.compile(r"^step-(\d{8})\.pt$")
REQUIRED = ("format_version", "model", "optimizer", "scaler", "step", "epoch", "step_in_epoch", "config")
# Config keys that must match between a checkpoint and the run resuming from it:
# anything else would silently make a different training run.
RESUME_MUST_MATCH = ("seed", "model", "optim", "data.train_subset", "train.batch_size", "train.epochs")
# Keys added to those sections after checkpoints were written, with the value that a saved
# config without the key trained with: such a checkpoint still resumes when it matches.
ADDED_KEYS = {"optim.muon_lr": 0.0, "optim.label_smoothing": 0.0,  # before them: Adam for everything, no smoothing
              "optim.muon_ns_steps": 5}  # before it: 5 Newton-Schulz iterations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def folder(run_dir: str | os.PathLike) -> Path:
    return RunDir(run_dir).checkpoints  # cnn.rundir names the run folder's parts


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
            # load_state_dict's first line is a heading ("Error(s) in loading state_dict for CNN:"):
            # the next one says what differs (missing/unexpected keys, a size mismatch)
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if not ln.startswith("Error(s) in loading")), lines[0] if lines else "")
            raise CheckpointError(f"{path}: weights do not fit this model ({detail[:160]})") from None
    return state


def find_resume(
    resume: str, run_dir: str | os.PathLike, check_model: Callable[[dict], None] | None, warn: Callable[[str], None]
) -> dict[str, Any] | None:
    """The state to resume from, following checkpoint.resume (auto | never | a path)."""
    if resume == "never":
        return None
    if resume != "auto":  # an explicit path must be good: no silent fallback
        if not Path(resume).is_file():
            raise CheckpointError(f"checkpoint.resume: {resume}: no such checkpoint file (read by rank 0)")
        return load(resume, check_model)
    for path in list_checkpoints(run_dir):
        try:
            return load(path, check_model)
        except CheckpointError as exc:
            warn(f"skipping {exc}; trying an older checkpoint")
    return None


def _first_difference(saved: Any, now: Any, key: str) -> tuple[str, Any, Any] | None:
    """(dotted key, saved value, current value) of the first leaf that differs, else None."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for sub in [*now, *(k for k in saved if k not in now)]:  # the schema's order
            diff = _first_difference(saved.get(sub), now.get(sub), f"{key}.{sub}")
            if diff:
                return diff
        return None
    return None if saved == now else (key, saved, now)


def _dotlist_value(value: Any) -> str:
    return "(absent)" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_config(saved: dict[str, Any], now: dict[str, Any], source: str) -> None:
    """Refuse to resume a different training run: the RESUME_MUST_MATCH keys must be equal.

    The error names the first key that differs, both values, and the ways out that
    apply: restore the value, or start fresh -- by dropping an explicit
    checkpoint.resume path, else in another run.dir (checkpoint.resume=never in the same
    folder would mix the two runs' checkpoints and metrics).
    """
    saved = copy.deepcopy(saved)
    for dotted, value in ADDED_KEYS.items():
        *parents, leaf = dotted.split(".")
        node = saved
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    for section in RESUME_MUST_MATCH:
        a, b = saved, now
        for part in section.split("."):
            a, b = a.get(part) if isinstance(a, dict) else None, b.get(part) if isinstance(b, dict) else None
        diff = _first_difference(a, b, section)
        if diff is None:
            continue
        key, was, is_now = diff
        restore = f"{key}={_dotlist_value(was)}"
        explicit = now.get("checkpoint", {}).get("resume", "auto") not in ("auto", "never")
        fresh = ("drop checkpoint.resume to start fresh" if explicit
                 else "pass another run.dir to start a new run")
        raise CheckpointError(
            f"{source}: {key} was {_dotlist_value(was)} when saved but is {_dotlist_value(is_now)} now: "
            f"pass {restore} to continue {'from this checkpoint' if explicit else 'this run'}, or {fresh}"
        )


def check_folder(run_dir: Path, config: dict[str, Any]) -> None:
    """A run.dir without a usable checkpoint but with another run's config.yaml (one that
    differs in a must-match key) is another run's folder: refuse to mix the two."""
    saved_path = RunDir(run_dir).file(CONFIG)
    if not saved_path.is_file():
        return
    try:
        saved = RunDir(run_dir).read_config()
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"run.dir '{run_dir}': its {CONFIG} cannot be read ({first})") from None
    check_config(saved if isinstance(saved, dict) else {}, config, f"run.dir '{run_dir}' holds another run ({CONFIG})")


def recorded_precision(state: dict[str, Any] | None) -> str | None:
    """The precision a checkpoint's run computed in (fp32 | bf16 | fp16), if the checkpoint records it."""
    rec = (state or {}).get("precision")
    resolved = rec.get("resolved") if isinstance(rec, dict) else None
    return resolved if resolved in PRECISIONS else None


def run_precision(state: dict[str, Any], path: Path) -> tuple[str, str]:
    """(precision, how it is known) of the run that wrote `state`, read from `path`.

    Checkpoints record it.  One saved before they did: an explicit precision in its config is
    the one; under precision=auto, the run's metrics.jsonl `start` record of the attempt that
    wrote it says what auto chose; without that either, fp32 (and the note says to pass
    precision= when the run computed in another)."""
    if (name := recorded_precision(state)) is not None:
        return name, "recorded in the checkpoint"
    asked = (state.get("config") or {}).get("precision", "auto")
    if asked in PRECISIONS:
        return asked, "the run's precision setting; this checkpoint predates the recorded precision"
    run = of_checkpoint(path)
    try:
        starts = [r for r in run.read_metrics("start") if r.get("step", 0) <= state["step"]]
    except (OSError, ValueError):
        starts = []
    if starts and starts[-1].get("precision") in PRECISIONS:
        return starts[-1]["precision"], f"what precision=auto chose, from {run.path / 'metrics.jsonl'}; this checkpoint " \
                                        "predates the recorded precision"
    return "fp32", ("unknown: a precision=auto checkpoint that predates the recorded precision, without its run's "
                    "metrics.jsonl; pass precision=bf16 (or fp16) if the run computed in it")


def fits_model(state_dict: dict) -> None:
    """Raise if the weights are not the seed CNN's (for load()'s check_model)."""
    CNN().load_state_dict(state_dict)


def resume(resume_from: str, config: dict[str, Any], run_dir: Path, is_main: bool,
           warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The checkpoint state this run continues from, on every rank (None: start fresh).

    Rank 0 picks, reads and validates it, then broadcasts it (or its error, which
    every rank raises as CheckpointError): nodes need not share a filesystem, and an
    explicit checkpoint.resume path need exist on rank 0's node only.
    """
    payload: dict[str, Any] | str | None = None
    if is_main:
        try:
            payload = find_resume(resume_from, run_dir, fits_model, warn)
            if payload is not None:
                check_config(payload["config"], config, str(resume_from if resume_from != "auto" else run_dir))
            elif resume_from == "auto":
                check_folder(run_dir, config)
        except CheckpointError as exc:
            payload = str(exc)
    payload = distributed.broadcast_object(payload)
    if isinstance(payload, str):
        raise CheckpointError(payload)
    return payload


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler) -> list[str]:
    """Load a checkpoint into the live training objects; returns notes on what was adapted.

    ``precision`` and ``train.channels_last`` may differ from the saved run (moving a run
    to a machine without bf16, or trying the other layout); both adapt exactly:
    - the optimizer's moment tensors are put in their parameter's memory format.  They are
      saved with their strides, and Adam's fused kernels walk memory linearly: on CPU a
      mismatch silently pairs the wrong elements (measured, torch 2.14), on CUDA it fails
      the kernel's layout check.  Values are unchanged, so the update is the same.
    - a checkpoint saved without fp16 has no loss-scaler state ({}): an fp16 run then starts
      a fresh scaler, which finds its scale within a few steps; an fp16 checkpoint's scaler
      state is ignored by a disabled (fp32/bf16) scaler.
    """
    notes = []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    converted = 0
    for param, slots in optimizer.state.items():
        for name, value in slots.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                slots[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)  # param's strides
                converted += 1
    if converted:
        notes.append(f"optimizer state converted to the model's memory format ({converted} tensors; "
                     "train.channels_last differs from the checkpoint's)")
    if scaler.is_enabled() and not state["scaler"]:
        notes.append("fp16 loss scaler starts fresh (the checkpoint was saved without fp16)")
    else:
        scaler.load_state_dict(state["scaler"])
    return notes


class NullSaver:
    """What ranks other than 0 get: saving does nothing."""

    def save(self, step: int, extra: dict[str, Any]) -> Path | None:
        return None

    def save_emergency(self, step: int, extra: dict[str, Any]) -> Path | None:
        return None


def _finite(tree: Any) -> bool:
    if torch.is_tensor(tree):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_finite(v) for v in tree)
    return True


class Saver(NullSaver):
    """Global rank 0's checkpoint writer, bound to the live training objects."""

    def __init__(self, run_dir: Path, keep: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, config: dict[str, Any], world_size: int, steps_per_epoch: int,
                 precision: dict[str, str]) -> None:
        self.run_dir, self.keep, self.precision = run_dir, keep, precision
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.config, self.world_size, self.spe = config, world_size, steps_per_epoch

    def state(self, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        """The raw model's state_dict (loads without DDP or compile), optimizer, scaler, position, config,
        and the precision the run computes in (cnn.precision.record)."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "step": step, "epoch": step // self.spe,
            "step_in_epoch": step % self.spe, "config": self.config, "world_size": self.world_size,
            "precision": self.precision, **extra,
        }

    def save(self, step: int, extra: dict[str, Any]) -> Path:
        return save(self.state(step, extra), self.run_dir, self.keep)

    def save_emergency(self, step: int, extra: dict[str, Any]) -> Path | None:
        """After a failed collective: the live state, which the caller vouches is that of the completed
        optimizer step `step`, as a normal checkpoint -- unless a checkpoint of `step` or later exists
        already (never an older state over a newer one) or the state is not finite (the failure may
        be this replica's own).  No collective: the peers may be gone.  Every surviving rank may
        call it: DDP replicas hold the same weights and optimizer state, each writes through its own
        temp file (cnn.files.write_atomic), and on a shared filesystem the first rename wins the
        check of the later ones.  None when nothing was written."""
        newest = list_checkpoints(self.run_dir)
        if newest and int(PATTERN.match(newest[0].name).group(1)) >= step:
            return None
        state = self.state(step, extra)
        if not (_finite(state["model"]) and _finite(state["optimizer"])):
            return None
        return save(state, self.run_dir, self.keep)


def make_saver(is_main: bool, *args: Any) -> NullSaver:
    return Saver(*args) if is_main else NullSaver()


def make_emergency_saver(backend: str, *args: Any) -> NullSaver:
    """Every rank's writer of the emergency checkpoint (``Saver.save_emergency``), on gloo.  On NCCL a
    null one: there the CPU runs ahead of the GPU, so when a collective's failure reaches Python
    the optimizer updates of the failed step may already be queued behind it on the device (the
    state's step is unknown), and under torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING=3
    (SkipCleanUp) the watchdog thread ends the process before Python sees the error at all."""
    return Saver(*args) if backend == "gloo" else NullSaver()

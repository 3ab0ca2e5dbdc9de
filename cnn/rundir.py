"""The run folder, in one place: its layout, and every write and read of its files.

    <run.dir>/config.yaml        the resolved config of the latest attempt
    <run.dir>/metrics.jsonl      one JSON record per line: {"event", "step", "epoch", ...}
    <run.dir>/summary.json       the final figures of a finished run
    <run.dir>/predictions.pt     the final test-set predictions (uint8, test-set order)
    <run.dir>/wandb_run_id.txt   the W&B run id, reused when the run resumes
    <run.dir>/wandb/             W&B's own files (offline runs)
    <run.dir>/checkpoints/       step-XXXXXXXX.pt, written and read by cnn.checkpoint
    <run.dir>/eval.json          `mnist-ddp evaluate`'s report on the test split (eval-train.json: --split train)
    <run.dir>/model.safetensors  the final weights logged as a W&B model artifact (wandb.log_model=true)
    <run.dir>/profile/           rank<R>.pt.trace.json, torch.profiler traces (train.profile_steps)

Every metrics record names its ``event``: ``start`` (the run's facts), ``train``
(a log window), ``eval`` (a mid-epoch evaluation), ``epoch`` (end of an epoch,
with its evaluation), ``samples`` (a hash of the step's global batch).  The
trainer, the plots, the comparison, the benchmark and the tests read them through here.

A ``train`` record holds the window's ``train_loss``, ``train_accuracy``, ``lr``,
``images_per_sec``, ``gflops``, ``mfu``, ``train_seconds`` (training time so far) and,
with train.rank_stats, the spread over ranks (cnn.perf.RankStats): ``rank_compute_ms_*``
and ``rank_wait_ms_*`` (``min``/``median``/``max``, ms per step), ``slowest_rank``,
``slowest_host``, ``rss_peak_mb`` and on CUDA ``gpu_mem_peak_mb``/``gpu_mem_mb`` (the
largest rank's).  W&B gets the same fields under namespaced keys (cnn.tracking.wandb_key).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from cnn.files import write_atomic

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PREDICTIONS = "predictions.pt"
WANDB_ID = "wandb_run_id.txt"
WANDB_DIR = "wandb"  # written by wandb itself, given the run folder as its dir
CHECKPOINTS = "checkpoints"
MODEL = "model.safetensors"
PROFILE = "profile"
EXPORT = "export"  # mnist-ddp export's default folder
PLOTS = {"loss": "loss.png", "accuracy": "accuracy.png", "predictions": "predictions.png"}  # mnist-ddp plot
EVENTS = ("start", "train", "eval", "epoch", "samples")


def job_id(env: Mapping[str, str] = os.environ) -> str:
    """The launcher's id for this job, stable across restarts and requeues ('' if none).

    A SLURM array task is ``<array job>_<task>`` (each task its own folder); else the
    SLURM job id; else torchrun's run id (torchrun's placeholder "none" counts as none).
    slurm/common.sh's JOB_REF is the same rule for the templates' shell (tests/test_slurm_trap.py
    checks that they agree).
    """
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    job = env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID", "")
    return "" if job == "none" else job


def resolve(run_dir: str, env: Mapping[str, str] = os.environ) -> Path:
    """run.dir if set, else runs/<job id>, else runs/<timestamp> (a plain python run)."""
    if run_dir:
        return Path(run_dir)
    return Path("runs") / (job_id(env) or time.strftime("%Y%m%d-%H%M%S"))


class RunDirError(RuntimeError):
    """run.dir cannot be used (a file, not writable); the message is one line naming it."""


class RunDir:
    """Names, writes and reads the files of one run folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def profile_dir(self) -> Path:
        return self.path / PROFILE

    def profile_trace(self, rank: int) -> Path:
        """Rank `rank`'s profiler trace; W&B's trace viewer recognises the .pt.trace.json suffix."""
        return self.profile_dir / f"rank{rank}.pt.trace.json"

    def profile_traces(self) -> list[Path]:
        return sorted(self.profile_dir.glob("rank*.pt.trace.json"))

    def is_run(self) -> bool:
        """A folder the trainer wrote: it has config.yaml and metrics.jsonl."""
        return self.file(CONFIG).is_file() and self.file(METRICS).is_file()

    def has_summary(self) -> bool:
        """The run finished (an interrupted run has none yet)."""
        return self.file(SUMMARY).is_file()

    def create(self) -> "RunDir":
        """Make the folder; RunDirError (one line naming run.dir) if it is a file or cannot be made."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run.dir '{self.path}' is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = write_atomic(self.path / ".write-test", b"")  # writable, not just present
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"run.dir '{self.path}' cannot be created or written: {exc.strerror or exc}") from None
        return self

    # ---- config.yaml
    def write_config(self, yaml_text: str) -> None:
        write_atomic(self.file(CONFIG), yaml_text)

    def read_config(self) -> dict[str, Any]:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(self.file(CONFIG)))  # type: ignore[return-value]

    # ---- summary.json
    def write_summary(self, values: Mapping[str, Any]) -> None:
        write_atomic(self.file(SUMMARY), json.dumps(dict(values), indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.file(SUMMARY).read_text())

    # ---- predictions.pt
    def write_predictions(self, preds: torch.Tensor) -> None:
        write_atomic(self.file(PREDICTIONS), lambda f: torch.save(preds.to(torch.uint8), f))

    def read_predictions(self) -> torch.Tensor:
        return torch.load(self.file(PREDICTIONS), weights_only=True)

    # ---- wandb_run_id.txt
    def read_wandb_id(self) -> str | None:
        path = self.file(WANDB_ID)
        return (path.read_text().strip() or None) if path.exists() else None

    def write_wandb_id(self, run_id: str) -> None:
        write_atomic(self.file(WANDB_ID), run_id + "\n")

    # ---- metrics.jsonl
    def read_metrics(self, *events: str) -> list[dict[str, Any]]:
        return read_metrics(self.path, *events)

    def metrics_log(self) -> "MetricsLog":
        return MetricsLog(self.file(METRICS))


def eval_name(split: str) -> str:
    """The report `mnist-ddp evaluate` writes for a split: eval.json (test), eval-train.json."""
    return "eval.json" if split == "test" else f"eval-{split}.json"


def of_checkpoint(path: str | os.PathLike) -> RunDir:
    """The run folder a checkpoint file belongs to (<run>/checkpoints/step-*.pt), else its own folder."""
    parent = Path(path).parent
    return RunDir(parent.parent if parent.name == CHECKPOINTS else parent)


def write_json(path: str | os.PathLike, values: Mapping[str, Any]) -> Path:
    """A JSON report (eval.json, or where --out says), written atomically; a list of numbers
    stays on one line (a confusion matrix reads as one row per line)."""
    text = re.sub(r"\[\n\s+([-+\d.,eE\s]+?)\n\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  json.dumps(dict(values), indent=2))
    return write_atomic(path, text + "\n")


def record(event: str, step: int, epoch: int, **values: Any) -> dict[str, Any]:
    """A metrics record: every record names its event, step and epoch."""
    if event not in EVENTS:
        raise ValueError(f"unknown metrics event '{event}' (one of {', '.join(EVENTS)})")
    return {"event": event, "step": step, "epoch": epoch, **values}


class MetricsLog:
    """Appends records to metrics.jsonl, line-buffered: a crash loses at most a line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)

    def append(self, rec: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(dict(rec)) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop records past `step` (left by an attempt that died after its last checkpoint).

        Returns the highest step that was in the file (-1 if none), so the caller knows
        which steps an external logger may already hold.  A torn last line goes too.
        """
        self._file.close()
        kept, highest = [], -1
        for line in self.path.read_text().splitlines(keepends=True):
            s = _record_step(line)
            if s is None:
                continue
            highest = max(highest, s)
            if s <= step:
                kept.append(line)
        write_atomic(self.path, "".join(kept))
        self._file = open(self.path, "a", buffering=1)
        return highest

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | os.PathLike, *events: str) -> list[dict[str, Any]]:
    """The records of a run folder's metrics.jsonl (or of that file), in order; only
    those of the given events if any are named. Every record has an "event": the train
    records that version 0.1 wrote without one read as "train" (here only)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    recs = []
    for i, line in enumerate(lines):
        try:
            recs.append({"event": "train", **json.loads(line)})
        except ValueError:
            if i < len(lines) - 1:  # only the last line can be torn (a kill mid-write; line-buffered)
                raise
    return [r for r in recs if r.get("event") in events] if events else recs


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    return RunDir(run_dir).read_summary()


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None

"""Metrics: one tracker on global rank 0, a null tracker with the same interface elsewhere.

The rank-0 ``Tracker`` always writes ``<run.dir>/metrics.jsonl`` (one JSON object
per event, each with ``step`` and ``epoch``) and ``summary.json``, and streams
the same records to Weights & Biases when it can.  W&B is never allowed to break
training: a failure at init or at log time becomes one warning, the run carries
on with the local files, and an unreachable server costs at most
``wandb.init_timeout_s`` seconds before falling back to offline mode.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from cnn.config import WandbConfig

RUN_ID_FILE = "wandb_run_id.txt"
GRID_IMAGES = 32  # test images shown with their predicted and true labels


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.Api(timeout=5).api_key)  # reads ~/.netrc / settings, no network
    except Exception:
        return False


class NullTracker:
    """What ranks other than 0 get: every call does nothing."""

    run_id: str | None = None
    resumed_step: int = -1

    def log(self, record: dict[str, Any], stream: bool = True) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def truncate_after(self, step: int) -> None: ...
    def predictions(self, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class Tracker(NullTracker):
    def __init__(self, run_dir: str | os.PathLike, cfg: WandbConfig, config: dict[str, Any], group: str) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self._jsonl = open(self.metrics_path, "a", buffering=1)  # line-buffered: a crash loses at most a line
        self._wandb = None
        self.run_id = None
        self.wandb_every = cfg.log_every
        self._init_wandb(cfg, config, group)

    # ---------------------------------------------------------------- W&B
    def _init_wandb(self, cfg: WandbConfig, config: dict[str, Any], group: str) -> None:
        mode = os.environ.get("WANDB_MODE", cfg.mode)
        if mode in ("disabled", "dryrun") or mode not in ("online", "offline"):
            return
        try:
            import wandb
        except Exception as exc:  # pragma: no cover - wandb is a dependency
            _warn(f"W&B unavailable ({exc}); metrics go to {self.metrics_path} only")
            return
        if mode == "online" and not _api_key_configured():
            _warn("W&B online mode but no API key (run `wandb login` or set WANDB_API_KEY); logging offline instead")
            mode = "offline"
        id_file = self.dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else _new_run_id()
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity or None,
            group=group or None,
            name=cfg.name or None,
            tags=list(cfg.tags) or None,
            notes=cfg.notes or None,
            config=config,
            dir=str(self.dir),
            id=run_id,
            resume="allow",
        )
        for attempt in ([mode, "offline"] if mode == "online" else [mode]):
            try:
                settings = wandb.Settings(init_timeout=cfg.init_timeout_s, silent=True, x_disable_stats=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._wandb = wandb.init(mode=attempt, settings=settings, **kwargs)
                break
            except Exception as exc:
                first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                nxt = "retrying offline" if attempt == "online" else f"metrics go to {self.metrics_path} only"
                _warn(f"W&B init failed in {attempt} mode ({type(exc).__name__}: {first}); {nxt}")
                try:  # forget the half-made run, or the retry finds its id "in use"
                    wandb.teardown()
                except Exception:
                    pass
        if self._wandb is not None:
            self.run_id = self._wandb.id
            id_file.write_text(self.run_id + "\n")
            # after a resume W&B knows the last step logged; never log at or below it again
            self.resumed_step = int(getattr(self._wandb, "step", 0) or 0) - 1

    def _wandb_call(self, fn, *args, **kwargs) -> None:
        if self._wandb is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            _warn(f"W&B call failed ({type(exc).__name__}: {str(exc)[:200]}); continuing without W&B")
            self._wandb = None

    # ---------------------------------------------------------------- API
    def log(self, record: dict[str, Any], stream: bool = True) -> None:
        """Append record (which has 'step') to metrics.jsonl and, if `stream`, send it to W&B."""
        self._jsonl.write(json.dumps(record) + "\n")
        step = record["step"]
        thinned = "event" not in record and self.wandb_every and step % self.wandb_every
        if self._wandb is not None and stream and step > self.resumed_step and not thinned:
            payload = {k: v for k, v in record.items() if k not in ("step", "event") and isinstance(v, (int, float))}
            self._wandb_call(self._wandb.log, payload, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (left by an attempt that died after its last checkpoint)."""
        self._jsonl.close()
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        # W&B already holds the dropped steps (offline it cannot tell us): never log them twice
        steps = [(ln, _record_step(ln)) for ln in lines if ln.strip()]
        self.resumed_step = max([self.resumed_step, *(s for _, s in steps if s is not None)])
        kept = [ln for ln, s in steps if s is not None and s <= step]  # a torn last line goes too
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.metrics_path)
        self._jsonl = open(self.metrics_path, "a", buffering=1)

    def summary(self, values: dict[str, Any]) -> None:
        tmp = self.dir / "summary.json.tmp"
        tmp.write_text(json.dumps(values, indent=2) + "\n")
        os.replace(tmp, self.dir / "summary.json")
        if self._wandb is not None:
            self._wandb_call(self._wandb.summary.update, values)

    def predictions(self, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor) -> None:
        """The seed's figures: a grid of test images with predicted/true labels, and a
        confusion matrix.  preds go to predictions.pt for `python -m cnn.plot` too."""
        torch.save(preds.to(torch.uint8), self.dir / "predictions.pt")
        if self._wandb is None:
            return

        def build():
            import wandb

            grid = [wandb.Image(images[i].numpy(), caption=f"pred {int(preds[i])} / true {int(labels[i])}")
                    for i in range(GRID_IMAGES)]
            matrix = wandb.plot.confusion_matrix(y_true=labels.tolist(), preds=preds.tolist(),
                                                 class_names=[str(c) for c in range(10)])
            self._wandb.log({"test_predictions": grid, "confusion_matrix": matrix})

        self._wandb_call(build)

    def finish(self, exit_code: int = 0) -> None:
        self._jsonl.close()
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:
                _warn(f"W&B finish failed ({type(exc).__name__}: {str(exc)[:200]})")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or a run folder holding one), in order."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def make_tracker(is_main: bool, run_dir: str | os.PathLike, cfg: WandbConfig, config: dict[str, Any], group: str):
    return Tracker(run_dir, cfg, config, group) if is_main else NullTracker()

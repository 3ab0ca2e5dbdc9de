"""Metrics: one tracker on global rank 0, a null tracker with the same interface elsewhere.

The rank-0 ``Tracker`` writes the resolved config.yaml, always appends to the run folder's metrics.jsonl and
writes summary.json (``cnn.rundir`` owns both), and streams the same records to
Weights & Biases when it can.  W&B is never allowed to break training: a failure
at init or at log time becomes one warning, the run carries on with the local
files, and an unreachable server costs at most ``wandb.init_timeout_s`` seconds
before falling back to offline mode.  ``job_facts`` gathers what W&B and the
summary say about the job (world size, hosts, device, commit...).  With
``wandb.log_model=true`` the final checkpoint's weights go to W&B as a ``model``
artifact (safetensors, the same file ``mnist-ddp export`` writes), and the summary
names it.
"""

from __future__ import annotations

import os
import secrets
import socket
import string
import subprocess
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cnn import console
from cnn.config import WandbConfig
from cnn.perf import Roofline
from cnn.rundir import MODEL, RunDir

GRID_IMAGES = 32  # test images shown with their predicted and true labels


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

    def log(self, record: dict[str, Any], stream: bool = True) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def truncate_after(self, step: int) -> None: ...
    def predictions(self, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class Tracker(NullTracker):
    def __init__(self, run: RunDir, config_yaml: str, cfg: WandbConfig, config: dict[str, Any], group: str) -> None:
        self.run = run.create()
        self.run.write_config(config_yaml)
        self.metrics = run.metrics_log()
        self._wandb = None
        self.wandb_every = cfg.log_every
        self.log_model = cfg.log_model
        self.resumed_step = -1  # W&B already holds the steps up to this one: never log them again
        self._init_wandb(cfg, config, group)
        if self.log_model and self._wandb is None:
            console.warn("wandb.log_model=true but W&B is off: no model artifact (`mnist-ddp export` writes the files)")

    # ---------------------------------------------------------------- W&B
    def _init_wandb(self, cfg: WandbConfig, config: dict[str, Any], group: str) -> None:
        mode = os.environ.get("WANDB_MODE", cfg.mode)
        if mode in ("disabled", "dryrun") or mode not in ("online", "offline"):
            return
        try:
            import wandb
        except Exception as exc:  # pragma: no cover - wandb is a dependency
            console.warn(f"W&B unavailable ({exc}); metrics go to {self.metrics.path} only")
            return
        if mode == "online" and not _api_key_configured():
            console.warn("W&B online mode but no API key (run `wandb login` or set WANDB_API_KEY); logging offline instead")
            mode = "offline"
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity or None,
            group=cfg.group or group or None,  # wandb.group, else the job id
            name=cfg.name or None,
            tags=list(cfg.tags) or None,
            notes=cfg.notes or None,
            config=config,
            dir=str(self.run.path),
            id=self.run.read_wandb_id() or _new_run_id(),
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
                nxt = "retrying offline" if attempt == "online" else f"metrics go to {self.metrics.path} only"
                console.warn(f"W&B init failed in {attempt} mode ({type(exc).__name__}: {first}); {nxt}")
                try:  # forget the half-made run, or the retry finds its id "in use"
                    wandb.teardown()
                except Exception:
                    pass
        if self._wandb is not None:
            self.run_id = self._wandb.id
            self.run.write_wandb_id(self.run_id)
            # after a resume W&B knows the last step logged; never log at or below it again
            self.resumed_step = int(getattr(self._wandb, "step", 0) or 0) - 1

    def _wandb_call(self, fn, *args, **kwargs) -> None:
        if self._wandb is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            console.warn(f"W&B call failed ({type(exc).__name__}: {str(exc)[:200]}); continuing without W&B")
            self._wandb = None

    # ---------------------------------------------------------------- API
    def log(self, record: dict[str, Any], stream: bool = True) -> None:
        """Append record (see cnn.rundir.record) to metrics.jsonl and, if `stream`, send it to W&B."""
        self.metrics.append(record)
        step = record["step"]
        thinned = record["event"] == "train" and self.wandb_every and step % self.wandb_every
        if self._wandb is not None and stream and step > self.resumed_step and not thinned:
            payload = {k: v for k, v in record.items() if k not in ("step", "event") and isinstance(v, (int, float))}
            self._wandb_call(self._wandb.log, payload, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`; W&B already holds them (offline it cannot tell us): never log them twice."""
        self.resumed_step = max(self.resumed_step, self.metrics.truncate_after(step))

    def summary(self, values: dict[str, Any]) -> None:
        if self.log_model and self._wandb is not None:
            self._wandb_call(self._log_model, values)
        self.run.write_summary(values)
        if self._wandb is not None:
            self._wandb_call(self._wandb.summary.update, values)

    def _log_model(self, values: dict[str, Any]) -> None:
        """The final checkpoint's weights as a W&B model artifact, aliases latest and best (the only
        weights a run publishes are its final ones); `values` (the summary) gets its name."""
        import wandb

        from cnn import checkpoint, export
        from cnn.files import write_atomic
        from cnn.inference import load_model

        trained = load_model(checkpoint.path_for(self.run.path, values["steps"]))
        meta = export.metadata(trained)
        path = write_atomic(self.run.file(MODEL), export.to_safetensors(export.plain(trained.model), meta))
        artifact = wandb.Artifact(f"model-{self.run_id}", type="model",
                                  metadata={**meta, "test_accuracy": values.get("test_accuracy")})
        artifact.add_file(str(path))
        self._wandb.log_artifact(artifact, aliases=["latest", "best"])
        values["model_artifact"] = f"{artifact.name}:latest"

    def predictions(self, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor) -> None:
        """The seed's figures: a grid of test images with predicted/true labels, and a
        confusion matrix.  preds go to predictions.pt for `python -m cnn.plot` too."""
        self.run.write_predictions(preds)
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
        self.metrics.close()
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:
                console.warn(f"W&B finish failed ({type(exc).__name__}: {str(exc)[:200]})")


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def make_tracker(is_main: bool, run: RunDir, config_yaml: str, cfg: WandbConfig, config: dict[str, Any],
                 group: str) -> NullTracker:
    """The run's resolved config, metrics and W&B run on rank 0; a NullTracker elsewhere."""
    return Tracker(run, config_yaml, cfg, config, group) if is_main else NullTracker()


def git_commit() -> str:
    """The code's commit, for filtering runs in W&B ('' outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def job_facts(d, prec, global_batch: int, peak: Roofline, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    """What the job is and where it runs, for the start record, W&B's config and the summary.

    Collective: every rank takes part (the placement is all-gathered), so that the
    summary shows which hosts and SLURM nodes actually took part.  `prec` is the run's
    cnn.precision.Precision (its name and why it was chosen); `peak` the roofline MFU is
    measured against, with its arithmetic and TF32 settings.
    """
    placement: list[Any] = [None] * d.world_size
    dist.all_gather_object(placement, (d.rank, socket.gethostname(), os.environ.get("SLURM_NODEID")))
    return {
        "world_size": d.world_size, "nodes": d.num_nodes, "backend": d.backend, "launcher": d.launcher,
        "device_name": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
        "precision": prec.name, "precision_reason": prec.reason, "global_batch_size": global_batch, "per_rank_batch_size": global_batch // d.world_size,
        "torch_version": torch.__version__, "threads_per_rank": torch.get_num_threads(),
        **peak.facts(), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "git_commit": git_commit(),
        "hosts": sorted({host for _, host, _ in placement}),
        "slurm_node_ids": sorted({int(n) for _, _, n in placement if n is not None}),
    }

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

Built for comparing runs in W&B: a run is named after what sets it apart
(``run_name``: ws2-fp32-b128-lr4e-3-s0) unless wandb.name is set, grouped only by
wandb.group, typed by ``job_type``; metrics.jsonl's flat fields stream under
namespaced keys (``wandb_key``: train/…, test/…, perf/…, sys/…) against a
``global_step`` axis, with min/max summaries for losses/accuracies; W&B's own
system metrics (system/…) are on unless wandb.system_metrics=false.  The run
summary keeps summary.json's flat names (test_accuracy is the final one: the
sweep's metric).
"""

from __future__ import annotations

import os
import secrets
import socket
import string
import subprocess
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from cnn import console
from cnn.config import WandbConfig
from cnn.perf import Roofline
from cnn.rundir import RunDir

GRID_IMAGES = 32  # test images shown with their predicted and true labels
STEP_KEY = "global_step"  # the x-axis of every namespaced metric: optimizer steps over the whole job
SUMMARIES = {"train/loss": "min", "test/loss": "min", "train/accuracy": "max", "test/accuracy": "max"}
_RENAMED = {"lr": "train/lr", "epoch": "train/epoch", "eval_count": "test/count"}


def wandb_key(field: str) -> str:
    """The W&B name of a metrics.jsonl field: train_* -> train/*, test_* -> test/*, memory (*_mb)
    -> sys/*, throughput and rank timing (everything else) -> perf/*; lr and epoch are train/."""
    if field in _RENAMED:
        return _RENAMED[field]
    for prefix in ("train", "test"):
        if field.startswith(prefix + "_"):
            return f"{prefix}/{field[len(prefix) + 1:]}"
    return f"sys/{field}" if field.endswith("_mb") else f"perf/{field}"


def _short(x: float) -> str:
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def run_name(config: dict[str, Any]) -> str:
    """What sets a run apart, as a W&B run name: world size, precision, global batch, peak lr,
    seed (ws2-fp32-b128-lr4e-3-s0).  `config` is the resolved config plus job_facts; '' if it lacks them."""
    try:
        return (f"ws{config['world_size']}-{config['precision']}-b{config['global_batch_size']}"
                f"-lr{_short(config['optim']['lr'])}-s{config['seed']}")
    except (KeyError, TypeError):
        return ""


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
    def attach_profile(self, paths: list[Path]) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class Tracker(NullTracker):
    def __init__(self, run: RunDir, config_yaml: str, cfg: WandbConfig, config: dict[str, Any],
                 job_type: str = "train", model_file: Callable[[int], tuple[Path, dict[str, str]]] | None = None) -> None:
        self.run = run.create()
        self.model_file = model_file  # step -> (the weights file, its metadata): what wandb.log_model publishes
        self.run.write_config(config_yaml)
        self.metrics = run.metrics_log()
        self._wandb = None
        self.wandb_every = cfg.log_every
        self.log_model = cfg.log_model
        self.resumed_step = -1  # W&B already holds the steps up to this one: never log them again
        self._init_wandb(cfg, config, job_type)
        if self.log_model and self._wandb is None:
            console.warn("wandb.log_model=true but W&B is off: no model artifact (`mnist-ddp export` writes the files)")

    # ---------------------------------------------------------------- W&B
    def _init_wandb(self, cfg: WandbConfig, config: dict[str, Any], job_type: str) -> None:
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
            group=cfg.group or None,
            job_type=job_type,
            name=cfg.name or run_name(config) or None,
            tags=list(cfg.tags) or None,
            notes=cfg.notes or None,
            config=config,
            dir=str(self.run.path),
            id=self.run.read_wandb_id() or _new_run_id(),
            resume="allow",
        )
        for attempt in ([mode, "offline"] if mode == "online" else [mode]):
            try:
                settings = wandb.Settings(init_timeout=cfg.init_timeout_s, silent=True,
                                          x_disable_stats=not cfg.system_metrics)
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
            self._wandb_call(self._define_metrics)

    def _define_metrics(self) -> None:
        run = self._wandb
        run.define_metric(STEP_KEY, hidden=True)
        for namespace in ("train", "test", "perf", "sys"):
            run.define_metric(f"{namespace}/*", step_metric=STEP_KEY)
        for name, summary in SUMMARIES.items():  # an exact name replaces the glob's definition: repeat the axis
            run.define_metric(name, step_metric=STEP_KEY, summary=summary)

    def _wandb_call(self, fn, *args, **kwargs) -> None:
        if self._wandb is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            console.warn(f"W&B call failed ({type(exc).__name__}: {str(exc)[:200]}); continuing without W&B")
            self._wandb = None
            _release_wandb()

    # ---------------------------------------------------------------- API
    def log(self, record: dict[str, Any], stream: bool = True) -> None:
        """Append record (see cnn.rundir.record) to metrics.jsonl and, if `stream`, send it to W&B."""
        self.metrics.append(record)
        step = record["step"]
        thinned = record["event"] == "train" and self.wandb_every and step % self.wandb_every
        if self._wandb is not None and stream and step > self.resumed_step and not thinned:
            payload = {wandb_key(k): v for k, v in record.items()
                       if k not in ("step", "event") and isinstance(v, (int, float))}  # slowest_host: metrics.jsonl only
            self._wandb_call(self._wandb.log, {STEP_KEY: step, **payload}, step=step)

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
        weights a run publishes are its final ones); `values` (the summary) gets its name.  The file
        comes from `model_file` (train_ddp.py passes cnn.export.model_file: the export's owner writes it)."""
        import wandb

        if self.model_file is None:
            return
        path, meta = self.model_file(values["steps"])
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

    def attach_profile(self, paths: list[Path]) -> None:
        """Profiler traces (cnn.profile) as a "profile" artifact of the run: W&B shows *.pt.trace.json in its trace viewer."""
        if self._wandb is None or not paths:
            return

        def build():
            import wandb

            artifact = wandb.Artifact(f"profile-{self._wandb.id}", type="profile")
            for path in paths:
                artifact.add_file(str(path), name=path.name)
            self._wandb.log_artifact(artifact)

        self._wandb_call(build)

    def finish(self, exit_code: int = 0) -> None:
        self.metrics.close()
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:
                console.warn(f"W&B finish failed ({type(exc).__name__}: {str(exc)[:200]})")
                _release_wandb()


def _release_wandb() -> None:
    """Tear down W&B's connection to its service process now, after a call failed. The usual cause
    is a service that is gone: SLURM signals every process of a job step (scancel, preemption),
    wandb-core included. Left to W&B's own atexit hook, the teardown of the dead connection
    prints a traceback as the process exits."""
    try:
        import wandb
        wandb.teardown()  # unregisters that atexit hook before it talks to the service
    except (Exception, SystemExit):  # SystemExit: teardown exits with the service's exit code
        pass


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def make_tracker(is_main: bool, run: RunDir, config_yaml: str, cfg: WandbConfig, config: dict[str, Any],
                 job_type: str = "train", model_file: Callable[[int], tuple[Path, dict[str, str]]] | None = None
                 ) -> NullTracker:
    """The run's resolved config, metrics and W&B run on rank 0; a NullTracker elsewhere."""
    return Tracker(run, config_yaml, cfg, config, job_type, model_file) if is_main else NullTracker()


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

"""Training progress that outlives a restart (saved in every checkpoint, read back on resume),
and the records made from it: each evaluation's, and the run's summary figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from cnn import perf
from cnn.rundir import record

TARGET_ACCURACY = 0.99  # seconds_to_99 / images_to_99: training time / images until the first evaluation at or above this


@dataclass
class Progress:
    train_seconds: float = 0.0
    """Training time so far, in seconds, summed over attempts (evaluations and checkpoints excluded)."""
    images: int = 0
    """Training images processed so far, over all ranks."""
    best_accuracy: float = 0.0
    """Best test accuracy of any evaluation so far."""
    seconds_to_99: float | None = None
    """train_seconds when an evaluation first reached TARGET_ACCURACY (None: not yet)."""
    images_to_99: int | None = None
    """images when an evaluation first reached TARGET_ACCURACY (None: not yet)."""
    epoch_start_seconds: float = 0.0
    """train_seconds when the current epoch began."""
    epoch_start_images: int = 0
    """images when the current epoch began."""
    warmup_window_seconds: float = 0.0
    """Seconds of the warm-up windows: the first log window of each attempt (process start), which holds
    cuDNN autotuning, DDP's first iterations and a cold torch.compile."""
    warmup_window_images: int = 0
    """Images of the warm-up windows."""
    steady_window_seconds: float = 0.0
    """Seconds of the steady windows: every log window but each attempt's first.  A checkpoint written
    before these window fields existed loads them at their defaults (0, and None for the two below):
    its windows count as neither warm-up nor steady, so the steady figures cover only the windows since."""
    steady_window_images: int = 0
    """Images of the steady windows."""
    warmup_window_seconds_to_99: float | None = None
    """warmup_window_seconds when an evaluation first reached TARGET_ACCURACY (None: not yet, or reached
    before these fields existed)."""
    warmup_window_images_to_99: int | None = None
    """warmup_window_images when an evaluation first reached TARGET_ACCURACY."""

    def __post_init__(self) -> None:
        # Not saved: every process, a resumed one too, starts cold, so its first window is warm-up.
        self.next_window_is_warmup = True

    def add(self, images: int, seconds: float) -> None:
        """A closed log window: the attempt's first is warm-up, the others steady."""
        self.images += images
        self.train_seconds += seconds
        if self.next_window_is_warmup:
            self.warmup_window_images += images
            self.warmup_window_seconds += seconds
            self.next_window_is_warmup = False
        else:
            self.steady_window_images += images
            self.steady_window_seconds += seconds

    def record_eval(self, accuracy: float) -> None:
        self.best_accuracy = max(self.best_accuracy, accuracy)
        if accuracy >= TARGET_ACCURACY and self.seconds_to_99 is None:
            self.seconds_to_99, self.images_to_99 = self.train_seconds, self.images
            self.warmup_window_seconds_to_99 = self.warmup_window_seconds
            self.warmup_window_images_to_99 = self.warmup_window_images

    def steady(self, peak: perf.Roofline) -> dict[str, float | None]:
        """The run's figures after warm-up, beside summarize's whole-run totals.

        steady_images_per_sec = steady_window_images / steady_window_seconds; steady_mfu and
        steady_mfu_datasheet: perf.throughput's mfu and mfu_datasheet at that rate.
        warmup_seconds = warmup_window_seconds - warmup_window_images / steady_images_per_sec, at least 0:
        the training seconds the warm-up windows took beyond what their images take at the steady rate.
        steady_seconds_to_99 = seconds_to_99 minus that excess of the warm-up windows before it (a
        resume after 99% adds warm-up that seconds_to_99 does not hold).
        Every figure is None while there is no steady window (a run of one log window per attempt:
        too short to have a steady state); steady_seconds_to_99 also when seconds_to_99 is None or the
        99% mark predates these fields."""
        none = {"steady_images_per_sec": None, "steady_mfu": None, "steady_mfu_datasheet": None,
                "warmup_seconds": None, "steady_seconds_to_99": None}
        if self.steady_window_seconds <= 0:
            return none
        tp = perf.throughput(self.steady_window_images, self.steady_window_seconds, peak)
        rate = tp["images_per_sec"]

        def excess(seconds: float, images: int) -> float:
            return max(0.0, seconds - images / rate)

        to_99 = None
        if self.seconds_to_99 is not None and self.warmup_window_seconds_to_99 is not None:
            to_99 = self.seconds_to_99 - excess(self.warmup_window_seconds_to_99, self.warmup_window_images_to_99 or 0)
        return {"steady_images_per_sec": rate, "steady_mfu": tp["mfu"], "steady_mfu_datasheet": tp["mfu_datasheet"],
                "warmup_seconds": excess(self.warmup_window_seconds, self.warmup_window_images),
                "steady_seconds_to_99": to_99}

    def close_epoch(self) -> tuple[int, float]:
        """(images, seconds) of the epoch that just ended; the next one starts now."""
        done = (self.images - self.epoch_start_images, self.train_seconds - self.epoch_start_seconds)
        self.epoch_start_images, self.epoch_start_seconds = self.images, self.train_seconds
        return done

    def log_eval(self, tracker, out, peak: perf.Roofline, step: int, epoch: int, epoch_end: bool, ev,
                 train_loss: float, train_acc: float) -> None:
        """Record an evaluation: an "eval" record mid-epoch; at an epoch's end an "epoch" record with
        the epoch's throughput, and its line on the console (`out`)."""
        test = {"test_loss": ev.loss, "test_accuracy": ev.accuracy, "eval_count": ev.count,
                "train_seconds": self.train_seconds}
        if not epoch_end:
            tracker.log(record("eval", step, epoch, **test))
            return
        images, seconds = self.close_epoch()
        tp = perf.throughput(images, seconds, peak)
        tracker.log(record("epoch", step, epoch, train_loss=train_loss, train_accuracy=train_acc, **test,
                           epoch_seconds=seconds, **tp))
        out.info(f"epoch {epoch} step {step}: train loss {train_loss:.4f} acc {train_acc:.4f} | test loss "
                 f"{ev.loss:.4f} acc {ev.accuracy:.4f} ({ev.count} images) | {tp['images_per_sec']:.0f} img/s, "
                 f"{seconds:.1f} s")

    def summarize(self, final, total_steps: int, spe: int, peak: perf.Roofline, device: torch.device) -> dict:
        """The run's figures for summary.json and W&B, after the final evaluation `final`
        (collective: peak memory is the largest rank's): whole-run totals, and the steady-state ones
        after warm-up (`steady`)."""
        return {
            "test_accuracy": final.accuracy, "test_loss": final.loss, "eval_count": final.count,
            "best_test_accuracy": max(self.best_accuracy, final.accuracy),
            "seconds_to_99": self.seconds_to_99, "images_to_99": self.images_to_99,
            "epochs": total_steps / spe, "steps": total_steps,
            "train_seconds": self.train_seconds, "images": self.images,
            **perf.peak_memory_mb(device),
            **perf.throughput(self.images, self.train_seconds, peak),
            **self.steady(peak),
        }

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)  # the fields only: next_window_is_warmup belongs to the process

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any] | None) -> "Progress":
        """From a checkpoint's "progress" (or the "history" dict that checkpoints of 0.1 hold); fields
        newer than the checkpoint take their defaults.  The next window is warm-up (__post_init__)."""
        if state is None:
            return cls()
        if "progress" in state:
            return cls(**state["progress"])
        old = state.get("history") or {}
        seconds, images = old.get("epoch_start", (0.0, 0))
        return cls(train_seconds=old.get("train_seconds", 0.0), images=old.get("images", 0),
                   best_accuracy=old.get("best_test_accuracy", 0.0), seconds_to_99=old.get("seconds_to_99"),
                   epoch_start_seconds=seconds, epoch_start_images=images)  # 0.1 did not count images to 99%

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

    def add(self, images: int, seconds: float) -> None:
        """A closed log window."""
        self.images += images
        self.train_seconds += seconds

    def record_eval(self, accuracy: float) -> None:
        self.best_accuracy = max(self.best_accuracy, accuracy)
        if accuracy >= TARGET_ACCURACY and self.seconds_to_99 is None:
            self.seconds_to_99, self.images_to_99 = self.train_seconds, self.images

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
        (collective: peak memory is the largest rank's)."""
        return {
            "test_accuracy": final.accuracy, "test_loss": final.loss, "eval_count": final.count,
            "best_test_accuracy": max(self.best_accuracy, final.accuracy),
            "seconds_to_99": self.seconds_to_99, "images_to_99": self.images_to_99,
            "epochs": total_steps / spe, "steps": total_steps,
            "train_seconds": self.train_seconds, "images": self.images,
            **perf.peak_memory_mb(device),
            **perf.throughput(self.images, self.train_seconds, peak),
        }

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any] | None) -> "Progress":
        """From a checkpoint's "progress" (or the "history" dict that checkpoints of 0.1 hold)."""
        if state is None:
            return cls()
        if "progress" in state:
            return cls(**state["progress"])
        old = state.get("history") or {}
        seconds, images = old.get("epoch_start", (0.0, 0))
        return cls(train_seconds=old.get("train_seconds", 0.0), images=old.get("images", 0),
                   best_accuracy=old.get("best_test_accuracy", 0.0), seconds_to_99=old.get("seconds_to_99"),
                   epoch_start_seconds=seconds, epoch_start_images=images)  # 0.1 did not count images to 99%

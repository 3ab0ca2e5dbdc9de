"""cnn.progress: the summary's steady-state figures leave each attempt's warm-up window out, and survive
a resume (no process group: peak memory's all-reduce is a no-op for one rank)."""

from types import SimpleNamespace

import pytest
import torch

from cnn import perf
from cnn.perf import Roofline, throughput
from cnn.progress import Progress

PEAK = Roofline(100.0, 400.0, "bf16")
FINAL = SimpleNamespace(accuracy=0.995, loss=0.02, count=10000)
STEADY_KEYS = {"steady_images_per_sec", "steady_mfu", "steady_mfu_datasheet", "warmup_seconds", "steady_seconds_to_99"}


@pytest.fixture(autouse=True)
def one_rank(monkeypatch):
    monkeypatch.setattr(perf.dist, "all_reduce", lambda t, **kw: None)


def summary(progress: Progress) -> dict:
    return progress.summarize(FINAL, total_steps=100, spe=50, peak=PEAK, device=torch.device("cpu"))


def test_steady_figures_leave_the_warm_up_window_out():
    """A slow first window (compilation, autotuning) then fast ones: the steady rate is the later
    windows', the totals stay the whole run's."""
    p = Progress()
    p.add(1000, 10.0)  # warm-up: 100 img/s
    p.add(4000, 2.0)  # 2000 img/s from here
    p.record_eval(0.995)  # 99% after 12 s of training
    p.add(6000, 3.0)
    s = summary(p)
    assert s["images_per_sec"] == pytest.approx(11000 / 15.0) and s["train_seconds"] == 15.0  # totals unchanged
    assert {k: s[k] for k in throughput(11000, 15.0, PEAK)} == throughput(11000, 15.0, PEAK)
    assert s["seconds_to_99"] == 12.0 and s["images_to_99"] == 5000 and s["images"] == 11000
    assert s["steady_images_per_sec"] == pytest.approx(2000.0)
    assert s["steady_mfu"] == pytest.approx(throughput(10000, 5.0, PEAK)["mfu"])
    assert s["steady_mfu_datasheet"] == pytest.approx(throughput(10000, 5.0, PEAK)["mfu_datasheet"])
    assert s["warmup_seconds"] == pytest.approx(10.0 - 1000 / 2000)  # beyond the steady rate's 0.5 s
    assert s["steady_seconds_to_99"] == pytest.approx(12.0 - 9.5)  # = 5000 images at 2000 img/s


def test_a_run_of_one_window_has_no_steady_figures():
    p = Progress()
    p.add(1000, 10.0)
    p.record_eval(0.995)
    s = summary(p)
    assert s["images_per_sec"] == 100.0 and s["seconds_to_99"] == 10.0
    assert {k: s[k] for k in STEADY_KEYS} == dict.fromkeys(STEADY_KEYS)


def test_a_resumed_attempt_starts_with_warm_up_again():
    p = Progress()
    p.add(1000, 10.0)
    p.add(4000, 2.0)
    state = {"progress": p.state_dict()}
    q = Progress.from_checkpoint(state)
    assert q == p
    q.add(500, 5.0)  # the new process's first window: warm-up again
    q.add(2000, 1.0)
    q.record_eval(0.995)
    s = summary(q)
    assert s["images_per_sec"] == pytest.approx(7500 / 18.0)
    assert s["steady_images_per_sec"] == pytest.approx(2000.0)
    assert s["warmup_seconds"] == pytest.approx(15.0 - 1500 / 2000)
    assert s["steady_seconds_to_99"] == pytest.approx(18.0 - 14.25)


def test_a_checkpoint_without_the_warm_up_fields_still_loads():
    """Its windows count as neither warm-up nor steady; its 99% mark has no steady counterpart."""
    old = {"train_seconds": 12.0, "images": 5000, "best_accuracy": 0.991, "seconds_to_99": 11.0,
           "images_to_99": 4800, "epoch_start_seconds": 0.0, "epoch_start_images": 0}
    p = Progress.from_checkpoint({"progress": old})
    assert p.train_seconds == 12.0 and p.steady_window_seconds == 0.0 and p.warmup_window_seconds_to_99 is None
    p.add(500, 5.0)
    assert summary(p)["steady_images_per_sec"] is None  # only a warm-up window since
    p.add(3000, 1.0)
    s = summary(p)
    assert s["images_per_sec"] == pytest.approx(8500 / 18.0) and s["seconds_to_99"] == 11.0
    assert s["steady_images_per_sec"] == pytest.approx(3000.0)
    assert s["warmup_seconds"] == pytest.approx(5.0 - 500 / 3000)
    assert s["steady_seconds_to_99"] is None

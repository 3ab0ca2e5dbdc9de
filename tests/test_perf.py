"""Throughput accounting: the figures the trainer and the benchmark report."""

import time

import pytest
import torch

from cnn.model import TRAIN_FLOPS_PER_IMAGE
from cnn.perf import Clock, throughput


def test_throughput_figures_are_consistent():
    t = throughput(images=3000, seconds=2.0, peak_gflops=100.0)
    assert t["images_per_sec"] == 1500
    assert t["gflops"] == pytest.approx(1500 * TRAIN_FLOPS_PER_IMAGE / 1e9)
    assert t["mfu"] == pytest.approx(t["gflops"] / 100.0)
    assert throughput(0, 0.0, 0.0) == {"images_per_sec": 0.0, "gflops": 0.0, "mfu": 0.0}


def test_clock_measures_elapsed_time_and_restarts():
    clock = Clock(torch.device("cpu"))
    time.sleep(0.05)
    assert clock.seconds() >= 0.05
    clock.restart()
    assert clock.seconds() < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_clock_times_queued_work():
    clock = Clock(torch.device("cuda"))
    torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU time, queued without blocking the host
    queued = clock.seconds()
    assert queued > 0.005
    clock.restart()
    assert clock.seconds() < queued

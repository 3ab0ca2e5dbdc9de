"""CUDA checks; skipped cleanly where no GPU is present (run by bench/gpu_check.sh)."""

import sys

import pytest
import torch

from cnn import perf, precision
from cnn.rundir import read_summary
from conftest import run, smoke_args, torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_precision_follows_native_bf16():
    caps = precision.detect()
    native = torch.cuda.get_device_capability()[0] >= 8
    assert caps.cuda_available and caps.cuda_bf16_native == native
    assert precision.resolve("auto", "cuda", caps).name == ("bf16" if native else "fp16")
    assert precision.build("fp16", torch.device("cuda")).scaler.is_enabled()
    assert not precision.build("bf16", torch.device("cuda")).scaler.is_enabled()


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_measured_peak_stays_under_the_datasheet(prec):
    """A datasheet entry that is too low (a sparse figure, a wrong part) shows up as an MFU above 1."""
    name = torch.cuda.get_device_name()
    sheet = perf.datasheet_peak_tflops(name, prec)
    if sheet is None:
        pytest.skip(f"no datasheet {prec} peak for {name}")
    measured = perf.matmul_peak_gflops(torch.device("cuda"), perf.compute_dtype(prec)) / 1e3
    assert 0.2 * sheet < measured <= 1.05 * sheet, (name, prec, measured, sheet)


@pytest.mark.parametrize("prec", ["auto", "fp16"])
def test_cuda_training_learns(mnist_root, tmp_path, prec):
    """auto (bf16 from compute capability 8.0 on) and fp16 with its grad scaler; bench/gpu_runs.py
    runs every precision, compiled and under torchrun, for the figures."""
    proc = run([sys.executable, "train_ddp.py", *smoke_args(mnist_root, tmp_path, f"precision={prec}",
                                                            "data.train_subset=12800", "train.epochs=1",
                                                            "train.roofline=true")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = read_summary(tmp_path)
    want = precision.resolve(prec, "cuda", precision.detect()).name
    assert s["backend"] == "nccl" and s["device_name"] != "cpu" and s["precision"] == want
    assert s["eval_count"] == 1000 and s["test_accuracy"] > 0.9
    assert s["peak_gpu_mb"] > 0 and s["peak_gflops"] > 0 and 0 < s["mfu"] < 1
    assert s["peak_basis"] == want
    if s["peak_datasheet_gflops"] is not None:
        assert 0 < s["mfu_datasheet"] < 1


def test_cuda_torchrun_one_process(mnist_root, tmp_path):
    proc = run(torchrun(1, *smoke_args(mnist_root, tmp_path, "train.max_steps=20")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = read_summary(tmp_path)
    assert s["backend"] == "nccl" and s["precision_reason"].startswith("CUDA device")


def test_stop_check_group_is_gloo_next_to_nccl():
    """#10.4: the stop agreement's group on a GPU run is a gloo side group (CPU tensors)."""
    import torch.distributed as dist
    from cnn import distributed
    d = distributed.setup("cuda")
    try:
        assert d.backend == "nccl" and dist.get_backend(d.cpu_group) == "gloo"
    finally:
        distributed.cleanup()


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_no_host_device_sync_between_log_points(mnist_root, tmp_path, prec):
    """train.sync_debug=true runs every step after the first log point under
    torch.cuda.set_sync_debug_mode("error"): a blocking copy, .item() or synchronize between
    log points (stop checks included: every 10 steps) would end the run with an error."""
    proc = run([sys.executable, "train_ddp.py", *smoke_args(mnist_root, tmp_path, f"precision={prec}",
                                                            "train.sync_debug=true", "train.log_every=25",
                                                            "data.train_subset=6400", "train.batch_size=64",
                                                            "train.epochs=1")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_summary(tmp_path)["steps"] == 100

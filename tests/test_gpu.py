"""CUDA checks; skipped cleanly where no GPU is present (run by bench/gpu_check.sh)."""

import sys

import pytest
import torch

from cnn.rundir import read_summary
from conftest import run, smoke_args, torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_precision_is_bf16_on_cuda():
    from cnn import precision
    p = precision.build("auto", torch.device("cuda"))
    assert p.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp32") and not p.scaler.is_enabled()
    assert precision.build("fp16", torch.device("cuda")).scaler.is_enabled()


@pytest.mark.parametrize("prec", ["fp32", "bf16", "fp16"])
def test_cuda_training_learns(mnist_root, tmp_path, prec):
    proc = run([sys.executable, "train_ddp.py", *smoke_args(mnist_root, tmp_path, f"precision={prec}",
                                                            "data.train_subset=12800", "train.epochs=1")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = read_summary(tmp_path)
    assert s["backend"] == "nccl" and s["device_name"] != "cpu" and s["precision"] == prec
    assert s["eval_count"] == 1000 and s["test_accuracy"] > 0.9


def test_cuda_torchrun_one_process(mnist_root, tmp_path):
    proc = run(torchrun(1, *smoke_args(mnist_root, tmp_path, "train.max_steps=20")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_summary(tmp_path)["backend"] == "nccl"


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
                                                            "data.train_subset=6400", "train.batch_size=64")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_summary(tmp_path)["steps"] == 100

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

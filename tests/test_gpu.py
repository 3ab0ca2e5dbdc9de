"""CUDA checks; skipped cleanly where no GPU is present (run by bench/gpu_check.sh)."""

import copy
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
    # Muon's update replays as a CUDA graph from its second step; fp16's grad scaler keeps it eager
    assert s["muon_graph_replays"] == (0 if want == "fp16" else s["steps"] - 1)
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


def test_seed_step_seeds_the_cuda_generator_as_torch_manual_seed_does():
    from data.sharding import seed_step
    dev = torch.device("cuda", 0)
    torch.manual_seed(1234)
    want = torch.nn.functional.dropout(torch.ones(4096, device=dev), 0.25), torch.rand(5, device=dev), torch.rand(5)
    torch.manual_seed(0)
    torch.rand(7, device=dev)  # the generator's offset moved on: seed_step must reset it too
    seed_step(1234, dev)
    got = torch.nn.functional.dropout(torch.ones(4096, device=dev), 0.25), torch.rand(5, device=dev), torch.rand(5)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_muon_update_replays_as_a_cuda_graph_and_matches_the_eager_step():
    """optim.GraphedUpdate: the first step eager (it makes the momentum buffers), then one replay a
    step with the learning rate changing; a load_state_dict (new buffers) captures again."""
    from cnn.optim import Muon
    dev = torch.device("cuda", 0)
    shapes = [(64, 32, 3, 3), (128, 64, 3, 3)]

    def make(graph: bool):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, device=dev)) for shape in shapes]
        return params, Muon(params, lr=0.02, cuda_graph=graph)

    (pa, eager), (pb, graphed) = make(False), make(True)
    start = [p.detach().clone() for p in pb]

    def steps(first: int, n: int) -> None:
        for step in range(first, first + n):
            torch.manual_seed(100 + step)
            grads = [torch.randn(shape, device=dev) for shape in shapes]
            for params, opt in ((pa, eager), (pb, graphed)):
                for p, grad in zip(params, grads):
                    p.grad = grad.clone()
                for group in opt.param_groups:
                    group["lr"] = 0.02 * (step + 1) / 10
                opt.step()

    steps(0, 6)
    assert graphed.graph_replays == 5 and eager.graph_replays == 0
    for a, b, b0 in zip(pa, pb, start):
        assert (b - b0).abs().max() > 1e-3  # the replays moved the weights
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    for a, b in zip(pa, pb):
        assert torch.equal(eager.state[a]["momentum_buffer"], graphed.state[b]["momentum_buffer"])
    graphed.load_state_dict(copy.deepcopy(eager.state_dict()))  # a resume: buffers at new addresses
    with torch.no_grad():
        for a, b in zip(pa, pb):
            b.copy_(a)
    steps(6, 3)
    assert graphed.graph_replays == 3  # the new capture's count
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        assert torch.equal(eager.state[a]["momentum_buffer"], graphed.state[b]["momentum_buffer"])

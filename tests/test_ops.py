"""Host work per step as a figure (train.count_ops): the aten ops one training step dispatches,
the whole loop -- DDP's all-reduce, both optimizers, the loop's bookkeeping -- held to a budget
so that a change adding ops to the step fails here. On a GPU each op is a kernel launch or more
of host time (docs/performance.md)."""

import pytest
import torch

import train_ddp
from cnn import config, distributed
from cnn.rundir import read_summary
from conftest import clear_launcher_env, smoke_args

# Measured with torch 2.14.1 on the CPU, world size 1 (DDP and its all-reduce run as at any size),
# precision pinned: autocast adds casts. Before the Newton-Schulz iteration took torch.optim.Muon's
# addmm form: 261 (fp32) and 284 (bf16); with it, 211 and 234; its Gram form (half the multiply-adds)
# adds 2 ops a weight, Muon's momentum as foreach ops takes 3 off the step: 212 and 235; DDP without
# static_graph (a select and a _local_scalar_dense per parameter each backward, cnn/distributed/ddp.py):
# 192 and 215.
BUDGET = {("2.14", "fp32"): 192, ("2.14", "bf16"): 215}
TORCH = ".".join(torch.__version__.split(".")[:2])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_dispatches_no_more_ops_than_its_budget(mnist_root, tmp_path, monkeypatch, precision):
    budget = BUDGET.get((TORCH, precision))
    if budget is None:
        pytest.skip(f"the op budget was measured on torch 2.14, this is {torch.__version__}")
    clear_launcher_env(monkeypatch)
    cfg = config.parse_args(smoke_args(mnist_root, tmp_path, "data.train_subset=640", "train.batch_size=64",
                                       "train.max_steps=6", "train.log_every=50", "data.test_subset=100",
                                       f"precision={precision}", "train.count_ops=true"))
    d = distributed.setup("cpu", 60)
    try:
        assert train_ddp.train(cfg, d, distributed.StopRequest(announce=False)) == 0
    finally:
        distributed.cleanup()
    s = read_summary(tmp_path)
    ops, by_name = s["ops_per_step"], s["ops_by_name"]
    assert sum(by_name.values()) == ops
    assert by_name["allreduce_"] >= 1 and by_name["convolution_backward"] == 3  # the whole step was counted
    assert ops <= budget, f"{ops} ops per step, budget {budget}: {by_name}"


def test_the_loop_formats_no_traceback_per_step(mnist_root, tmp_path, monkeypatch):
    """Host work the op count cannot see: torch.manual_seed formats the caller's stack for each device
    type not initialized (data/sharding.py seed_step) -- it was called every step."""
    import traceback
    calls = []
    real = traceback.format_stack
    monkeypatch.setattr(traceback, "format_stack", lambda *a, **k: calls.append(1) or real(*a, **k))
    clear_launcher_env(monkeypatch)
    steps = 12
    cfg = config.parse_args(smoke_args(mnist_root, tmp_path, "data.train_subset=1280", "train.batch_size=64",
                                       f"train.max_steps={steps}", "train.log_every=50", "data.test_subset=100",
                                       "precision=fp32"))
    d = distributed.setup("cpu", 60)
    try:
        assert train_ddp.train(cfg, d, distributed.StopRequest(announce=False)) == 0
    finally:
        distributed.cleanup()
    assert len(calls) < steps, f"{len(calls)} stacks formatted in a {steps}-step run"

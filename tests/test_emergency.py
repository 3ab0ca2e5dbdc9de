"""The emergency checkpoint: when a collective fails, a surviving rank writes the last completed
optimizer step -- and only a consistent state, never over a newer checkpoint.

The trainer runs in this process (world size 1, gloo) with a collective failure forced at each
place it can strike: inside the gradient all-reduce (the live state is the previous step's),
in the stop agreement after the update (this step's), and during the update itself (no
consistent state: nothing written).  The real thing, a SIGKILLed rank under torchrun at world
size 2 and 3, is in test_fault.py."""

import pytest
import torch

import train_ddp
from cnn import checkpoint, config, distributed
from cnn.model import CNN
from conftest import clear_launcher_env, smoke_args

GONE = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234"
RUN = ("data.train_subset=640", "train.batch_size=32", "train.epochs=1", "checkpoint.every_steps=0",
       "train.log_every=5", "precision=fp32", "data.test_subset=200")  # 20 steps, checkpoints at the end only


class _Stop:
    """StopRequest's interface without signal handlers; `fail` raises from the agreement."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def agreed(self, group) -> int:
        if self.fail:
            raise RuntimeError(GONE)
        return 0


def _train(mnist_root, run_dir, monkeypatch, stop=None) -> int:
    clear_launcher_env(monkeypatch)
    cfg = config.parse_args(smoke_args(mnist_root, run_dir, *RUN))
    d = distributed.setup("cpu", 60)
    try:
        return train_ddp.train(cfg, d, stop or _Stop())
    finally:
        distributed.cleanup()


def _steps(run_dir) -> list[int]:
    return [checkpoint.load(p)["step"] for p in checkpoint.list_checkpoints(run_dir)]


def test_failure_in_the_gradient_all_reduce_saves_the_previous_step(mnist_root, tmp_path, monkeypatch, capsys):
    backward, calls = torch.Tensor.backward, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # step 8's backward: 7 steps are complete
            raise RuntimeError(GONE)
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", failing)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        _train(mnist_root, tmp_path, monkeypatch)
    assert _steps(tmp_path) == [7]
    assert "rank 0: a collective failed; emergency checkpoint of step 7" in capsys.readouterr().err
    state = checkpoint.load(checkpoint.list_checkpoints(tmp_path)[0], checkpoint.fits_model)
    assert state["progress"]["images"] == 5 * 32  # the normal format: progress to the last log point
    assert state["precision"]["resolved"] == "fp32" and state["step_in_epoch"] == 7


def test_failure_in_the_stop_agreement_saves_this_step(mnist_root, tmp_path, monkeypatch):
    """The stop agreement runs after step 10's update (STOP_CHECK_EVERY): step 10 is complete."""
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        _train(mnist_root, tmp_path, monkeypatch, _Stop(fail=True))
    assert _steps(tmp_path) == [train_ddp.STOP_CHECK_EVERY]


def test_failure_during_the_update_writes_nothing(mnist_root, tmp_path, monkeypatch, capsys):
    """A failure after the optimizer has changed some weights but before the step is counted: the
    live state belongs to no step, so no checkpoint, however the error reads."""
    build = train_ddp.build_optimizer

    def half_applied(model, cfg, *args):
        opt = build(model, cfg, *args)
        step, calls = opt.step, []

        def failing(*args, **kwargs):
            step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 8:
                raise RuntimeError(GONE)

        opt.step = failing
        return opt

    monkeypatch.setattr(train_ddp, "build_optimizer", half_applied)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        _train(mnist_root, tmp_path, monkeypatch)
    assert _steps(tmp_path) == [] and "emergency" not in capsys.readouterr().err


def _saver(run_dir, model=None):
    model = model or CNN()
    opt = torch.optim.Adam(model.parameters())
    return checkpoint.Saver(run_dir, 5, model, opt, torch.amp.GradScaler("cpu", enabled=False), {"seed": 0}, 2, 30,
                            {"requested": "fp32", "resolved": "fp32", "reason": "requested"})


def test_never_over_a_newer_or_equal_checkpoint(tmp_path):
    saver = _saver(tmp_path)
    newer = saver.save(20, {})
    before = newer.read_bytes()
    assert saver.save_emergency(15, {}) is None and saver.save_emergency(20, {}) is None
    assert _steps(tmp_path) == [20] and newer.read_bytes() == before
    assert saver.save_emergency(21, {}) == checkpoint.path_for(tmp_path, 21)
    assert _steps(tmp_path) == [21, 20]


def test_a_replica_whose_state_is_not_finite_writes_nothing(tmp_path):
    model = CNN()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")  # this replica's own failure, e.g. a non-finite loss applied
    assert _saver(tmp_path, model).save_emergency(7, {}) is None and _steps(tmp_path) == []


def test_nccl_runs_get_no_emergency_saver(tmp_path):
    args = (tmp_path, 5, CNN(), None, None, {}, 2, 30, {})
    assert isinstance(checkpoint.make_emergency_saver("gloo", *args), checkpoint.Saver)
    assert type(checkpoint.make_emergency_saver("nccl", *args)) is checkpoint.NullSaver

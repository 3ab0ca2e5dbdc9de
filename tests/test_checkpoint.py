import copy

import pytest
import torch

from cnn import checkpoint
from cnn.model import CNN
from cnn.progress import Progress


def _state(step: int) -> dict:
    model = CNN()
    opt = torch.optim.Adam(model.parameters())
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "step": step,
            "epoch": 0, "step_in_epoch": step, "config": {"seed": 0}}


def _check(sd):
    CNN().load_state_dict(sd)


def test_save_load_roundtrip_and_pruning(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(_state(step), tmp_path, keep=2)
    paths = checkpoint.list_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["step-00000030.pt", "step-00000020.pt"]
    state = checkpoint.load(paths[0], _check)
    assert state["step"] == 30 and state["format_version"] == checkpoint.FORMAT_VERSION
    CNN().load_state_dict(state["model"])  # loadable without DDP
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = checkpoint.save(_state(5), tmp_path, keep=2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match=f"{path}.*truncated or corrupt"):
        checkpoint.load(path, _check)


def test_foreign_checkpoint_is_rejected(tmp_path):
    state = _state(5)
    state["model"] = torch.nn.Linear(3, 2).state_dict()
    path = checkpoint.save(state, tmp_path, keep=2)
    with pytest.raises(checkpoint.CheckpointError, match=f"{path}.*do not fit this model"):
        checkpoint.load(path, _check)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(checkpoint.CheckpointError, match="not an mnist-ddp checkpoint"):
        checkpoint.load(other, _check)


def test_newer_format_is_rejected(tmp_path):
    path = checkpoint.save(_state(5), tmp_path, keep=2)
    state = torch.load(path, weights_only=True)
    state["format_version"] = checkpoint.FORMAT_VERSION + 1
    torch.save(state, path)
    with pytest.raises(checkpoint.CheckpointError, match="newer than this code"):
        checkpoint.load(path, _check)


def test_auto_falls_back_to_previous_valid(tmp_path):
    checkpoint.save(_state(10), tmp_path, keep=3)
    newest = checkpoint.save(_state(20), tmp_path, keep=3)
    newest.write_bytes(b"garbage")
    warnings = []
    state = checkpoint.find_resume("auto", tmp_path, _check, warnings.append)
    assert state["step"] == 10
    assert len(warnings) == 1 and str(newest) in warnings[0]
    # an explicit path gets no silent fallback
    with pytest.raises(checkpoint.CheckpointError, match=str(newest)):
        checkpoint.find_resume(str(newest), tmp_path, _check, warnings.append)
    assert checkpoint.find_resume("never", tmp_path, _check, warnings.append) is None
    assert checkpoint.find_resume("auto", tmp_path / "empty", _check, warnings.append) is None


KILL_MID_SAVE = """
import os, signal, sys, torch
sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]
from cnn import checkpoint
from test_checkpoint import _state
checkpoint.save(_state(10), {run!r}, keep=2)
def dying_save(obj, f, *a, **k):
    f.write(b"PK\\x03\\x04 half a zip")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would, mid-write
torch.save = dying_save
checkpoint.save(_state(20), {run!r}, keep=2)
"""


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    import subprocess, sys
    from conftest import REPO
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE.format(repo=str(REPO), run=str(tmp_path))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000010.pt"]
    assert list((tmp_path / "checkpoints").glob(".step-00000020.pt.*.tmp")), "the partial write should be a temp file"
    assert checkpoint.find_resume("auto", tmp_path, _check, print)["step"] == 10


def _configs(**now_overrides):
    from cnn import config
    saved = config.to_dict(config.build(None, ["optim.lr=0.002"]))
    now = config.to_dict(config.build(None, ["optim.lr=0.01", *now_overrides.get("extra", [])]))
    return saved, now


def test_config_mismatch_names_the_key_both_values_and_the_ways_out():
    saved, now = _configs(extra=["run.dir=/runs/mine"])
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.check_config(saved, now, "/runs/mine")
    msg = str(info.value)
    assert msg == ("/runs/mine: optim.lr was 0.002 when saved but is 0.01 now: pass optim.lr=0.002 to continue "
                   "this run, or pass another run.dir to start a new run")
    assert "checkpoint.resume=never" not in msg  # in the same folder it would mix two runs' checkpoints


def test_config_mismatch_with_an_explicit_checkpoint_does_not_blame_run_dir():
    """The user already chose a new run.dir; the way out is the checkpoint, not the folder."""
    saved, now = _configs(extra=["run.dir=/runs/new", "checkpoint.resume=/runs/old/step-00000010.pt"])
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.check_config(saved, now, "/runs/old/step-00000010.pt")
    msg = str(info.value)
    assert "optim.lr was 0.002 when saved but is 0.01 now" in msg
    assert msg.endswith("pass optim.lr=0.002 to continue from this checkpoint, or drop checkpoint.resume to start fresh")
    assert "run.dir" not in msg


def test_changed_precision_or_layout_is_not_a_mismatch():
    from cnn import config
    saved = config.to_dict(config.build(None, []))
    now = config.to_dict(config.build(None, ["precision=fp16", "train.channels_last=false"]))
    checkpoint.check_config(saved, now, "x")  # adapted by restore(), below


def test_missing_explicit_checkpoint_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"^checkpoint.resume: /no/such.pt: no such checkpoint file"):
        checkpoint.find_resume("/no/such.pt", tmp_path, _check, print)


def _trained(channels_last: bool, fp16: bool):
    """A model, fused Adam and scaler after one step, in the given layout and precision (CPU)."""
    torch.manual_seed(0)
    model = CNN()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    return model, opt, scaler


def _step(model, opt, scaler, channels_last: bool, fp16: bool):
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("saved_cl, now_cl", [(True, False), (False, True)])
def test_restore_puts_optimizer_state_in_the_new_memory_format(saved_cl, now_cl):
    """Fused Adam walks memory linearly: state in the old layout would silently pair the wrong
    elements on CPU (and fail on CUDA). After restore() the next step equals a step taken
    with the same values laid out natively."""
    model, opt, scaler = _trained(saved_cl, False)
    _step(model, opt, scaler, saved_cl, False)
    saved = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict()}
    runs = []
    for restore in (checkpoint.restore, None):
        state = copy.deepcopy(saved)  # as torch.load gives it: tensors that alias nothing
        m, o, s = _trained(now_cl, False)
        if restore:
            notes = restore(state, m, o, s)
            assert any("memory format" in n for n in notes)
        else:  # the reference: the same values loaded with strides converted by hand
            m.load_state_dict(state["model"])
            o.load_state_dict(state["optimizer"])
            for p, slots in o.state.items():
                for k, v in slots.items():
                    if v.shape == p.shape:
                        slots[k] = torch.empty_like(p).copy_(v)
        for p, slots in o.state.items():
            assert all(v.stride() == p.stride() for v in slots.values() if v.shape == p.shape)
        _step(m, o, s, now_cl, False)
        runs.append(m.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_restore_into_fp16_starts_a_fresh_scaler_and_fp16_state_loads_anywhere():
    model, opt, scaler = _trained(True, False)
    _step(model, opt, scaler, True, False)
    fp32 = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict()}
    assert fp32["scaler"] == {}  # a disabled scaler saves nothing: loading it into fp16's raised before
    m, o, s = _trained(True, True)
    assert checkpoint.restore(fp32, m, o, s) == ["fp16 loss scaler starts fresh (the checkpoint was saved without fp16)"]
    _step(m, o, s, True, True)
    fp16 = {"model": m.state_dict(), "optimizer": o.state_dict(), "scaler": s.state_dict()}
    m2, o2, s2 = _trained(True, True)
    assert checkpoint.restore(fp16, m2, o2, s2) == [] and s2.get_scale() == s.get_scale()
    m3, o3, s3 = _trained(True, False)
    assert checkpoint.restore(fp16, m3, o3, s3) == []  # back to fp32: the scaler state is not needed


def test_progress_resumes_from_new_and_0_1_checkpoints():
    """Progress round-trips through a checkpoint's "progress"; a 0.1 checkpoint's "history" dict
    (epoch_start = (train seconds, images) when the epoch began) maps field by field."""
    now = Progress(train_seconds=12.5, images=6400, best_accuracy=0.98, seconds_to_99=None, images_to_99=None,
                   epoch_start_seconds=10.0, epoch_start_images=5120)
    assert Progress.from_checkpoint({"progress": now.state_dict()}) == now
    old = {"history": {"train_seconds": 30.0, "images": 59904, "best_test_accuracy": 0.991, "seconds_to_99": 28.0,
                       "epoch_start": (15.0, 29952)}}
    assert Progress.from_checkpoint(old) == Progress(
        train_seconds=30.0, images=59904, best_accuracy=0.991, seconds_to_99=28.0, images_to_99=None,
        epoch_start_seconds=15.0, epoch_start_images=29952)
    assert Progress.from_checkpoint(None) == Progress()


def test_a_checkpoint_records_its_runs_precision_and_older_ones_still_tell(tmp_path):
    """The Saver records what was asked, what it resolved to and why; a checkpoint saved before
    it did still says what precision=auto chose: from an explicit config, else from its run's
    metrics.jsonl start record, else fp32 with the way to say otherwise."""
    from cnn import precision
    from cnn.rundir import RunDir, record

    model = CNN()
    opt, scaler = torch.optim.Adam(model.parameters()), torch.amp.GradScaler("cpu", enabled=False)
    bf16 = precision.build("bf16", torch.device("cpu"), "CPU with native bf16 (amx)")
    saver = checkpoint.Saver(tmp_path / "new", 2, model, opt, scaler, {"seed": 0, "precision": "auto"}, 1, 10,
                             precision.record("auto", bf16))
    path = saver.save(3, {})
    state = checkpoint.load(path, _check)
    assert state["precision"] == {"requested": "auto", "resolved": "bf16", "reason": "CPU with native bf16 (amx)"}
    assert checkpoint.run_precision(state, path) == ("bf16", "recorded in the checkpoint")

    old = {**_state(20), "config": {"seed": 0, "precision": "fp16"}}  # format 1, before the record
    path = checkpoint.save(old, tmp_path / "explicit", keep=2)
    assert checkpoint.run_precision(checkpoint.load(path), path)[0] == "fp16"

    run = RunDir(tmp_path / "auto")
    path = checkpoint.save({**old, "config": {"seed": 0, "precision": "auto"}}, run.path, keep=2)
    name, why = checkpoint.run_precision(checkpoint.load(path), path)
    assert name == "fp32" and "pass precision=bf16" in why  # nothing tells: the one every machine computes alike
    log = run.metrics_log()
    log.append(record("start", 0, 0, precision="bf16"))  # what auto chose in the attempt that saved step 20
    log.append(record("start", 30, 0, precision="fp32"))  # a later attempt, after this checkpoint: not its
    name, why = checkpoint.run_precision(checkpoint.load(path), path)
    assert name == "bf16" and "metrics.jsonl" in why

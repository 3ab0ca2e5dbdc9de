import torch
import pytest

from cnn import checkpoint
from cnn.model import CNN


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

"""Ctrl-C and SIGTERM on real launches: every rank stops at one agreed step with one
checkpoint and no traceback, and a re-run resumes from it."""

import os
import signal
import stat
import subprocess
import sys
import time

from cnn import checkpoint
from cnn.rundir import read_summary
from conftest import REPO, assert_ranks_ok, child_env, ranks, smoke_args, torchrun


def _stop_after(cmd, run_dir, sig, step=20):
    """Start cmd, send `sig` once metrics.jsonl has reached `step`; returns (returncode, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.exists() and f'"step": {step}' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


# 100 steps of one epoch; a stop check every 10 steps, checkpoints only at the end or when stopped.
STOPPABLE = ("data.train_subset=6400", "train.batch_size=64", "train.epochs=1", "train.log_every=5",
             "checkpoint.every_steps=0")


def _stopped_step(run_dir, out, err, signame):
    saved = checkpoint.list_checkpoints(run_dir)
    assert len(saved) == 1, out + err  # one checkpoint, written once, by rank 0
    step = checkpoint.load(saved[0])["step"]
    assert 20 <= step < 100 and step % 10 == 0
    assert out.count(f"{signame}: stopped at step {step} with a checkpoint; re-run with run.dir={run_dir} to resume") == 1
    assert "KeyboardInterrupt" not in err and 'train_ddp.py", line' not in err, err[-3000:]
    return step


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_then_resumes(mnist_root, tmp_path):
    """Ctrl-C reaches torchrun, which forwards SIGINT to its workers: they stop at one agreed
    step, rank 0 writes one checkpoint, no worker prints a traceback (torchrun itself reports
    the signal), and a re-run finishes the job. SIGTERM takes the same path (exit 143)."""
    args = smoke_args(mnist_root, tmp_path, *STOPPABLE)
    code, out, err = _stop_after(torchrun(2, *args), tmp_path, signal.SIGINT)
    assert code != 0
    stopped_at = _stopped_step(tmp_path, out, err, "SIGINT")
    assert err.count("press Ctrl-C again to exit at once") == 1  # rank 0 only
    procs = ranks(2, *args)  # the re-run: any launcher
    assert_ranks_ok(procs)
    assert f"resumed from step {stopped_at}" in procs[0].stdout
    assert read_summary(tmp_path)["steps"] == 100


def test_ctrl_c_plain_python_exits_130_then_resume_writes_group_readable_files(mnist_root, tmp_path):
    """A plain `python train_ddp.py` stops on Ctrl-C like SIGTERM, with exit code 130. The
    resumed run is made under umask 027: every file it writes is 0640 (mkstemp's 0600
    would lock the group out of a shared run folder)."""
    args = smoke_args(mnist_root, tmp_path, *STOPPABLE)
    code, out, err = _stop_after([sys.executable, "train_ddp.py", *args], tmp_path, signal.SIGINT)
    assert code == 130, err[-3000:]
    stopped_at = _stopped_step(tmp_path, out, err, "SIGINT")
    proc = subprocess.run([sys.executable, "train_ddp.py", *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in proc.stdout
    files = [tmp_path / "summary.json", tmp_path / "config.yaml", tmp_path / "metrics.jsonl",
             tmp_path / "predictions.pt", checkpoint.path_for(tmp_path, 100)]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o640" for f in files}

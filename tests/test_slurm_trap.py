"""slurm/common.sh's preemption trap, driven without a cluster: fake scancel/scontrol on PATH
record what they are asked to do; the batch shell gets USR1 as SLURM would send it."""

import subprocess

import pytest

from cnn import rundir
from conftest import REPO

FAKE = """#!/bin/bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
touch "$FAKE_LOG.cancelled"
"""
# A batch script: the "training step" sends USR1 to the batch shell (a preemption), then,
# like train_ddp.py, exits 143 once it has been told to stop (by the fake scancel).
BATCH = """
source slurm/common.sh
echo "RUN_DIR=$RUN_DIR"
bash -c 'sleep 0.3; kill -USR1 $PPID; while [ ! -e "$0" ]; do sleep 0.05; done; exit 143' "$FAKE_LOG.cancelled" &
run_step $!
"""


def preempt(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("scancel", "scontrol"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "RUN_ROOT": "runs", **env}
    proc = subprocess.run(["bash", "-c", BATCH], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


@pytest.mark.parametrize("env, ref", [
    ({"SLURM_JOB_ID": "42"}, "42"),
    # task 1 of array 100 runs as job 101; the array's id is also one task's job id, and
    # `scancel 100` / `scontrol requeue 100` would act on every task of the array
    ({"SLURM_JOB_ID": "100", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "1"}, "100_1"),
])
def test_preemption_addresses_only_this_job_or_array_task(tmp_path, env, ref):
    proc, calls = preempt(tmp_path, **env)
    assert calls == [f"scancel --signal=TERM {ref}", f"scontrol requeue {ref}"], proc.stdout + proc.stderr
    assert proc.returncode == 0
    assert f"RUN_DIR=runs/{ref}" in proc.stdout
    assert ref == rundir.job_id(env), "the trap's run folder and the trainer's default must agree"
    assert f"requeueing {ref} (requeue 1 of at most 3)" in proc.stdout


def test_requeue_limit_ends_the_loop_with_a_line(tmp_path):
    proc, calls = preempt(tmp_path, SLURM_JOB_ID="42", SLURM_RESTART_COUNT="3")
    assert calls == ["scancel --signal=TERM 42"], "no requeue past MAX_REQUEUES"
    assert proc.returncode == 143  # the step's own code: the job ends as stopped, not completed
    line = next(l for l in proc.stdout.splitlines() if "NOT requeueing" in l)
    assert "already requeued 3 times (MAX_REQUEUES=3)" in line and "run.dir=runs/42" in line


def test_requeue_limit_is_configurable(tmp_path):
    proc, calls = preempt(tmp_path, SLURM_JOB_ID="42", SLURM_RESTART_COUNT="3", MAX_REQUEUES="5")
    assert calls[-1] == "scontrol requeue 42" and proc.returncode == 0
    assert "requeue 4 of at most 5" in proc.stdout

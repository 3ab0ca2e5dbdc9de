"""The start-up of a two-rank gloo job (tests/dist_worker.py): a long timeout through the first
step, a short one after it, and one precision=auto choice for ranks on different CPUs."""

import subprocess
import sys

import pytest

from conftest import REPO, child_env, free_port

WORKER = REPO / "tests" / "dist_worker.py"


@pytest.fixture(scope="module")
def job():
    """Both ranks' output: one launch that both tests read."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    try:
        out0 = procs[0].communicate(timeout=120)[0]
    finally:
        procs[1].kill()
    out1 = procs[1].communicate(timeout=30)[0]
    return out0, out1


def test_slow_first_step_survives_and_a_hung_rank_ends_the_job(job):
    """Rank 1 reaches its first collective 3 s late, beyond dist.timeout_s (1 s): no timeout, because the
    group runs on dist.init_timeout_s (30 s) until end_warmup().  After it, rank 1 hangs and rank 0's next
    collective fails within the short timeout, not the start-up one."""
    out0, out1 = job
    assert "warm" in out0.splitlines() and "warm" in out1.splitlines(), out0 + out1
    failed = [line for line in out0.splitlines() if line.startswith("collective failed after")]
    assert failed, out0
    waited = float(failed[0].split()[3])
    assert 0.9 <= waited < 4, failed[0]


def test_ranks_on_different_cpus_agree_on_auto_precision(job):
    """Rank 0 has native bf16, rank 1 does not: both measure and take the same precision."""
    lines = [next(line for line in out.splitlines() if line.startswith("precision ")) for out in job]
    assert lines[0] == lines[1], lines
    assert "ranks disagree (bf16, fp32)" in lines[0] and "measured fp32" in lines[0] and "slowest rank" in lines[0]

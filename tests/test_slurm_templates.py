"""The slurm/*.sbatch templates run as SLURM would run their batch shell, without a cluster: a fake
`srun` on PATH records the command line and the environment it was started with (what it passes
to every task, --export=ALL being srun's default), a fake `scontrol` names the nodes.  Checked:
each task gets the job's CPUs whatever the Slurm version, torch.compile's inductor workers are
bounded by them, and the rendezvous port stays out of Linux's ephemeral range."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cnn.distributed.launch import slurm_port
from conftest import REPO

TEMPLATES = sorted(p.name for p in (REPO / "slurm").glob("*.sbatch"))
SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_DIR/srun.argv"
env -0 > "$FAKE_DIR/srun.env"
"""
SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf 'node1\\nnode2\\n'
exit 0
"""
# ranks that share one srun task's CPUs: torchrun's workers (one task per node), or 1 when srun
# starts every rank itself
RANKS_PER_TASK = {"srun_direct.sbatch": 1}


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """What SLURM gives a batch shell (2 nodes, 4 GPUs and 12 CPUs per task), here."""
    return {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "FAKE_DIR": str(tmp_path), "HOME": str(tmp_path),
        "SLURM_SUBMIT_DIR": str(tmp_path / "submit"), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "12", **extra}


def run_template(tmp_path: Path, name: str, **extra: str) -> tuple[list[str], dict[str, str]]:
    """Run slurm/<name> as its batch shell; the fake srun's argv (options first) and environment."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    for tool, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (tmp_path / "bin" / tool).write_text(text)
        (tmp_path / "bin" / tool).chmod(0o755)
    submit = tmp_path / "submit"  # the "repository root" the job is submitted from: nothing lands in REPO
    submit.mkdir(exist_ok=True)
    if not (submit / "slurm").exists():
        (submit / "slurm").symlink_to(REPO / "slurm")
    if "$SLURM_ARRAY_TASK_ID" in (REPO / "slurm" / name).read_text():  # task 2 of array 4240
        extra = {"SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2", **extra}
    proc = subprocess.run(["bash", str(REPO / "slurm" / name), "train.epochs=1"], env=job_env(tmp_path, **extra),
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training step finished with exit code 0" in proc.stdout, proc.stdout + proc.stderr
    argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    env = dict(item.split("=", 1) for item in (tmp_path / "srun.env").read_text().split("\0") if "=" in item)
    return argv, env


def task_cpus(argv: list[str], env: dict[str, str], version: tuple[int, int]) -> int:
    """The CPUs each task of this srun gets from a Slurm of `version`: its -c/--cpus-per-task option,
    else the variable that version reads -- SRUN_CPUS_PER_TASK on 22.05 and 23.02 (srun(1), 22.05: not
    inherited from the allocation), SLURM_CPUS_PER_TASK before and since 23.11 (CHANGELOG/slurm-23.11.md:
    "Replace SRUN_CPUS_PER_TASK with SLURM_CPUS_PER_TASK") -- else 1."""
    for arg in argv:
        if not arg.startswith("-"):  # the program: srun's own options end here
            break
        m = re.fullmatch(r"(?:--cpus-per-task=|-c)(\d+)", arg)
        if m:
            return int(m.group(1))
    var = "SRUN_CPUS_PER_TASK" if (22, 5) <= version < (23, 11) else "SLURM_CPUS_PER_TASK"
    return int(env.get(var, "1"))


def test_every_template_is_covered():
    """A new template that starts its ranks differently must say how many share one task's CPUs."""
    assert TEMPLATES, "no slurm/*.sbatch"
    for name in TEMPLATES:
        text = (REPO / "slurm" / name).read_text()
        assert re.search(r"^srun ", text, re.M), f"{name} runs no srun: this file's tests assume one"
        assert name in RANKS_PER_TASK or "torch.distributed.run" in text, name


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_task_gets_the_jobs_cpus_on_every_slurm_version(tmp_path, name):
    """Slurm >= 22.05: srun no longer inherits --cpus-per-task from the allocation (sbatch(1), 22.05);
    without it each task of the step gets 1 CPU."""
    argv, env = run_template(tmp_path, name)
    for version in ((21, 8), (22, 5), (23, 2), (23, 11), (24, 11)):
        assert task_cpus(argv, env, version) == 12, (version, argv[:4])
    # and for an srun added to a copy of the template, on 22.05 / 23.02
    assert env.get("SRUN_CPUS_PER_TASK") == "12"


@pytest.mark.parametrize("name", TEMPLATES)
def test_compile_workers_are_bounded_by_the_tasks_cpus(tmp_path, name):
    """train.compile=true: inductor starts TORCHINDUCTOR_COMPILE_THREADS workers per rank, else
    min(32, the CPUs the rank may run on); bounded by the task's 12 CPUs over the ranks sharing them."""
    ranks = RANKS_PER_TASK.get(name, 4)  # torchrun: --nproc_per_node = the node's 4 GPUs
    argv, env = run_template(tmp_path, name)
    assert env.get("TORCHINDUCTOR_COMPILE_THREADS") == str(12 // ranks)
    if name not in RANKS_PER_TASK:
        assert any("--nproc_per_node" in a for a in argv)


@pytest.mark.parametrize("name", TEMPLATES)
def test_compile_workers_at_least_one_and_the_users_value_wins(tmp_path, name):
    _, env = run_template(tmp_path, name, SLURM_CPUS_PER_TASK="2", SLURM_GPUS_ON_NODE="8")
    assert env.get("TORCHINDUCTOR_COMPILE_THREADS") == ("2" if name in RANKS_PER_TASK else "1")
    _, env = run_template(tmp_path, name, TORCHINDUCTOR_COMPILE_THREADS="5")
    assert env.get("TORCHINDUCTOR_COMPILE_THREADS") == "5"


# job ids around every wrap of the formulas, and the large ones of long-lived clusters
JOB_IDS = [*range(0, 50000, 7), 11999, 12000, 12001, 12767, 19999, 20000, 39999, 2**31 - 1, 4294967294, 987654321]


def test_job_port_is_slurm_port_and_below_the_ephemeral_range():
    """slurm/common.sh's job_port (torchrun templates) and cnn.distributed.slurm_port (srun_direct) are
    one formula, in [1024, 32768): Linux hands out local ports for outgoing connections from
    net.ipv4.ip_local_port_range, 32768-60999 by default."""
    script = 'source slurm/common.sh; for id in "$@"; do SLURM_JOB_ID=$id job_port; done'
    out = subprocess.run(["bash", "-c", script, "bash", *map(str, JOB_IDS)], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    shell = [int(p) for p in out.stdout.split()]
    python = [slurm_port({"SLURM_JOB_ID": str(i)}) for i in JOB_IDS]
    assert shell == python
    assert all(1024 <= p < 32768 for p in python), max(python)
    # consecutive jobs (the common case of jobs sharing a node) get distinct ports, 12000 of them
    assert len({slurm_port({"SLURM_JOB_ID": str(i)}) for i in range(5000, 17000)}) == 12000

"""Shared fixtures: the verified MNIST folder and a launcher for real training runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnn.rundir import RunDir  # noqa: E402
from data import mnist  # noqa: E402

# CI prepares MNIST once into the repository's datasets/ (python -m data.prepare);
# MNIST_ROOT points the tests elsewhere.
DATA_ROOT = Path(os.environ.get("MNIST_ROOT", REPO / "datasets"))


# pyproject's addopts run the suite on 2 xdist workers, a test file at a time (--dist loadfile:
# the tests of a file share its module fixtures' runs; --dist loadgroup would allow finer groups
# but silently stops grouping with pytest 9.2, pytest-xdist#1386). Files are handed out in the
# order below, the longest first (pyproject's --no-loadscope-reorder keeps it), so that the two
# workers finish together.
LONGEST_FIRST = ("test_fault.py", "test_slurm.py", "test_hosts.py", "test_bench.py", "test_train.py", "test_wandb.py", "test_numerics.py",
                 "test_cli.py", "test_interrupt.py", "test_observe.py", "test_multihomed.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    mnist.ensure(DATA_ROOT)
    return DATA_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What cnn.distributed.launch_env and cnn.rundir.job_id read: none of it leaks from the
# environment pytest runs in into a test's own launch.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "GROUP_WORLD_SIZE")
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_")


def is_launcher_var(name: str) -> bool:
    return name in LAUNCHER_VARS or name.startswith(LAUNCHER_PREFIXES)


def clear_launcher_env(monkeypatch) -> None:
    """This process as a plain `python` run: a test then sets the launcher it emulates."""
    for name in [n for n in os.environ if is_launcher_var(n)]:
        monkeypatch.delenv(name)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not (is_launcher_var(k) or k.startswith("WANDB_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}, **extra)
    return env


def torchrun(nproc: int, *args: str, extra: tuple[str, ...] = (),
             entry: tuple[str, ...] = (str(REPO / "train_ddp.py"),)) -> list[str]:
    """A standalone torchrun command line for train_ddp.py (or `entry`, e.g. ("-m", "cnn.cli", "evaluate"))."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *extra, *entry, *args]


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=timeout)


def ranks(n: int, *args: str, rank_args=lambda rank: (), timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`n` train_ddp.py processes on this host given RANK, WORLD_SIZE, MASTER_ADDR/PORT... as torchrun
    gives them, but without its agent process (about 3 s less per launch): for runs where the
    launcher is not what is tested. `rank_args(rank)` adds arguments to one rank's command line."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "train_ddp.py", *args, *rank_args(r)], cwd=REPO,
                              env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def assert_ranks_ok(procs: list[subprocess.CompletedProcess]) -> None:
    assert [p.returncode for p in procs] == [0] * len(procs), "".join(p.stderr[-2000:] for p in procs)


def smoke_args(root: Path, run_dir: Path, *more: str) -> list[str]:
    """A small, fast training run: W&B off, no roofline measurement, 1,000 test images
    (each can be overridden: data.test_subset=0 where counting all 10,000 is the point)."""
    return [f"data.root={root}", f"run.dir={run_dir}", "wandb.mode=disabled", "train.roofline=false",
            "data.test_subset=1000", *more]


@pytest.fixture(scope="session")
def trained_run(mnist_root, tmp_path_factory) -> Path:
    """One small finished run, shared by the tests of evaluate, predict, export and the W&B
    model artifact: 40 steps (~90% test accuracy), the whole test set counted in its
    summary (what evaluate must reproduce), W&B offline with wandb.log_model=true.
    Made once per session, not once per xdist worker: the workers' temporary folders share
    a parent, and the first worker to take the lock trains (pytest-xdist's documented pattern)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # else (-n 0) this session's own folder
        shared = shared.parent
    base = shared / "trained"
    run_dir = base / "run"
    with FileLock(shared / "trained.lock"):
        if not RunDir(run_dir).has_summary():
            proc = run([sys.executable, "train_ddp.py", *smoke_args(
                mnist_root, run_dir, "data.test_subset=0", "data.train_subset=2560", "train.batch_size=64",
                "train.epochs=1", "train.max_steps=40", "wandb.mode=offline", "wandb.log_model=true")],
                WANDB_DATA_DIR=str(base / "wandb-data"))  # W&B stages artifact files there, not in ~/.local
            assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir

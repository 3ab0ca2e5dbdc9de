"""bench/gpu_runs.py, the trainer matrix of bench/gpu_check.sh: what it runs and how it reports (no GPU needed)."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import gpu_runs  # noqa: E402


def test_plan_covers_every_precision_compile_mode_and_launch():
    runs = gpu_runs.plan(gpus=8)
    assert {(r.precision, r.compiled, r.nproc) for r in runs} == {
        (p, c, n) for p in ("fp32", "bf16", "fp16") for c in (False, True) for n in (0, 8)}
    assert len({r.name for r in runs}) == len(runs) == 12
    assert not any(r.compiled for r in runs[:6])  # the eager runs first: a tight deadline cuts compiled ones
    for run in runs:
        cmd = gpu_runs.command(run, "data", REPO / "runs" / run.name, "python3")
        assert ("--nproc_per_node=8" in cmd) == (run.nproc == 8)
        assert ("train.compile_mode=reduce-overhead" in cmd) == run.compiled
        batch = int(next(a for a in cmd if a.startswith("train.batch_size=")).split("=")[1])
        assert batch % max(1, run.nproc) == 0 and f"precision={run.precision}" in cmd
    odd = gpu_runs.command(gpu_runs.Run("bf16", False, 3), "data", REPO, "python3")
    assert "train.batch_size=510" in odd  # divisible by 3 ranks


def test_rows_report_both_peaks_memory_and_graph_replays():
    summary = {"images_per_sec": 90000.0, "seconds_to_99": 2.5, "test_accuracy": 0.9912, "peak_gflops": 500000.0,
               "peak_datasheet_gflops": 989500.0, "peak_basis": "bf16", "peak_gpu_mb": 812.0,
               "cudagraph_replays": 1400, "cudagraph_skips": 0}
    row = gpu_runs.result(gpu_runs.Run("bf16", True, 0), summary, [20000.0, 100000.0, 110000.0], 30.0)
    assert row["steady_images_per_sec"] == 105000.0  # the first window (compilation) left out
    assert 0 < row["mfu_datasheet"] < row["mfu"] < 1
    line = gpu_runs.table_line(row)
    assert line.startswith("bf16-graphs-python") and "replayed (1400 replays, 0 skips)" in line and "812" in line
    eager = gpu_runs.result(gpu_runs.Run("fp32", False, 8), {**summary, "peak_datasheet_gflops": None,
                                                              "seconds_to_99": None}, [1.0], 5.0)
    assert eager["mfu_datasheet"] is None and eager["steady_images_per_sec"] == 90000.0
    assert gpu_runs.table_line({"run": "x", "status": "FAILED (exit 1)"}) == f"{'x':<24} FAILED (exit 1)"
    not_replayed = gpu_runs.table_line({**row, "cudagraph_replays": 0})
    assert "NOT replayed" in not_replayed

"""The benchmark's short version runs in CI so it cannot rot (figures are not asserted:
this machine is shared and noisy; ratios are read from its table)."""

import json
import sys

from conftest import run


def test_quick_benchmark_runs_and_reports(mnist_root, tmp_path):
    out = tmp_path / "bench.json"
    proc = run([sys.executable, "bench/benchmark.py", "--quick", "--root", str(mnist_root), "--json", str(out)],
               timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours/tutorial images_per_sec" in proc.stdout and "2rank/1rank scaling efficiency" in proc.stdout
    assert "2rank/1rank weak scaling efficiency" in proc.stdout and "DDP efficiency" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"tutorial", "ours", "ours_1rank", "ours_2rank", "ours_2rank_weak", "2x1rank_nodist"}
    for row in result["rows"].values():
        assert row["images_per_sec"] > 0 and 0 < row["mfu"] < 1.5 and row["peak_rss_mb"] > 0


def test_wandb_overhead_script():
    proc = run([sys.executable, "bench/wandb_overhead.py", "--steps", "20"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "W&B offline: init" in proc.stdout and "per logged step (20 steps)" in proc.stdout


def test_checkpoint_cost_script(tmp_path):
    proc = run([sys.executable, "bench/checkpoint_cost.py", "--dir", str(tmp_path), "--repeats", "2"], timeout=120)
    assert proc.returncode == 0 and "MiB" in proc.stdout and "save" in proc.stdout, proc.stderr


def test_rank_stats_cost_script():
    proc = run([sys.executable, "bench/rank_stats_cost.py", "--blocks", "1", "--block-steps", "2"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "instrumentation per step" in proc.stdout and "window close" in proc.stdout

"""The benchmark's short version runs in CI so it cannot rot (figures are not asserted:
this machine is shared and noisy; ratios are read from its table)."""

import json
import sys

from cnn.model import TRAIN_FLOPS_PER_IMAGE
from conftest import run


def test_quick_benchmark_runs_and_reports(mnist_root, tmp_path):
    out = tmp_path / "bench.json"
    proc = run([sys.executable, "bench/benchmark.py", "--quick", "--root", str(mnist_root), "--json", str(out)],
               timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"tutorial", "ours_fp32", "ours_bf16", "ours_1rank", "ours_2rank", "ours_2rank_weak",
                         "2x1rank_nodist"}
    # each row ran in the precision it names and its MFU is against that dtype's own roofline
    assert rows["ours_fp32"]["precision"] == "fp32" and rows["ours_bf16"]["precision"] == "bf16"
    roof = result["roofline_gflops"]
    assert rows["ours_bf16"]["roofline_gflops"] == roof["bf16@all"] != roof["fp32@all"]
    assert rows["ours_1rank"]["roofline_gflops"] == roof[f"{rows['ours_1rank']['precision']}@1"]
    for name, row in rows.items():  # no bound on MFU: the suite's other worker shares the cores while
        # the roofline is measured, so the ratio of two timings can land anywhere
        assert row["images_per_sec"] > 0 and row["mfu"] > 0 and row["peak_rss_mb"] > 0, name
        assert abs(row["mfu"] - row["images_per_sec"] * TRAIN_FLOPS_PER_IMAGE / 1e9 / row["roofline_gflops"]) < 0.01 * row["mfu"] + 1e-3
    for ratio in ("ours/tutorial images_per_sec (both fp32)", "bf16/fp32 images_per_sec",
                  "2rank/1rank scaling efficiency", "2rank/1rank weak scaling efficiency",
                  "DDP efficiency: 2rank_weak/2 independent jobs"):
        assert f"{ratio}: {result['ratios'][ratio]:.2f}" in proc.stdout
    if roof["bf16@all"] < roof["fp32@all"]:  # emulated here: the note names the steps --quick ran (QUICK_STEPS)
        assert "so the ours_bf16 row ran 9 steps for its throughput only" in proc.stdout, proc.stdout[-2000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("pipeline"))
    assert header.split()[:2] == ["pipeline", "prec"] and "img to 99%" in header


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


def test_step_parts_script():
    """bench/step_parts.py on the CPU: its CUDA-only rows are left out with why, the others time."""
    proc = run([sys.executable, "bench/step_parts.py", "--device", "cpu", "--steps", "2", "--rounds", "1",
                "--only", "bare fp32,opt.step only (Adam),as a CUDA graph"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "left out (CUDA only): opt.step only (Adam + Muon as a CUDA graph)" in proc.stdout
    timed = [line.split(maxsplit=1)[1].split("   (")[0] for line in proc.stdout.splitlines()
             if line[:8].strip().replace(".", "").isdigit()]
    assert timed == ["bare fp32", "opt.step only (Adam)"], proc.stdout[-2000:]
    assert "profiler, 20 steps of 'bare fp32'" in proc.stdout


def test_muon_share_script():
    """bench/muon_share.py: one row per (iteration count, form), in the order asked for."""
    proc = run([sys.executable, "bench/muon_share.py", "--ns", "5", "2", "--rounds", "1", "--block", "2"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split()[:2] for line in proc.stdout.splitlines() if line.split()[:1] in (["5"], ["2"])]
    assert rows == [["5", "gram"], ["5", "direct"], ["2", "gram"], ["2", "direct"]], proc.stdout


def test_bare_loop_script(mnist_root):
    """bench/bare_loop.py, the comparator of the trainer against a bare DDP loop (and the GPU check's
    --gap stage runs it): both sides train, and the table has the row with their ratio (a tiny,
    Adam-only run here, by overrides after --, as the docstring's host-bound example)."""
    proc = run([sys.executable, "bench/bare_loop.py", "--nprocs", "1", "--precisions", "fp32", "--rounds", "1",
                "--steps", "20", "--root", str(mnist_root), "--", "train.batch_size=16", "optim.muon_lr=0",
                "train.log_every=5", "data.test_subset=500"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round 1: 1 rank(s) fp32: trainer" in proc.stdout, proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:2] == ["1", "fp32"]]
    assert len(rows) == 1 and len(rows[0]) == 5, proc.stdout
    trainer, bare, ratio = map(float, rows[0][2:])
    assert trainer > 0 and bare > 0 and abs(ratio - trainer / bare) < 0.01 * ratio + 1e-3
    assert "20 steps each; train.batch_size=16 optim.muon_lr=0" in proc.stdout


def test_loop_cost_script():
    """bench/loop_cost.py on the CPU: a row per item of the trainer's own per-step work and their sum."""
    proc = run([sys.executable, "bench/loop_cost.py", "--device", "cpu", "--calls", "20"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for item in ("seed_step", "watchdog.beat", "window.add", "rank stats: hook + after_backward", "stop.agreed"):
        assert any(line.startswith(item) for line in lines), proc.stdout
    assert float(lines[-1].split()[-1]) > 0 and lines[-1].startswith("in all, per step"), proc.stdout

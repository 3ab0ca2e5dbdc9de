"""W&B: one offline run per job with config, metrics and summary; resume continues the
same run; a missing key or an unreachable server never breaks training."""

import json
import time

from cnn.tracking import read_metrics
from conftest import run, torchrun
import wandb_records as wr

SMALL = ("data.train_subset=2560", "train.batch_size=64", "train.epochs=1", "train.log_every=10",
         "wandb.log_every=10", "checkpoint.every_steps=10")


def _args(root, run_dir, *more):
    return [f"data.root={root}", f"run.dir={run_dir}", "wandb.mode=offline", *SMALL, *more]


def _run_files(run_dir):
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def test_offline_run_holds_config_metrics_and_summary(mnist_root, tmp_path):
    proc = run(torchrun(2, *_args(mnist_root, tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = _run_files(tmp_path)
    assert len(files) == 1, files  # one run for the job, not one per rank
    recs = wr.records(files[0])
    cfg = wr.config(recs)
    assert cfg["world_size"] == 2 and cfg["train"]["batch_size"] == 64 and cfg["precision"] == "fp32"
    hist = wr.history(recs)
    steps = [h["_step"] for h in hist]
    assert steps == sorted(set(steps)), "global step must strictly increase"
    assert any("train_loss" in h for h in hist) and any("test_accuracy" in h for h in hist)
    keys = {k.split(".")[0] for h in hist for k in h}
    assert {"confusion_matrix_table", "test_predictions"} <= keys  # the seed's figures, as media
    summ = wr.summary(recs)
    assert summ["eval_count"] == 10000 and 0 < summ["test_accuracy"] <= 1
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() in files[0].name


def test_resume_continues_the_same_run_without_repeating_steps(mnist_root, tmp_path):
    first = run(torchrun(2, *_args(mnist_root, tmp_path, "checkpoint.fault_step=25", "checkpoint.fault_kind=raise")))
    assert first.returncode != 0
    second = run(torchrun(2, *_args(mnist_root, tmp_path)))
    assert second.returncode == 0, second.stderr[-3000:]
    files = _run_files(tmp_path)
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert len(files) == 2 and all(run_id in f.name for f in files)
    steps = [h["_step"] for f in files for h in wr.history(wr.records(f))]
    assert steps == sorted(set(steps)), f"steps repeated or going backwards: {steps}"
    # metrics.jsonl, too, holds each step once
    train_steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train_loss" in r and "event" not in r]
    assert train_steps == sorted(set(train_steps))


def test_online_without_key_or_server_keeps_training(mnist_root, tmp_path):
    for case, env in {
        "no_key": {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path)},
        "no_server": {"HOME": str(tmp_path), "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"},
    }.items():
        run_dir = tmp_path / case
        t0 = time.monotonic()
        proc = run(torchrun(1, f"data.root={mnist_root}", f"run.dir={run_dir}", *SMALL, "wandb.mode=online",
                            "wandb.init_timeout_s=5", "train.max_steps=20"), **env)
        took = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.count("warning: W&B") == 1, proc.stderr  # one warning, not one per step
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 20
        assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r][-1] == 20
        assert took < 90, f"{case}: {took:.0f} s"


def test_sweep_parameters_are_config_keys():
    """Every swept parameter, passed as the agent passes it (--key=value), is a valid override."""
    import yaml  # PyYAML, which omegaconf depends on
    from cnn.config import parse_args
    from conftest import REPO

    sweep = yaml.safe_load((REPO / "configs" / "sweep.yaml").read_text())
    assert sweep["metric"]["name"] == "test_accuracy" and sweep["program"] == "train_ddp.py"
    assert {"optim.lr", "train.batch_size", "precision"} <= set(sweep["parameters"])
    for key, spec in sweep["parameters"].items():
        for value in spec.get("values", [spec.get("min"), spec.get("max")]):
            parse_args(["--config", str(REPO / "configs" / "default.yaml"), f"--{key}={value}"])


def test_plot_command_writes_pngs(mnist_root, tmp_path):
    import sys
    proc = run([sys.executable, "train_ddp.py", f"data.root={mnist_root}", f"run.dir={tmp_path}", *SMALL,
                "train.max_steps=20", "train.eval_every=10", "wandb.mode=disabled"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run([sys.executable, "-m", "cnn.plot", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    for name in ("loss.png", "accuracy.png", "predictions.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name

"""W&B: one offline run per job with config, metrics, media and summary; a restarted job
continues the same run; a missing key or an unreachable server never breaks training."""

import sys
import time

import torch

from cnn.config import WandbConfig
from cnn.rundir import RunDir, read_metrics, read_summary, record
from cnn.tracking import Tracker
from conftest import REPO, run, smoke_args, torchrun
import wandb_records as wr

SMALL = ("data.train_subset=2560", "train.batch_size=64", "train.epochs=1", "train.log_every=10",
         "wandb.log_every=10", "checkpoint.every_steps=10")


def _run_files(run_dir):
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def _artifacts(recs, kind):
    return [r.artifact for r in recs if r.WhichOneof("record_type") == "artifact" and r.artifact.type == kind]


def test_final_weights_are_a_model_artifact_in_the_offline_run(trained_run):
    """wandb.log_model=true (conftest's trained_run): the offline run records one artifact of type
    "model", aliases latest and best, holding the run's model.safetensors byte for byte (W&B's
    digest is the file's base64 MD5); the summary names it; the weights load into CNN()."""
    import base64
    import hashlib
    import json

    from safetensors.torch import load_file

    from cnn import checkpoint
    from cnn.model import CNN

    (run_file,) = _run_files(trained_run)
    recs = wr.records(run_file)
    (art,) = _artifacts(recs, "model")
    run_id = RunDir(trained_run).read_wandb_id()
    assert art.name == f"model-{run_id}" and set(art.aliases) == {"latest", "best"}
    weights = trained_run / "model.safetensors"
    (entry,) = art.manifest.contents
    assert entry.path == "model.safetensors"
    assert entry.digest == base64.b64encode(hashlib.md5(weights.read_bytes()).digest()).decode()
    meta = json.loads(art.metadata)
    assert meta["input_name"] == "image" and meta["test_accuracy"] == read_summary(trained_run)["test_accuracy"]
    assert wr.summary(recs)["model_artifact"] == read_summary(trained_run)["model_artifact"] == f"model-{run_id}:latest"
    final = checkpoint.load(checkpoint.list_checkpoints(trained_run)[0])["model"]
    model = CNN()
    model.load_state_dict(load_file(weights))
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())  # the final weights


def test_offline_run_and_its_restart_are_one_run(mnist_root, tmp_path):
    """A 2-rank job whose rank 1 raises at step 25, then its re-run: one W&B run file per
    attempt (not per rank), one run id, config, train and test metrics, the seed's figures
    as media, the summary, and no step logged twice (in W&B or in metrics.jsonl)."""
    args = smoke_args(mnist_root, tmp_path, *SMALL, "wandb.mode=offline")
    first = run(torchrun(2, *args, "checkpoint.fault_step=25", "checkpoint.fault_kind=raise",
                         "checkpoint.fault_rank=1"))
    assert first.returncode != 0
    second = run(torchrun(2, *args))
    assert second.returncode == 0, second.stderr[-3000:]
    files = _run_files(tmp_path)
    run_id = RunDir(tmp_path).read_wandb_id()
    assert len(files) == 2 and all(run_id in f.name for f in files), files
    steps = [h["_step"] for f in files for h in wr.history(wr.records(f))]
    assert steps == sorted(set(steps)), f"steps repeated or going backwards: {steps}"
    recs = wr.records(files[-1])
    # named after what sets it apart; no group although torchrun gave the job a run id (wandb.group is unset)
    prec = read_summary(tmp_path)["precision"]  # what precision=auto chose on this machine
    assert wr.run_info(recs) == {"name": f"ws2-{prec}-b64-lr4e-3-s0", "group": "", "job_type": "train"}
    cfg = wr.config(recs)
    assert cfg["world_size"] == 2 and cfg["train"]["batch_size"] == 64 and cfg["precision"] == prec
    hist = [h for f in files for h in wr.history(wr.records(f))]
    assert any("train/loss" in h for h in hist) and any("test/accuracy" in h for h in hist)
    keys = {k.split(".")[0] for h in hist for k in h}
    assert {"confusion_matrix_table", "test_predictions"} <= keys  # the seed's figures, as media
    summ = wr.summary(recs)
    assert summ["eval_count"] == 1000 and 0 < summ["test_accuracy"] <= 1 and summ["steps"] == 40
    assert not _artifacts(recs, "model") and "model_artifact" not in summ  # wandb.log_model is off by default
    train_steps = [r["step"] for r in read_metrics(tmp_path, "train")]
    assert train_steps == sorted(set(train_steps)) == [10, 20, 30, 40]


def test_online_without_key_or_server_falls_back_with_one_warning(tmp_path, monkeypatch, capfd):
    """The tracker in-process: online mode with no API key, and with a key but no server
    (an unreachable address), each ends in one warning and an offline run; metrics.jsonl
    and summary.json are written either way."""
    for case, env in {
        "no_key": {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path)},
        "no_server": {"HOME": str(tmp_path), "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"},
    }.items():
        with monkeypatch.context() as m:
            for k in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
                m.delenv(k, raising=False)
            for k, v in {**env, "WANDB_SILENT": "true"}.items():
                m.setenv(k, v)
            rd = RunDir(tmp_path / case)
            t0 = time.monotonic()
            tracker = Tracker(rd, "seed: 0\n", WandbConfig(mode="online", init_timeout_s=5), {"seed": 0})
            for step in (10, 20):
                tracker.log(record("train", step, 0, train_loss=1.0 / step))
            tracker.summary({"steps": 20})
            tracker.finish()
            took = time.monotonic() - t0
        err = capfd.readouterr().err
        assert err.count("warning: W&B") == 1, err  # one warning, not one per step
        assert tracker.run_id and _run_files(rd.path), f"{case}: no offline run"
        assert [r["step"] for r in read_metrics(rd.path, "train")] == [10, 20]
        assert read_summary(rd.path)["steps"] == 20
        assert took < 60, f"{case}: {took:.0f} s"


# The tracker in a process of its own, offline; then what SLURM's scancel does to every process
# of a job step: wandb-core, this process's child, gets SIGTERM.
SERVICE_KILLED = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from cnn.config import WandbConfig
from cnn.rundir import RunDir, record
from cnn.tracking import Tracker
tracker = Tracker(RunDir({run_dir!r}), "seed: 0\\n", WandbConfig(mode="offline"), {{"seed": 0}})
core = [int(p) for p in os.listdir("/proc") if p.isdigit() and b"wandb-core" in open(f"/proc/{{p}}/cmdline", "rb").read()
        and open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid())]
assert core, "no wandb-core child"
os.kill(core[0], signal.SIGTERM)
while open(f"/proc/{{core[0]}}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":  # until it has exited
    time.sleep(0.05)
for step in (10, 20, 30):
    tracker.log(record("train", step, 0, train_loss=1.0 / step))
    time.sleep(0.2)
tracker.summary({{"steps": 30}})
tracker.finish()
"""


def test_a_killed_wandb_service_costs_one_warning_and_no_traceback(tmp_path):
    """Training goes on with metrics.jsonl and summary.json when W&B's service dies under it, and
    the process exits 0 without W&B's atexit hook printing a traceback of the dead connection."""
    proc = run([sys.executable, "-c", SERVICE_KILLED.format(repo=str(REPO), run_dir=str(tmp_path))], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("warning: W&B") == 1, proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [10, 20, 30]
    assert read_summary(tmp_path)["steps"] == 30


def test_wandb_group_is_the_configured_one(tmp_path, monkeypatch):
    """wandb.group is the run's group (slurm/array_seeds.sbatch groups its tasks by the array id)."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    rd = RunDir(tmp_path)
    tracker = Tracker(rd, "seed: 0\n", WandbConfig(mode="offline", group="4242"), {"seed": 0})
    tracker.finish()
    # W&B's service process may still be writing the offline file when finish() returns on a busy
    # machine (seen once in CI: no run record yet): read it again for up to 15 s
    deadline, runs = time.monotonic() + 15, []
    while not runs and time.monotonic() < deadline:
        runs = [r.run for r in wr.records(_run_files(tmp_path)[0]) if r.WhichOneof("record_type") == "run"]
        if not runs:
            time.sleep(0.5)
    assert runs and runs[0].run_group == "4242"


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


def test_single_process_run_and_plot_command(mnist_root, tmp_path):
    """`python train_ddp.py` is world size 1 of the same code; `python -m cnn.plot` draws its run."""
    proc = run([sys.executable, "train_ddp.py", *smoke_args(mnist_root, tmp_path, *SMALL, "train.max_steps=20",
                                                            "train.eval_every=10")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = read_summary(tmp_path)
    assert s["world_size"] == 1 and s["launcher"] == "single" and s["steps"] == 20
    proc = run([sys.executable, "-m", "cnn.plot", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    for name in ("loss.png", "accuracy.png", "predictions.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name

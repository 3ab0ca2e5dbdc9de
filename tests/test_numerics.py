"""The promises that depend on numerics, in fp32 and in forced bf16, on whatever CPU runs them.

A run computes in the precision `auto` chose for its machine, and that is a fact of the run:
evaluate (world size 1 and 2), predict and a resume under `precision=auto` use the precision
its checkpoint recorded, not the one this machine would choose, and an explicit precision
still wins.  Each test runs for a run forced to fp32 and for one forced to bf16, so on every
machine one of the two differs from what `auto` would pick here: on an AVX2-only CPU the bf16
run, on one with avx512_bf16 or AMX (and on CUDA) the fp32 run.  bf16 is emulated on
AVX2-only CPUs (~15x slower than fp32): the runs are 10 steps of 64 images.
"""

import gzip
import json
import sys

import pytest
import torch

from cnn import checkpoint, cli
from cnn.evaluate import confusion_matrix
from cnn.rundir import RunDir, read_summary
from conftest import run, smoke_args, torchrun
from data import mnist

# 10 steps (640 images, global batch 64), checkpoints every 5; 2,000 test images in batches of 1,000:
# whole batches at world size 1 and 2, so every image meets the same kernels in both
TINY = ("data.train_subset=640", "train.batch_size=64", "train.epochs=1", "train.log_every=5",
        "checkpoint.every_steps=5", "checkpoint.keep=5", "data.test_subset=2000", "train.eval_batch_size=1000",
        "model.dropout=0.2")
OTHER = {"fp32": "bf16", "bf16": "fp32"}


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def forced(request, mnist_root, tmp_path_factory):
    """(precision, run folder) of a TINY run forced to that precision."""
    prec = request.param
    run_dir = tmp_path_factory.mktemp(f"run-{prec}")
    proc = run([sys.executable, "train_ddp.py", *smoke_args(mnist_root, run_dir, *TINY, f"precision={prec}")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_summary(run_dir)["precision"] == prec
    return prec, run_dir


def _evaluate(capsys, run_dir, out, *overrides):
    assert cli.main(["evaluate", str(run_dir), "data.test_subset=2000", "--out", str(out), *overrides]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def test_evaluate_reproduces_the_run_in_its_precision(forced, tmp_path, capsys):
    """World size 1: the run's accuracy exactly and its loss to float64 rounding, in the run's
    precision, named in the report; an explicit precision wins, and computes other numbers."""
    prec, run_dir = forced
    summary = read_summary(run_dir)
    report = _evaluate(capsys, run_dir, tmp_path / "eval.json")
    assert report["precision"] == prec and report["precision_reason"] == "the run's (recorded in the checkpoint)"
    assert report["count"] == 2000 and report["accuracy"] == summary["test_accuracy"]
    assert report["loss"] == pytest.approx(summary["test_loss"], rel=1e-9)
    other = _evaluate(capsys, run_dir, tmp_path / "other.json", f"precision={OTHER[prec]}")
    assert other["precision"] == OTHER[prec] and other["precision_reason"] == "requested"
    assert other["loss"] != pytest.approx(summary["test_loss"], rel=1e-6)  # the precisions are told apart
    auto = _evaluate(capsys, run_dir, tmp_path / "auto.json", "precision=auto")  # auto: the run's, not this machine's
    assert auto["precision"] == prec and auto["loss"] == report["loss"]


def test_evaluate_at_world_size_2_reproduces_the_run(forced, tmp_path):
    prec, run_dir = forced
    out = tmp_path / "eval2.json"
    proc = run(torchrun(2, str(run_dir), "data.test_subset=2000", "--out", str(out), entry=("-m", "cnn.cli", "evaluate")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["count"] == 2000 and report["precision"] == prec
    assert report["accuracy"] == read_summary(run_dir)["test_accuracy"]
    labels = mnist.load(checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])["config"]["data"]["root"], False, 2000)[1]
    assert report["confusion_matrix"] == confusion_matrix(labels, RunDir(run_dir).read_predictions()).tolist()


def test_predict_agrees_with_the_runs_evaluation(forced, tmp_path, capsys):
    """The run's 2,000 test images as a gzipped IDX file: predict's top class is the run's own
    final prediction for every image (predictions.pt), in the run's precision."""
    prec, run_dir = forced
    root = checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])["config"]["data"]["root"]
    images, _ = mnist.load(root, False, 2000)
    idx = tmp_path / "test.idx.gz"
    idx.write_bytes(gzip.compress(mnist.idx_images(images.numpy())))
    assert cli.main(["predict", str(run_dir), str(idx), "--top-k", "1"]) == 0
    out, err = capsys.readouterr()
    assert [r["classes"][0] for r in json.loads(out)] == RunDir(run_dir).read_predictions().tolist()
    assert err.strip() == f"2000 image(s) from 1 file(s), precision {prec} (the run's (recorded in the checkpoint))"


def _weights(run_dir):
    return checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])["model"]


def test_resume_under_auto_is_bitwise_in_the_runs_precision(forced, mnist_root, tmp_path):
    """From the step-5 checkpoint with precision=auto: the run goes on in its own precision, and its
    final weights equal the uninterrupted run's bit for bit, whatever this machine would choose."""
    prec, run_dir = forced
    proc = run([sys.executable, "train_ddp.py", *smoke_args(mnist_root, tmp_path, *TINY, "precision=auto",
                                                            f"checkpoint.resume={checkpoint.path_for(run_dir, 5)}")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 5" in proc.stdout
    assert f"precision {prec}: the run's: resumed from a checkpoint that computed in {prec}" in proc.stdout
    assert read_summary(tmp_path)["precision"] == prec
    final, resumed = _weights(run_dir), _weights(tmp_path)
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_resume_in_another_precision_adapts(forced, mnist_root, tmp_path):
    """An explicit precision wins over the checkpoint's: the run goes on in it, from where the
    checkpoint left, and records it; the weights then differ from the uninterrupted run's."""
    prec, run_dir = forced
    proc = run([sys.executable, "train_ddp.py", *smoke_args(mnist_root, tmp_path, *TINY, f"precision={OTHER[prec]}",
                                                            f"checkpoint.resume={checkpoint.path_for(run_dir, 5)}")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"precision {OTHER[prec]}: requested" in proc.stdout
    state = checkpoint.load(checkpoint.list_checkpoints(tmp_path)[0])
    assert state["step"] == 10 and state["precision"]["resolved"] == OTHER[prec]
    assert read_summary(tmp_path)["precision"] == OTHER[prec] and read_summary(tmp_path)["test_accuracy"] > 0.5
    final = _weights(run_dir)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert any(not torch.equal(final[k], state["model"][k]) for k in final)

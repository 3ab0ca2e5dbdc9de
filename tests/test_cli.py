"""`mnist-ddp`: the dispatcher, and evaluate / predict / export on one small trained run
(conftest's `trained_run`); each bad input ends in one line naming it and a non-zero exit."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cnn import checkpoint, cli
from cnn.evaluate import EVAL_KEYS, confusion_matrix
from cnn.model import CNN
from cnn.rundir import RunDir, read_summary
from conftest import REPO, run, torchrun
from data import mnist
from data.sharding import model_input

EVALUATE = ("-m", "cnn.cli", "evaluate")


@pytest.fixture(autouse=True)
def _keep_argv0(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main names the command in sys.argv[0]


def _final(run_dir):
    return checkpoint.list_checkpoints(run_dir)[0]


def _data_root(run_dir):
    """The data.root the run trained with (its checkpoint's config)."""
    return checkpoint.load(_final(run_dir))["config"]["data"]["root"]


def _test_set(root, n=None):
    images, labels = mnist.load(root, train=False)
    return (images[:n], labels[:n]) if n else (images, labels)


def _one_error_line(err: str, *must: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert all(m in lines[0] for m in must), lines[0]
    return lines[0]


# ---------------------------------------------------------------- the dispatcher


def test_one_command_each_subcommand_has_help(capsys):
    assert 'mnist-ddp = "cnn.cli:run"' in (REPO / "pyproject.toml").read_text()  # the console script
    proc = subprocess.run([sys.executable, "-m", "cnn.cli", "nonsense"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown command 'nonsense'" in proc.stderr  # run(): main's code, as exit
    assert cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name}" in listing for name in ("train", "evaluate", "predict", "export", "prepare", "plot", "compare"))
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: mnist-ddp {name}"), out[:200]
        if name == "train":  # every config key, from the schema
            assert "optim.lr" in out and "wandb.log_model" in out
        if name == "evaluate":  # the keys it takes, and only those
            assert all(k in out for k in EVAL_KEYS) and "optim.lr" not in out
    assert cli.main(["nonsense"]) == 2
    _one_error_line(capsys.readouterr().err, "unknown command 'nonsense'")


# ---------------------------------------------------------------- evaluate


def test_evaluate_reproduces_the_runs_test_accuracy(trained_run, capsys):
    """In this process (world size 1), on the run folder alone: the checkpoint supplies the model
    and the data root. Its accuracy and loss are the summary's, its confusion matrix is the one
    of the run's own final predictions (predictions.pt), and it is printed and written."""
    assert cli.main(["evaluate", str(trained_run)]) == 0
    out = capsys.readouterr().out
    summary, report = read_summary(trained_run), json.loads((trained_run / "eval.json").read_text())
    assert report["count"] == summary["eval_count"] == 10000
    assert report["accuracy"] == summary["test_accuracy"]
    assert report["loss"] == pytest.approx(summary["test_loss"], rel=1e-9)
    assert report["checkpoint"] == str(_final(trained_run)) and report["step"] == summary["steps"] == 40
    _, labels = _test_set(_data_root(trained_run))
    preds = RunDir(trained_run).read_predictions()
    assert report["confusion_matrix"] == confusion_matrix(labels, preds).tolist()
    conf = np.array(report["confusion_matrix"])
    assert np.allclose(report["per_class_accuracy"], conf.diagonal() / conf.sum(1))
    assert f"accuracy {summary['test_accuracy']:.4f}" in out and "confusion matrix" in out


def test_evaluate_train_split_and_out(trained_run, tmp_path, capsys):
    out = tmp_path / "sub" / "train.json"
    assert cli.main(["evaluate", str(_final(trained_run)), "--split", "train", "data.train_subset=500",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "train" and report["count"] == 500 and 0.5 < report["accuracy"] <= 1


def test_evaluate_under_torchrun_counts_each_image_once(trained_run, tmp_path):
    """World size 2: each rank evaluates half; the report is the whole test set's, equal to world size 1's."""
    out = tmp_path / "eval2.json"
    proc = run(torchrun(2, str(trained_run), "--out", str(out), entry=EVALUATE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["count"] == 10000
    assert report["accuracy"] == read_summary(trained_run)["test_accuracy"]
    _, labels = _test_set(_data_root(trained_run))
    preds = RunDir(trained_run).read_predictions()
    assert report["confusion_matrix"] == confusion_matrix(labels, preds).tolist()
    assert proc.stdout.count("confusion matrix") == 1  # rank 0 prints, rank 1 does not


def test_evaluate_more_ranks_than_images_fails_on_every_rank(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    proc = run(torchrun(2, str(trained_run), "data.test_subset=1", "--out", str(out), entry=EVALUATE), timeout=120)
    assert proc.returncode != 0
    msg = "config error: data.test_subset: 1 test image(s) for 2 ranks; every rank needs at least one"
    assert proc.stderr.count(msg) == 2, proc.stderr[-2000:]
    assert not out.exists()


def _truncated(tmp_path, final):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(final.read_bytes()[:100_000])
    return bad, "truncated or corrupt"


def _foreign(tmp_path, final):
    bad = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    return bad, "not an mnist-ddp checkpoint"


def _newer(tmp_path, final):
    state = torch.load(final, weights_only=True)
    state["format_version"] = checkpoint.FORMAT_VERSION + 1
    bad = tmp_path / "newer.pt"
    torch.save(state, bad)
    return bad, "newer than this code"


def _no_checkpoint(tmp_path, final):
    (tmp_path / "run").mkdir()
    return tmp_path / "run", "no checkpoint in"


@pytest.mark.parametrize("make", [_truncated, _foreign, _newer, _no_checkpoint])
def test_bad_checkpoints_are_one_line_naming_the_file(trained_run, tmp_path, capsys, make):
    """evaluate, predict and export all load a checkpoint through cnn.inference.load_model."""
    bad, why = make(tmp_path, _final(trained_run))
    png = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    for argv in (["evaluate", str(bad)], ["predict", str(bad), str(png)], ["export", str(bad)]):
        assert cli.main(argv) == 1, argv
        _one_error_line(capsys.readouterr().err, str(bad), why)
    assert not any(p.name in ("eval.json", "export") for p in tmp_path.rglob("*"))


def test_evaluate_refuses_keys_that_the_checkpoint_fixes(trained_run, capsys):
    assert cli.main(["evaluate", str(trained_run), "model.dropout=0"]) == 2
    _one_error_line(capsys.readouterr().err, "this command does not take 'model.dropout'", "data.root")
    assert cli.main(["evaluate", str(trained_run), "--data.root", "/x"]) == 2
    _one_error_line(capsys.readouterr().err, "write data.root=/x")


# ---------------------------------------------------------------- predict


def _predict(capsys, *argv) -> tuple[int, list[dict], str]:
    code = cli.main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.startswith("[") else out), err


def test_predict_on_test_set_files_equals_the_evaluate_path(trained_run, tmp_path, capsys):
    """The first 100 test images as PNGs, as an inverted RGB PNG with --invert, as .npy (uint8 and
    float 0..1) and as a gzipped IDX file: every path predicts what the run's own evaluation did
    (predictions.pt), and the top-k lists are sorted probabilities."""
    n = 100
    images, _ = _test_set(_data_root(trained_run), n)
    expected = RunDir(trained_run).read_predictions()[:n].tolist()
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(n):
        Image.fromarray(images[i].numpy()).save(pngs / f"{i:03d}.png")
    code, recs, err = _predict(capsys, trained_run, pngs, "--top-k", 3)
    prec = read_summary(trained_run)["precision"]  # stdout holds the predictions; stderr one line naming the precision
    assert code == 0 and err == f"100 image(s) from 100 file(s), precision {prec} (the run's (recorded in the checkpoint))\n"
    assert [r["classes"][0] for r in recs] == expected
    for r in recs:
        assert len(r["classes"]) == 3 and r["probabilities"] == sorted(r["probabilities"], reverse=True)
        assert 0 < sum(r["probabilities"]) <= 1 + 1e-5

    inverted = tmp_path / "inverted.png"
    Image.fromarray(255 - images[0].numpy()).convert("RGB").save(inverted)
    np.save(tmp_path / "batch.npy", images.numpy())
    np.save(tmp_path / "floats.npy", images.numpy().astype(np.float32) / 255)
    (tmp_path / "t10k.idx.gz").write_bytes(gzip.compress(mnist.idx_images(images.numpy())))
    code, recs, err = _predict(capsys, trained_run, inverted, "--invert")
    assert code == 0 and [r["classes"][0] for r in recs] == expected[:1]
    for name in ("batch.npy", "floats.npy", "t10k.idx.gz"):
        code, recs, err = _predict(capsys, trained_run, tmp_path / name, "--top-k", 1, "--batch-size", 32)
        assert code == 0 and [r["classes"][0] for r in recs] == expected, name
        assert [r["index"] for r in recs] == list(range(n))

    out = tmp_path / "preds.csv"
    assert cli.main(["predict", str(trained_run), str(tmp_path / "batch.npy"), "--top-k", "2", "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "file,index,class_1,probability_1,class_2,probability_2" and len(rows) == n + 1
    assert [int(r.split(",")[2]) for r in rows[1:]] == expected


def test_predict_centres_any_image_like_mnist(trained_run, tmp_path, capsys):
    """Digits scaled 3x (84x84) and pasted off-centre into a 150x120 canvas are cropped, scaled
    to fit 20x20 and centred by centre of mass: the result fills a 20-pixel box with its centre
    of mass at (14, 14) +- 0.5, and the model reads them as it reads the originals."""
    from cnn.predict import to_mnist

    n = 50
    images, _ = _test_set(_data_root(trained_run), n)
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(n):
        big = Image.fromarray(images[i].numpy()).resize((84, 84), Image.Resampling.BILINEAR)
        canvas = Image.new("L", (120, 150))
        canvas.paste(big, (10 + i % 20, 60 - i % 50))
        canvas.save(folder / f"{i:03d}.png")
        small = to_mnist(np.asarray(canvas, dtype=np.float64)).astype(np.float64)
        rows, cols = np.nonzero(small.sum(1))[0], np.nonzero(small.sum(0))[0]
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (20, 21)  # Lanczos may touch a 21st pixel
        ys, xs = np.indices(small.shape)
        assert abs((ys * small).sum() / small.sum() - 14) <= 0.5 and abs((xs * small).sum() / small.sum() - 14) <= 0.5
    code, recs, _ = _predict(capsys, trained_run, folder, "--top-k", 1)
    expected = RunDir(trained_run).read_predictions()[:n].tolist()
    agree = sum(r["classes"][0] == e for r, e in zip(recs, expected))
    assert code == 0 and agree >= 0.9 * n, agree


def test_predict_reports_each_bad_file_and_predicts_the_rest(trained_run, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(_test_set(_data_root(trained_run), 1)[0][0].numpy()).save(good)
    bad = {
        "text.png": (b"hello, not a picture", "not an image, .npy or IDX file"),
        "half.png": (good.read_bytes()[:60], "unreadable image"),
        "labels.idx": (mnist.idx_labels(np.arange(5)), "an IDX file of labels"),
        "normalized.npy": (None, "values outside 0..255"),
        "blank.png": (None, "no light digit on a dark background found"),
        "paper.png": (None, "use --invert"),
    }
    for name, (data, _) in bad.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "normalized.npy", np.full((28, 28), -0.42, np.float32))
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray(np.full((40, 30), 250, np.uint8)).save(tmp_path / "paper.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out.json"
    code = cli.main(["predict", str(trained_run), str(good), *(str(tmp_path / n) for n in bad), str(empty),
                     "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == len(bad) + 1, err
    for name, (_, why) in bad.items():
        assert any(line.startswith(f"error: {tmp_path / name}: ") and why in line for line in err), (name, err)
    assert any(line.startswith(f"error: {empty}: empty folder") for line in err)
    assert [r["file"] for r in json.loads(out.read_text())] == [str(good)]  # the good one, still predicted
    # nothing readable at all: exit 1 and no output file
    assert cli.main(["predict", str(trained_run), str(empty), "--out", str(tmp_path / "none.json")]) == 1
    assert not (tmp_path / "none.json").exists()


# ---------------------------------------------------------------- export


def test_export_three_formats_each_equal_to_pytorch(trained_run, tmp_path, capsys):
    """safetensors (weights only, into a fresh CNN), TorchScript and ONNX (through onnxruntime) give
    the checkpoint's logits on real test images within 1e-4 (measured: 0, 0 and ~2e-6), and each
    records its input name, shape and normalization; an existing target is refused unless --force."""
    import onnxruntime
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "export"
    assert cli.main(["export", str(trained_run), "--out", str(out)]) == 0
    images, _ = _test_set(_data_root(trained_run), 256)
    x = model_input(images, torch.device("cpu"))
    reference = CNN()
    reference.load_state_dict(checkpoint.load(_final(trained_run))["model"])
    with torch.inference_mode():
        expected = reference.eval()(x)

    weights = load_file(out / "model.safetensors")
    assert set(weights) == set(CNN().state_dict())  # weights only: no optimizer state
    fresh = CNN()
    fresh.load_state_dict(weights)
    with torch.inference_mode():
        assert torch.allclose(fresh.eval()(x), expected, rtol=0, atol=1e-4)
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["input_name"] == "image" and meta["normalization_mean"] == "0.1307" and meta["normalization_std"] == "0.3081"

    extra = {"mnist_ddp.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 calls TorchScript deprecated
        scripted = torch.jit.load(out / "model.torchscript.pt", _extra_files=extra)
    with torch.inference_mode():
        assert torch.allclose(scripted(x), expected, rtol=0, atol=1e-4)
    assert json.loads(extra["mnist_ddp.json"])["input_shape"] == "[batch, 1, 28, 28]"

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.shape[1:] == [1, 28, 28]
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    assert torch.allclose(got, expected, rtol=0, atol=1e-4), (got - expected).abs().max()
    props = session.get_modelmeta().custom_metadata_map
    assert props["normalization_mean"] == "0.1307" and props["normalization_std"] == "0.3081"
    assert props["source_checkpoint"] == str(_final(trained_run))

    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["export", str(trained_run), "--out", str(out), "--formats", "onnx"]) == 1
    _one_error_line(capsys.readouterr().err, str(out / "model.onnx"), "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli.main(["export", str(trained_run), "--out", str(out), "--formats", "onnx", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temp files left

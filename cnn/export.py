"""`mnist-ddp export CKPT`: a trained model in the formats other tools load, each checked before it is written.

    mnist-ddp export runs/<id>                               # all three, into runs/<id>/export/
    mnist-ddp export runs/<id>/checkpoints/step-00000468.pt --formats onnx --out model/ --force

    model.safetensors     the weights only, no optimizer state:
                          CNN().load_state_dict(safetensors.torch.load_file(path))
    model.torchscript.pt  TorchScript: torch.jit.load(path), no mnist-ddp code needed
    model.onnx            ONNX (opset 17): input "image" float32 [batch, 1, 28, 28], output "logits" [batch, 10]

Every file carries the same metadata (``metadata()``): the input's name, shape and dtype, the
normalization ``x = (pixel / 255 - mean) / std`` of a white-on-black 28x28 digit centred
like MNIST's, the output, the classes and the source checkpoint; in the safetensors
header, in TorchScript's extra file ``mnist_ddp.json``, in ONNX's ``metadata_props``.  A
consumer needs nothing else.

Before anything is written, each export is loaded back (safetensors into a fresh CNN,
``torch.jit.load``, an onnxruntime session) and its logits on SAMPLE random images are
compared with PyTorch's: the largest absolute difference must be at most TOLERANCE (the
exports compute in fp32: the file holds the weights faithfully).  A run that computed in
bf16 or fp16 is also compared with PyTorch in that precision (``--precision``, by default the
run's: what its evaluation computed), within MIXED_TOLERANCE of the logits' scale, and the
files' metadata name the precision the run trained in.
Only then are the files written, each atomically; an existing file is refused unless
``--force``.

ONNX goes through torch's TorchScript-based exporter, ``torch.onnx.export(..., dynamo=False)``:
it needs no onnxscript package (the torch.export-based exporter, the default since torch
2.9, imports onnxscript: measured ``ModuleNotFoundError`` on torch 2.14 without it), it
exists on every torch this project supports (2.4..2.14), and this CNN has no control flow
for which the newer exporter would matter.  torch 2.14 marks it deprecated
(``torch/onnx/__init__.py``: ``dynamo=False`` takes the ``torchscript_exporter`` branch with a
DeprecationWarning); when a release removes it, pass ``dynamo=True`` and add onnxscript to
the dependencies.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from cnn import checkpoint, console, precision, rundir
from cnn.checkpoint import CheckpointError
from cnn.files import write_atomic
from cnn.inference import Trained, load_model
from cnn.model import CNN
from data.sharding import MEAN, STD, normalize

FILES = {"safetensors": "model.safetensors", "torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
INPUT, OUTPUT = "image", "logits"
OPSET = 17  # ONNX opset: onnxruntime >= 1.13 and most other runtimes run it
TOLERANCE = 1e-4  # max |logit difference| to PyTorch fp32 (measured: 0 safetensors/TorchScript, ~2e-6 ONNX)
# max |logit difference| to PyTorch in bf16 | fp16, over max(1, max |logit|): the sample's rounding
# (measured 5e-3 and 6e-4 on a 20-step checkpoint, AMD EPYC with avx512_bf16, torch 2.14), with 10x margin
MIXED_TOLERANCE = {"bf16": 0.05, "fp16": 0.01}
SAMPLE = 64  # random 28x28 images the check runs through both models
TORCHSCRIPT_META = "mnist_ddp.json"  # TorchScript extra file holding the metadata


def metadata(trained: Trained) -> dict[str, str]:
    """What a consumer of an export needs to feed it, as strings (safetensors and ONNX store str -> str)."""
    return {
        "model": "mnist-ddp CNN: conv 32-64-128, Linear 2048-625-10",
        "input_name": INPUT,
        "input_shape": "[batch, 1, 28, 28]",
        "input_dtype": "float32",
        "input_image": "28x28 grayscale, white digit on black, centred by centre of mass like MNIST's",
        "normalization": "x = (pixel / 255 - mean) / std, pixel in 0..255",
        "normalization_mean": repr(MEAN),
        "normalization_std": repr(STD),
        "output_name": OUTPUT,
        "output_shape": "[batch, 10]",
        "output": "logits of the digits 0..9 (softmax gives probabilities)",
        "classes": "0,1,2,3,4,5,6,7,8,9",
        "source_checkpoint": str(trained.path),
        "step": str(trained.step),
        "model_config": json.dumps({"dropout": trained.config.model.dropout}),
        "trained_precision": trained.precision,  # the exports compute in fp32 (input_dtype)
    }


def plain(model: CNN) -> CNN:
    """The model in eval mode and the default memory format (what every exporter expects)."""
    return model.to(memory_format=torch.contiguous_format).eval()


# ---------------------------------------------------------------- writers: model -> bytes


def to_safetensors(model: CNN, meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, metadata=meta)


def to_torchscript(model: CNN, meta: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 calls TorchScript deprecated
        torch.jit.save(torch.jit.script(model), buf, _extra_files={TORCHSCRIPT_META: json.dumps(meta)})
    return buf.getvalue()


def to_onnx(model: CNN, meta: dict[str, str]) -> bytes:
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))  # see the module doc
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), buf, dynamo=False, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          opset_version=OPSET)
    proto = onnx.load_model_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = f"{meta['model']}; {meta['normalization']}, mean {meta['normalization_mean']}, " \
                       f"std {meta['normalization_std']}"
    return proto.SerializeToString()


# ---------------------------------------------------------------- readers: bytes -> logits, for the check


def _run_safetensors(blob: bytes, x: torch.Tensor, dropout: float) -> torch.Tensor:
    from safetensors.torch import load

    model = CNN(dropout)
    model.load_state_dict(load(blob))
    with torch.inference_mode():
        return model.eval()(x)


def _run_torchscript(blob: bytes, x: torch.Tensor, dropout: float) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(io.BytesIO(blob))
    with torch.inference_mode():
        return model(x)


def _run_onnx(blob: bytes, x: torch.Tensor, dropout: float) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


FORMATS: dict[str, tuple[Callable[[CNN, dict[str, str]], bytes], Callable[[bytes, torch.Tensor, float], torch.Tensor]]] = {
    "safetensors": (to_safetensors, _run_safetensors),
    "torchscript": (to_torchscript, _run_torchscript),
    "onnx": (to_onnx, _run_onnx),
}


def sample_inputs(n: int = SAMPLE) -> torch.Tensor:
    """n random 28x28 images, normalized as the model's inputs are (fixed seed: the same every time)."""
    gen = torch.Generator().manual_seed(0)
    return normalize(torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8))


def build(trained: Trained, formats: Sequence[str], prec: str = "fp32") -> dict[str, tuple[bytes, float, float]]:
    """{format: (file content, max |logit difference| to PyTorch fp32, and to PyTorch in `prec`)};
    ValueError if one is off (fp32: TOLERANCE; bf16 | fp16: MIXED_TOLERANCE x the logits' scale)."""
    model, meta, x = plain(trained.model.cpu()), metadata(trained), sample_inputs()
    with torch.inference_mode():
        expected = model(x)
        with precision.autocast_for(prec, torch.device("cpu"))():
            in_prec = model(x).float()
    limit = MIXED_TOLERANCE.get(prec, 0.0) * max(1.0, expected.abs().max().item())
    out = {}
    for fmt in formats:
        write, run = FORMATS[fmt]
        blob = write(model, meta)
        got = run(blob, x, trained.config.model.dropout)
        diff, diff_prec = (got - expected).abs().max().item(), (got - in_prec).abs().max().item()
        if not diff <= TOLERANCE:
            raise ValueError(f"{fmt} export differs from PyTorch by {diff:.2e} > {TOLERANCE:.0e}; nothing written")
        if prec != "fp32" and not diff_prec <= limit:
            raise ValueError(f"{fmt} export differs from PyTorch in {prec} by {diff_prec:.2e} > {limit:.1e}; "
                             "nothing written")
        out[fmt] = (blob, diff, diff_prec)
    return out


def model_file(run: rundir.RunDir, step: int) -> tuple[Path, dict[str, str]]:
    """The weights of `run`'s checkpoint of `step` as the run folder's model.safetensors (what the W&B
    model artifact publishes: cnn.tracking), and their metadata."""
    trained = load_model(checkpoint.path_for(run.path, step))
    meta = metadata(trained)
    return write_atomic(run.file(rundir.MODEL), to_safetensors(plain(trained.model), meta)), meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-ddp export",
        description="Export a checkpoint's weights as safetensors, TorchScript and ONNX, each checked against PyTorch.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CKPT|RUN_DIR", help="a checkpoint file, or a run folder (its newest)")
    parser.add_argument("--formats", default=",".join(FILES),
                        help=f"comma-separated, of {', '.join(FILES)} (default: all)")
    parser.add_argument("--out", type=Path, help="folder for the files (default: export/ in the checkpoint's run folder)")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist")
    parser.add_argument("--precision", default="auto", choices=("auto", *precision.NAMES),
                        help="the PyTorch precision the exports are also checked against; auto (default): the run's")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FILES]
    if unknown or not formats:
        parser.error(f"--formats: '{','.join(unknown)}' is not among {', '.join(FILES)}")
    try:
        trained = load_model(args.checkpoint)
    except CheckpointError as exc:
        console.error(exc)
        return 1
    folder = args.out or rundir.of_checkpoint(trained.path).file(rundir.EXPORT)
    targets = {fmt: folder / FILES[fmt] for fmt in formats}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not args.force:
        console.error(f"{existing[0]} exists; pass --force to overwrite it (nothing written)")
        return 1
    try:
        prec, why = precision.for_trained(args.precision, trained.precision, trained.precision_source)
        console.say(f"checked against PyTorch in fp32{'' if prec == 'fp32' else f' and in {prec} ({why})'}")
        built = build(trained, formats, prec)
        for fmt, (blob, diff, diff_prec) in built.items():
            write_atomic(targets[fmt], blob)
            also = "" if prec == "fp32" else f", PyTorch {prec}'s {diff_prec:.1e}"
            console.say(f"{targets[fmt]}  {len(blob) / 2**20:.1f} MiB  max |logit - PyTorch fp32's| {diff:.1e}{also}")
    except (ValueError, OSError) as exc:
        console.error(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

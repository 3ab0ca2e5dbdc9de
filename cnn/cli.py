"""`mnist-ddp`: one command for the jobs around training.

    mnist-ddp train [--config FILE] [key=value ...]      # = python train_ddp.py
    mnist-ddp evaluate CKPT|RUN_DIR [--split train|test] [key=value ...]
    mnist-ddp predict CKPT FILE... [--top-k K] [--format json|csv] [--invert]
    mnist-ddp export CKPT [--formats safetensors,torchscript,onnx] [--out DIR] [--force]
    mnist-ddp prepare [--root DIR]                        # = python -m data.prepare
    mnist-ddp plot RUN_DIR                                # = python -m cnn.plot

Under torchrun (train, evaluate): ``torchrun --standalone --nproc_per_node=N -m cnn.cli evaluate RUN_DIR``.
Each command is a ``main(argv) -> exit code`` in the module that owns the job, imported only
when it runs; a new command is one more row in COMMANDS.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn, Sequence

# name -> (module:function, one line for `mnist-ddp --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train_ddp:main", "train the CNN with DDP (python train_ddp.py; torchrun -m cnn.cli train)"),
    "evaluate": ("cnn.evaluate:main", "accuracy, loss, per-class accuracy, confusion matrix of a checkpoint"),
    "predict": ("cnn.predict:main", "classify digits in PNG/JPEG images, .npy arrays or IDX files"),
    "export": ("cnn.export:main", "weights as safetensors, TorchScript and ONNX, checked against PyTorch"),
    "prepare": ("data.prepare:main", "fetch and verify MNIST ahead of time (offline clusters)"),
    "plot": ("cnn.plot:main", "training curves and a prediction grid of a run folder, as PNGs"),
    "compare": ("cnn.compare:main", "runs side by side without W&B: differing config keys, results, overlay plots"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items())
    return (f"usage: mnist-ddp COMMAND [ARGS ...]\n\ncommands:\n{rows}\n\n"
            "`mnist-ddp COMMAND --help` for a command's arguments; exit codes: 0 done, 1 error, 2 bad usage.")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}' (one of {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    sys.argv[0] = f"mnist-ddp {name}"  # what argparse shows as `prog` in the command's usage lines
    return getattr(importlib.import_module(module), func)(rest)


def run() -> NoReturn:
    """The `mnist-ddp` console script: a command that ran a process group (train, evaluate) ends
    through cnn.distributed.exit_process, the others as usual (without importing torch)."""
    code = main()
    if "cnn.distributed" in sys.modules:
        from cnn.distributed import exit_process

        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()

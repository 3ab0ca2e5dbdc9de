"""A trained model from a checkpoint, ready to use: the one place that turns a checkpoint into a model.

    trained = load_model("runs/<id>")                                   # a run: its newest checkpoint
    trained = load_model("runs/<id>/checkpoints/step-00000468.pt")
    logits(trained.model, trained.config, images_uint8, autocast)       # N x 10, in batches

The model is built from the checkpoint's own config (``model.*``), loaded through
``cnn.checkpoint.load`` (so a truncated, foreign or newer-format file is the same
one-line ``CheckpointError``), put in eval mode on the requested device, in the
memory format it trained in (``train.channels_last``).  Its inputs go through
``data.sharding.model_input``, the normalization training used: `evaluate`,
`predict` and `export` therefore see the model exactly as the run's own
evaluation did -- in the precision the run computed in (``Trained.precision``, from
``cnn.checkpoint.run_precision``), which they use unless told otherwise.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, ContextManager, NamedTuple

import torch

from cnn import checkpoint, config, rundir
from cnn.checkpoint import CheckpointError
from cnn.config import Config, ConfigError
from cnn.model import CNN
from data.sharding import model_input


class Trained(NamedTuple):
    model: CNN  # eval mode, on the requested device
    config: Config  # the config the run trained with
    path: Path  # the checkpoint file it came from
    step: int  # optimizer steps behind these weights
    precision: str  # fp32 | bf16 | fp16: what the run computed in (precision=auto resolved)
    precision_source: str  # how that is known: recorded in the checkpoint, or how an older one tells


def find_checkpoint(source: str | os.PathLike) -> Path:
    """A checkpoint file as given, or the newest checkpoint of a run folder (or of its checkpoints/)."""
    source = Path(source)
    if not source.is_dir():
        return source  # checkpoint.load names a missing file
    run = source.parent if source.name == rundir.CHECKPOINTS and not checkpoint.folder(source).is_dir() else source
    found = checkpoint.list_checkpoints(run)
    if not found:
        raise CheckpointError(f"{source}: no checkpoint in {checkpoint.folder(run)} (not a run folder, "
                              "or the run saved none)")
    return found[0]


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu") -> Trained:
    """The model of a checkpoint file or run folder; raises CheckpointError naming the file."""
    path = find_checkpoint(source)
    state = checkpoint.load(path, checkpoint.fits_model)
    try:
        cfg = config.from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its saved config does not fit this code ({exc})") from None
    model = CNN(cfg.model.dropout)
    model.load_state_dict(state["model"])
    model = model.to(device).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Trained(model, cfg, path, int(state["step"]), *checkpoint.run_precision(state, path))


@torch.inference_mode()
def logits(model: torch.nn.Module, cfg: Config, images: torch.Tensor, batch_size: int = 1000,
           autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """float32 N x 10 logits (on the CPU) of uint8 N x 28 x 28 images in MNIST's format, in batches,
    computed under `autocast` (cnn.precision: the run's precision, as its evaluation computed)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        with autocast():
            out.append(model(model_input(images[i : i + batch_size], device, cfg.train.channels_last)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 10)

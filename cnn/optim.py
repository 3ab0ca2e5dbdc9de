"""Adam and its learning-rate schedule, a pure function of the step."""

from __future__ import annotations

import math

import torch

from cnn.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel (one launch for all parameters) exists on CUDA and, since
    # torch 2.4, on CPU; fall back to foreach where a build lacks it.
    try:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    onecycle: linear warm-up to cfg.lr over warmup_frac of the run, then linear
    decay to 0 at the last step; cosine: same warm-up, cosine decay to 0;
    constant: cfg.lr throughout.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = int(cfg.warmup_frac * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)

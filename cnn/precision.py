"""Mixed precision, chosen once at start-up: an autocast context and a grad scaler.

The training loop calls ``prec.autocast()`` and ``prec.scaler`` unconditionally;
fp32 gets a null context and a disabled scaler, bf16 autocast and no scaling
(bf16 has fp32's exponent range), fp16 autocast and a live GradScaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch


@dataclass(frozen=True)
class Precision:
    name: str  # resolved: fp32 | bf16 | fp16
    autocast: Callable[[], ContextManager]
    scaler: torch.amp.GradScaler


def resolve(requested: str, device: torch.device) -> str:
    """auto -> bf16 on a CUDA device that supports it, else fp32 (bf16 autocast measured slower than fp32
    on an AVX2-only CPU, which has no native bf16)."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build(requested: str, device: torch.device) -> Precision:
    name = resolve(requested, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
    if dtype is None:
        autocast: Callable[[], ContextManager] = contextlib.nullcontext
    else:
        def autocast() -> ContextManager:
            return torch.autocast(device_type=device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=(name == "fp16"))
    return Precision(name, autocast, scaler)

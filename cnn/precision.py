"""Mixed precision, chosen once at start-up: an autocast context and a grad scaler.

The training loop calls ``prec.autocast()`` and ``prec.scaler`` unconditionally;
fp32 gets a null context and a disabled scaler, bf16 autocast and no scaling
(bf16 has fp32's exponent range), fp16 autocast and a live GradScaler.

``precision=auto`` picks the fastest precision that is safe on the hardware
(``resolve``, a pure function of the request and the ``Caps`` gathered once):

- CUDA with native bf16 (compute capability >= 8.0): bf16;
- CUDA without it (V100, T4: bf16 only emulated): fp16 with a grad scaler;
- an x86 CPU with avx512_bf16 or AMX: bf16 (measured 1.44x fp32 on an AVX-512 EPYC);
- an x86 CPU without them: fp32 (bf16 autocast measured slower than fp32 on AVX2);
- where the flags cannot tell (a torch without the CPU probes on an AVX-512 CPU, a non-x86
  CPU, or ``train.precision_probe=true``): a short measurement of the real model's training
  step in each candidate decides.

Every rank ends with the same choice (``choose`` compares the ranks' decisions and measures
on all of them when they differ), and the reason is kept for the log and the job facts.

The resolved precision is a fact of the run: checkpoints record it (``record``), and whatever
runs a trained model again -- a resumed run, evaluate, predict, export's check, the W&B model
artifact -- computes in it unless told otherwise (``for_trained``; ``choose(resumed=...)``):
``auto`` there means "the run's", so a run's numbers are reproduced on any machine.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F

NAMES = ("fp32", "bf16", "fp16")  # the resolved precisions (`auto` resolves to one of them)
MEASURE = "measure"  # resolve()'s answer when only a measurement can tell
PROBE_SECONDS = 1.0  # the start-up measurement's budget, warm-up steps included (one timed round at least)
PROBE_IMAGES = 16  # images per measured step: the speed ratio, not the step time, decides (bf16 on AVX2: 0.26 s)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # resolved: fp32 | bf16 | fp16
    autocast: Callable[[], ContextManager]
    scaler: torch.amp.GradScaler
    reason: str = "requested"  # why this precision: logged once and kept in the job facts


@dataclass(frozen=True)
class Caps:
    """What this process's hardware offers for mixed precision (``detect()`` gathers it once)."""

    cuda_available: bool = False
    cuda_bf16_native: bool = False  # the bound CUDA device computes in bf16 natively (compute capability >= 8.0)
    cpu_arch: str = "x86_64"  # platform.machine(): the CPU flags below are x86 flags
    cpu_capability: str = ""  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, SVE256, ...
    cpu_avx512_bf16: bool | None = None  # None: this torch cannot tell
    cpu_amx: bool | None = None  # AMX tiles (Sapphire Rapids and later); None: this torch cannot tell

    @property
    def x86(self) -> bool:
        return self.cpu_arch.lower() in ("x86_64", "amd64", "i686", "i386")


def _cpu_flag(name: str) -> bool | None:
    """torch.cpu._is_avx512_bf16_supported / _is_amx_tile_supported: Python wrappers present in torch
    2.5-2.14 (the torch._C._cpu functions behind them were removed in 2.11); None where absent."""
    fn = getattr(torch.cpu, name, None)
    if fn is None:
        return None
    try:
        return bool(fn())
    except Exception:
        return None


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a CUDA device of this compute capability computes bf16 natively: from 8.0 (A100,
    sm_80) on; V100 (7.0) and T4 (7.5) only emulate it.  torch's own rule, as a pure function:
    torch.cuda.is_bf16_supported(including_emulation=False) is `major >= 8` on CUDA (torch 2.11 and
    2.14 torch/cuda/__init__.py; ROCm: always True)."""
    return capability[0] >= 8


def _cuda_bf16_native() -> bool:
    """torch.cuda.is_bf16_supported(including_emulation=False): True from compute capability 8.0 on.
    The default (including_emulation=True) also says True on V100/T4, where bf16 is only emulated
    (torch 2.11 torch/cuda/__init__.py); the parameter exists from torch 2.4."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.4: ask for the compute capability ourselves
        return native_bf16(torch.cuda.get_device_capability())


def detect() -> Caps:
    """This process's capabilities; on CUDA, of the device already bound with torch.cuda.set_device."""
    return Caps(
        cuda_available=torch.cuda.is_available(),
        cuda_bf16_native=_cuda_bf16_native(),
        cpu_arch=platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_avx512_bf16=_cpu_flag("_is_avx512_bf16_supported"),
        cpu_amx=_cpu_flag("_is_amx_tile_supported"),
    )


@dataclass(frozen=True)
class Choice:
    name: str  # fp32 | bf16 | fp16, or MEASURE
    reason: str
    candidates: tuple[str, ...] = ()  # what a measurement compares (name == MEASURE)


def resolve(requested: str, device_type: str, caps: Caps, probe: bool = False) -> Choice:
    """The precision for `requested` on this hardware (pure; see the module docstring for the rules)."""
    if requested != "auto":
        return Choice(requested, "requested")
    if device_type == "cuda":
        if caps.cuda_bf16_native:
            return Choice("bf16", "CUDA device with native bf16 (compute capability >= 8.0)")
        return Choice("fp16", "CUDA device without native bf16 (it would be emulated): fp16 with a grad scaler")
    if device_type != "cpu":
        return Choice("fp32", f"no mixed-precision rule for device type {device_type}")
    if probe:
        return Choice(MEASURE, "train.precision_probe=true", ("fp32", "bf16"))
    if not caps.x86:
        return Choice(MEASURE, f"{caps.cpu_arch} CPU ({caps.cpu_capability}): its bf16 support is not known to torch's "
                               "x86 probes", ("fp32", "bf16"))
    if caps.cpu_avx512_bf16 or caps.cpu_amx:
        flags = "+".join(f for f, on in (("avx512_bf16", caps.cpu_avx512_bf16), ("amx", caps.cpu_amx)) if on)
        return Choice("bf16", f"CPU with native bf16 ({flags})")
    if caps.cpu_avx512_bf16 is None and caps.cpu_amx is None and caps.cpu_capability.startswith("AVX512"):
        return Choice(MEASURE, "AVX-512 CPU, and this torch cannot tell whether it has avx512_bf16", ("fp32", "bf16"))
    return Choice("fp32", f"CPU without native bf16 ({caps.cpu_capability or 'unknown'}; no avx512_bf16, no AMX): "
                          "bf16 autocast would be slower than fp32")


def record(requested: str, prec: Precision) -> dict[str, str]:
    """What a checkpoint keeps of its run's precision: what was asked, what it computed in, and why."""
    return {"requested": requested, "resolved": prec.name, "reason": prec.reason}


def for_trained(requested: str, run_precision: str, source: str) -> tuple[str, str]:
    """(precision, why) to run a trained model in: an explicit fp32 | bf16 | fp16 wins; `auto` is
    `run_precision`, the one the run computed in (`source` says how that is known)."""
    if requested in NAMES:
        return requested, "requested"
    return run_precision, f"the run's ({source})"


def autocast_for(name: str, device: torch.device) -> Callable[[], ContextManager]:
    dtype = DTYPES.get(name)
    if dtype is None:
        return contextlib.nullcontext

    def autocast() -> ContextManager:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return autocast


def build(name: str, device: torch.device, reason: str = "requested") -> Precision:
    """The autocast context and grad scaler of a resolved precision (fp32 | bf16 | fp16)."""
    scaler = torch.amp.GradScaler(device.type, enabled=(name == "fp16"))
    return Precision(name, autocast_for(name, device), scaler, reason)


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, candidates: tuple[str, ...],
                 device: torch.device, budget_s: float = PROBE_SECONDS) -> dict[str, float]:
    """The fastest forward + backward of `model` on up to PROBE_IMAGES images of (x, y) in each
    candidate precision, in seconds.

    Runs on a copy of the model (the weights, gradients and the caller's RNG stay untouched): one
    untimed warm-up step per candidate, then rounds of one timed step each until `budget_s` (from
    the start, warm-ups included) is spent; at least one round.  A candidate 1.5x slower than the
    best stops early: it cannot win (bf16 autocast on an AVX2 CPU measured ~20x fp32).
    """
    probe = copy.deepcopy(model).train()
    x, y = x[:PROBE_IMAGES], y[:PROBE_IMAGES]
    contexts = {name: autocast_for(name, device) for name in candidates}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one(name: str) -> float:
        sync()
        t0 = time.perf_counter()
        with contexts[name]():
            loss = F.cross_entropy(probe(x), y)
        loss.backward()
        probe.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # dropout draws: keep the caller's RNG stream
        deadline = time.perf_counter() + budget_s
        for name in candidates:
            one(name)
        best = {name: float("inf") for name in candidates}
        alive = list(candidates)
        while True:
            for name in alive:
                best[name] = min(best[name], one(name))
            fastest = min(best[name] for name in alive)
            alive = [name for name in alive if best[name] <= 1.5 * fastest]
            if len(alive) < 2 or time.perf_counter() >= deadline:
                return best


def pick(times: dict[str, float]) -> str:
    """The fastest candidate; fp32 on a tie (the safe one)."""
    return min(times, key=lambda name: (times[name], name != "fp32"))


def choose(requested: str, device: torch.device, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
           probe: bool = False, caps: Caps | None = None, resumed: str | None = None) -> Precision:
    """Resolve `requested` on every rank to one precision (collective: all ranks must call it).

    A resumed run (`resumed`: the precision its checkpoint computed in, the same on every rank:
    rank 0 broadcast the checkpoint) keeps it under `auto`, wherever it resumes: the run goes on
    with the numerics it had, and its resume is exact.  An explicit precision changes it.

    Each rank decides from its own capabilities; when every rank decided alike, that is the
    choice.  When any rank needs a measurement, or the ranks disagree (mixed hardware), every
    rank times the candidates on (x, y) and the job takes the one whose slowest rank is fastest:
    the job steps at its slowest rank's pace.
    """
    local = resolve(requested, device.type, caps or detect(), probe)
    if requested == "auto" and resumed in NAMES:
        here = "" if local.name == resumed else (
            f"; alone, this machine would {'measure' if local.name == MEASURE else 'pick ' + local.name}: {local.reason}")
        return build(resumed, device, f"the run's: resumed from a checkpoint that computed in {resumed} (precision=auto "
                                      f"keeps a resumed run's precision; pass precision=fp32|bf16|fp16 to change it){here}")
    decisions: list = [None] * dist.get_world_size()
    dist.all_gather_object(decisions, (local.name, local.reason, local.candidates))
    names = {name for name, _, _ in decisions}
    if len(names) == 1 and local.name != MEASURE:
        return build(local.name, device, local.reason)
    candidates = tuple(sorted({c for name, _, cands in decisions for c in (cands or (name,))},
                              key=("fp32", "bf16", "fp16").index))
    why = local.reason if len(names) == 1 else f"ranks disagree ({', '.join(sorted(names))})"
    times: list = [None] * dist.get_world_size()
    dist.all_gather_object(times, step_seconds(model, x, y, candidates, device))
    slowest = {c: max(t[c] for t in times) for c in candidates}
    name = pick(slowest)
    measured = " vs ".join(f"{c} {slowest[c] * 1e3:.1f} ms" for c in candidates)
    return build(name, device, f"{why}; measured {measured} per training step (slowest rank)")

"""What the hardware can do and how much of it a run uses: the matmul roofline measured on the spot,
the datasheet's dense peaks, the TF32 settings that decide which peak applies, and MFU."""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cnn.model import TRAIN_FLOPS_PER_IMAGE
from cnn.perf.clock import sync


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.6) -> float:
    """Achieved GFLOP/s of a large square matmul on this process's threads / device.

    The compute roofline that MFU is measured against: measured, not a data-sheet
    figure, so it reflects this machine's clocks and thread settings.  Takes about
    `seconds` whatever the dtype: the matrix grows from 256 towards 2048 (8192 on CUDA)
    only while one product stays under a tenth of that, so a dtype the hardware only
    emulates (bf16 on an AVX2 CPU: ~1 GFLOP/s, 17 s for one 2048 product) is measured
    on a smaller matrix instead of stalling start-up.
    """
    largest = 8192 if device.type == "cuda" else 2048
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if n >= largest or time.perf_counter() - t0 > seconds / 80:
            break  # the next size (8x the work) would take over a tenth of the budget
        n *= 2
    best = 0.0
    for _ in range(3):  # best of three: a shared machine only ever makes it slower
        iters, t0 = 0, time.perf_counter()
        while True:
            a @ b
            iters += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds / 3:
                break
        best = max(best, 2 * n**3 * iters / elapsed / 1e9)
    return best


# Dense (no sparsity) datasheet peaks in TFLOP/s: FP32 (CUDA cores), TF32 / BF16 / FP16 tensor cores;
# None where the part has no such path (V100 and T4: no TF32 or BF16 tensor cores).  From NVIDIA's
# datasheets; torchtitan's tools/utils.py uses the same H100/H200 (989 BF16) and A100 (312) figures.
# First match wins, so a variant (PCIe, NVL) comes before its family.
DATASHEET_TFLOPS: list[tuple[str, tuple[float, float | None, float | None, float | None] | None]] = [
    (r"\bH100\b.*\bPCIE\b", (51.0, 378.0, 756.5, 756.5)),
    (r"\bH1[02]0\b.*\bNVL\b", None),  # NVL parts: other clocks and peaks, not in this table
    (r"\bH100\b", (67.0, 494.5, 989.5, 989.5)),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH200\b", (67.0, 494.5, 989.5, 989.5)),  # SXM
    (r"\bA100\b", (19.5, 156.0, 312.0, 312.0)),  # SXM4 and PCIe alike
    (r"\bL40S\b", (91.6, 183.0, 362.0, 362.0)),
    (r"\bL4\b", (30.3, 60.0, 121.0, 121.0)),
    (r"\bA10\b", (31.2, 62.5, 125.0, 125.0)),
    (r"\bV100-SXM2\b", (15.7, None, None, 125.0)),
    (r"\bT4\b", (8.1, None, None, 65.0)),
]


def datasheet_peak_tflops(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """The datasheet's dense peak for a run in `precision` (fp32 | bf16 | fp16; `tf32`: fp32 work on
    TF32 tensor cores) on the CUDA device named `device_name`; None for an unknown device or a path
    the device lacks (bf16 on a T4) and on CPUs."""
    name = device_name.upper()
    for pattern, peaks in DATASHEET_TFLOPS:
        if re.search(pattern, name):
            if peaks is None:
                return None
            fp32, tf32_peak, bf16, fp16 = peaks
            if precision == "bf16":
                return bf16
            if precision == "fp16":
                return fp16
            return (tf32_peak or fp32) if tf32 else fp32  # no TF32 cores (V100, T4): TF32 runs as fp32
    return None


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the run's matmuls and convolutions compute in."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def tf32_flags() -> tuple[bool, bool]:
    """(matmuls, cuDNN convolutions) allowed to use TF32 on CUDA.  Defaults (torch 2.11, 2.14): False,
    True.  torch >= 2.9 also has the fp32_precision API; reading a legacy flag after the new API set
    it raises RuntimeError ("you have used mix of the legacy and new APIs", seen on 2.14.1), so that
    case is read through the new API."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return (torch.backends.cuda.matmul.fp32_precision == "tf32",
                torch.backends.cudnn.conv.fp32_precision == "tf32")


@contextlib.contextmanager
def _matmul_tf32():
    """TF32 matmuls for a while, through the legacy flag (the one tf32_flags reads: no API mix)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def peak_basis(precision: str, device_type: str, tf32_cudnn: bool) -> str:
    """The arithmetic a run's convolutions (85% of this CNN's FLOPs) compute in: bf16 | fp16 | tf32 | fp32.
    An fp32 run on CUDA uses TF32 tensor cores for its cuDNN convolutions when cudnn.allow_tf32 is on."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if device_type == "cuda" and tf32_cudnn else "fp32"


@dataclass(frozen=True)
class Roofline:
    """What MFU is measured against, for the whole job (every rank's share summed)."""

    measured_gflops: float  # matmul peak measured at start-up in `basis`; 0 = not measured
    datasheet_gflops: float | None  # the devices' datasheet peak in `basis`; None = unknown (and on CPUs)
    basis: str  # fp32 | tf32 | bf16 | fp16: the arithmetic the run's convolutions use
    tf32_matmul: bool = False
    tf32_cudnn: bool = False

    def facts(self) -> dict[str, float | str | bool | None]:
        return {"peak_gflops": self.measured_gflops, "peak_datasheet_gflops": self.datasheet_gflops,
                "peak_basis": self.basis, "tf32_matmul": self.tf32_matmul, "tf32_cudnn": self.tf32_cudnn}


def job_roofline(device: torch.device, precision: str, measure: bool = True) -> Roofline:
    """The job's roofline in the arithmetic the run computes in (collective).

    fp16 and bf16 runs are measured with fp16 / bf16 matmuls.  An fp32 run on CUDA computes its
    convolutions (85% of this CNN's FLOPs) in TF32 when cuDNN allows it (torch's default), while
    its matmuls stay fp32 (torch's default too): the peak is then measured with TF32 matmuls, and
    both flags go into the summary.  On a CPU TF32 does not exist and the datasheet peak is None.
    """
    tf32_matmul, tf32_cudnn = tf32_flags() if device.type == "cuda" else (False, False)
    basis = peak_basis(precision, device.type, tf32_cudnn)
    measured = 0.0
    if measure:
        with _matmul_tf32() if basis == "tf32" else contextlib.nullcontext():
            measured = matmul_peak_gflops(device, compute_dtype(precision))
    sheet = None
    if device.type == "cuda":
        sheet = datasheet_peak_tflops(torch.cuda.get_device_name(device), precision, basis == "tf32")
    # NaN marks an unknown datasheet peak: any rank's NaN makes the job's sum unknown
    t = torch.tensor([measured, math.nan if sheet is None else sheet * 1e3], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    job_sheet = float(t[1].item())
    return Roofline(float(t[0].item()), None if math.isnan(job_sheet) else job_sheet, basis, tf32_matmul, tf32_cudnn)


def throughput(images: int, seconds: float, peak: Roofline) -> dict[str, float | None]:
    """images/s, achieved GFLOP/s (forward + backward) and its share of the measured roofline (mfu)
    and of the datasheet's (mfu_datasheet; None where that is unknown)."""
    ips = images / seconds if seconds > 0 else 0.0
    gflops = ips * TRAIN_FLOPS_PER_IMAGE / 1e9
    sheet = peak.datasheet_gflops
    return {
        "images_per_sec": ips,
        "gflops": gflops,
        "mfu": gflops / peak.measured_gflops if peak.measured_gflops > 0 else 0.0,
        "mfu_datasheet": gflops / sheet if sheet else None,
    }

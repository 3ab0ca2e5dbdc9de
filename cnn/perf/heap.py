"""train.keep_heap: glibc's malloc keeps a step's freed tensor memory instead of handing it back.

A CPU step allocates and frees the same activations every step (~33 MB at the default batch of
128). glibc serves blocks above its mmap threshold with mmap and unmaps them on free; the
threshold starts at 128 KiB and rises only when such a block is freed, so whether every step
re-faults those pages (zeroed by the kernel: measured 8,365 minor faults a step, one rank, bf16,
2-core AMD EPYC) or none does depends on what the process happened to allocate first (in the
trainer, loading the test set and evaluating before the loop made it none). Fixing both thresholds (mallopt, as
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ would at start-up) keeps those pages mapped:
no faults whatever ran first, at the price of the process holding its peak heap until it exits.
Where the environment sets either variable, or libc has no mallopt (musl, macOS), nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable, Mapping

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): bigger blocks still mmap
TRIM_THRESHOLD = 1024 * 1024 * 1024  # free heap top kept up to this much before it is returned
ENV_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _libc_mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "mallopt", None)
    except OSError:
        return None


def keep_heap(enabled: bool, environ: Mapping[str, str] = os.environ,
              mallopt: Callable[[], Callable[[int, int], int] | None] = _libc_mallopt) -> str:
    """Fixes glibc's mmap and trim thresholds (see the module doc); returns what it did, for the log."""
    if not enabled:
        return "malloc: glibc's defaults (train.keep_heap=false)"
    if set_by := [k for k in ENV_KEYS if k in environ]:
        return f"malloc: as the environment sets it ({', '.join(set_by)})"
    fn = mallopt()
    if fn is None:
        return "malloc: left alone (no mallopt in this libc)"
    if not (fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and fn(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "malloc: left alone (mallopt refused the thresholds)"
    return f"malloc: freed memory kept (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB)"

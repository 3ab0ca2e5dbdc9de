"""One rank of tests/test_startup.py's two-process job: the start-up path of cnn/distributed/ and
cnn/precision.py with gloo, driven directly (no trainer).  Launched with torchrun's variables set.

Rank 1 stands for a rank whose first step is slow (a cold torch.compile): it sleeps SLOW_S, longer than
the short timeout, before its first collective; both then agree on precision=auto from different
CPUs (rank 0 claims avx512_bf16, rank 1 AVX2); after the warm-up rank 1 hangs, and rank 0 reports
how long its next collective waited.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from cnn import distributed, precision  # noqa: E402
from cnn.model import CNN  # noqa: E402

INIT_TIMEOUT_S, TIMEOUT_S, SLOW_S = 30, 1, 3

d = distributed.setup("cpu", init_timeout_s=INIT_TIMEOUT_S)
if d.rank == 1:
    time.sleep(SLOW_S)
caps = (precision.Caps(cpu_capability="AVX512", cpu_avx512_bf16=True, cpu_amx=False) if d.rank == 0 else
        precision.Caps(cpu_capability="AVX2", cpu_avx512_bf16=False, cpu_amx=False))
torch.manual_seed(0)
x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
prec = precision.choose("auto", d.device, CNN(), x, y, caps=caps)
print(f"precision {prec.name}: {prec.reason}", flush=True)
grads = torch.ones(4)
dist.all_reduce(grads)  # the first step's gradient all-reduce
distributed.end_warmup(TIMEOUT_S, d.device)
print("warm", flush=True)
if d.rank == 1:
    time.sleep(120)  # hung after the warm-up: the test kills it
t0 = time.monotonic()
try:
    dist.all_reduce(grads)
    print("collective returned", flush=True)
except Exception as exc:
    print(f"collective failed after {time.monotonic() - t0:.2f} s: {type(exc).__name__}", flush=True)
os._exit(0)  # no teardown: the peer is hung

"""Throughput accounting, one idea a module: the device clock (clock), the matmul roofline, datasheet
peaks and MFU (roofline), training windows and memory (window), CUDA-graph captures and replays
(cudagraphs), the host-device sync check (sync_check), the per-rank figures that show a
straggler (stragglers), the ops a training step dispatches (ops), and glibc's malloc thresholds (heap).  The names are re-exported here: ``from cnn import perf; perf.Window``.
"""

import torch.distributed as dist  # noqa: F401  (tests patch perf.dist.all_reduce)

from cnn.perf.clock import sync, Clock  # noqa: F401
from cnn.perf.roofline import matmul_peak_gflops, DATASHEET_TFLOPS, datasheet_peak_tflops, compute_dtype, tf32_flags, peak_basis, Roofline, job_roofline, throughput  # noqa: F401
from cnn.perf.window import memory_mb, peak_memory_mb, Window  # noqa: F401
from cnn.perf.cudagraphs import GraphReplays, NullReplays, CUDAGRAPH_MODES, graph_replays  # noqa: F401
from cnn.perf.sync_check import SyncCheck  # noqa: F401
from cnn.perf.stragglers import STRAGGLER_RATIO, STRAGGLER_WINDOWS, Stragglers, NullRankStats, RankStats, make_rank_stats  # noqa: F401
from cnn.perf.ops import COUNTED_STEP, OpCounter, StepOps, NullStepOps, step_ops  # noqa: F401
from cnn.perf.heap import keep_heap  # noqa: F401

"""Throughput accounting: a matmul roofline measured on the spot (and the datasheet's), MFU, training
windows, memory, CUDA-graph captures and replays, and the per-rank figures that show a straggler (RankStats)."""

from __future__ import annotations

import contextlib
import math
import re
import resource
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from cnn.model import TRAIN_FLOPS_PER_IMAGE


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Elapsed training time: CUDA events on a GPU (device time, no host-side jitter),
    perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.restart()

    def restart(self) -> None:
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.start.elapsed_time(end) / 1e3
        return time.perf_counter() - self.t0


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


def memory_mb(device: torch.device) -> dict[str, float]:
    """This process's memory so far, MiB: peak resident set (ru_maxrss, KiB on Linux) and, on
    CUDA, torch's peak and current allocation.  Peaks are never reset here: other readers
    (the summary) rely on the whole run's peak."""
    mem = {"rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        mem["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        mem["gpu_mem_mb"] = torch.cuda.memory_allocated(device) / 2**20
    return mem


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """The largest peak memory of any rank, MiB (collective): resident set, and torch's GPU
    allocation on CUDA (None on CPUs)."""
    mine = memory_mb(device)
    t = torch.tensor([mine["rss_peak_mb"], mine.get("gpu_mem_peak_mb", 0.0)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    rss, gpu = t.tolist()
    return {"peak_rss_mb": rss, "peak_gpu_mb": gpu if device.type == "cuda" else None}


class GraphReplays:
    """Counts CUDA-graph captures and replays in this process, to tell whether compile_mode=reduce-overhead
    really reused the step's CUDA graphs (cudagraph trees fall back to eager for graphs they cannot
    capture, with a warning only, and re-record a graph whose inputs changed).

    torch has no such counters, so the methods inductor's cudagraph trees call are wrapped on
    `graph_class` (torch.cuda.CUDAGraph, a Python class in torch/cuda/graphs.py; a stand-in in tests):
    `capture_end`, which the `torch.cuda.graph(...)` context calls on leaving (graph.__exit__), and
    `replay`.  A replay alone proves nothing: in torch/_inductor/cudagraph_trees.py (read in 2.14.1),
    CUDAGraphNode.__init__ records its graph (`self._record(...)`, inside `torch.cuda.graph(self.graph,
    ...)`) and then calls `self.graph.replay()` once, so a graph re-recorded every step reads one replay
    per capture; later runs replay through CUDAGraphNode.run_graph.  CUDAGraphTreeManager.__init__ also
    captures one empty graph per device, never replayed.  Reuse is therefore the replays beyond the
    captures: `cudagraph_replays_beyond_captures` = max(0, replays - captures), 0 when no graph was
    reused (it undercounts real reuse by one per tree manager, never overcounts).  Skipped graphs are
    counted by torch in torch._dynamo.utils.counters["inductor"]["cudagraph_skips"].  The wrappers stay
    for the life of the process."""

    def __init__(self, graph_class: type | None = None) -> None:
        self.captures = self.replays = 0
        cls = torch.cuda.CUDAGraph if graph_class is None else graph_class
        capture_end, replay = cls.capture_end, cls.replay
        outer = self

        def counted_capture_end(graph) -> None:
            capture_end(graph)
            outer.captures += 1  # after it returns: a capture that failed recorded no graph

        def counted_replay(graph) -> None:
            outer.replays += 1
            replay(graph)

        cls.capture_end, cls.replay = counted_capture_end, counted_replay

    def facts(self) -> dict[str, int]:
        from torch._dynamo.utils import counters

        return {"cudagraph_captures": self.captures, "cudagraph_replays": self.replays,
                "cudagraph_replays_beyond_captures": max(0, self.replays - self.captures),
                "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


class NullReplays:
    """Runs without CUDA graphs: nothing to count, nothing to report."""

    def facts(self) -> dict[str, int]:
        return {}


CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that turn on inductor's cudagraphs


def graph_replays(compiled: bool, mode: str, device: torch.device) -> GraphReplays | NullReplays:
    """A capture and replay counter where torch.compile may run CUDA graphs, a null one elsewhere."""
    return GraphReplays() if compiled and mode in CUDAGRAPH_MODES and device.type == "cuda" else NullReplays()


class SyncCheck:
    """train.sync_debug: proof that the loop never waits for the GPU between log points.

    ``forbid()`` at the top of each step turns any host-device synchronisation into an
    error (``torch.cuda.set_sync_debug_mode("error")``: blocking copies, ``.item()`` of a
    device tensor, ``torch.cuda.synchronize``); ``allow()`` at a log, eval or checkpoint
    point lifts it.  Armed at the first log point, so one-time warm-up (DDP's first
    steps, torch.compile) is not counted.  A no-op on CPU or when off.  torch.distributed
    collectives are not covered by the debug mode; the stop check uses a CPU tensor on a
    gloo group (cnn.distributed.StopRequest.agreed).
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled, self.armed = enabled and device.type == "cuda", False

    def forbid(self) -> None:
        if self.armed:
            torch.cuda.set_sync_debug_mode("error")

    def allow(self) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
            self.armed = True


class Window:
    """Train loss and accuracy summed on the device between log points: no host sync per step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.steps = 0
        self.clock = Clock(device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.detach().float()
        self.correct += (logits.argmax(dim=1) == y).sum()
        self.steps += 1

    def close(self, world_size: int, global_batch: int) -> tuple[float, float, int, float]:
        """(mean train loss, accuracy, images, seconds) over all ranks since the last close (collective).

        Raises FloatingPointError on a non-finite loss, on every rank alike."""
        sums = torch.stack([self.loss, self.correct.float()])
        dist.all_reduce(sums)  # the whole job's figures, not rank 0's
        loss = sums[0].item() / (self.steps * world_size)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss}) in the last {self.steps} steps")
        acc, images = sums[1].item() / (self.steps * global_batch), self.steps * global_batch
        seconds = self.clock.seconds()
        self.loss.zero_(), self.correct.zero_()
        self.steps = 0
        return loss, acc, images, seconds

    def restart_clock(self) -> None:
        """Evaluation and checkpointing are not training time."""
        self.clock.restart()


# ---------------------------------------------------------------- per-rank figures and stragglers

STRAGGLER_RATIO = 1.2  # a rank whose compute time per step exceeds the other ranks' median by 20% ...
STRAGGLER_WINDOWS = 3  # ... for this many consecutive log windows gets a warning


class Stragglers:
    """Which rank, if any, has been slower than the others' median by `ratio` for `windows` log
    windows in a row.  The others' median, not everyone's: with two ranks it is the other rank.

    Pure: `update` returns the rank to warn about once, when its streak reaches `windows`
    (a new streak, or another rank, warns again)."""

    def __init__(self, ratio: float = STRAGGLER_RATIO, windows: int = STRAGGLER_WINDOWS) -> None:
        self.ratio, self.windows = ratio, windows
        self.rank, self.streak = -1, 0

    @staticmethod
    def slowest(compute_ms: list[float]) -> tuple[int, float]:
        """(the slowest rank, the median of the other ranks' times; its own time if alone)."""
        rank = max(range(len(compute_ms)), key=compute_ms.__getitem__)
        others = compute_ms[:rank] + compute_ms[rank + 1:]
        return rank, statistics.median(others) if others else compute_ms[rank]

    def update(self, compute_ms: list[float]) -> int | None:
        rank, median = self.slowest(compute_ms)
        if median > 0 and compute_ms[rank] > self.ratio * median:
            self.streak = self.streak + 1 if rank == self.rank else 1
            self.rank = rank
        else:
            self.rank, self.streak = -1, 0
        return self.rank if self.streak == self.windows else None


class NullRankStats:
    """train.rank_stats=false: no hooks, no gather, no fields."""

    def after_backward(self) -> None: ...

    def close(self, seconds: float, step: int) -> dict[str, Any]:
        return {}


class RankStats(NullRankStats):
    """Each rank's own compute time and its time blocked in DDP's gradient all-reduce, per log
    window, gathered to every rank in one small all-gather (no per-step collective).

    DDP overlaps the all-reduce with backward, and a fast rank's waiting for a slow one is
    hidden inside `backward()`.  What is measured, per step:
      wait    = from the moment this rank's last gradient is ready (a post-accumulate-grad
                hook) to the return of backward(), which DDP holds until every bucket's
                all-reduce is done: the last bucket's transfer plus any waiting for slower
                ranks.  Host clock on CPU (gloo blocks the host there); CUDA events on a GPU
                (NCCL blocks the stream, not the host: the events time the stream's stall);
      compute = step time (the window's Clock / its steps) - wait: the rank's own work
                (data slicing, forward, backward, optimizer, logging).
    The slowest rank is the one with the largest compute; it waits least.  Waiting in the
    few other collectives (the stop check every 10 steps, DDP's one-time bucket rebuild in an
    early forward, a checkpoint's) counts as compute.  `close` returns min/median/max over
    ranks, the slowest rank and its host and the largest rank's memory (memory_mb), and warns
    on rank 0's console about a straggler (Stragglers).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, world_size: int, warn: Callable[[str], None],
                 delay_ms: float = 0.0) -> None:
        self.device, self.world_size, self.warn = device, world_size, warn
        self.cuda = device.type == "cuda"
        self.delay_s = delay_ms / 1e3  # a rehearsed straggler (train.debug_delay_ms), on this rank only
        hosts: list[Any] = [None] * world_size
        dist.all_gather_object(hosts, socket.gethostname())  # once, at start-up
        self.hosts: list[str] = hosts
        self.stragglers = Stragglers()
        self._ready: Any = None
        self._pairs: list[tuple[Any, Any]] = []  # CUDA: (last gradient ready, backward returned) events per step
        self._wait_s, self._steps, self._delayed = 0.0, 0, False
        # Every parameter is hooked for the first backward, to learn which gradient comes last
        # (the order is fixed: static graph); after it only that one stays hooked.
        self._last: torch.Tensor | None = None
        self._handles = {id(p): p.register_post_accumulate_grad_hook(self._on_grad)
                         for p in model.parameters() if p.requires_grad}

    def _stamp(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # on the current stream: the autograd thread's, the forward's stream
            return event
        return time.perf_counter()

    def _on_grad(self, param: torch.Tensor) -> None:
        if self.delay_s and not self._delayed:  # in backward: the others wait in the all-reduce, as for a real straggler
            self._delayed = True
            time.sleep(self.delay_s)
        self._last = param
        self._ready = self._stamp()

    def after_backward(self) -> None:
        """Call right after backward() returns: closes this step's wait."""
        end = self._stamp()
        if self._ready is not None:
            if self.cuda:
                self._pairs.append((self._ready, end))
            else:
                self._wait_s += end - self._ready
        self._ready, self._steps = None, self._steps + 1
        self._delayed = False
        if len(self._handles) > 1 and self._last is not None:
            for key in [k for k in self._handles if k != id(self._last)]:
                self._handles.pop(key).remove()

    def close(self, seconds: float, step: int) -> dict[str, Any]:
        """The window's figures over all ranks (collective); `seconds` is this rank's window time."""
        if self._steps == 0:
            return {}
        if self.cuda:  # the window's close has synchronized the stream: every event has completed
            self._wait_s = sum(a.elapsed_time(b) for a, b in self._pairs) / 1e3
        step_ms = seconds * 1e3 / self._steps
        wait_ms = min(self._wait_s * 1e3 / self._steps, step_ms)
        mem = memory_mb(self.device)
        mine = torch.tensor([step_ms - wait_ms, wait_ms, *mem.values()], dtype=torch.float64, device=self.device)
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine)
        table = torch.stack(rows).cpu().tolist()
        self._pairs, self._wait_s, self._steps = [], 0.0, 0
        compute, wait = [r[0] for r in table], [r[1] for r in table]
        slowest = max(range(self.world_size), key=compute.__getitem__)
        figures: dict[str, Any] = {}
        for name, values in (("compute", compute), ("wait", wait)):
            figures.update({f"rank_{name}_ms_min": min(values), f"rank_{name}_ms_median": statistics.median(values),
                            f"rank_{name}_ms_max": max(values)})
        figures.update(slowest_rank=slowest, slowest_host=self.hosts[slowest])
        figures.update({key: max(r[2 + i] for r in table) for i, key in enumerate(mem)})
        if self.stragglers.update(compute) is not None:
            _, others = Stragglers.slowest(compute)
            self.warn(f"straggler: rank {slowest} on {self.hosts[slowest]} computes {compute[slowest]:.1f} ms/step, "
                      f"{compute[slowest] / others - 1:.0%} above the other ranks' median {others:.1f} ms, for "
                      f"{self.stragglers.windows} log windows (to step {step}); they wait for it")
        return figures


def make_rank_stats(enabled: bool, model: torch.nn.Module, device: torch.device, world_size: int,
                    warn: Callable[[str], None], delay_ms: float = 0.0) -> NullRankStats:
    """RankStats on every rank (all take part in its gather), or the no-op on every rank when switched off.
    `warn` is rank 0's console (a no-op elsewhere); `delay_ms` slows this rank (train.debug_delay_ms, for tests)."""
    return RankStats(model, device, world_size, warn, delay_ms) if enabled else NullRankStats()

"""Throughput accounting: the figures the trainer and the benchmark report."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnn import perf
from cnn.model import TRAIN_FLOPS_PER_IMAGE
from cnn.perf import Clock, Roofline, compute_dtype, datasheet_peak_tflops, peak_basis, throughput

REPO = Path(__file__).resolve().parents[1]


def test_throughput_figures_are_consistent():
    t = throughput(images=3000, seconds=2.0, peak=Roofline(100.0, 400.0, "bf16"))
    assert t["images_per_sec"] == 1500
    assert t["gflops"] == pytest.approx(1500 * TRAIN_FLOPS_PER_IMAGE / 1e9)
    assert t["mfu"] == pytest.approx(t["gflops"] / 100.0)
    assert t["mfu_datasheet"] == pytest.approx(t["gflops"] / 400.0)
    assert throughput(0, 0.0, Roofline(0.0, None, "fp32")) == {"images_per_sec": 0.0, "gflops": 0.0, "mfu": 0.0,
                                                                "mfu_datasheet": None}


def test_clock_measures_elapsed_time_and_restarts():
    clock = Clock(torch.device("cpu"))
    time.sleep(0.05)
    assert clock.seconds() >= 0.05
    clock.restart()
    assert clock.seconds() < 0.05


@pytest.mark.parametrize("name, precision, tf32, want", [
    ("NVIDIA H200", "bf16", False, 989.5),
    ("NVIDIA H200", "fp32", True, 494.5),
    ("NVIDIA H100 80GB HBM3", "fp16", False, 989.5),
    ("NVIDIA H100 PCIe", "bf16", False, 756.5),
    ("NVIDIA H100 NVL", "bf16", False, None),  # another part: unknown rather than the SXM figure
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5),
    ("NVIDIA A100 80GB PCIe", "fp32", True, 156.0),
    ("NVIDIA L40S", "bf16", False, 362.0),
    ("NVIDIA L4", "fp16", False, 121.0),
    ("NVIDIA A10", "bf16", False, 125.0),
    ("Tesla V100-SXM2-16GB", "fp16", False, 125.0),
    ("Tesla T4", "fp16", False, 65.0),
    ("Tesla T4", "bf16", False, None),  # no bf16 tensor cores: emulated
    ("Tesla T4", "fp32", True, 8.1),  # no TF32 cores: TF32 runs as fp32
    ("NVIDIA GeForce RTX 4090", "bf16", False, None),
    ("cpu", "fp32", False, None),
])
def test_datasheet_peak(name, precision, tf32, want):
    assert datasheet_peak_tflops(name, precision, tf32) == want


def test_peak_is_measured_in_the_arithmetic_the_run_uses(monkeypatch):
    assert [compute_dtype(p) for p in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16, torch.float16]
    assert peak_basis("fp32", "cuda", tf32_cudnn=True) == "tf32"  # torch's default: cuDNN convs in TF32
    assert peak_basis("fp32", "cuda", tf32_cudnn=False) == "fp32"
    assert peak_basis("fp32", "cpu", tf32_cudnn=True) == "fp32"
    assert peak_basis("fp16", "cuda", tf32_cudnn=True) == "fp16"
    seen = []
    monkeypatch.setattr(perf.roofline, "matmul_peak_gflops", lambda device, dtype: seen.append(dtype) or 100.0)
    monkeypatch.setattr(perf.dist, "all_reduce", lambda t, **kw: None)  # one rank
    roof = perf.job_roofline(torch.device("cpu"), "bf16")
    assert seen == [torch.bfloat16] and roof.measured_gflops == 100.0 and roof.datasheet_gflops is None
    assert roof.facts() == {"peak_gflops": 100.0, "peak_datasheet_gflops": None, "peak_basis": "bf16",
                            "tf32_matmul": False, "tf32_cudnn": False}


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: the two methods GraphReplays wraps."""

    log: list = []

    def capture_end(self) -> None:
        FakeGraph.log.append(("capture", id(self)))

    def replay(self) -> None:
        FakeGraph.log.append(("replay", id(self)))


def _cudagraph_trees(graph_class: type, steps: int, rerecord: bool) -> None:
    """What inductor's cudagraph trees call (torch/_inductor/cudagraph_trees.py, 2.14.1): the tree
    manager captures one empty graph, never replayed; each CUDAGraphNode captures its graph and
    replays it once at once; later steps replay it (run_graph), or record a new node every step."""
    graph_class().capture_end()  # CUDAGraphTreeManager.__init__
    graph = None
    for _ in range(steps):
        if graph is None or rerecord:
            graph = graph_class()
            graph.capture_end()  # CUDAGraphNode._record, torch.cuda.graph's __exit__
        graph.replay()  # right after recording: CUDAGraphNode.__init__; else run_graph


@pytest.mark.parametrize("rerecord, captures, replays, beyond", [(True, 11, 10, 0), (False, 2, 10, 8)])
def test_graph_reuse_counts_replays_beyond_captures(rerecord, captures, replays, beyond):
    """A graph re-recorded every step replays once per capture: 0 beyond the captures, not "replayed"."""

    class Graph(FakeGraph):  # a fresh class per test: GraphReplays' wrappers stay on the class it is given
        pass

    FakeGraph.log = []
    counter = perf.GraphReplays(Graph)
    _cudagraph_trees(Graph, 10, rerecord)
    facts = counter.facts()
    assert {k: facts[k] for k in ("cudagraph_captures", "cudagraph_replays", "cudagraph_replays_beyond_captures")} \
        == {"cudagraph_captures": captures, "cudagraph_replays": replays, "cudagraph_replays_beyond_captures": beyond}
    assert [kind for kind, _ in FakeGraph.log].count("replay") == replays  # the wrapped methods still ran
    assert [kind for kind, _ in FakeGraph.log].count("capture") == captures
    assert facts["cudagraph_skips"] == 0


def test_muons_own_graph_is_not_counted_as_torch_compiles():
    """cnn/optim.py GraphedUpdate marks its graph uncounted: its replays are not compile's reuse."""

    class Graph(FakeGraph):
        pass

    counter = perf.GraphReplays(Graph)
    muon = Graph()
    muon.uncounted = True
    muon.capture_end()
    for _ in range(5):
        muon.replay()
    _cudagraph_trees(Graph, 3, rerecord=True)
    facts = counter.facts()
    assert (facts["cudagraph_captures"], facts["cudagraph_replays"]) == (4, 3)


def test_graph_replays_wrap_torchs_graph_class_where_cuda_graphs_may_run(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: calls.append(("replay", graph)))
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_end", lambda graph: calls.append(("capture", graph)))
    counter = perf.graph_replays(True, "reduce-overhead", torch.device("cuda", 0))
    torch.cuda.CUDAGraph.capture_end("g1")
    torch.cuda.CUDAGraph.replay("g1")
    torch.cuda.CUDAGraph.replay("g1")
    assert calls == [("capture", "g1"), ("replay", "g1"), ("replay", "g1")]
    facts = counter.facts()
    assert (facts["cudagraph_captures"], facts["cudagraph_replays"], facts["cudagraph_replays_beyond_captures"]) \
        == (1, 2, 1)
    assert perf.graph_replays(True, "default", torch.device("cuda", 0)).facts() == {}
    assert perf.graph_replays(True, "reduce-overhead", torch.device("cpu")).facts() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_clock_times_queued_work():
    clock = Clock(torch.device("cuda"))
    torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU time, queued without blocking the host
    queued = clock.seconds()
    assert queued > 0.005
    clock.restart()
    assert clock.seconds() < queued


def test_roofline_takes_its_budget_even_for_an_emulated_dtype():
    """bf16 on a CPU without avx512_bf16/AMX multiplies at ~1 GFLOP/s (17 s for one 2048x2048
    product, measured on an AVX2 EPYC): the measurement shrinks the matrix instead of stalling
    start-up (train.roofline) or the benchmark for minutes."""
    for dtype in (torch.float32, torch.bfloat16):
        t0 = time.perf_counter()
        assert perf.matmul_peak_gflops(torch.device("cpu"), dtype, seconds=0.3) > 0
        assert time.perf_counter() - t0 < 3.0, dtype


def test_keep_heap_sets_both_glibc_thresholds_unless_told_otherwise():
    calls = []

    def fake_mallopt():
        return lambda param, value: calls.append((param, value)) or 1

    said = perf.keep_heap(True, environ={}, mallopt=fake_mallopt)
    assert calls == [(-3, 32 * 1024 * 1024), (-1, 1024 * 1024 * 1024)] and said.startswith("malloc: freed memory kept")
    calls.clear()
    assert "MALLOC_TRIM_THRESHOLD_" in perf.keep_heap(True, environ={"MALLOC_TRIM_THRESHOLD_": "0"}, mallopt=fake_mallopt)
    assert "train.keep_heap=false" in perf.keep_heap(False, environ={}, mallopt=fake_mallopt)
    assert calls == []  # the user's environment and the switch win
    assert "no mallopt" in perf.keep_heap(True, environ={}, mallopt=lambda: None)
    assert "refused" in perf.keep_heap(True, environ={}, mallopt=lambda: lambda param, value: 0)


HEAP_PROBE = """
import resource, sys, torch, torch.nn.functional as F
from cnn import perf
from cnn.model import CNN
torch.set_num_threads(1)
print(perf.keep_heap(sys.argv[1] == "on", environ={}))
model = CNN(0.0).to(memory_format=torch.channels_last)
x, y = torch.randn(128, 1, 28, 28).to(memory_format=torch.channels_last), torch.randint(0, 10, (128,))
faults = []
for i in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[3:])[4])  # the median step after three of warm-up (one may grow a cache)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_heap_does_not_fault_every_step():
    """A fresh process's steps, as a bare loop runs them: with glibc's defaults each one maps and
    faults its activations afresh (~12,000 pages at batch 128 with glibc 2.36); kept, none."""
    faults, said = {}, {}
    for side in ("on", "off"):
        proc = subprocess.run([sys.executable, "-c", HEAP_PROBE, side], capture_output=True, text=True, timeout=120,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        said[side], per_step = proc.stdout.strip().splitlines()[-2:]
        faults[side] = float(per_step)
    if said["on"].startswith("malloc: left alone"):
        pytest.skip(said["on"])
    assert faults["on"] < 50, faults  # a few pages of Python objects at most (off: thousands here)

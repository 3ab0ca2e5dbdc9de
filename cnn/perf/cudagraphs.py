"""CUDA-graph captures and replays: whether compile_mode=reduce-overhead really reused its graphs."""

from __future__ import annotations


import torch



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
            # after it returns: a capture that failed recorded no graph; Muon's own graph
            # (cnn/optim.py GraphedUpdate, marked uncounted) is not torch.compile's
            outer.captures += not getattr(graph, "uncounted", False)

        def counted_replay(graph) -> None:
            outer.replays += not getattr(graph, "uncounted", False)
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

"""Host work per training step as a figure: the aten ops one step dispatches (train.count_ops)."""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

COUNTED_STEP = 4  # of this process: compiled, warm, DDP's buckets rebuilt (at a 1-rank job's 2nd forward: no settling)


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatcher below autograd (what runs a kernel, the
    collectives included: c10d::allreduce_), by name. On a GPU each is a kernel launch or more."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class StepOps:
    """train.count_ops=true: counts one whole loop iteration -- the boundary work after step
    start+COUNTED_STEP-1 and the compute of the next -- between two ``step()`` calls at the
    loop's profiler point; ``facts()`` goes into summary.json (ops_per_step, ops_by_name)."""

    def __init__(self, start_step: int) -> None:
        self.first = start_step + COUNTED_STEP - 1
        self.counter: OpCounter | None = None
        self.ops: collections.Counter | None = None

    def step(self, step: int) -> None:
        if step == self.first:
            self.counter = OpCounter()
            self.counter.__enter__()
        elif step == self.first + 1 and self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.ops, self.counter = self.counter.ops, None

    def close(self) -> None:
        """The run ended inside the counted iteration: stop counting."""
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.counter = None

    def facts(self) -> dict:
        if self.ops is None:
            return {}
        return {"ops_per_step": sum(self.ops.values()), "ops_by_name": dict(self.ops.most_common())}


class NullStepOps:
    def step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def facts(self) -> dict:
        return {}


def step_ops(enabled: bool, start_step: int) -> StepOps | NullStepOps:
    return StepOps(start_step) if enabled else NullStepOps()

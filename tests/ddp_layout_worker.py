"""One rank of tests/test_ddp.py: the gradients DDP all-reduces in a process's first backwards,
with and without cnn.distributed.wrap settling the bucket layout. Launched by torchrun."""

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from cnn import distributed  # noqa: E402
from cnn.model import CNN  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(100 + rank)
x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return CNN(0.0)


def backward(ddp) -> list[torch.Tensor]:
    ddp.module.zero_grad(set_to_none=True)
    F.cross_entropy(ddp(x), y).backward()
    return [p.grad.clone() for p in ddp.module.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b))


plain = DDP(model(), gradient_as_bucket_view=True)  # the flags cnn.distributed.wrap uses
first, second, third, fourth = (backward(plain) for _ in range(4))
settled = distributed.wrap(model(), torch.device("cpu"), x, contextlib.nullcontext)
settled_first = backward(settled)
if rank == 0:
    print(f"plain: 1st==3rd {same(first, third)} 3rd==4th {same(third, fourth)}; "
          f"settled 1st==plain 3rd {same(settled_first, third)}", flush=True)
# the trainer's shutdown: with two DDP objects alive, a bare destroy_process_group() left the process
# group to interpreter finalization, where gloo's threads aborted a rank now and then (SIGABRT,
# "terminate called without an active exception": 2 of 10 runs beside a busy core, 2026-12-04)
distributed.cleanup()
distributed.exit_process(0)

"""cnn.distributed without a launcher: the stop request (SIGTERM, Ctrl-C, their agreement) and the
one-line message for a failed collective."""

import signal
import subprocess
import sys

import pytest
import torch.distributed as dist

from cnn import distributed
from conftest import REPO, child_env

# A process that behaves like the trainer's main thread: StopRequest installed, then busy.
SIGNALS = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from cnn.distributed import StopRequest
stop = StopRequest(announce=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print("after one:", stop.requested, stop.signum, flush=True)
{second}
time.sleep(0.2)
print("still running", flush=True)
"""


def _signals(second: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIGNALS.format(repo=str(REPO), second=second)], env=child_env(),
                          capture_output=True, text=True, timeout=60)


def test_first_ctrl_c_requests_a_stop_second_exits_at_once():
    once = _signals("")
    assert once.returncode == 0 and "after one: True 2" in once.stdout and "still running" in once.stdout
    assert "press Ctrl-C again to exit at once" in once.stderr and "Traceback" not in once.stderr
    twice = _signals("os.kill(os.getpid(), signal.SIGINT)")
    assert twice.returncode == 130
    assert "still running" not in twice.stdout
    assert twice.stderr.strip().splitlines()[-1] == "second interrupt: exiting now, without a checkpoint"
    assert "Traceback" not in twice.stderr and "KeyboardInterrupt" not in twice.stderr


def test_sigterm_outranks_ctrl_c():
    proc = _signals("os.kill(os.getpid(), signal.SIGTERM)\nprint('now', stop.signum, flush=True)")
    assert proc.returncode == 0 and "now 15" in proc.stdout  # exit 143, as SIGTERM asks


@pytest.fixture
def world_of_one():
    """setup() as a plain `python train_ddp.py` on CPU gets it, torn down after the test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    d = distributed.setup("cpu")
    yield d
    distributed.cleanup()
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_stop_agreement_is_a_cpu_tensor_on_a_gloo_group(world_of_one, monkeypatch):
    """#10.4: the stop check never touches the device. GPU runs create the gloo side group in
    setup() (tests/test_gpu.py checks its backend there); the loop's only collective between
    log points is this one, and its tensor lives on the host."""
    seen = []
    real = dist.all_reduce

    def spy(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        seen.append((tensor.device.type, dist.get_backend(group)))
        return real(tensor, op=op, group=group, async_op=async_op)

    monkeypatch.setattr(dist, "all_reduce", spy)
    stop = distributed.StopRequest(announce=False)
    assert stop.agreed(world_of_one.cpu_group) == 0
    stop._handle(signal.SIGINT, None)
    assert stop.agreed(world_of_one.cpu_group) == 2
    assert seen == [("cpu", "gloo"), ("cpu", "gloo")]


def test_collective_failure_is_one_line_and_other_errors_pass_through():
    nccl = RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE, "
                        "NumelIn=1, NumelOut=1, Timeout(ms)=60000) ran for 60001 milliseconds before timing out.")
    msg = distributed.collective_failure(nccl)
    assert msg.startswith("collective allreduce timed out after 60 s") and "\n" not in msg
    gone = distributed.collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert gone.startswith("a collective failed") and "another rank is gone" in gone
    assert distributed.collective_failure(RuntimeError("CUDA out of memory")) is None
    assert distributed.collective_failure(ValueError("Timed out waiting 10ms")) is None

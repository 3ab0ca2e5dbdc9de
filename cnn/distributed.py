"""Distributed state, in one place.

``setup()`` detects the launcher (torchrun's variables, or SLURM's when ``srun``
starts one task per GPU directly), sets the device *before*
``init_process_group`` and returns an immutable ``Dist``.  A plain
``python train_ddp.py`` is world size 1 of the same code: a one-process group
on an in-memory store, so DDP and the collectives run unchanged.
``cleanup()`` is always safe to call.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    device: torch.device
    backend: str
    launcher: str  # "torchrun" | "slurm" | "single"
    # gloo group for host-side agreement (the stop check) on CPU tensors: no device sync.
    # The world group on CPU runs; a gloo side group next to NCCL on GPU runs.
    cpu_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise KeyError(name)
        return default
    return int(value)


def first_slurm_host() -> str:
    """The first node of the job: the rendezvous host for srun-direct launches."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
    ).stdout
    return out.split()[0]


def slurm_port() -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes don't collide."""
    return 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000


class Launch(NamedTuple):
    launcher: str  # "torchrun" | "slurm" | "single"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def launch_env() -> Launch:
    """Who started this process, from the environment: the one source of the world size
    (config validation and setup() both ask here).

    SLURM counts only for a task of a job *step* (``srun``: SLURM_STEP_NUM_TASKS and
    SLURM_PROCID); a plain ``python train_ddp.py`` in an ``salloc`` of 3 tasks
    (SLURM_NTASKS=3, no step) is world size 1.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or a hand-made launch)
        ws = _env_int("WORLD_SIZE")
        return Launch("torchrun", _env_int("RANK"), _env_int("LOCAL_RANK", 0), ws, _env_int("LOCAL_WORLD_SIZE", ws))
    if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:  # srun, one task per GPU
        ws = _env_int("SLURM_STEP_NUM_TASKS")
        nodes = _env_int("SLURM_STEP_NUM_NODES", 1)
        return Launch("slurm", _env_int("SLURM_PROCID"), _env_int("SLURM_LOCALID", 0), ws, max(1, ws // nodes))
    return Launch("single", 0, 0, 1, 1)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device: str = "auto", timeout_s: float = 60.0) -> Dist:
    """Initialise the process group for whichever launcher started us."""
    launcher, rank, local_rank, world_size, local_world_size = launch_env()
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before init_process_group: NCCL binds to it
        # surface NCCL failures as exceptions instead of hangs (the default on recent torch)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if launcher == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if launcher == "slurm":
            os.environ.setdefault("MASTER_ADDR", first_slurm_host())
            os.environ.setdefault("MASTER_PORT", str(slurm_port()))
        dist.init_process_group(backend, store=_store(rank, world_size, timeout), rank=rank, world_size=world_size,
                                timeout=timeout)
    # Created once here (new_group is collective: every rank calls setup() in the same order).
    cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    node_rank = rank // max(1, local_world_size)
    return Dist(rank, local_rank, world_size, local_world_size, node_rank, dev, backend, launcher, cpu_group)


def _store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store, with a prefix per torchrun restart attempt.

    Under torchrun the agent hosts the store and keeps it across elastic
    restarts; without a per-attempt prefix the restarted workers read the dead
    attempt's gloo addresses and fail to connect ("Connection refused").
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0 and not agent_hosts), timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"mnist-ddp/attempt-{attempt}", store)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def once_per_node(fn: Callable[[], None], local_rank: int, timeout_s: float) -> str | None:
    """Run fn on local rank 0 of each node while the node's other ranks wait.

    Returns None when it succeeded everywhere, else the error to raise on this rank:
    fn's own message where it failed, or a pointer to the node whose log says why.
    Nobody waits for the collective timeout: the failure is part of the barrier.
    """
    error = None
    if local_rank == 0:
        try:
            fn()
        except Exception as exc:
            error = str(exc)
    failed = agree_any(error is not None, timeout_s)
    if error is None and failed:
        error = "failed on another node (see its log)"
    return error


def agree_any(flag: bool, timeout_s: float) -> bool:
    """A barrier that also tells every rank whether any rank raised `flag`.

    It runs on a gloo side-group with its own (long) timeout: local rank 0 may be
    downloading MNIST while the others wait, and the main group's short timeout
    must stay intact.  gloo works whatever the main backend is.
    """
    if dist.get_world_size() == 1:
        return flag
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    dist.destroy_process_group(group)
    return bool(t.item())


class StopRequest:
    """SIGTERM (torchrun, SLURM) and Ctrl-C, read at step boundaries where all ranks agree on them.

    The first SIGINT acts like SIGTERM: every rank stops at the same agreed step with a
    checkpoint.  A second SIGINT exits at once (code 130, one line, no traceback); it is
    acted on when the main thread next runs Python code, i.e. within a step, or once a
    collective that waits on a hung peer times out.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0  # the strongest stop signal received (SIGTERM > SIGINT)
        self.announce = announce  # print the Ctrl-C hint (launch rank 0 only: one line per job)
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame) -> None:
        # Repeated SIGTERMs are expected (slurmstepd and the torchrun agent may both forward
        # one); torchrun and SLURM escalate to SIGKILL themselves if we never reach a boundary.
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                _write_stderr("second interrupt: exiting now, without a checkpoint\n")
                os._exit(128 + signal.SIGINT)  # at once: no finally blocks, no collectives, no traceback
            if self.announce and self.signum == 0:
                _write_stderr("interrupt: all ranks will stop at the next stop check (every few steps) and "
                              "save a checkpoint; press Ctrl-C again to exit at once without one\n")
        self.signum = max(self.signum, signum)

    def agreed(self, group) -> int:
        """The stop signal any rank received (0: carry on); the same value on every rank (collective).

        A CPU tensor on a gloo group: the host takes part in a tiny all-reduce (~0.1 ms on one
        node) while the GPU keeps working through its queue; no device copy, no .item() of a
        device tensor, so the training loop never waits for the GPU here.
        """
        t = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())


def _write_stderr(msg: str) -> None:
    # os.write, not print: a signal handler may run while the main thread is inside a write
    # to sys.stderr, and re-entering the buffered writer raises.
    try:
        os.write(2, msg.encode())
    except OSError:
        pass


_TIMEOUT = re.compile(r"Timed out waiting (\d+)\s*ms|Timeout\(ms\)=(\d+)")  # gloo | NCCL's watchdog
_PEER_GONE = re.compile(r"[Cc]onnection (?:closed|reset) by peer|[Bb]roken pipe")
_OP_TYPE = re.compile(r"OpType=(\w+)")  # NCCL names the collective itself
_REPO = Path(__file__).resolve().parents[1]


def collective_failure(exc: BaseException) -> str | None:
    """One line for a collective that timed out or lost a peer (None: not such an error).

    gloo raises a plain RuntimeError ("Timed out waiting 10000ms for recv operation to
    complete", torch 2.11 and 2.14) that does not say which collective; the traceback
    does: the torch.distributed function our code called (all_reduce,
    broadcast_object_list...), or the autograd engine, inside which DDP all-reduces the
    gradients.  (NCCL's watchdog usually ends the process itself, with its own message.)
    """
    msg = str(exc)
    timed_out, gone = _TIMEOUT.search(msg), _PEER_GONE.search(msg)
    if not (isinstance(exc, RuntimeError) and (timed_out or gone)):
        return None
    name, where = "", ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):  # outermost first
        path, func = Path(frame.f_code.co_filename), frame.f_code.co_name
        if "torch" in path.parts:
            if not name and "autograd" in path.parts:
                name = "DDP gradient all-reduce (in backward)"
            elif not name and "distributed" in path.parts and not func.startswith("_") and func != "wrapper":
                name = func  # the public torch.distributed call (not its logging decorator)
        elif path.is_relative_to(_REPO) and "site-packages" not in path.parts:
            where = f" at {path.name}:{lineno}"  # our innermost frame
    op = _OP_TYPE.search(msg)
    what = f"collective {op.group(1).lower() if op else name}" if op or name else "a collective"
    if timed_out:
        ms = next(g for g in timed_out.groups() if g)
        return (f"{what} timed out after {int(ms) / 1000:g} s{where}: another rank died or hung "
                f"(its log says which; dist.timeout_s sets the limit)")
    return f"{what} failed{where}: another rank is gone ({gone.group(0)}); its log says why"


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


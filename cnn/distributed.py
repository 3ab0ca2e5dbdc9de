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
import signal
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

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


def launch_env() -> tuple[str, int, int, int, int]:
    """(launcher, rank, local_rank, world_size, local_world_size) from the environment."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or a hand-made launch)
        ws = _env_int("WORLD_SIZE")
        return "torchrun", _env_int("RANK"), _env_int("LOCAL_RANK", 0), ws, _env_int("LOCAL_WORLD_SIZE", ws)
    if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:  # srun, one task per GPU
        ws = _env_int("SLURM_STEP_NUM_TASKS")
        nodes = _env_int("SLURM_STEP_NUM_NODES", 1)
        return "slurm", _env_int("SLURM_PROCID"), _env_int("SLURM_LOCALID", 0), ws, max(1, ws // nodes)
    return "single", 0, 0, 1, 1


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
    node_rank = rank // max(1, local_world_size)
    return Dist(rank, local_rank, world_size, local_world_size, node_rank, dev, backend, launcher)


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


def all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank passed True (one tiny all-reduce)."""
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopRequest:
    """Set by SIGTERM (torchrun, SLURM); read at step boundaries, where all ranks agree on it."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        # Repeats are expected (slurmstepd and the torchrun agent may both forward one);
        # torchrun and SLURM escalate to SIGKILL themselves if we never reach a step boundary.
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was asked to stop (collective)."""
        return all_agree(self.requested, device)


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


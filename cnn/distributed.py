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


def choose_gpu(local_rank: int, local_world_size: int, visible_count: int, cuda_visible_devices: str | None,
               launcher: str = "torchrun") -> int:
    """The index (among the visible GPUs) this rank binds to; ValueError when no rule gives it a GPU of its own.

    - one visible GPU under srun: SLURM bound one GPU to this task (--gpus-per-task=1, --gpu-bind=single:1,
      map_gpu): use it, whatever the local rank.
    - at least local_world_size visible: every local rank sees the node's GPUs: local_rank's.
    - anything else would put two ranks on one GPU (NCCL stops with "Duplicate GPU detected"), e.g.
      --gpu-bind=closest with SLURM's cyclic placement on a 2-socket node (tasks 0,2,4,6 see GPUs 0-3),
      or more ranks per node than GPUs.  torchrun's workers inherit one environment, so one visible GPU
      there is shared by all of its local ranks: only a single local rank may use it.
    """
    if visible_count == 1 and (launcher == "slurm" or local_world_size == 1):
        return 0
    if visible_count >= local_world_size:
        return local_rank
    cvd = "unset" if cuda_visible_devices is None else f"'{cuda_visible_devices}'"
    raise ValueError(
        f"local rank {local_rank} of {local_world_size} on this node sees {visible_count} GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={cvd}), so ranks would share a GPU: start at most {visible_count} rank(s) per node "
        f"(torchrun --nproc_per_node), or under srun give each task its own GPU with --gpus-per-task=1 "
        f"(or --gpu-bind=none so that every task sees all of the node's GPUs)")


def pick_device(requested: str, local_rank: int, local_world_size: int = 1, launcher: str = "single") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        index = choose_gpu(local_rank, local_world_size, torch.cuda.device_count(),
                           os.environ.get("CUDA_VISIBLE_DEVICES"), launcher)
        return torch.device("cuda", index)
    return torch.device("cpu")


def setup(device: str = "auto", init_timeout_s: float = 600.0) -> Dist:
    """Initialise the process group for whichever launcher started us.

    The group starts with the long start-up timeout `init_timeout_s` (rendezvous, the first step's
    compilation); `end_warmup()` lowers it to dist.timeout_s after the first training step.
    TORCH_NCCL_ASYNC_ERROR_HANDLING is left to torch: its default since 2.2 is 3, SkipCleanUp (a
    timed-out or failed collective ends the process without cleaning up the communicators;
    ProcessGroupNCCL.cpp `getCvarInt(TORCH_NCCL_ASYNC_ERROR_HANDLING, 3 /*SkipCleanUp*/)`).  1,
    TearDown, first calls ncclCommAbort, which ProcessGroupNCCL.hpp (2.11) itself says can hang:
    SkipCleanUp is documented as the mode for that case.
    """
    launcher, rank, local_rank, world_size, local_world_size = launch_env()
    dev = pick_device(device, local_rank, local_world_size, launcher)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before init_process_group: NCCL binds to it
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = timedelta(seconds=init_timeout_s)
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


def set_timeout(timeout_s: float) -> None:
    """The default group's collective timeout from now on (gloo and NCCL honour it for later collectives).

    torch.distributed.set_timeout exists from 2.14, which deprecates _set_pg_timeout (FutureWarning);
    torch 2.4-2.13 (2.11 on the GPU machines) only have distributed_c10d._set_pg_timeout.
    """
    timeout = timedelta(seconds=timeout_s)
    if hasattr(dist, "set_timeout"):
        dist.set_timeout(timeout)
    else:
        dist.distributed_c10d._set_pg_timeout(timeout)


def end_warmup(timeout_s: float, device: torch.device) -> None:
    """After the first training step (of this process: after a resume too): lower the collective
    timeout from dist.init_timeout_s to dist.timeout_s (collective).

    A cold torch.compile may keep one rank from its first all-reduce for minutes; from here on a
    rank that stalls is dead, and the job must end within timeout_s.  As in torchtitan
    (distributed/utils.py set_pg_timeouts, called `if self.step - loaded_step == 1`): the barrier
    and device sync first, so that no faster rank issues a collective under the short timeout while
    a slower one is still in its first step.
    """
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    set_timeout(timeout_s)


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


class SideGroupError(RuntimeError):
    """The gloo side group (the MNIST barrier) could not be created or timed out; one line."""


def side_group_error(exc: BaseException, timeout_s: float) -> str:
    """The one-line message for a failed gloo side group, naming what to set."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return (f"the gloo side group (the once-per-node data barrier) failed: {type(exc).__name__}: {first}. "
            f"gloo binds to the interface this host's name resolves to; on a multi-homed node set "
            f"GLOO_SOCKET_IFNAME to the interface the nodes share (as NCCL_SOCKET_IFNAME for NCCL), "
            f"or raise dist.data_timeout_s ({timeout_s:g} s) if a rank was still fetching MNIST")


def agree_any(flag: bool, timeout_s: float) -> bool:
    """A barrier that also tells every rank whether any rank raised `flag`.

    It runs on a gloo side-group with its own (long) timeout: local rank 0 may be
    downloading MNIST while the others wait, and the main group's short timeout
    must stay intact.  gloo works whatever the main backend is, but on a GPU run it
    is the job's only gloo traffic: a wrong interface shows up here first, so a
    failure raises SideGroupError that names GLOO_SOCKET_IFNAME.
    """
    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    try:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    except (RuntimeError, ValueError, OSError) as exc:  # DistError, DistBackendError and gloo's own
        raise SideGroupError(side_group_error(exc, timeout_s)) from None
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


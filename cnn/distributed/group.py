"""The process group: set up for whichever launcher started us (an immutable ``Dist``), its
timeouts, work done once per node or on rank 0 with every rank told the outcome, and the clean end."""

from __future__ import annotations

import atexit
import gc
import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist
from cnn.distributed.launch import cpu_threads, first_slurm_host, follow_nccl_socket_ifname, launch_env, pick_device, slurm_port


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    device: torch.device
    backend: str
    launcher: str  # "torchrun" | "slurm" | "single"
    # gloo group for host-side agreement (the stop check) on CPU tensors: no device sync.
    # The world group on CPU runs; a gloo side group next to NCCL on GPU runs.
    cpu_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def set_cpu_threads(requested: int, d: Dist) -> str:
    """Apply cpu_threads() to this process; the log line's words ("2 threads per rank (why)")."""
    count, why = cpu_threads(requested, d.launcher, d.local_world_size, torch.get_num_threads())
    if count != torch.get_num_threads():
        torch.set_num_threads(count)
    return f"{count} thread{'s' if count > 1 else ''} per rank ({why})"


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
    launcher, rank, local_rank, world_size, local_world_size, node_rank, num_nodes = launch_env()
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        die_with_agent()
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
        follow_nccl_socket_ifname()  # gloo on NCCL's interface when only NCCL_SOCKET_IFNAME is set; ValueError if none
        try:
            dist.init_process_group(backend, store=_store(rank, world_size, timeout), rank=rank,
                                    world_size=world_size, timeout=timeout)
        except RuntimeError as exc:
            if _GLOO_CONNECT not in str(exc):
                raise
            raise ValueError(connect_error(exc, backend)) from None
    # Created once here (new_group is collective: every rank calls setup() in the same order).
    try:
        cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    except RuntimeError as exc:
        if _GLOO_CONNECT not in str(exc):
            raise
        raise ValueError(connect_error(exc, "gloo")) from None
    return Dist(rank, local_rank, world_size, local_world_size, node_rank, num_nodes, dev, backend, launcher,
                cpu_group)


_GLOO_CONNECT = "connectFullMesh"  # gloo's message when its ranks cannot reach each other


def connect_error(exc: BaseException, backend: str) -> str:
    """One line for a gloo group whose ranks could not connect (a wrong interface, most often)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"\[/\S+/third_party/gloo/", "[gloo/", first)[:200]
    where = f"; GLOO_SOCKET_IFNAME={os.environ['GLOO_SOCKET_IFNAME']}" if os.environ.get("GLOO_SOCKET_IFNAME") else ""
    return (f"the ranks' {backend} group could not connect ({first}{where}). gloo binds to the interface this "
            f"host's name resolves to ({_resolved_hostname()}); on a multi-homed node set GLOO_SOCKET_IFNAME (or "
            f"NCCL_SOCKET_IFNAME, which gloo follows) to the interface the nodes share")


def _resolved_hostname() -> str:
    try:
        name = socket.gethostname()
        return f"{name} -> {socket.gethostbyname(name)}"
    except OSError as exc:
        return f"unresolvable: {exc}"


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_agent() -> None:
    """Under a torchrun agent: this worker is SIGKILLed when the agent dies (Linux prctl
    PR_SET_PDEATHSIG), as on a crashed host.

    torchrun starts each worker in a session of its own, so a dead agent (OOM-killed, kill -9)
    left its worker training alone; when the worker then finished, the surviving agents of an
    elastic job waited torchrun's exit barrier for the dead one: 300 s (LocalElasticAgent's
    exit_barrier_timeout, which torchrun exposes no flag for). Dying with the agent makes it the
    host-crash case, which re-forms at once. No-op elsewhere; the agent starts workers from its
    main thread, whose exit is what the kernel watches.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the agent died before the call
        os._exit(1)


def set_timeout(timeout_s: float, group: dist.ProcessGroup | None = None) -> None:
    """A group's collective timeout from now on (gloo and NCCL honour it for later collectives);
    the default group if `group` is None.

    torch.distributed.set_timeout exists from 2.14, which deprecates _set_pg_timeout (FutureWarning);
    torch 2.4-2.13 (2.11 on the GPU machines) only have distributed_c10d._set_pg_timeout.
    """
    timeout = timedelta(seconds=timeout_s)
    if hasattr(dist, "set_timeout"):
        dist.set_timeout(timeout, group)
    else:
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def end_warmup(timeout_s: float, device: torch.device, cpu_group: dist.ProcessGroup | None = None) -> None:
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
    if cpu_group is not None and cpu_group is not dist.group.WORLD:  # the gloo side group next to NCCL
        set_timeout(timeout_s, cpu_group)


def wait_for_rank0(timeout_s: float, group: dist.ProcessGroup) -> None:
    """Every rank waits here for rank 0, at most timeout_s (collective, on the gloo group `group`).

    After a stop, rank 0 alone writes the checkpoint: a rank that exited at once with 143 would
    let `srun --kill-on-bad-exit=1` (the SLURM templates) kill the step while rank 0 is still
    writing to a slow shared filesystem, losing the stop checkpoint (the atomic write keeps only
    the old one). The group's timeout is raised first: the job ends after this.
    """
    set_timeout(timeout_s, group)
    dist.barrier(group=group)


def _store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store; with a prefix per torchrun restart attempt where the agent hosts it.

    Under torchrun's default the agent hosts the store (TORCHELASTIC_USE_AGENT_STORE=True) and
    keeps it across elastic restarts: without a per-attempt prefix the restarted workers read the
    dead attempt's gloo addresses and fail to connect ("Connection refused").  Otherwise (a plain
    launch, srun, or torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as an elastic
    --nnodes=MIN:MAX job needs) rank 0 hosts a fresh store every attempt and there is nothing
    stale to hide -- and no prefix is right: TORCHELASTIC_RESTART_COUNT is each agent's own count,
    so a node that joins later (count 0) would never meet the others (count 1) under one.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0 and not agent_hosts), timeout=timeout)
    if not agent_hosts:
        return store
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"mnist-ddp/attempt-{attempt}", store)


def cleanup() -> None:
    """Destroy every process group while the interpreter is fully alive.

    gc.collect() first: DDP's reducer hooks form reference cycles, so the DDP object (and the
    process group and gloo work it holds) would otherwise be freed only at interpreter
    finalization, when gloo's C++ threads tearing down can abort the process
    ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489 and
    #179291 describe that teardown order) -- seen once in CI on a rank that had finished.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process whose work is done (outputs written and closed, cleanup() called) as exit
    would, but without the interpreter's finalization and C++ static destructors.

    The atexit handlers run first (W&B's teardown, logging's flush: all of Python's exit), then
    os._exit. Finalization is where gloo's threads have aborted finished ranks
    ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291 describes
    that teardown): three times in this project's CI, each on a non-main rank that had finished
    while rank 0 was still writing its outputs, which torchrun and SLURM then report as a
    failed job. Not reproduced in 40 local two-rank runs, so this removes the stage rather than
    a proven cause; faulthandler (train_ddp.main) prints the Python stacks should it recur.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def once_per_node(fn: Callable[[], None], local_rank: int, timeout_s: float) -> str | None:
    """Run fn on local rank 0 of each node while the node's other ranks wait.

    Returns None when it succeeded everywhere, else the error to raise on this rank: fn's
    own message where it failed, else the first failed rank's (the same line on every rank).
    Nobody waits for the collective timeout: the failure is part of the barrier.
    """
    error = None
    if local_rank == 0:
        try:
            fn()
        except Exception as exc:
            error = str(exc)
    agreed = agree_error(error, timeout_s)  # every rank joins the barrier, the failed one too
    return error or agreed


class SideGroupError(RuntimeError):
    """The gloo side group (the MNIST barrier) could not be created or timed out; one line."""


def side_group_error(exc: BaseException, timeout_s: float) -> str:
    """The one-line message for a failed gloo side group, naming what to set."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return (f"the gloo side group (the once-per-node data barrier) failed: {type(exc).__name__}: {first}. "
            f"gloo binds to the interface this host's name resolves to; on a multi-homed node set "
            f"GLOO_SOCKET_IFNAME to the interface the nodes share (as NCCL_SOCKET_IFNAME for NCCL), "
            f"or raise dist.data_timeout_s ({timeout_s:g} s) if a rank was still fetching MNIST")


def agree_error(error: str | None, timeout_s: float) -> str | None:
    """A barrier that also tells every rank the first error any rank brought to it (None: none).

    It runs on a gloo side-group with its own (long) timeout: local rank 0 may be
    downloading MNIST while the others wait, and the main group's short timeout
    must stay intact.  gloo works whatever the main backend is, but on a GPU run it
    is the job's only gloo traffic: a wrong interface shows up here first, so a
    failure raises SideGroupError that names GLOO_SOCKET_IFNAME.
    """
    if dist.get_world_size() == 1:
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    try:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        dist.all_gather_object(errors, error, group=group)
    except (RuntimeError, ValueError, OSError) as exc:  # DistError, DistBackendError and gloo's own
        raise SideGroupError(side_group_error(exc, timeout_s)) from None
    dist.destroy_process_group(group)
    return next((e for e in errors if e), None)


def on_rank0(fn: Callable[[], None], is_main: bool) -> str | None:
    """Run fn on global rank 0 only and tell every rank whether it failed (collective).

    For work that one rank does for all (creating the run folder): a failure there becomes
    the same one-line error on every rank at once, instead of rank 0 exiting while the
    others wait in their next collective.  Returns None, or the error's message.
    """
    error = None
    if is_main:
        try:
            fn()
        except Exception as exc:
            error = str(exc)
    return broadcast_object(error)


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

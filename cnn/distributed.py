"""Distributed state, in one place.

``setup()`` detects the launcher (torchrun's variables, or SLURM's when ``srun``
starts one task per GPU directly), sets the device *before*
``init_process_group`` and returns an immutable ``Dist``.  A plain
``python train_ddp.py`` is world size 1 of the same code: a one-process group
on an in-memory store, so DDP and the collectives run unchanged.
``cleanup()`` is always safe to call.
"""

from __future__ import annotations

import atexit
import gc
import os
import re
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, NoReturn

import torch
import torch.distributed as dist


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


def _env_int(name: str, default: int | None = None) -> int:
    """An integer the launcher put in the environment; ValueError naming the variable if it is not one."""
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _check_rank(rank_name: str, rank: int, size_name: str, size: int) -> None:
    if size < 1:
        raise ValueError(f"{size_name}={size} must be >= 1")
    if not 0 <= rank < size:
        raise ValueError(f"{rank_name}={rank} is not a rank of {size_name}={size} (0..{size - 1})")


def first_slurm_host() -> str:
    """The first node of the job: the rendezvous host for srun-direct launches."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
    ).stdout
    return out.split()[0]


def slurm_port() -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes don't collide
    (slurm/common.sh's job_port, for the torchrun templates, is the same formula)."""
    return 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000


class Launch(NamedTuple):
    launcher: str  # "torchrun" | "slurm" | "single"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int  # ranks on this node
    node_rank: int = 0
    num_nodes: int = 1


def tasks_per_node(value: str) -> list[int]:
    """SLURM's per-node task counts, as SLURM_STEP_TASKS_PER_NODE writes them ('2(x3),1' is
    [2, 2, 2, 1]); [] if `value` is not in that form."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return []
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def launch_env() -> Launch:
    """Who started this process, from the environment: the one source of the world size
    (config validation and setup() both ask here).

    SLURM counts only for a task of a job *step* (``srun``: SLURM_STEP_NUM_TASKS and
    SLURM_PROCID); a plain ``python train_ddp.py`` in an ``salloc`` of 3 tasks
    (SLURM_NTASKS=3, no step) is world size 1.  Node rank and count come from the launcher
    (torchrun's GROUP_RANK / GROUP_WORLD_SIZE; SLURM_NODEID / SLURM_STEP_NUM_NODES), so that an
    uneven SLURM layout (3 tasks on 2 nodes: SLURM_STEP_TASKS_PER_NODE=2,1) is counted as it is.
    """
    has_rank, has_size = "RANK" in os.environ, "WORLD_SIZE" in os.environ
    if has_rank != has_size:  # half a launch: never guess a world size
        there, missing = ("RANK", "WORLD_SIZE") if has_rank else ("WORLD_SIZE", "RANK")
        raise ValueError(f"{there} is set but {missing} is not: start under torchrun (which sets both), "
                         f"or unset {there} for a single process")
    if has_rank:  # torchrun (or a hand-made launch)
        ws, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
        local_rank, lws = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", ws)
        _check_rank("RANK", rank, "WORLD_SIZE", ws)
        _check_rank("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", lws)
        for name in ("MASTER_ADDR", "MASTER_PORT"):  # the rendezvous store; torchrun sets both
            if not os.environ.get(name):
                raise ValueError(f"{name} is not set (RANK and WORLD_SIZE are): start under torchrun, or set "
                                 f"MASTER_ADDR and MASTER_PORT to rank 0's host and a free port")
        port = _env_int("MASTER_PORT")
        if not 0 < port < 65536:
            raise ValueError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
        nodes = _env_int("GROUP_WORLD_SIZE", max(1, ws // lws))  # hand-made launches: even nodes
        return Launch("torchrun", rank, local_rank, ws, lws, _env_int("GROUP_RANK", rank // lws), nodes)
    if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:  # srun, one task per GPU
        ws, rank = _env_int("SLURM_STEP_NUM_TASKS"), _env_int("SLURM_PROCID")
        nodes = _env_int("SLURM_STEP_NUM_NODES", 1)
        _check_rank("SLURM_PROCID", rank, "SLURM_STEP_NUM_TASKS", ws)
        if nodes < 1:
            raise ValueError(f"SLURM_STEP_NUM_NODES={nodes} must be >= 1")
        local_rank, node = _env_int("SLURM_LOCALID", 0), _env_int("SLURM_NODEID", 0)
        per_node = tasks_per_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
        if len(per_node) == nodes and 0 <= node < nodes:
            return Launch("slurm", rank, local_rank, ws, per_node[node], node, nodes)
        lws = max(1, ws // nodes)  # no usable layout: an even one, tasks placed in blocks
        return Launch("slurm", rank, local_rank, ws, lws, rank // lws, nodes)
    return Launch("single", 0, 0, 1, 1)


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


def cpu_threads(requested: int, launcher: str, local_world_size: int, default: int,
                env: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """This process's intra-op thread count and why: (count, reason for the log).

    `default` is torch's own choice (torch.get_num_threads() before any is set): OMP_NUM_THREADS or
    MKL_NUM_THREADS where set (torchrun sets OMP_NUM_THREADS=1 for more than one process per node),
    else the CPUs this process may run on (measured: under `taskset -c 0` torch picks 1). A SLURM
    cluster that does not bind tasks to their CPUs (TaskPlugin=task/none) lets every task run on
    every core of its node, so each srun-started rank would take the whole node: there the job's
    allocation, SLURM_CPUS_PER_TASK, bounds the count, shared by the local ranks of one task
    (torchrun's workers are one srun task), never above `default`. train.threads (`requested`)
    overrides all of this."""
    if requested:
        return requested, "train.threads"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if env.get(name):
            return default, f"{name}={env[name]}"
    cpus = env.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0:
        sharing = local_world_size if launcher == "torchrun" else 1
        why = f"SLURM_CPUS_PER_TASK={cpus}" + (f" shared by {sharing} local ranks" if sharing > 1 else "")
        return max(1, min(default, int(cpus) // sharing)), why
    return default, "torch's default: the CPUs this process may run on"


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
    # Created once here (new_group is collective: every rank calls setup() in the same order).
    cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank, local_rank, world_size, local_world_size, node_rank, num_nodes, dev, backend, launcher,
                cpu_group)


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


"""Which launcher started this process and what it gave it: rank, world size and node from torchrun's
or SLURM's variables (or a plain python run), the GPU this rank uses and its CPU threads."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import Mapping, MutableMapping, NamedTuple, Sequence

import torch


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


def slurm_port(env: Mapping[str, str] = os.environ) -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes don't collide
    (slurm/common.sh's job_port, for the torchrun templates, is the same formula).

    20000..31999: below Linux's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by
    default), from which the kernel hands out the local ports of outgoing connections -- a
    rendezvous port in there can already be taken by any client socket on the node (the old
    20000 + id % 20000 reached 39999)."""
    return 20000 + int(env.get("SLURM_JOB_ID", "0")) % 12000


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


def _nccl_matches(name: str, prefixes: list[str], exact: bool) -> bool:
    return any(name == p if exact else name.startswith(p) for p in prefixes)


def gloo_socket_ifname(env: Mapping[str, str], interfaces: Sequence[str]) -> str | None:
    """What GLOO_SOCKET_IFNAME should be so that gloo uses NCCL's interface; None: leave gloo alone.

    gloo (the CPU side group, the MNIST barrier, CPU runs) binds to what the hostname resolves to
    unless GLOO_SOCKET_IFNAME names interfaces: exact names, comma-separated, one gloo device each
    (ProcessGroupGloo.cpp, Options::create_default: split(',', GLOO_SOCKET_IFNAME) ->
    createDeviceForInterface).  NCCL_SOCKET_IFNAME is a list of prefixes, `=` first for exact names,
    `^` first to exclude (NCCL's env docs; `^=` excludes exact names).  `interfaces` are this host's
    (in socket.if_nameindex() order, by interface index as getifaddrs lists them to NCCL;
    follow_nccl_socket_ifname() passes those with an address, as NCCL skips the others).

    - GLOO_SOCKET_IFNAME set: it wins, returned as it is; NCCL_SOCKET_IFNAME unset: None.
    - a list of names or prefixes: the first interface it matches (NCCL bootstraps over the first
      match too; one gloo device, as one interface is all the side group needs).
    - an exclusion: the interface left, if exactly one is.
    ValueError, one line naming what to set, when nothing matches or an exclusion leaves several.
    """
    if env.get("GLOO_SOCKET_IFNAME"):
        return env["GLOO_SOCKET_IFNAME"]
    spec = env.get("NCCL_SOCKET_IFNAME", "")
    if not spec:
        return None
    rest = spec
    exclude = rest.startswith("^")
    rest = rest[1:] if exclude else rest
    exact = rest.startswith("=")
    rest = rest[1:] if exact else rest
    # NCCL also reads "name:port" entries; the port is not part of the name
    prefixes = [re.sub(r":\d+$", "", p) for p in rest.split(",") if p]
    names = list(interfaces)
    have = ", ".join(names) or "none"
    if exclude:
        left = [n for n in names if not _nccl_matches(n, prefixes, exact)]
        if len(left) == 1:
            return left[0]
        if left:
            raise ValueError(f"NCCL_SOCKET_IFNAME={spec!r} leaves several interfaces ({', '.join(left)}) and gloo "
                             f"takes exact names: set GLOO_SOCKET_IFNAME to the one the nodes share")
        raise ValueError(f"NCCL_SOCKET_IFNAME={spec!r} excludes every interface of this host ({have}): set "
                         f"NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME to the one the nodes share")
    for name in names:
        if _nccl_matches(name, prefixes, exact):
            return name
    raise ValueError(f"NCCL_SOCKET_IFNAME={spec!r} matches none of this host's interfaces ({have}): set it, "
                     f"or GLOO_SOCKET_IFNAME for gloo, to the one the nodes share")


def _has_address(name: str) -> bool:
    """Whether interface `name` has an IPv4 address or a non-loopback IPv6 one: the interfaces NCCL
    and gloo can bind to (NCCL skips the others)."""
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        return True
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:  # address, index, prefix length, scope, flags, name
            return any(cols[5] == name and cols[0] != "0" * 31 + "1" for cols in map(str.split, f) if len(cols) == 6)
    except OSError:
        return False


def follow_nccl_socket_ifname(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Before the process group exists: when only NCCL_SOCKET_IFNAME is set, set GLOO_SOCKET_IFNAME
    to the interface NCCL uses (gloo_socket_ifname()), so that gloo does not bind to whatever the
    hostname resolves to (127.0.1.1 on a stock Debian/Ubuntu /etc/hosts).  Returns the value gloo
    will use (None: gloo's own choice); ValueError, one line, when there is none to give it."""
    if env.get("GLOO_SOCKET_IFNAME") or not env.get("NCCL_SOCKET_IFNAME"):
        return env.get("GLOO_SOCKET_IFNAME") or None
    names = [name for _, name in socket.if_nameindex()]
    value = gloo_socket_ifname(env, [n for n in names if _has_address(n)])
    if value:
        env["GLOO_SOCKET_IFNAME"] = value
    return value

"""Distributed decisions as pure functions, driven with the real cases (no GPU, no process group needed)."""

import os
import sys
import subprocess
from datetime import timedelta

import pytest
import torch

from cnn import distributed
from conftest import REPO, clear_launcher_env

# (case, launcher, local_world_size, CUDA_VISIBLE_DEVICES as each rank sees it, GPU per local rank or None = error)
GPU_CASES = [
    # srun --gpus-per-task=1: SLURM gives every task one GPU of its own, always visible as index 0
    ("slurm --gpus-per-task=1", "slurm", 8, lambda r: str(r), [0] * 8),
    # srun --gpus-per-node=8, no binding: every task sees the node's 8 GPUs
    ("slurm --gpus-per-node=8 unbound", "slurm", 8, lambda r: "0,1,2,3,4,5,6,7", list(range(8))),
    # --gpu-bind=closest, cyclic placement on 2 sockets: tasks 0,2,4,6 see GPUs 0-3 (and would pick 0,2,0,2)
    ("slurm --gpu-bind=closest", "slurm", 8, lambda r: "0,1,2,3" if r % 2 == 0 else "4,5,6,7", None),
    # more ranks than GPUs: torchrun --nproc_per_node=4 on a 2-GPU workstation
    ("torchrun 4 ranks, 2 GPUs", "torchrun", 4, lambda r: None, None),
    # torchrun --nproc_per_node=2 on a 1-GPU workstation: both would share it
    ("torchrun 2 ranks, 1 GPU", "torchrun", 2, lambda r: None, None),
    # torchrun --nproc_per_node=2 on a 2-GPU workstation
    ("torchrun 2-GPU workstation", "torchrun", 2, lambda r: None, [0, 1]),
    # torchrun --nproc_per_node=1 on a 2-GPU workstation, and a plain python run
    ("torchrun 1 rank, 2 GPUs", "torchrun", 1, lambda r: None, [0]),
    ("python, 1 GPU", "single", 1, lambda r: None, [0]),
]


def visible(cvd, default):
    return default if cvd is None else len(cvd.split(","))


@pytest.mark.parametrize("case, launcher, lws, cvd_of, want", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_choose_gpu(case, launcher, lws, cvd_of, want):
    machine_gpus = {"torchrun 4 ranks, 2 GPUs": 2, "torchrun 2 ranks, 1 GPU": 1, "python, 1 GPU": 1}.get(case, 2)
    for local_rank in range(lws):
        cvd = cvd_of(local_rank)
        count = visible(cvd, machine_gpus)
        if want is not None:
            assert distributed.choose_gpu(local_rank, lws, count, cvd, launcher) == want[local_rank]
            continue
        with pytest.raises(ValueError) as err:
            distributed.choose_gpu(local_rank, lws, count, cvd, launcher)
        msg = str(err.value)
        assert "\n" not in msg and "CUDA_VISIBLE_DEVICES=" in msg
        assert f"local rank {local_rank} of {lws}" in msg and f"sees {count} GPU(s)" in msg
        assert "--gpus-per-task=1" in msg and "--nproc_per_node" in msg
        if cvd is not None:
            assert f"CUDA_VISIBLE_DEVICES='{cvd}'" in msg


# (case, train.threads, launcher, local_world_size, environment, torch's default on a 64-core node, want)
THREAD_CASES = [
    ("train.threads wins over everything", 3, "slurm", 8, {"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "8"}, 64, 3),
    # torchrun --nproc_per_node=8 sets OMP_NUM_THREADS=1; torch read it already (its default is then 1)
    ("torchrun's OMP_NUM_THREADS", 0, "torchrun", 8, {"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "16"}, 1, 1),
    ("MKL_NUM_THREADS", 0, "single", 1, {"MKL_NUM_THREADS": "4"}, 4, 4),
    # srun starts 8 tasks per node with --cpus-per-task=8, TaskPlugin=task/none: each sees all 64 cores
    ("srun direct, unbound", 0, "slurm", 8, {"SLURM_CPUS_PER_TASK": "8"}, 64, 8),
    # one srun task per node runs torchrun --nproc_per_node=4 with OMP_NUM_THREADS set to "" by the user
    ("torchrun in one srun task", 0, "torchrun", 4, {"SLURM_CPUS_PER_TASK": "16", "OMP_NUM_THREADS": ""}, 64, 4),
    ("more local ranks than CPUs", 0, "torchrun", 4, {"SLURM_CPUS_PER_TASK": "2"}, 64, 1),
    # task/affinity binds the task to its 8 CPUs (torch's default is then 8): never above it
    ("bound task, hyperthreads counted", 0, "slurm", 1, {"SLURM_CPUS_PER_TASK": "16"}, 8, 8),
    ("python inside sbatch -c 4", 0, "single", 1, {"SLURM_CPUS_PER_TASK": "4"}, 64, 4),
    ("no SLURM", 0, "single", 1, {}, 64, 64),
    ("unparsable SLURM_CPUS_PER_TASK", 0, "slurm", 1, {"SLURM_CPUS_PER_TASK": "4(x2)"}, 64, 64),
]


@pytest.mark.parametrize("case, requested, launcher, lws, env, default, want", THREAD_CASES,
                         ids=[c[0] for c in THREAD_CASES])
def test_cpu_threads(case, requested, launcher, lws, env, default, want):
    count, why = distributed.cpu_threads(requested, launcher, lws, default, env)
    assert count == want
    names = [n for n in ("train.threads", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SLURM_CPUS_PER_TASK")
             if n in why]
    assert len(names) <= 1 and "\n" not in why, why  # one reason, on the log line
    if requested:
        assert names == ["train.threads"]
    elif any(env.get(n) for n in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        assert names and env[names[0]] in why
    elif want != default:
        assert names == ["SLURM_CPUS_PER_TASK"] and (launcher != "torchrun" or f"shared by {lws}" in why)


def test_bound_gpus_are_distinct_per_node():
    """Across a node's ranks, every accepted assignment uses distinct physical GPUs."""
    for case, launcher, lws, cvd_of, want in GPU_CASES:
        if want is None or lws == 1:
            continue
        physical = []
        for r in range(lws):
            cvd = cvd_of(r)
            index = distributed.choose_gpu(r, lws, visible(cvd, 2), cvd, launcher)
            physical.append(cvd.split(",")[index] if cvd else str(index))
        assert len(set(physical)) == lws, case


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA machine as far as setup() can tell: 2 devices; init_process_group is recorded, not run."""
    calls = []
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
              "TORCH_NCCL_ASYNC_ERROR_HANDLING", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(("set_device", str(dev))))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw["timeout"])))
    # the gloo side group beside NCCL (the stop check's): recorded too
    monkeypatch.setattr(distributed.dist, "new_group", lambda backend, **kw: calls.append(("group", backend)))
    return calls


def test_setup_leaves_nccl_error_handling_to_torch(fake_cuda):
    """torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING (3, SkipCleanUp) stays: setup() sets no NCCL variable,
    binds the GPU before the group starts, and starts it with the long start-up timeout."""
    before = dict(os.environ)
    d = distributed.setup("cuda", init_timeout_s=600)
    assert dict(os.environ) == before
    assert d.device == torch.device("cuda", 0) and d.backend == "nccl"
    assert fake_cuda == [("set_device", "cuda:0"), ("init", "nccl", timedelta(seconds=600)), ("group", "gloo")]


def test_setup_refuses_shared_gpu_before_the_group_starts(fake_cuda, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_LOCALID", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES='0,1'"):
        distributed.setup("cuda")
    assert fake_cuda == []


def test_slurm_templates_leave_nccl_error_handling_to_torch():
    """Sourcing slurm/common.sh sets no TORCH_NCCL_ASYNC_ERROR_HANDLING; GLOO_SOCKET_IFNAME is documented
    beside NCCL_SOCKET_IFNAME."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_NCCL_ASYNC_ERROR_HANDLING"}
    out = subprocess.run(["bash", "-c", 'source slurm/common.sh; echo "${TORCH_NCCL_ASYNC_ERROR_HANDLING-unset}"'],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "unset"
    text = (REPO / "slurm" / "common.sh").read_text()
    assert "# export GLOO_SOCKET_IFNAME=" in text and "# export NCCL_SOCKET_IFNAME=" in text


def test_side_group_failure_names_gloo_socket_ifname(monkeypatch):
    """A gloo side group that cannot connect (wrong interface) is a one-line error naming GLOO_SOCKET_IFNAME."""
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)

    def refuse(**kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:144] connect [10.1.2.3]:4242: "
                           "Connection refused\nmore detail")

    monkeypatch.setattr(distributed.dist, "new_group", refuse)
    with pytest.raises(distributed.SideGroupError) as err:
        distributed.once_per_node(lambda: None, local_rank=0, timeout_s=1800)
    msg = str(err.value)
    assert "\n" not in msg and "GLOO_SOCKET_IFNAME" in msg and "Connection refused" in msg
    assert "dist.data_timeout_s (1800 s)" in msg


# (case, environment, Launch(launcher, rank, local_rank, world_size, local_world_size, node_rank, num_nodes))
TORCHRUN = {"MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
SRUN_3_ON_2 = {"SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2,1"}
LAYOUTS = [
    # srun -n3 -N2: block distribution, 2 tasks on node 0 and 1 on node 1 (3 // 2 would say 1 per node)
    ("srun 3 tasks on 2 nodes, node 0", {**SRUN_3_ON_2, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"},
     ("slurm", 1, 1, 3, 2, 0, 2)),
    ("srun 3 tasks on 2 nodes, node 1", {**SRUN_3_ON_2, "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1"},
     ("slurm", 2, 0, 3, 1, 1, 2)),
    # srun -m cyclic: rank 1 on node 1 (rank // tasks-per-node would say node 0)
    ("srun cyclic, SLURM's compressed counts", {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2",
     "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1"},
     ("slurm", 1, 0, 4, 2, 1, 2)),
    ("srun without a layout variable", {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_PROCID": "3"},
     ("slurm", 3, 0, 4, 2, 1, 2)),
    ("torchrun, 2 nodes of 2", {**TORCHRUN, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
     "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2"}, ("torchrun", 3, 1, 4, 2, 1, 2)),
    # two agents with different --nproc_per_node: 3 ranks on node 0, 1 on node 1
    ("torchrun, 3 + 1 ranks", {**TORCHRUN, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
     "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2"}, ("torchrun", 3, 0, 4, 1, 1, 2)),
    ("hand-made RANK/WORLD_SIZE", {**TORCHRUN, "RANK": "1", "WORLD_SIZE": "2"}, ("torchrun", 1, 0, 2, 2, 0, 1)),
    ("plain python", {}, ("single", 0, 0, 1, 1, 0, 1)),
]


@pytest.mark.parametrize("case, env, want", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_launch_env_reads_node_rank_and_count_from_the_launcher(case, env, want, monkeypatch):
    clear_launcher_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tuple(distributed.launch_env()) == want


def test_tasks_per_node_reads_slurms_compressed_form():
    assert distributed.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert distributed.tasks_per_node("4") == [4]
    assert distributed.tasks_per_node("") == [] and distributed.tasks_per_node("2(x") == []


def test_exit_process_runs_atexit_handlers_then_skips_finalization():
    """exit_process: the exit code given, the atexit handlers run (W&B's teardown is one), and
    no finalization (a module global's __del__, run there, is never called)."""
    script = ("import atexit\n"
              "from cnn.distributed import exit_process\n"
              "class Finalized:\n"
              "    def __del__(self): print('finalized', flush=True)\n"
              "keep = Finalized()\n"
              "atexit.register(lambda: print('atexit ran'))\n"
              "print('buffered', end='')\n"
              "exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "bufferedatexit ran\n"  # flushed; and no "finalized"
    normal = subprocess.run([sys.executable, "-c", script.replace("exit_process(3)", "raise SystemExit(3)")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert normal.returncode == 3 and "finalized" in normal.stdout  # what a normal exit would have run


# (case, environment, this host's interfaces in index order, GLOO_SOCKET_IFNAME or None, or the error's words)
HOST = ["lo", "eth0", "ib0", "ib1", "docker0"]
GLOO_CASES = [
    ("NCCL_SOCKET_IFNAME unset: gloo's own choice", {}, HOST, None),
    ("NCCL_SOCKET_IFNAME empty: as unset", {"NCCL_SOCKET_IFNAME": ""}, HOST, None),
    ("GLOO_SOCKET_IFNAME set wins", {"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "eth0"}, HOST, "eth0"),
    ("it wins even where NCCL's matches nothing", {"NCCL_SOCKET_IFNAME": "nope", "GLOO_SOCKET_IFNAME": "eth0"},
     HOST, "eth0"),
    ("a whole name is a prefix of itself", {"NCCL_SOCKET_IFNAME": "eth0"}, HOST, "eth0"),
    ("a prefix", {"NCCL_SOCKET_IFNAME": "eth"}, HOST, "eth0"),
    # NCCL bootstraps over the first match; gloo gets one interface, the same one
    ("a prefix matching several: the first", {"NCCL_SOCKET_IFNAME": "ib"}, HOST, "ib0"),
    ("the host's order, not the list's", {"NCCL_SOCKET_IFNAME": "ib,eth"}, HOST, "eth0"),
    ("=: exact names", {"NCCL_SOCKET_IFNAME": "=ib1"}, HOST, "ib1"),
    ("=: a prefix is not a name", {"NCCL_SOCKET_IFNAME": "=ib"}, HOST, "matches none of this host's interfaces"),
    ("=: several names", {"NCCL_SOCKET_IFNAME": "=ib1,eth0"}, HOST, "eth0"),
    ("name:port, as NCCL reads it", {"NCCL_SOCKET_IFNAME": "=ib1:5000"}, HOST, "ib1"),
    ("^: exclusion leaving one", {"NCCL_SOCKET_IFNAME": "^docker,lo"}, ["lo", "eth0", "docker0"], "eth0"),
    ("^: exclusion leaving several is ambiguous", {"NCCL_SOCKET_IFNAME": "^docker,lo"}, HOST,
     "leaves several interfaces (eth0, ib0, ib1)"),
    ("^=: exact exclusion", {"NCCL_SOCKET_IFNAME": "^=lo,docker"}, ["lo", "docker0", "eth0"],
     "leaves several interfaces (docker0, eth0)"),
    ("^=: exact exclusion leaving one", {"NCCL_SOCKET_IFNAME": "^=lo,docker0"}, ["lo", "docker0", "eth0"], "eth0"),
    ("^: excluding everything", {"NCCL_SOCKET_IFNAME": "^e,lo,ib,d"}, HOST, "excludes every interface"),
    ("nothing matches", {"NCCL_SOCKET_IFNAME": "enp"}, HOST, "matches none of this host's interfaces "
     "(lo, eth0, ib0, ib1, docker0)"),
]


@pytest.mark.parametrize("case, env, interfaces, want", GLOO_CASES, ids=[c[0] for c in GLOO_CASES])
def test_gloo_socket_ifname_follows_nccl(case, env, interfaces, want):
    from cnn.distributed.launch import gloo_socket_ifname

    if want is None or want in interfaces:
        assert gloo_socket_ifname(env, interfaces) == want
        return
    with pytest.raises(ValueError) as err:
        gloo_socket_ifname(env, interfaces)
    msg = str(err.value)
    assert want in msg and "\n" not in msg
    assert f"NCCL_SOCKET_IFNAME={env['NCCL_SOCKET_IFNAME']!r}" in msg and "GLOO_SOCKET_IFNAME" in msg


def test_follow_nccl_skips_interfaces_without_an_address(monkeypatch):
    """As NCCL does: an interface with no address (ib0 down) is not one gloo could bind to."""
    from cnn.distributed import launch

    monkeypatch.setattr(launch.socket, "if_nameindex", lambda: [(1, "lo"), (2, "ib0"), (3, "ib1")])
    monkeypatch.setattr(launch, "_has_address", lambda name: name != "ib0")
    env = {"NCCL_SOCKET_IFNAME": "ib"}
    assert launch.follow_nccl_socket_ifname(env) == "ib1" and env["GLOO_SOCKET_IFNAME"] == "ib1"
    env = {"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "ib0"}
    assert launch.follow_nccl_socket_ifname(env) == "ib0" and env["GLOO_SOCKET_IFNAME"] == "ib0"
    env = {}
    assert launch.follow_nccl_socket_ifname(env) is None and env == {}


@pytest.fixture
def two_rank_launch(fake_cuda, monkeypatch):
    """Rank 1 of 2 under torchrun, with the rendezvous store faked; GLOO_SOCKET_IFNAME as it was at
    init_process_group is recorded, and whatever setup() sets is removed afterwards."""
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "x")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")  # now restored to unset after the test, whatever setup() did
    from cnn.distributed import group

    monkeypatch.setattr(group, "_store", lambda *args: None)
    seen = []
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: seen.append(os.environ.get("GLOO_SOCKET_IFNAME")))
    return seen


def test_setup_points_gloo_at_the_nccl_interface(two_rank_launch, monkeypatch):
    """Only NCCL_SOCKET_IFNAME set (multi-homed nodes): gloo -- the side group, the MNIST barrier --
    binds to the same interface instead of what the hostname resolves to."""
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")  # the one interface every host has
    distributed.setup("cuda")
    assert two_rank_launch == ["lo"]


def test_setup_refuses_an_nccl_interface_this_host_lacks(two_rank_launch, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "=no-such-if0")
    with pytest.raises(ValueError, match="NCCL_SOCKET_IFNAME='=no-such-if0' matches none"):
        distributed.setup("cuda")
    assert two_rank_launch == []  # before the process group


def test_train_ddp_turns_the_interface_error_into_one_line(tmp_path):
    """train_ddp.main: a ValueError from setup() is one line and exit 2, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_", "GLOO_"))}
    env.update({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500", "NCCL_SOCKET_IFNAME": "=no-such-if0", "CUDA_VISIBLE_DEVICES": ""})
    # short timeouts: without the check, rank 0 would wait for rank 1 at the rendezvous
    proc = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), "device=cpu", f"run.dir={tmp_path / 'run'}",
                           "dist.timeout_s=5", "dist.init_timeout_s=5"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if "NCCL_SOCKET_IFNAME" in l]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr

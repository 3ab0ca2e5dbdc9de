"""Multi-node training on test hosts (tests/hosts.py: network namespaces with hostnames of their
own, one switch): c10d rendezvous by hostname, each host's own interface, a lost node and a
pulled cable.  Needs root (skipped with the reason otherwise, as the SLURM tests are)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cnn.rundir import read_metrics, read_summary
from conftest import REPO, child_env, smoke_args
import hosts as hosts_module
from hosts import TestHosts, netns_available, wait_for

RDZV_PORT = 29400  # each host has a network stack of its own: nothing else listens there


@pytest.fixture(scope="module")
def can_make_hosts():
    why = netns_available()
    if why:
        pytest.skip(why)


@pytest.fixture
def hosts(can_make_hosts, request):
    """Test hosts (2 unless the test is parametrized indirectly), torn down also when it fails."""
    made = TestHosts(getattr(request, "param", 2))
    made.start()
    try:
        yield made.hosts
    finally:
        made.close()


class Launch:
    """A command on a test host, its output (stdout and stderr together) read as it comes, each
    line with the time it arrived (time.monotonic), and copied to `log`."""

    def __init__(self, host, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.host, self.log = host, log
        self.lines: list[tuple[float, str]] = []
        self.proc = host.popen(cmd, env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log, "a") as f:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), line))
                f.write(line)
                f.flush()

    @property
    def text(self) -> str:
        return "".join(line for _, line in list(self.lines))

    def find(self, pattern: str, since: float = 0.0) -> tuple[float, str] | None:
        """The first line matching `pattern` (a regex) that arrived after `since`."""
        return next(((t, line) for t, line in list(self.lines) if t >= since and re.search(pattern, line)), None)

    def wait_line(self, pattern: str, timeout_s: float, since: float = 0.0) -> tuple[float, str]:
        return wait_for(lambda: self.find(pattern, since) or (self.proc.poll() is not None and self._ended(pattern)),
                        timeout_s, what=f"{self.host.name}: a line matching {pattern!r}")

    def _ended(self, pattern: str):
        self._reader.join(5)
        found = self.find(pattern)
        if found:
            return found
        raise AssertionError(f"{self.host.name} exited {self.proc.returncode} before a line matching {pattern!r}:\n"
                             f"{self.text[-3000:]}")

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(10)
        return code


def torchrun_cmd(nnodes: str, endpoint: str, run_id: str, *train_args: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}", *extra,
            str(REPO / "train_ddp.py"), *train_args]


def host_env(host, **extra: str) -> dict[str, str]:
    """The launch environment on `host`: gloo on its own interface (not on what a name resolves to)."""
    return child_env(GLOO_SOCKET_IFNAME=host.dev, **extra)


def _workers(host) -> dict[int, dict[str, str]]:
    """The train_ddp.py worker processes on `host` (those given a RANK by torchrun): pid -> environment."""
    found = {}
    for pid in host.pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"train_ddp.py" in cmdline and b"torch.distributed.run" not in cmdline:
            env = dict(kv.split("=", 1) for kv in environ.decode(errors="replace").split("\0") if "=" in kv)
            if "RANK" in env:
                found[pid] = env
    return found


def test_hosts_have_names_addresses_and_cables_and_go_away_on_failure(can_make_hosts):
    """The harness itself (< 1 s): each host its hostname, /etc/hosts and interface; a pulled cable
    cuts a host off; a crash kills every process of its namespace, whatever its session; and the
    teardown after a failing test leaves no namespace, folder or process."""
    made = TestHosts(3)
    with pytest.raises(ZeroDivisionError):
        with made as (a, b, c):
            assert (a.name, b.name, c.name) == ("hosta", "hostb", "hostc")
            assert a.run(["hostname"]).stdout.strip() == "hosta"
            assert "198.18.0.2 hostb" in c.run(["cat", "/etc/hosts"]).stdout
            assert f"{c.addr}/24" in c.run(["ip", "-o", "addr", "show", "dev", c.dev]).stdout
            listen = f"import socket\ns = socket.create_server(('{a.addr}', 5000))\nwhile True: s.accept()[0].close()"
            probe = "import socket, sys; socket.create_connection((sys.argv[1], 5000), timeout=2).close()"
            server = a.popen([sys.executable, "-c", listen])
            wait_for(lambda: b.run([sys.executable, "-c", probe, "hosta"]).returncode == 0, 10, what="b reaches a")
            c.cable(False)
            assert c.run([sys.executable, "-c", probe, "hosta"]).returncode != 0  # cut off
            c.cable(True)
            wait_for(lambda: c.run([sys.executable, "-c", probe, "hosta"]).returncode == 0, 10, what="c back")
            # a process in a session of its own (as torchrun starts its workers) dies with its host
            b.popen(["setsid", "sleep", "300"])
            wait_for(lambda: len(b.pids()) == 1, 5, what="b's sleep")
            assert b.crash() and not b.pids()
            assert server.poll() is None  # a's untouched
            1 / 0  # the test fails: the teardown must still run
    assert not [ns for ns in hosts_module._namespaces() if ns.startswith(made.prefix)]
    assert not [p for p in hosts_module.NETNS_ETC.glob(made.prefix + "*")]
    assert server.wait(5) == -9


def test_leftovers_of_a_crashed_run_are_removed(can_make_hosts):
    """Namespaces of a run that died before its teardown (its pid gone) go when the next starts;
    those of a live process stay."""
    dead = f"{hosts_module.PREFIX}{2**22 + 1}-1-a"  # above pid_max's default (2^22): no such process
    live = f"{hosts_module.PREFIX}1-1-a"  # pid 1 is alive
    try:
        for ns in (dead, live):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=20)
        with TestHosts(2):
            names = hosts_module._namespaces()
            assert dead not in names and live in names
    finally:
        for ns in (dead, live):
            hosts_module.delete_namespace(ns)


def test_two_hosts_learn_by_hostname(hosts, mnist_root, tmp_path):
    """The twin of test_train.py's two nodes on loopback, on two test hosts: c10d rendezvous at
    hosta:PORT (a hostname, resolved through each host's /etc/hosts), gloo on each host's own
    interface. The job learns, the summary counts 2 nodes on 2 distinct hosts, and each worker ran
    on its own host with MASTER_ADDR a hostname."""
    a, b = hosts
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd("2", f"{a.name}:{RDZV_PORT}", "test-hosts-learn",
                       *smoke_args(mnist_root, run_dir, "data.train_subset=6400", "train.epochs=1", "train.log_every=10"))
    started = time.monotonic()
    nodes = [Launch(h, cmd, host_env(h), tmp_path / f"{h.name}.log") for h in hosts]

    def each_host():
        per = {h.name: _workers(h) for h in hosts}
        return per if all(per.values()) else None

    seen = {name: next(iter(w.values())) for name, w in wait_for(each_host, 120, what="a worker on each host").items()}
    codes = [n.wait(300) for n in nodes]
    print(f"two hosts, 50 steps: {time.monotonic() - started:.1f} s")
    assert codes == [0, 0], nodes[0].text[-2000:] + nodes[1].text[-2000:]
    losses = [r["train_loss"] for r in read_metrics(run_dir, "train")]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], losses
    s = read_summary(run_dir)
    assert s["world_size"] == 2 and s["nodes"] == 2 and s["global_batch_size"] == 128
    assert s["steps"] == 50 and s["test_accuracy"] > 0.85
    assert s["hosts"] == ["hosta", "hostb"]  # job_facts: each rank's socket.gethostname(), all-gathered
    assert sorted(env["RANK"] for env in seen.values()) == ["0", "1"]
    assert {env["MASTER_ADDR"] for env in seen.values()} <= {"hosta", "hostb"}, seen  # a name, not an address
    assert all(env["GLOO_SOCKET_IFNAME"] == h.dev for h, env in zip(hosts, (seen["hosta"], seen["hostb"])))
    assert sum(n.text.count("--- resolved config ---") for n in nodes) == 1
    assert not a.pids() and not b.pids()


# The launcher's own bounds, stated once: a dead node's rendezvous heartbeat expires after
# keep_alive_interval x keep_alive_max_attempt (torch's defaults 5 s x 3); once min_nodes are in,
# a round closes last_call_timeout later (default 30 s) unless max_nodes joined first; join_timeout
# bounds a whole rendezvous (default 600 s).  torch/distributed/elastic/rendezvous/dynamic_rendezvous.py
# (create_handler, _RendezvousStateHolder._sanitize, _RendezvousJoinOp).
RDZV_CONF = "join_timeout=60,last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3"
REFORM_BOUND_S = 1 * 3 + 3  # the dead node's heartbeat expiry, then the last call


def _digests(seed: int, steps: int, global_batch: int, num_samples: int = 60000) -> dict[int, str]:
    """What train.record_samples must log at each step (cnn.fault.samples_digest: the sorted global
    batch), from the data order alone: epoch 0's permutation at world size 1 (at any world size the
    ranks' shares of a step are the same images)."""
    import hashlib

    from data.sharding import epoch_indices

    perm = epoch_indices(num_samples, 0, 1, seed, 0)
    return {s + 1: hashlib.sha1(perm[s * global_batch:(s + 1) * global_batch].sort().values.numpy().astype("<i8")
                                .tobytes()).hexdigest()[:16] for s in range(steps)}


def _metrics(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except (OSError, ValueError):  # not there yet, or being replaced
        return []


def _attempts(run_dir: Path) -> list[list[dict]]:
    """metrics.jsonl cut at its `start` records: one list per attempt (records after a resume's
    truncation), each beginning with its start record."""
    out: list[list[dict]] = []
    for r in _metrics(run_dir):
        if r["event"] == "start":
            out.append([])
        if out:
            out[-1].append(r)
    return out


def _last_step(run_dir: Path) -> int:
    return max((r["step"] for r in _metrics(run_dir) if r["event"] == "samples"), default=0)


def test_lost_node_reforms_resumes_and_grows_back(hosts, mnist_root, tmp_path):
    """torchrun --nnodes=1:2 on two hosts, the default config (234 steps of 128 images), no periodic
    checkpoints.  Host B crashes (every process of it SIGKILLed) mid-epoch: host A's rank writes the
    emergency checkpoint of the step it holds, its agent re-forms the job at world size 1 and resumes
    there (at most the step in flight lost), with the same global batches.  Then B's torchrun is
    started again: A's agent restarts its worker (SIGTERM: a checkpoint at the next stop check) and
    the job goes on at world size 2, and finishes >= 99%."""
    a, b = hosts
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd("1:2", f"{a.name}:{RDZV_PORT}", "test-hosts-lost", "--config", "configs/default.yaml",
                       *smoke_args(mnist_root, run_dir, "data.test_subset=0", "checkpoint.every_steps=0",
                                   "train.record_samples=true", "dist.timeout_s=20"),
                       extra=("--max-restarts=3", f"--rdzv-conf={RDZV_CONF}"))
    # torch 2.14's shared TCP store (its default) cannot grow a job: an agent that already has a store
    # server as rank 0 does not publish MASTER_ADDR/PORT in later rounds (dynamic_rendezvous.py
    # DynamicRendezvousHandler.next_rendezvous rebuilds its bootstrap info only on its first round or
    # when it is newly rank 0), so a node joining later waits for them until the store timeout
    # (60 s: "wait timeout ... keys: /torch.rendezvous.<id>.2/MASTER_ADDR") and fails.  Opting out
    # of the sharing makes rank 0 publish them every round.
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    t0 = time.monotonic()
    b1 = Launch(b, cmd, host_env(b, **env), tmp_path / "hostb-1.log")  # B first: it waits for A's store
    node_a = Launch(a, cmd, host_env(a, **env), tmp_path / "hosta.log")
    wait_for(lambda: (_attempts(run_dir) or [[{}]])[0][0].get("world_size"), 120, what="the first start record")
    assert _attempts(run_dir)[0][0]["world_size"] == 2, "both hosts in the first round"
    kill_at = 40
    wait_for(lambda: _last_step(run_dir) >= kill_at, 120, what=f"step {kill_at}")
    killed = b.crash()
    t_kill = time.monotonic()
    last = _last_step(run_dir)  # the newest step both ranks completed (its samples record is collective)
    assert killed and not b.pids()
    assert b1.wait(10) == -9

    # A re-forms alone and resumes from its emergency checkpoint
    t_resumed, line = node_a.wait_line(r"resumed from step \d+", 60, since=t_kill)
    resumed = int(re.search(r"resumed from step (\d+)", line).group(1))

    def second_attempt_stepped():
        attempts = _attempts(run_dir)
        return len(attempts) > 1 and any(r["event"] == "samples" for r in attempts[1]) and time.monotonic()

    t_training = wait_for(second_attempt_stepped, 60, poll_s=0.05, what="a step of the second attempt")
    second = _attempts(run_dir)[1][0]
    assert second["world_size"] == 1 and second["step"] == resumed, second
    assert re.search(rf"rank \d: a collective failed; emergency checkpoint of step {resumed}:", node_a.text), \
        node_a.text[-3000:]
    assert last <= resumed <= last + 1, (last, resumed)  # lost: the step in flight at most
    first = node_a.text[:node_a.text.index(line)]
    errors = [e for e in first.splitlines() if e.startswith("error:")]
    print(f"A's error line: {errors}")
    # one line, naming the collective and the peer gloo lost (host B's address)
    assert len(errors) == 1 and re.fullmatch(rf"error: collective .+ failed at \w+\.py:\d+: another rank is gone "
                                             rf"\([^)]*{re.escape(b.addr)}:\d+\); its log says why", errors[0]), errors
    print(f"lost node: killed after step {last}, resumed from step {resumed} "
          f"(steps lost {max(0, last - resumed)}); kill -> resumed line {t_resumed - t_kill:.1f} s, "
          f"kill -> training again (first step record) {t_training - t_kill:.1f} s")
    assert t_training - t_kill < REFORM_BOUND_S + 30  # the bounds of RDZV_CONF, a worker's start-up, resume

    # B comes back: the job grows back to world size 2
    t_join = time.monotonic()
    b2 = Launch(b, cmd, host_env(b, **env), tmp_path / "hostb-2.log")
    # Needs cnn.distributed.group._store to leave a store that rank 0 hosts unprefixed: a per-attempt
    # prefix from TORCHELASTIC_RESTART_COUNT (each agent's own count: A's is 1 here, the new agent's 0)
    # kept their workers apart, hanging in init_process_group until dist.init_timeout_s.  Without
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (torch's bug above) the new node never gets that far.
    wait_for(lambda: len(_attempts(run_dir)) >= 3, 45,
             what="the job at world size 2 again after host B's torchrun restarted (see cnn.distributed.group._store)")
    t_grown = time.monotonic()
    third = _attempts(run_dir)[2][0]
    assert third["world_size"] == 2 and third["hosts"] == ["hosta", "hostb"], third
    print(f"grow back: B's torchrun started -> attempt at world size 2 from step {third['step']}: "
          f"{t_grown - t_join:.1f} s")
    codes = [node_a.wait(300), b2.wait(60)]
    print(f"lost node test: {time.monotonic() - t0:.1f} s of runs")
    assert codes == [0, 0], node_a.text[-3000:] + b2.text[-3000:]

    s = read_summary(run_dir)
    assert s["steps"] == 234 and s["eval_count"] == 10000 and s["world_size"] == 2
    assert s["test_accuracy"] >= 0.99, s
    samples = [(r["step"], r["samples"]) for r in read_metrics(run_dir, "samples")]
    steps = [st for st, _ in samples]
    assert len(steps) == len(set(steps)), "a step recorded twice"
    expected = _digests(0, 234, 128)
    assert all(expected[st] == digest for st, digest in samples), "another batch than the data order's"
    missing = set(expected) - set(steps)
    # an emergency checkpoint taken after a step's update but before its (collective) record holds
    # that step: its record can be missing, never any other
    assert missing <= {resumed}, sorted(missing)
    assert not a.pids() and not b.pids()



TIMEOUT_S = 10  # dist.timeout_s of the cable test


def test_pulled_cable_is_noticed_within_the_timeout_and_the_job_goes_on_alone(hosts, mnist_root, tmp_path):
    """Host B's link goes down mid-step (TCP then neither delivers nor resets: no error, only
    silence).  Host A's rank notices when its collective times out, dist.timeout_s after it began,
    says so in one line naming the collective, writes the emergency checkpoint (every checkpoint on
    disk still loads), and its agent re-forms the job alone (--nnodes=1:2: within B's heartbeat
    expiry and the last call, RDZV_CONF) and finishes at world size 1.  The cable comes back after
    A has finished: B's processes end by themselves; nothing is left on either host."""
    from cnn import checkpoint

    a, b = hosts
    run_dir = tmp_path / "run"
    # 100 steps (2 epochs of 50), a checkpoint every 10; every step recorded (to pull the cable between boundaries)
    cmd = torchrun_cmd("1:2", f"{a.name}:{RDZV_PORT}", "test-hosts-cable",
                       *smoke_args(mnist_root, run_dir, "data.train_subset=6400", "train.epochs=2", "train.log_every=10",
                                   "checkpoint.every_steps=10", "checkpoint.keep=20", "train.record_samples=true",
                                   f"dist.timeout_s={TIMEOUT_S}"),
                       extra=("--max-restarts=1", f"--rdzv-conf={RDZV_CONF}"))
    t0 = time.monotonic()
    node_b = Launch(b, cmd, host_env(b), tmp_path / "hostb.log")
    node_a = Launch(a, cmd, host_env(a), tmp_path / "hosta.log")
    wait_for(lambda: _last_step(run_dir) >= 23, 120, what="step 23")  # mid-way between checkpoints
    b.cable(False)
    t_pull = time.monotonic()

    t_err, err = node_a.wait_line(r"^error:", TIMEOUT_S + 20, since=t_pull)
    noticed = t_err - t_pull
    print(f"cable down -> A's error line: {noticed:.1f} s (dist.timeout_s={TIMEOUT_S}): {err.strip()}")
    # its collective began at most a step before the pull, and gloo's timeout counts from there
    assert TIMEOUT_S - 1 <= noticed <= TIMEOUT_S + 5, noticed
    assert re.fullmatch(rf"error: collective (DDP gradient all-reduce \(in backward\)|\w+) timed out( after "
                        rf"{TIMEOUT_S} s)? at \w+\.py:\d+: another rank died or hung .*\n", err), err
    t_res, res = node_a.wait_line(r"resumed from step \d+", TIMEOUT_S + REFORM_BOUND_S + 30, since=t_err)
    print(f"cable down -> A training alone again: {t_res - t_pull:.1f} s ({res.strip()})")
    resumed = int(re.search(r"resumed from step (\d+)", res).group(1))
    first = node_a.text[:node_a.text.index(res)]  # A's first attempt, up to the resume
    assert [line for line in first.splitlines() if line.startswith("error:")] == [err.strip()]
    # the emergency checkpoint of the step A holds: written by the first of the two ranks to time out
    # (both hold that step; on this shared run folder the second finds it there and writes nothing)
    emergency = rf"rank \d: a collective failed; emergency checkpoint of step {resumed}:"
    assert re.search(emergency, first) or re.search(emergency, node_b.text), first[-3000:]
    assert 'train_ddp.py", line' not in first, "a worker printed a traceback"
    assert resumed > 20

    code_a = node_a.wait(120)  # B stays cut off: A finishes alone
    assert code_a == 0, node_a.text[-3000:]
    starts = [att[0] for att in _attempts(run_dir)]
    assert [(r["world_size"], r["step"]) for r in starts] == [(2, 0), (1, resumed)], starts
    s = read_summary(run_dir)
    assert s["steps"] == 100 and s["world_size"] == 1 and s["test_accuracy"] > 0.85
    saved = sorted(run_dir.glob("checkpoints/step-*.pt"))
    assert {10, 20, resumed, 100} <= {int(p.stem[5:]) for p in saved}, saved  # the ones before the pull kept
    for path in saved:  # intact: each loads, and holds the step its name says
        assert checkpoint.load(path)["step"] == int(path.stem[5:]), path

    b.cable(True)
    t_up = time.monotonic()
    try:
        code_b = node_b.wait(90)  # B's agent meets the closed rendezvous (or its join_timeout)
    except subprocess.TimeoutExpired:
        code_b = None
    print(f"cable up -> B's torchrun exits ({code_b}): {time.monotonic() - t_up:.1f} s; "
          f"pulled cable test: {time.monotonic() - t0:.1f} s of runs")
    assert code_b is not None, f"B still running 90 s after the cable came back: {b.pids()}\n{node_b.text[-3000:]}"
    b_errors = [line for line in node_b.text.splitlines() if line.startswith("error:")]
    assert len(b_errors) == 1 and "timed out" in b_errors[0], node_b.text[-3000:]  # B's rank timed out too
    assert 'train_ddp.py", line' not in node_b.text, "B's worker printed a traceback"
    assert not a.pids() and not b.pids(), (a.pids(), b.pids())


# cnn.distributed.failures on gloo's own texts (torch 2.14), as seen on the test hosts: no root needed
GLOO = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"


@pytest.mark.parametrize("text, expected", [
    (GLOO + "pair.cc:561] Connection closed by peer [198.18.0.2]:48278. This is typically caused by a remote worker "
     "crashing. Check the logs of the remote worker before reporting an error. GLHF!",
     "a collective failed: another rank is gone (Connection closed by peer 198.18.0.2:48278); its log says why"),
    (GLOO + "pair.cc:534] Read error [198.18.0.2]:48278: Connection reset by peer",
     "a collective failed: another rank is gone (Connection reset by peer 198.18.0.2:48278); its log says why"),
    (GLOO + "pair.cc:534] Write error [fd00::2]:7: Broken pipe",
     "a collective failed: another rank is gone (Broken pipe, peer [fd00::2]:7); its log says why"),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer",  # no address: none named
     "a collective failed: another rank is gone (Connection closed by peer); its log says why"),
    (GLOO + "unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete",
     "a collective timed out after 10 s: another rank died or hung (its log says which; dist.timeout_s sets the "
     "limit)"),
    # a pulled cable, on the rank whose first error is a later bucket's (the connection closed by the timeout)
    ("Application timeout caused pair closure",
     "a collective timed out (gloo closed the connection after a timeout): another rank died or hung (its log says "
     "which; dist.timeout_s sets the limit)"),
])
def test_collective_failure_line_names_the_peer_gloo_lost(text, expected):
    from cnn.distributed import collective_failure

    try:
        raise RuntimeError(text)
    except RuntimeError as exc:
        line = collective_failure(exc)
    # raised here: no torch.distributed frame (so no collective named), and this file is the innermost one of ours
    assert re.sub(r" at test_hosts\.py:\d+", "", line) == expected

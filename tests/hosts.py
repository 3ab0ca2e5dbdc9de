"""Test hosts: two or three "machines" on this one, as Linux network namespaces.

Each host is a network namespace of its own (``ip netns``) with its own hostname (a UTS namespace
per process: ``unshare --uts``) and its own /etc/hosts (``ip netns exec`` bind-mounts
/etc/netns/NS/hosts over /etc/hosts), joined to the others by a veth pair whose far end is a port
of a bridge -- the "switch" -- in a namespace of its own (never in the root namespace: traffic
stays between the namespaces made here, with no route, NAT or bridge to a real interface).
Addresses are from 198.18.0.0/15 (RFC 2544, for network tests).

    with TestHosts(2) as (a, b):       # or the pytest fixture `hosts` (tests/test_hosts.py)
        p = a.popen([sys.executable, "x.py"], env)    # runs "on" host a: hostname hosta
        b.cable(False)                 # pulled cable: b's link goes down, a's stays up (as at a switch)
        b.crash()                      # SIGKILL every process whose network namespace is b's

A host crash kills every process of the namespace (``ip netns pids``), not a process group:
torchrun starts each worker in a session of its own, so the agent's group does not hold them.
Teardown kills every process of every namespace before deleting it, and runs also when a test
fails; namespaces left by an earlier run that crashed (prefix ``mnddp-<pid>-`` of a process that
no longer exists, or of this very pid) are removed first.  Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Sequence

PREFIX = "mnddp-"
NETNS_ETC = Path("/etc/netns")
SUBNET = "198.18.0"  # hosts are .1, .2, .3 (/24)
CMD_TIMEOUT_S = 20.0  # any one `ip` command
KILL_WAIT_S = 10.0  # SIGKILLed processes gone from a namespace


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=check)


def _namespaces() -> list[str]:
    proc = _ip("netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    """The processes whose network namespace is `ns` ([] if it does not exist)."""
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_namespace(ns: str, timeout_s: float = KILL_WAIT_S) -> list[int]:
    """SIGKILL every process in `ns` until none is left (bounded); returns the pids killed.
    A process that a parent has not reaped yet is a zombie: gone for this purpose (it holds no
    socket and runs nothing), so zombies are not waited for."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout_s
    while True:
        live = [p for p in netns_pids(ns) if not _zombie(p)]
        if not live:
            return killed
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {live} of namespace {ns} survive SIGKILL for {timeout_s:g} s")
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True  # gone


def delete_namespace(ns: str) -> None:
    """Kill every process in it, delete it (its veth ends go with it) and its /etc/netns folder."""
    if ns in _namespaces():
        kill_namespace(ns)
        _ip("netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def remove_leftovers(live_prefixes: set[str] = frozenset()) -> list[str]:
    """Namespaces of an earlier run that died before its teardown: those of `mnddp-<pid>-`
    prefixes whose process is gone, and those of this pid (a reused pid: the same names) that are
    not among `live_prefixes` (this process's sets in use).  Never another live run's."""
    removed = []
    names = set(_namespaces()) | ({p.name for p in NETNS_ETC.iterdir()} if NETNS_ETC.is_dir() else set())
    for ns in sorted(names):
        m = re.match(rf"{re.escape(PREFIX)}(\d+)-", ns)
        if not m:
            continue
        mine = int(m.group(1)) == os.getpid()
        if (mine and not any(ns.startswith(p) for p in live_prefixes)) or not Path(f"/proc/{m.group(1)}").exists():
            delete_namespace(ns)
            removed.append(ns)
    return removed


def netns_available() -> str | None:
    """None if test hosts can be made here, else why not (for pytest.skip): needs root, `ip` with
    netns support and `unshare`; tried for real with a throwaway namespace."""
    if os.geteuid() != 0:
        return "test hosts (network namespaces) need root"
    for tool in ("ip", "unshare"):
        if not shutil.which(tool):
            return f"test hosts need `{tool}`, which is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe-{uuid.uuid4().hex[:6]}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` fails here: {made.stderr.strip()[:200]}"
        run = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "sh", "-c", "hostname probe; hostname"],
                             capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        if run.returncode != 0 or run.stdout.strip() != "probe":
            return f"a UTS namespace inside a network namespace fails here: {run.stderr.strip()[:200]}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"network namespaces fail here: {exc}"
    finally:
        delete_namespace(probe)


class Host:
    """One test host: `name` its hostname (hosta...), `ns` its network namespace, `dev` its
    interface (the host end of its cable), `addr` its IPv4 address."""

    def __init__(self, name: str, ns: str, dev: str, addr: str) -> None:
        self.name, self.ns, self.dev, self.addr = name, ns, dev, addr

    def __repr__(self) -> str:
        return f"Host({self.name}, ns={self.ns}, dev={self.dev}, addr={self.addr})"

    def command(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` as run on this host: in its network namespace (and its /etc/hosts) with its own
        hostname (a new UTS namespace; `exec`, so the command is the process that runs)."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.name, *cmd]

    def popen(self, cmd: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start `cmd` on this host (subprocess.Popen's keyword arguments pass through)."""
        return subprocess.Popen(self.command(cmd), env=env, **kwargs)

    def run(self, cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = CMD_TIMEOUT_S,
            **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(cmd), env=env, timeout=timeout, capture_output=True, text=True, **kwargs)

    def pids(self) -> list[int]:
        """Every live process of this host (zombies not counted)."""
        return [p for p in netns_pids(self.ns) if not _zombie(p)]

    def crash(self) -> list[int]:
        """The host dies: SIGKILL every process in its namespace (agent and workers alike);
        returns the pids killed. The network stays as it was (a dead host's link is still plugged)."""
        return kill_namespace(self.ns)

    def cable(self, up: bool) -> None:
        """Plug (True) or pull (False) this host's cable: its interface up or down. Its peers' links
        stay up (they are plugged into the switch): they just stop hearing from it."""
        _ip("-n", self.ns, "link", "set", self.dev, "up" if up else "down")


class TestHosts:
    """`n` (2 or 3) test hosts on one switch; a context manager (teardown always) or
    start()/close().  Names: ns `mnddp-<pid>-<k>-a`... (k: a counter, so that two sets can
    coexist in one process), hostnames hosta, hostb, hostc, interfaces va, vb, vc."""

    __test__ = False  # not a pytest test class
    _count = 0
    _live: set[str] = set()  # prefixes of this process's sets not closed yet

    def __init__(self, n: int = 2) -> None:
        if not 1 <= n <= 26:
            raise ValueError(f"{n} hosts")
        TestHosts._count += 1
        self.prefix = f"{PREFIX}{os.getpid()}-{TestHosts._count}-"
        self.switch = f"{self.prefix}sw"
        letters = "abcdefghijklmnopqrstuvwxyz"[:n]
        self.hosts = [Host(f"host{c}", f"{self.prefix}{c}", f"v{c}", f"{SUBNET}.{i + 1}") for i, c in enumerate(letters)]

    def __enter__(self) -> list[Host]:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def start(self) -> list[Host]:
        remove_leftovers(TestHosts._live)
        TestHosts._live.add(self.prefix)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self.hosts

    def _build(self) -> None:
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in self.hosts)
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for h in self.hosts:
            _ip("netns", "add", h.ns)
            _ip("-n", h.ns, "link", "set", "lo", "up")
            (NETNS_ETC / h.ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / h.ns / "hosts").write_text(hosts_file)
            port = f"p{h.name[-1]}"
            # made directly inside the two namespaces: no name is ever taken in the root namespace
            _ip("link", "add", h.dev, "netns", h.ns, "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.dev)
            _ip("-n", h.ns, "link", "set", h.dev, "up")

    def close(self) -> None:
        """Kill every process of every host, then delete the namespaces; never raises on the way
        (what could not be removed is raised at the end)."""
        errors = []
        for ns in [h.ns for h in self.hosts] + [self.switch]:
            try:
                delete_namespace(ns)
            except Exception as exc:  # go on: remove what can be
                errors.append(f"{ns}: {exc}")
        left = [ns for ns in _namespaces() if ns.startswith(self.prefix)]
        TestHosts._live.discard(self.prefix)
        if errors or left:
            raise RuntimeError(f"test hosts not torn down: {errors} {left}")


def wait_for(predicate, timeout_s: float, poll_s: float = 0.1, what: str = "a condition"):
    """Poll `predicate` until it returns something truthy (returned) or `timeout_s` passes
    (TimeoutError naming `what`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(poll_s)

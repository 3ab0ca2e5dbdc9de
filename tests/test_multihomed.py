"""Multi-homed test hosts (tests/hosts.py): each host's own name resolves to 127.0.1.1, as on a
stock Debian/Ubuntu /etc/hosts, so gloo left to itself binds to loopback and the hosts cannot
reach each other. With only NCCL_SOCKET_IFNAME set (the one variable a GPU cluster's docs name),
gloo -- the CPU group here, the stop check and the MNIST barrier on GPU runs -- follows it to the
hosts' shared interface (cnn/distributed/launch.py follow_nccl_socket_ifname)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cnn.rundir import read_summary
from conftest import REPO, child_env, free_port
from hosts import NETNS_ETC, TestHosts, netns_available

TRAIN = ("data.train_subset=1280", "train.batch_size=64", "train.max_steps=4", "train.log_every=2",
         "data.test_subset=200", "dist.init_timeout_s=20", "dist.timeout_s=10", "precision=fp32")


@pytest.fixture
def multihomed():
    why = netns_available()
    if why:
        pytest.skip(why)
    made = TestHosts(2)
    made.start()
    try:
        for h in made.hosts:  # its own name on loopback, the others' on the shared network
            others = "".join(f"{o.addr} {o.name}\n" for o in made.hosts if o is not h)
            (NETNS_ETC / h.ns / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {h.name}\n{others}")
        yield made.hosts
    finally:
        made.close()


def test_gloo_follows_nccl_socket_ifname_on_multihomed_hosts(multihomed, mnist_root, tmp_path):
    hosts = multihomed
    args = [f"data.root={mnist_root}", f"run.dir={tmp_path / 'run'}", "wandb.mode=disabled", "train.roofline=false",
            *TRAIN]
    port = str(free_port())

    def job(*more, **env):
        procs = [h.popen([sys.executable, str(REPO / "train_ddp.py"), *args, *more],
                         child_env(RANK=str(r), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(r),
                                   MASTER_ADDR=hosts[0].name, MASTER_PORT=port, **env),
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r, h in enumerate(hosts)]
        try:
            return [p.communicate(timeout=120) + (p.returncode,) for p in procs]
        finally:
            for p in procs:
                p.kill()

    # the shared interfaces are va and vb: the NCCL-style prefix "v" names both
    results = job(NCCL_SOCKET_IFNAME="v")
    assert [rc for _, _, rc in results] == [0, 0], "".join(err[-2000:] for _, err, _ in results)
    s = read_summary(tmp_path / "run")
    assert s["world_size"] == 2 and s["nodes"] == 2 and s["steps"] == 4
    # neither variable: gloo binds to 127.0.1.1 and the peer's connection is refused -- one line naming
    # the variables, exit 2, within dist.init_timeout_s (gloo retries the refused connection until then)
    t0 = time.monotonic()
    results = job("dist.init_timeout_s=5", "dist.timeout_s=5")
    print(f"wrong interface -> one-line error: {time.monotonic() - t0:.1f} s")
    assert [rc for _, _, rc in results] == [2, 2], "".join(err[-2000:] for _, err, _ in results)
    for _, err, _ in results:
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: the ranks' gloo group could not connect (") and \
            "resolves to (hosta -> 127.0.1.1)" in last or "resolves to (hostb -> 127.0.1.1)" in last, err[-2000:]
        assert "set GLOO_SOCKET_IFNAME (or NCCL_SOCKET_IFNAME, which gloo follows)" in last
        assert "Traceback" not in err
    # a prefix no interface has: one line naming what to set, exit 2, before any rank waits on another
    results = job(NCCL_SOCKET_IFNAME="ib")
    assert [rc for _, _, rc in results] == [2, 2], "".join(err[-2000:] for _, err, _ in results)
    for _, err, _ in results:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "NCCL_SOCKET_IFNAME='ib' matches none of this host's interfaces" in lines[0], err

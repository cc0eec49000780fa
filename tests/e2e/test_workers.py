"""End to end: a node's ztunnel with several worker processes (issue 14, P7), in both redirect
modes, in the dev cluster (whose ztunnels run the default, max(2, a quarter of the cores)).

What it proves on this kernel:

* eBPF mode: the agent's SOCKMAP holds one socket of each listener's SO_REUSEPORT group (the
  parent's first), and ``bpf_sk_assign`` to it lets the kernel pick the group member by the
  connection's hash (Linux >= 6.5). If it did not, every captured connection would land on
  worker 0, or be dropped (older kernels refuse reuseport sockets in ``bpf_sk_assign``).
* iptables mode: TPROXY's listener lookup selects within the group the same way.
* Captured outbound (15001, node-1) and captured inbound plaintext (15006, node-2) connections
  both spread over the workers; a worker killed with SIGKILL is restarted, and connections made
  while it is down are all answered (the parent keeps its socket, so they wait in its queue).

Figures (connections per worker) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambit.dev import mesh, netns
from ambit.dev.cluster import DevCluster
from ambit.dev.cluster_state import NodeInfo, PodInfo
from tests.e2e.clusters import dev_cluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

PORT = 8080
CONNECTIONS = 60
ADMIN = "http://127.0.0.1:15000"


@pytest.fixture(scope="module", params=["ebpf", "iptables"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) \
        -> Iterator[DevCluster]:
    with dev_cluster("wk", request.param, tmp_path_factory, plain=("plain",)) as c:
        yield c


def workers(node: NodeInfo) -> list[dict[str, Any]]:
    status, body = mesh.http_get(node.netns, f"{ADMIN}/workers")
    assert status == 200, body
    doc: list[dict[str, Any]] = json.loads(body)
    return doc


def per_worker(node: NodeInfo, kind: str) -> list[float]:
    """Connections each worker opened of ``kind`` (reporter/security policy)."""
    return [w["by_kind"].get(kind, 0.0) for w in workers(node)]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def connect_many(c: DevCluster, src: PodInfo, dst: PodInfo, count: int) -> int:
    """``count`` connections from ``src`` to ``dst``'s echo, one after another (bash's
    /dev/tcp: no interpreter start per connection, each read bounded); returns how many were
    answered, and prints what went wrong otherwise."""
    script = (f"for i in $(seq {count}); do exec 3<>/dev/tcp/{dst.ip}/{PORT} || continue; "
              "echo hi >&3; timeout 5 head -n1 <&3; exec 3<&-; done")
    res = subprocess.run(netns.ns_argv(src.netns, ["timeout", "120", "bash", "-c", script]),
                         capture_output=True, text=True, timeout=150, check=False)
    answered = sum(1 for line in res.stdout.splitlines() if line.strip())
    if answered != count:
        print(f"\n{src.name} -> {dst.name}: {answered}/{count} answered; exit "
              f"{res.returncode}; stderr: {res.stderr[-2000:]}")
        for role in ("ztunnel/node-1", "ztunnel/node-2", "agent/node-2"):
            print(f"--- {role}\n{c.log_tail(role, 30)}")
    return answered


def warm_up(src: PodInfo, dst: PodInfo) -> None:
    for _ in range(50):
        if mesh.tcp_probe(src.netns, dst.ip, PORT, "warm").ok:
            return
        time.sleep(0.2)
    raise AssertionError(f"{src.name} never reached {dst.name}")


def delta(after: list[float], before: list[float]) -> list[float]:
    return [a - b for a, b in zip(after, before, strict=True)]


@pytest.fixture(scope="module")
def pods(cluster: DevCluster) -> dict[str, PodInfo]:
    c = cluster
    server = c.add_pod("wksrv", 2)
    c.start_echo(server.name, PORT)
    client = c.add_pod("wkcli", 1)
    outsider = c.add_pod("wkout", 1, namespace="plain")
    warm_up(client, server)
    warm_up(outsider, server)
    return {"server": server, "client": client, "outsider": outsider}


def test_captured_connections_spread_over_the_workers(cluster: DevCluster,
                                                      pods: dict[str, PodInfo]) -> None:
    c = cluster
    node1, node2 = c.node(1), c.node(2)
    assert len(workers(node1)) >= 2 and len(workers(node2)) >= 2
    kinds = ((node1, "source/mutual_tls"), (node2, "destination/mutual_tls"),
             (node2, "destination/none"))
    before = [per_worker(node, kind) for node, kind in kinds]
    assert connect_many(c, pods["client"], pods["server"], CONNECTIONS) == CONNECTIONS
    assert connect_many(c, pods["outsider"], pods["server"], CONNECTIONS) == CONNECTIONS
    outbound, tunnels, plaintext = (delta(per_worker(node, kind), b)
                                    for (node, kind), b in zip(kinds, before, strict=True))
    print(f"\n[{c.redirect_mode}] connections per worker: node-1 outbound (15001) "
          f"{outbound}; node-2 inbound plaintext (15006) {plaintext}; node-2 HBONE tunnels "
          f"(15008, pooled: one HBONE connection per node-1 worker) {tunnels}")
    parent = cluster.process("ztunnel/node-1").pid
    print(f"[{c.redirect_mode}] node-1 ztunnel resident memory: parent {rss_mib(parent)} MiB, "
          f"workers {[rss_mib(w['pid']) for w in workers(node1)]} MiB")
    # Each captured connection is accepted by the worker the kernel chose: both get some.
    assert sum(outbound) == CONNECTIONS and all(n > 0 for n in outbound), outbound
    assert sum(plaintext) == CONNECTIONS and all(n > 0 for n in plaintext), plaintext
    # Tunnels follow their pooled HBONE connection, wherever the kernel put it.
    assert sum(tunnels) == CONNECTIONS, tunnels


def test_one_certificate_fetch_per_identity(cluster: DevCluster,
                                            pods: dict[str, PodInfo]) -> None:
    """The parent fetched the server's certificate once and every worker serves that one."""
    node2 = cluster.node(2)
    status, body = mesh.http_get(node2.netns, f"{ADMIN}/config_dump")
    assert status == 200, body
    identity = f"spiffe://cluster.local/ns/default/sa/{pods['server'].service_account}"
    held = [(c["worker"], c["serial"]) for c in json.loads(body)["certificates"]
            if c["identity"] == identity]
    assert sorted(w for w, _ in held) == list(range(len(workers(node2)))), held
    assert len({serial for _, serial in held}) == 1, held


def test_killed_worker_is_restarted_without_losing_connections(
        cluster: DevCluster, pods: dict[str, PodInfo]) -> None:
    c = cluster
    node1 = c.node(1)
    victim = workers(node1)[1]
    assert victim["pid"] is not None
    os.kill(victim["pid"], signal.SIGKILL)
    # Connections made while it is down: those hashed to its socket wait in that socket's
    # queue (the parent holds it) until the new worker accepts them.
    assert connect_many(c, pods["client"], pods["server"], 20) == 20
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = workers(node1)[1]
        if now["ready"] and now["pid"] not in (None, victim["pid"]):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"worker 1 not restarted: {workers(node1)}")
    assert now["restarts"] == victim["restarts"] + 1
    status, body = mesh.http_get(node1.netns, "http://127.0.0.1:15021/healthz/ready")
    assert status == 200, body
    assert connect_many(c, pods["client"], pods["server"], 20) == 20

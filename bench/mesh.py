"""The system under test: one ambit ztunnel per node namespace, pods captured with TPROXY.

Why it looks like this: it is how the mesh runs for real in node mode. The client dials the
server pod's own IP and port, exactly as in the direct setup; the client node's TPROXY rules
steer that connection into its ztunnel (15001), which opens HBONE (HTTP/2 CONNECT over mutual
TLS) to the server pod's IP on the HBONE port; the server node's rules steer that into its ztunnel,
which authenticates the peer and connects to the server pod. The capture rules are the ones
the dev topology and the node agent apply (agent/capture/iptables.py via
ambit.dev.topology), inside the benchmark's own node namespaces only.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import yaml

from ambit.dev.mesh import ambit_command
from bench.procs import BenchError, Proc, ProcessSet, in_netns, ns_http_get, wait_until
from bench.topo import Topology
from mesh.ports import METRICS_PORT, READINESS_PORT

NODE_NAMES = {"client-node": "node-1", "server-node": "node-2"}


def check_runnable() -> None:
    """Fail before building anything when the ztunnel cannot start at all."""
    for module in ("ztunnel.app", "agent.capture.iptables"):
        if importlib.util.find_spec(module) is None:
            raise BenchError(f"ambit ztunnel not runnable: module {module} does not exist yet")


def state_document(client_ip: str, server_ip: str, client_id: tuple[str, str],
                   server_id: tuple[str, str]) -> dict[str, Any]:
    """Mesh state (docs/state-file.md): two HBONE workloads, one on each node, no policy."""
    return {
        "trustDomain": "cluster.local",
        "workloads": [
            {"name": "bench-client", "namespace": client_id[0], "serviceAccount": client_id[1],
             "node": NODE_NAMES["client-node"], "addresses": [client_ip],
             "labels": {"app": "bench-client"}, "protocol": "HBONE"},
            {"name": "bench-server", "namespace": server_id[0], "serviceAccount": server_id[1],
             "node": NODE_NAMES["server-node"], "addresses": [server_ip],
             "labels": {"app": "bench-server"}, "protocol": "HBONE"},
        ],
    }


def _ready(ns: str) -> bool:
    return ns_http_get(ns, f"http://127.0.0.1:{READINESS_PORT}/healthz/ready") is not None


def start_ztunnels(procs: ProcessSet, topo: Topology, certs: Path, work: Path,
                   client_id: tuple[str, str], server_id: tuple[str, str]) -> dict[str, Proc]:
    """Capture on both nodes, start both ztunnels, wait for /healthz/ready on each."""
    check_runnable()
    a = topo.addrs
    state = work / "ambit-state.yaml"
    state.write_text(yaml.safe_dump(state_document(a.client, a.server, client_id, server_id),
                                    sort_keys=False))
    topo.enable_capture()
    proxies: dict[str, Proc] = {}
    for role in ("server-node", "client-node"):
        ns = topo.ns[role]
        proxies[role] = procs.start(f"ztunnel-{NODE_NAMES[role]}", in_netns(ns, [
            *ambit_command(), "ztunnel", "--node", NODE_NAMES[role], "--state", str(state),
            "--identity-dir", str(certs), "--inbound-bind", "shared"]))
    for role, proc in proxies.items():
        ns = topo.ns[role]
        wait_until(f"ztunnel {NODE_NAMES[role]} /healthz/ready", proc,
                   functools.partial(_ready, ns), timeout=30, interval=0.2)
    return proxies


def connections_opened(ns: str) -> float:
    """Sum of ``istio_tcp_connections_opened_total`` on the ztunnel of node namespace ``ns``."""
    body = ns_http_get(ns, f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=3)
    if body is None:
        raise BenchError(f"cannot read the ztunnel's metrics in {ns}")
    total = 0.0
    for line in body.splitlines():
        if line.startswith("istio_tcp_connections_opened_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def verify_proxied(topo: Topology, expected: int) -> None:
    """Prove the measured traffic went through both ztunnels, not around them.

    Without this, broken capture would silently measure the direct path and report it as the
    ztunnel's numbers.
    """
    for role in ("client-node", "server-node"):
        seen = connections_opened(topo.ns[role])
        if seen < expected:
            raise BenchError(
                f"ztunnel {NODE_NAMES[role]} proxied {seen:g} connections, expected at least "
                f"{expected}: traffic bypassed the ztunnel (is capture working?)")

"""The system under test: one ambit ztunnel per node namespace, pods captured with TPROXY.

Why it looks like this: it is how the mesh runs for real in node mode. The client dials the
server pod's own IP and port, exactly as in the direct setup; the client node's TPROXY rules
steer that connection into its ztunnel (15001), which opens HBONE (HTTP/2 CONNECT over mutual
TLS) to the server pod's IP on the HBONE port; the server node's rules steer that into its ztunnel,
which authenticates the peer and connects to the server pod. The capture rules are the ones
the dev topology and the node agent apply (agent/capture/iptables.py via
ambit.dev.topology), inside the benchmark's own node namespaces only.

Two knobs make the comparison with Envoy like for like, and both are stated in the table:
``--workers 1`` (when the ztunnel has the flag; its default is max(2, a quarter of the cores))
matches Envoy's ``--concurrency 1`` outside the workers phase, and the ztunnels' TLS 1.3 suites
are restricted with an ``OPENSSL_CONF`` file (Python 3.11's ``ssl`` has no setter for TLS 1.3
suites, so the process's OpenSSL configuration is the only handle that needs no ztunnel code
change), because OpenSSL's server preference would otherwise pick AES-256-GCM while BoringSSL
picks AES-128-GCM. bench/tlsprobe.py checks what was negotiated.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import yaml

from ambit.dev.mesh import ambit_command
from bench.procs import BenchError, Proc, ProcessSet, in_netns, ns_http_get, run, wait_until
from bench.topo import Topology
from mesh.ports import METRICS_PORT, READINESS_PORT

NODE_NAMES = {"client-node": "node-1", "server-node": "node-2"}


def check_runnable() -> None:
    """Fail before building anything when the ztunnel cannot start at all."""
    for module in ("ztunnel.app", "agent.capture.iptables"):
        if importlib.util.find_spec(module) is None:
            raise BenchError(f"ambit ztunnel not runnable: module {module} does not exist yet")


@functools.cache
def workers_supported() -> bool:
    """Whether this ztunnel accepts ``--workers`` (multi-process data path, issue 14 P7)."""
    try:
        return "--workers" in run([*ambit_command(), "ztunnel", "--help"], timeout=60)
    except BenchError:
        return False


def openssl_conf(path: Path, tls13_suites: str) -> Path:
    """An OpenSSL config whose system default restricts TLS 1.3 to ``tls13_suites``.

    OpenSSL reads it (``OPENSSL_CONF``) when libssl initialises, and applies the
    ``system_default`` section to every SSL_CTX the process creates, Python's included.
    """
    path.write_text(
        "openssl_conf = openssl_init\n"
        "[openssl_init]\nssl_conf = ssl_sect\n"
        "[ssl_sect]\nsystem_default = system_default_sect\n"
        "[system_default_sect]\n"
        "MinProtocol = TLSv1.2\n"
        f"Ciphersuites = {tls13_suites}\n")
    return path


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
                   client_id: tuple[str, str], server_id: tuple[str, str],
                   workers: int | None = None,
                   tls13_suites: str | None = None) -> dict[str, Proc]:
    """Capture on both nodes, start both ztunnels, wait for /healthz/ready on each.

    ``workers``: pass ``--workers N`` (None: leave the flag out, for a ztunnel without it).
    ``tls13_suites``: restrict TLS 1.3 suites via ``OPENSSL_CONF`` (None: OpenSSL's default).
    """
    check_runnable()
    extra = [] if workers is None else ["--workers", str(workers)]
    env = None
    if tls13_suites:
        env = {**os.environ, "OPENSSL_CONF": str(openssl_conf(work / "ztunnel-openssl.cnf",
                                                              tls13_suites))}
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
            "--identity-dir", str(certs), "--inbound-bind", "shared", *extra]), env=env)
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

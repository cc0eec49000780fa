"""The system under test: one ambit ztunnel per node namespace, pods captured by TPROXY, eBPF or
in-pod rules.

Why it looks like this: it is how the mesh runs for real in node mode. The client dials the
server pod's own IP and port, exactly as in the direct setup; the client node's TPROXY rules
steer that connection into its ztunnel (15001), which opens HBONE (HTTP/2 CONNECT over mutual
TLS) to the server pod's IP on the HBONE port; the server node's rules steer that into its ztunnel,
which authenticates the peer and connects to the server pod. The capture rules are the ones
the dev topology and the node agent apply (agent/capture/iptables.py via
ambit.dev.topology), inside the benchmark's own node namespaces only. With ``capture="ebpf"``
(the ``ambit-ebpf`` setup) the agent's eBPF programs do the steering instead: bench/ebpf_node.py
loads them in each node namespace (pinned maps in a bpffs of the run's own) and serves the
agent's ztunnel link, and the ztunnel hands its listeners over with ``--agent-socket``. With
``capture="inpod"`` (the ``ambit-inpod`` setup) nothing steers in the node namespaces at all:
bench/inpod_node.py serves the agent's link in each node namespace, hands the node's pod
namespace to the ztunnel (which opens that pod's listeners inside it) and puts the agent's
REDIRECT rules inside the pod.

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
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from ambit.dev.mesh import ambit_command
from bench.procs import BenchError, Proc, ProcessSet, in_netns, ns_http_get, run, wait_until
from bench.topo import Topology
from mesh.ports import METRICS_PORT, READINESS_PORT

NODE_NAMES = {"client-node": "node-1", "server-node": "node-2"}


CAPTURES = ("iptables", "ebpf", "inpod")
NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps the bench pods' namespaces
REPO_ROOT = Path(__file__).resolve().parent.parent


def check_runnable(capture: str = "iptables") -> None:
    """Fail before building anything when the ztunnel (or the eBPF capture) cannot start."""
    for module in ("ztunnel.app", "agent.capture.iptables"):
        if importlib.util.find_spec(module) is None:
            raise BenchError(f"ambit ztunnel not runnable: module {module} does not exist yet")
    if capture == "ebpf":
        from agent.capture.ebpf_support import ebpf_unavailable_reason

        reason = ebpf_unavailable_reason()
        if reason is not None:
            raise BenchError(f"eBPF capture unavailable: {reason} (run `make bench`, whose "
                             "setup installs bcc and links the kernel headers)")
    if capture == "inpod":
        # The agent's in-pod backend runs iptables inside each pod through nsenter.
        for tool in ("nsenter", "iptables", "iptables-restore"):
            if shutil.which(tool) is None:
                raise BenchError(f"in-pod capture unavailable: {tool} not found (util-linux, "
                                 "iptables)")


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


def _mount_bpffs(topo: Topology, work: Path) -> Path:
    """A bpffs of this run's own: /sys/fs/bpf may be absent, and ``ip netns exec`` remounts
    /sys, so one under it would be invisible in the node namespaces. Unmounted after the
    topology is destroyed (the programs that used its maps go with the namespaces)."""
    mnt = work / f"bpffs-{os.getpid()}"
    mnt.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "bpf", "bpf", str(mnt)])

    def unmount() -> None:
        if os.path.ismount(mnt):
            run(["umount", str(mnt)], check=False)
        if os.path.ismount(mnt):
            run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()

    topo.after_destroy(unmount)
    return mnt


def enable_ebpf_capture(procs: ProcessSet, topo: Topology, work: Path) -> dict[str, Path]:
    """The agent's eBPF programs in both node namespaces, each node's pod enrolled; returns the
    ztunnel link socket per node role, for ``--agent-socket``."""
    bpffs = _mount_bpffs(topo, work)
    sockets: dict[str, Path] = {}
    drivers: dict[str, tuple[Proc, Path]] = {}
    for role in ("server-node", "client-node"):
        node = NODE_NAMES[role]
        ready = work / f"ebpf-{node}.json"
        ready.unlink(missing_ok=True)
        ready.with_suffix(".registered").unlink(missing_ok=True)
        sockets[role] = work / f"ztunnel-{node}.sock"
        pods = [f"{p.name}={p.ip}={p.host_iface}" for p in topo.pods_on(role)]
        argv = [sys.executable, "-m", "bench.ebpf_node", "--bpf-dir", str(bpffs / node),
                "--uplink", "eth0", "--socket", str(sockets[role]), "--ready", str(ready),
                *(a for spec in pods for a in ("--pod", spec))]
        # Both nodes compile their programs at once (clang takes about a second a program).
        drivers[role] = (procs.start(f"ebpf-{node}", in_netns(topo.ns[role], argv),
                                     cwd=REPO_ROOT), ready)
    for role, (proc, ready) in drivers.items():
        wait_until(f"eBPF capture on {NODE_NAMES[role]}", proc, ready.exists, timeout=90,
                   interval=0.2)
    return sockets


def enable_inpod_capture(procs: ProcessSet, topo: Topology, work: Path,
                         ) -> tuple[dict[str, Path], dict[str, tuple[Proc, Path]]]:
    """The agent's in-pod part in both node namespaces (bench/inpod_node.py), listening for
    its ztunnel; returns the link socket per node role (for ``--agent-socket``) and each
    driver with the file it writes once its pods are handed over and enrolled. The
    enrolment itself waits for the ztunnel (``wait_inpod_enrolled``)."""
    sockets: dict[str, Path] = {}
    drivers: dict[str, tuple[Proc, Path]] = {}
    for role in ("server-node", "client-node"):
        node = NODE_NAMES[role]
        ready = work / f"inpod-{node}.json"
        for stale in (ready, ready.with_suffix(".listening")):
            stale.unlink(missing_ok=True)
        sockets[role] = work / f"ztunnel-{node}.sock"
        # uid as the agent names a pod (namespace/name, the state file's workload).
        pods = [f"bench/bench-{p.name}={p.ip}={NETNS_DIR / p.netns}" for p in topo.pods_on(role)]
        argv = [sys.executable, "-m", "bench.inpod_node", "--socket", str(sockets[role]),
                "--ready", str(ready), *(a for spec in pods for a in ("--pod", spec))]
        drivers[role] = (procs.start(f"inpod-{node}", in_netns(topo.ns[role], argv),
                                     cwd=REPO_ROOT), ready)
    for role, (proc, ready) in drivers.items():
        wait_until(f"in-pod agent link on {NODE_NAMES[role]}", proc,
                   ready.with_suffix(".listening").exists, timeout=30, interval=0.1)
    return sockets, drivers


def _registered(work: Path, node: str) -> bool:
    return (work / f"ebpf-{node}.registered").exists()


def _ready(ns: str) -> bool:
    return ns_http_get(ns, f"http://127.0.0.1:{READINESS_PORT}/healthz/ready") is not None


def start_ztunnels(procs: ProcessSet, topo: Topology, certs: Path, work: Path,
                   client_id: tuple[str, str], server_id: tuple[str, str],
                   workers: int | None = None,
                   tls13_suites: str | None = None,
                   capture: str = "iptables") -> dict[str, Proc]:
    """Capture on both nodes, start both ztunnels, wait for /healthz/ready on each.

    ``workers``: pass ``--workers N`` (None: leave the flag out, for a ztunnel without it).
    ``tls13_suites``: restrict TLS 1.3 suites via ``OPENSSL_CONF`` (None: OpenSSL's default).
    ``capture``: "iptables" (TPROXY rules), "ebpf" (the agent's tc programs and SOCKMAP) or
    "inpod" (the agent's rules inside each pod, the ztunnel's listeners in the pod's namespace).
    """
    if capture not in CAPTURES:
        raise BenchError(f"capture {capture!r}: expected one of {', '.join(CAPTURES)}")
    check_runnable(capture)
    extra = [] if workers is None else ["--workers", str(workers)]
    env = None
    if tls13_suites:
        env = {**os.environ, "OPENSSL_CONF": str(openssl_conf(work / "ztunnel-openssl.cnf",
                                                              tls13_suites))}
    a = topo.addrs
    state = work / "ambit-state.yaml"
    state.write_text(yaml.safe_dump(state_document(a.client, a.server, client_id, server_id),
                                    sort_keys=False))
    links: dict[str, Path] = {}
    inpod: dict[str, tuple[Proc, Path]] = {}
    if capture == "ebpf":
        links = enable_ebpf_capture(procs, topo, work)
    elif capture == "inpod":
        links, inpod = enable_inpod_capture(procs, topo, work)
    else:
        topo.enable_capture()
    proxies: dict[str, Proc] = {}
    for role in ("server-node", "client-node"):
        ns = topo.ns[role]
        link = ["--agent-socket", str(links[role])] if role in links else []
        proxies[role] = procs.start(f"ztunnel-{NODE_NAMES[role]}", in_netns(ns, [
            *ambit_command(), "ztunnel", "--node", NODE_NAMES[role], "--state", str(state),
            "--identity-dir", str(certs), "--inbound-bind", "shared", *link, *extra]), env=env)
    for role, proc in proxies.items():
        ns = topo.ns[role]
        wait_until(f"ztunnel {NODE_NAMES[role]} /healthz/ready", proc,
                   functools.partial(_ready, ns), timeout=30, interval=0.2)
        if role in inpod:
            # Ready is not enough here either: the pod's listeners open in its namespace when
            # the driver hands it over, and its REDIRECT rules go in after that.
            driver, enrolled = inpod[role]
            wait_until(f"pod namespaces handed to ztunnel {NODE_NAMES[role]} and enrolled",
                       driver, enrolled.exists, timeout=60, interval=0.2)
        elif role in links:
            # Ready is not enough here: until the listeners are in the SOCKMAP, captured
            # connections fail closed.
            wait_until(f"ztunnel {NODE_NAMES[role]} listeners in the SOCKMAP", proc,
                       functools.partial(_registered, work, NODE_NAMES[role]), timeout=30,
                       interval=0.2)
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

"""End to end in the local multi-node cluster, once per redirect mode (eBPF, iptables and
inpod).

Everything is the real thing: pods wired by Debian's CNI plugins with ``ambit-cni`` chained,
a node agent and a ztunnel per node, the controller in embedded mode, all inside network
namespaces that ``DevCluster`` creates and removes (never the machine's own namespace).

The same scenarios run in both modes, so the two backends cannot drift apart in semantics.
The module fixture builds one cluster per mode; tests add their own pods (unique names), so
they do not depend on each other's order, except the last one, which uninstalls a node.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambit.dev import mesh, netns
from ambit.dev.cluster import DevCluster, PodInfo, node_snapshot
from tests.e2e.clusters import dev_cluster
from tests.e2e.restarts import LONG, RATE, restart_under_load
from tests.e2e.waiting import until

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

PORT = 8080


@pytest.fixture(scope="module", params=["ebpf", "iptables", "inpod"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) \
        -> Iterator[DevCluster]:
    with dev_cluster("e2e", request.param, tmp_path_factory, plain=("plain",)) as c:
        yield c


def add(c: DevCluster, name: str, node: int, *, namespace: str = "default",
        labels: dict[str, str] | None = None, echo: bool = False) -> PodInfo:
    pod = c.add_pod(f"{name}", node, namespace=namespace, labels=labels)
    if echo:
        c.start_echo(pod.name, PORT)
    return pod


def probe(c: DevCluster, src: PodInfo, dst: PodInfo, message: str = "hello") \
        -> mesh.ProbeResult:
    return mesh.tcp_probe(src.netns, dst.ip, PORT, message)


def access(c: DevCluster, node: str) -> list[dict[str, Any]]:
    path = Path(c.node(node).run_dir) / "access.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def records(c: DevCluster, dst: PodInfo, src: PodInfo,
            listener: str = "inbound") -> list[dict[str, Any]]:
    """Access records of ``src`` -> ``dst`` on the destination's node, by listener."""
    return [r for r in access(c, dst.node) if r.get("dst") == f"{dst.ip}:{PORT}"
            and r.get("src") == src.ip and r.get("listener") == listener]


def inbound_records(c: DevCluster, dst: PodInfo, src: PodInfo) -> list[dict[str, Any]]:
    return records(c, dst, src, "inbound")


def captured(c: DevCluster, pod: PodInfo) -> bool:
    for p in c.agent_status(c.node(pod.node))["pods"]:
        if p["pod"] == f"{pod.namespace}/{pod.name}":
            return bool(p["captured"])
    return False


def ok_probe(c: DevCluster, src: PodInfo, dst: PodInfo, tries: int = 30) -> mesh.ProbeResult:
    """A new pod's certificate is fetched on its first connection; allow a few retries."""
    res = probe(c, src, dst)
    for _ in range(tries):
        if res.ok:
            break
        time.sleep(0.2)
        res = probe(c, src, dst)
    assert res.ok, res.error
    return res


def test_cross_node_is_hbone_mtls_on_the_wire(cluster: DevCluster) -> None:
    c = cluster
    client, server = add(c, "xclient", 1), add(c, "xserver", 2, echo=True)
    assert captured(c, client) and captured(c, server)
    ok_probe(c, client, server)  # warm up: certificates, pooled HBONE connection
    secret = f"top-secret-{uuid.uuid4().hex}"
    pcap = c.dir / "wire.pcap"
    # tshark on the cluster network's bridge: every byte between the nodes passes there.
    tshark = subprocess.Popen(netns.ns_argv(c.net_ns, [
        "tshark", "-q", "-i", "br0", "-f", "tcp", "-w", str(pcap)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        until(lambda: pcap.exists() and pcap.stat().st_size > 0, 15, "tshark to start")
        res = probe(c, client, server, secret)
        assert res.ok and res.answer is not None and res.answer["data"] == secret
        time.sleep(0.5)
    finally:
        tshark.terminate()
        tshark.wait(10)
    raw = pcap.read_bytes()
    assert secret.encode() not in raw, "plaintext payload seen on the cluster network"
    fields = subprocess.run(["tshark", "-r", str(pcap), "-o", "tls.keylog_file:",
                             "-d", "tcp.port==15008,tls", "-Y", "tls.record",
                             "-T", "fields", "-e", "tcp.dstport", "-e", "tcp.srcport"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    ports = {p for line in fields.splitlines() for p in line.split()}
    assert "15008" in ports, f"no TLS records on port 15008 in the capture: {fields[:500]}"
    plain = subprocess.run(["tshark", "-r", str(pcap), "-Y", f"tcp.port=={PORT}"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert plain.strip() == "", f"traffic to port {PORT} crossed nodes unencrypted:\n{plain}"
    rec = until(lambda: inbound_records(c, server, client), 5, "the inbound access record")[-1]
    assert rec["mtls"] is True
    assert rec["src_identity"] == "spiffe://cluster.local/ns/default/sa/xclient"
    # The server's view of its peer: the client pod in-pod (issue 15), the node otherwise.
    assert (res.peer_ip == client.ip) == (c.redirect_mode == "inpod"), res


def test_same_node_goes_through_the_ztunnel_with_policy(cluster: DevCluster) -> None:
    c = cluster
    a, b, srv = add(c, "sa", 1), add(c, "sb", 1), add(c, "ssrv", 1, echo=True)
    # Positive control: before the policy, sb reaches the server (through its ztunnel).
    ok_probe(c, b, srv)
    until(lambda: [r for r in records(c, srv, b, "outbound") if r["outcome"] == "ok"],
          5, "sb's same-node outbound record before the policy")
    c.apply([{"apiVersion": "security.ambit.dev/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "deny-sb", "namespace": "default"},
              "spec": {"selector": {"matchLabels": {"app": "ssrv"}}, "action": "DENY",
                       "rules": [{"from": [{"source": {"principals": [
                           "cluster.local/ns/default/sa/sb"]}}]}]}}])
    res = ok_probe(c, a, srv)
    # Same node: the outbound listener enforces the destination's policy and delivers
    # directly (Istio's local fast path); the server sees the node, not the client, except
    # in-pod, where the ztunnel connects from inside the server's pod as the client.
    assert (res.peer_ip == a.ip) == (c.redirect_mode == "inpod"), res
    rec = until(lambda: [r for r in records(c, srv, a, "outbound") if r["outcome"] == "ok"],
                5, "a same-node outbound record")[-1]
    assert rec["plan"] == "local"

    def refused_with_its_record() -> tuple[mesh.ProbeResult, list[dict[str, Any]]] | None:
        before = len(records(c, srv, b, "outbound"))
        res = probe(c, b, srv)
        if res.ok:
            return None  # the policy has not reached the ztunnel yet
        new = until(lambda: records(c, srv, b, "outbound")[before:], 5,
                    "the refused connection's access record")
        return res, new

    res, new = until(refused_with_its_record, 10, "the DENY policy to apply")
    # The refusal is the policy's doing, not some other failure: one record, a denial by it.
    assert len(new) == 1, new
    denied = new[0]
    assert denied["outcome"] == "denied", denied
    assert denied["response_flags"] == "DENY", denied
    assert denied["policy"] == "default/deny-sb", denied
    assert denied["reason"] == "denied by DENY policy default/deny-sb", denied
    assert denied["src_identity"] == "spiffe://cluster.local/ns/default/sa/sb", denied
    assert res.answer is None and res.error, res

    # ... and the ztunnel counts it as Istio does: opened with response_flags="DENY".
    def denied_opened() -> float:
        return sum(float(ln.rsplit(" ", 1)[1])
                   for ln in c.node_metrics(c.node(srv.node)).splitlines()
                   if ln.startswith("istio_tcp_connections_opened_total{")
                   and 'response_flags="DENY"' in ln
                   and 'source_principal="spiffe://cluster.local/ns/default/sa/sb"' in ln)

    until(lambda: denied_opened() >= 1, 15, "the DENY-flagged connection metric")


def test_pods_outside_the_mesh_are_untouched(cluster: DevCluster) -> None:
    c = cluster
    pc, ps = add(c, "pc", 1, namespace="plain"), add(c, "ps", 2, namespace="plain", echo=True)
    assert not captured(c, pc) and not captured(c, ps)
    res = probe(c, pc, ps)
    assert res.ok, res.error
    assert res.peer_ip == pc.ip, "the server should see the client itself, not a proxy"
    assert not [r for r in access(c, pc.node) + access(c, ps.node) if r.get("src") == pc.ip]


def test_opt_out_label_and_namespace_enabled_later(cluster: DevCluster) -> None:
    c = cluster
    target = add(c, "optsrv", 2, namespace="plain", echo=True)
    out = add(c, "optout", 1, labels={"app": "optout", "ambit.dev/dataplane-mode": "none"})
    assert not captured(c, out)
    res = probe(c, out, target)
    assert res.ok and res.peer_ip == out.ip
    # Removing the opt-out label puts it in the mesh: the agent reconciles from the push.
    c.set_pod_labels("optout", {"app": "optout"})
    until(lambda: captured(c, out), 10, "the agent to capture the pod after the label change")
    res = ok_probe(c, out, target)
    # Passthrough through the node's ztunnel: it leaves from the node, in-pod from the pod.
    assert (res.peer_ip == out.ip) == (c.redirect_mode == "inpod"), res
    assert until(lambda: [r for r in access(c, out.node) if r.get("src") == out.ip], 5,
                 "an outbound access record")
    # A namespace enabled later: its running pod is captured without a restart.
    late = add(c, "latepod", 1, namespace="late")
    assert not captured(c, late)
    c.set_namespace("late", ambient=True)
    until(lambda: captured(c, late), 10, "the pod of a newly enabled namespace")


def test_agent_restart_keeps_connections_and_adopts_pods(cluster: DevCluster) -> None:
    c = cluster
    client, server = add(c, "rclient", 1), add(c, "rserver", 2, echo=True)
    ok_probe(c, client, server)
    release = c.dir / f"release-{uuid.uuid4().hex}"
    hold = subprocess.Popen(netns.ns_argv(client.netns, [
        mesh.PYTHON, "-m", "ambit.dev.probe", "hold", server.ip, str(PORT), "--until",
        str(release), "--timeout", "60"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert hold.stdout is not None
        first = json.loads(hold.stdout.readline())
        assert first["data"] == "first"
        node1 = c.node(1)
        c.restart_agent(node1)
        c.restart_agent(c.node(2))
        # The agent also forgets its records (a lost run dir): it re-finds its pods from the
        # registry and the routing table.
        c.stop(f"agent/{node1.name}")
        (Path(node1.run_dir) / "pods.json").unlink()
        c.start_agent(node1)
        release.touch()
        out, err = hold.communicate(timeout=30)
        assert hold.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["data"] == "second"
    finally:
        if hold.poll() is None:
            hold.kill()
    ok_probe(c, client, server)  # new connections after the restarts
    until(lambda: captured(c, client), 10, "the adopted pod to show as captured")
    pods = {p["pod"]: p for p in c.agent_status(c.node(1))["pods"]}
    assert "found on the node" in pods["default/rclient"]["reason"]


def test_node_metrics_endpoint(cluster: DevCluster) -> None:
    c = cluster
    client, server = add(c, "mclient", 1), add(c, "mserver", 2, echo=True)
    ok_probe(c, client, server)
    # The agent learns the ztunnel's pid from its link, which the ztunnel re-opens (with
    # backoff) after an agent restart in an earlier test: allow it a moment.
    def with_ztunnel() -> str | None:
        t = c.node_metrics(c.node(1))
        return t if 'ambit_process_up{component="ztunnel"} 1.0' in t else None

    text = until(with_ztunnel, timeout=15, what="the ztunnel's link to the agent")
    assert "istio_tcp_connections_opened_total" in text  # the ztunnel's, merged
    assert 'ambit_process_up{component="agent"} 1.0' in text
    assert "ambit_process_resident_memory_bytes" in text
    line = next(ln for ln in text.splitlines()
                if ln.startswith("ambit_capture_connections_total{")
                and f'pod_ip="{client.ip}"' in ln)
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert f'redirect_mode="{c.redirect_mode}"' in text


def test_agent_status_command(cluster: DevCluster) -> None:
    c = cluster
    pod = add(c, "stpod", 1)
    out = netns.ns_run(c.node(1).netns, [*mesh.ambit_command(), "agent", "status", "--url",
                                         "http://127.0.0.1:15022"])
    assert f"redirect mode {c.redirect_mode}" in out and "ready" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("default/stpod"))
    assert pod.ip in line and pod.host_iface in line and " yes " in line
    if c.redirect_mode == "ebpf":
        assert "listeners: " in out and "missing" not in out

def test_agent_stays_small_without_bcc_in_process(cluster: DevCluster) -> None:
    """In eBPF mode bcc and its clang/LLVM run in the short-lived loader process only: the
    agent has no libbcc mapped and its RSS stays near iptables mode's (~70 MB, against
    ~220 MB when it compiled in process)."""
    c = cluster
    for node in c.nodes:
        pid = c.process(f"agent/{node.name}").pid
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "python" in Path(f"/proc/{pid}/cmdline").read_text()  # the agent itself
        assert "libbcc" not in maps and "libLLVM" not in maps, f"{node.name}: bcc mapped"
        text = c.node_metrics(node)
        rss = next(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith('ambit_process_resident_memory_bytes{component="agent"}'))
        assert rss < 120 * 2**20, f"{node.name}: agent RSS {rss / 2**20:.0f} MB"


def test_kubelet_probes_from_the_node_are_not_captured(cluster: DevCluster) -> None:
    c = cluster
    server = add(c, "kprobe", 1, echo=True)
    node = c.node(server.node)
    res = mesh.tcp_probe(node.netns, server.ip, PORT, "healthz")
    assert res.ok, res.error
    # The node itself connected (from the pod gateway address ptp gives the host veth), and
    # no ztunnel listener saw it.
    assert res.peer_ip.startswith("10.244.1.")
    assert not [r for r in access(c, node.name) if r.get("dst") == f"{server.ip}:{PORT}"]


def test_captured_pods_never_reach_the_nodes_own_ports(cluster: DevCluster) -> None:
    """A mesh pod's connection to its node's address on the mesh's own ports is captured like
    any other and refused by the ztunnel as a denial: nothing reaches the agent's 15022
    (bound on every address) or loops into the ztunnel's own 15008 (0.0.0.0)."""
    c = cluster
    pod, server = add(c, "ownports", 1), add(c, "ownsrv", 2, echo=True)
    node = c.node(pod.node)
    status, _ = mesh.http_get(node.netns, f"http://{node.ip}:15022/healthz/ready")
    assert status == 200  # it is there, for the node
    for port in (15022, 15008, 15000):
        status, body = mesh.http_get(pod.netns, f"http://{node.ip}:{port}/metrics", timeout=3)
        assert status is None, (port, status, body[:200])

    def denied() -> set[str] | None:
        got = {r["dst"] for r in access(c, node.name) if r.get("src") == pod.ip
               and r.get("outcome") == "denied" and r.get("policy") == "node-protection"}
        return got if len(got) == 3 else None

    assert until(denied, timeout=5, what="the denials in the access log") == {
        f"{node.ip}:{port}" for port in (15022, 15008, 15000)}
    ok_probe(c, pod, server)  # the pod's other traffic is untouched


def test_ztunnel_restart_loses_no_connection(cluster: DevCluster) -> None:
    """Issue 15: each node's ztunnel replaced under 50 new connections a second and 5
    long-lived ones (client on node-1, server on node-2): no new connection refused or failed,
    the long-lived ones survive (they end within the old ztunnel's drain period), the
    replacement took the listeners over from the agent, and no stream was lost on the way
    (the HBONE pool keeps to the peer's stream limit when it reconnects)."""
    c = cluster
    client, server = add(c, "zrclient", 1), add(c, "zrserver", 2, echo=True)
    ok_probe(c, client, server)
    for node in (c.node(1), c.node(2)):  # the client's side, then the server's
        before = c.agent_status(node)["ztunnelTakeovers"]
        r = restart_under_load(c, client, server, node, PORT)
        new = r.load["new"]
        print(f"\n{c.redirect_mode} {node.name}: restart {r.took_s:.1f}s; new connections "
              f"{new['ok']} ok, {new['failed']} failed, p99 {new['p99_ms']} ms, max "
              f"{new['max_ms']} ms; long-lived {r.load['long']['ok']}/{LONG} kept")
        assert not r.problems(), "\n".join(r.problems())
        assert new["ok"] >= RATE * 10 and r.load["long"]["ok"] == LONG, r.load
        status = c.agent_status(node)
        assert status["ztunnelTakeovers"] == before + 1, status
        assert status["ztunnelPid"] == c.process(f"ztunnel/{node.name}").pid, status
    ok_probe(c, client, server)


def test_a_cni_that_owns_the_host_veth(cluster: DevCluster) -> None:
    """Issue 15: a stand-in for a CNI that owns the pods' host-side veths (Cilium, Calico
    eBPF): its own direct-action tc program on the client's host veth, ahead of everything
    (``ambit.dev.standin_cni``: prio 1, returns TC_ACT_OK, so the packet goes on and no later
    tc filter sees it). In-pod capture lives inside the pod and iptables TPROXY runs after tc,
    so both keep carrying the client's connections over HBONE; node-level eBPF never sees
    them, and the agent's status says so."""
    c = cluster
    client, server = add(c, "vclient", 1), add(c, "vserver", 2, echo=True)
    ok_probe(c, client, server)
    node = c.node(1)
    netns.ns_run(node.netns, [mesh.PYTHON, "-m", "ambit.dev.standin_cni", client.host_iface])
    try:
        before = len(inbound_records(c, server, client))
        res = ok_probe(c, client, server)
        time.sleep(1.0)  # the access log line of an HBONE tunnel, if there is one
        over_hbone = len(inbound_records(c, server, client)) > before
        if c.redirect_mode == "ebpf":
            # Uncaptured at its source: it reached node-2 in plaintext (its uplink program
            # still takes it to 15006), never over HBONE.
            assert not over_hbone, f"the stand-in's filter should keep capture away: {res}"

            def preempted() -> str:
                return str(c.agent_status(node)["capture"].get("preempted", ""))

            said = until(lambda: client.host_iface in preempted() and preempted(), 15,
                         "the agent's status to name the preempted veth")
            assert "bpf (prio 1)" in said and "inpod" in said
        else:
            assert over_hbone, f"{c.redirect_mode}: not carried over HBONE any more"
    finally:
        c.delete_pod(client.name)
        c.delete_pod(server.name)


def test_uninstall_leaves_the_node_as_it_was(cluster: DevCluster) -> None:
    """Last in the module: node-2 loses its agent and capture."""
    c = cluster
    node = c.node(2)
    for pod in [p for p in c.pods.values() if p.node == node.name]:
        c.delete_pod(pod.name)
    c.stop(f"agent/{node.name}")
    c.stop(f"ztunnel/{node.name}")
    netns.ns_run(node.netns, [*mesh.ambit_command(), "agent", "uninstall", "--run-dir",
                              node.run_dir, "--bpf-dir", node.bpf_dir, "--uplink", "eth0"])
    after = node_snapshot(node.netns)
    assert after == c.baseline[node.name]
    assert not Path(node.bpf_dir).exists() or not any(Path(node.bpf_dir).iterdir())

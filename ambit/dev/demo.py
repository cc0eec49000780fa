"""``ambit dev demo``: a two-node mesh on this machine, showing what Ambit does in a minute.

Why it exists: it is the quickest end-to-end proof that the pieces fit: the controller, pods
enrolled through the CNI plugin, capture by the node agent (eBPF where the kernel allows, else
iptables), HBONE between the ztunnels of two nodes, L4 authorization by SPIFFE identity, and
the node metrics. It runs on the local dev cluster (``ambit.dev.cluster``), all in network
namespaces that are not connected to the machine's own network.

The scene: ``client`` and ``denied`` pods on node-1, an echo ``server`` pod on node-2, and an
AuthorizationPolicy that lets only the client's identity reach the server. The demo prints each
step, checks each outcome and exits non-zero if one is wrong. Then L7: a waypoint (the real
Envoy) for service ``web``, with an HTTPRoute (header match, 80/20 split) and an L7 DENY.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambit.dashboard import launch as dashboard_launch
from ambit.dev import mesh, netns
from ambit.dev.cluster import STATE_ROOT, ClusterError, DevCluster
from mesh.ports import NODE_METRICS_PORT

NAMESPACE = "default"
TRUST_DOMAIN = "cluster.local"
SERVER_PORT = 8080
# Metric families worth showing; the rest of /metrics is process noise for a demo.
SHOWN_METRICS = (
    "istio_tcp_connections_opened",
    "istio_tcp_connections_closed",
    "ambit_ztunnel_policy_denied",
    "istio_tcp_sent_bytes",
)

Out = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass
class Checks:
    """The demo's verdicts, printed as they happen and summarised at the end."""

    out: Out
    results: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.results.append((name, ok, detail))
        self.out(f"    {'ok  ' if ok else 'FAIL'} {name}: {detail}")

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.results)


# Of Istio's many labels, the ones that tell the story on one line.
SHOWN_LABELS = ("pod_name", "component", "reporter", "source_workload",
                "destination_workload", "response_code", "response_flags", "direction",
                "policy")  # fmt: skip
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _metric_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith(SHOWN_METRICS) and "_created" not in line
    ]


def _compact(line: str) -> str:
    """``name{a="1",...} v`` with only the labels in ``SHOWN_LABELS``."""
    m = _SAMPLE.match(line)
    if not m:
        return line
    labels = dict(_LABEL.findall(m.group("labels") or ""))
    kept = ",".join(f"{k}={labels[k]}" for k in SHOWN_LABELS if k in labels)
    return f"{m.group('name')}{{{kept}}} {m.group('value')}"


def _access_records(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


ALLOW_CLIENT = {
    "apiVersion": "security.ambit.dev/v1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "allow-client", "namespace": NAMESPACE},
    "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
             "rules": [{"from": [{"source": {
                 "principals": [f"{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/client"]}}]}]},
}
CAPTURE_METRICS = ("ambit_capture_connections_total", "ambit_process_resident_memory_bytes")


def _probe_until_ok(ns: str, host: str, message: str, tries: int = 25) -> mesh.ProbeResult:
    res = mesh.tcp_probe(ns, host, SERVER_PORT, message)
    for _ in range(tries):  # a new pod's certificate is fetched on its first connection
        if res.ok:
            break
        time.sleep(0.2)
        res = mesh.tcp_probe(ns, host, SERVER_PORT, message)
    return res


def run(workdir: Path, keep: bool = False, out: Out = _print, redirect_mode: str = "inpod",
        name: str = "demo") -> int:
    """Build, exercise and (unless ``keep``) tear down the demo mesh; 0 if every check passed."""
    checks = Checks(out)
    cluster = DevCluster(name, nodes=2, redirect_mode=redirect_mode, root=workdir,
                         out=lambda line: out(f"    {line}"))
    try:
        out("[1/7] a 2-node cluster in network namespaces: controller, and a ztunnel and a "
            "node agent per node")
        cluster.up()
        out("[2/7] namespace default joins the mesh; pods are created through CNI "
            "(ptp + host-local, then ambit-cni)")
        cluster.set_namespace(NAMESPACE, ambient=True)
        client = cluster.add_pod("client", "node-1")
        denied = cluster.add_pod("denied", "node-1")
        server = cluster.add_pod("server", "node-2")
        cluster.start_echo("server", SERVER_PORT)
        for p in (client, denied, server):
            out(f"    pod {p.name:<7} {p.ip:<11} on {p.node} (veth {p.host_iface})")
        for node in cluster.nodes:
            st = cluster.agent_status(node)
            names = [p["pod"] for p in st["pods"] if p["captured"]]
            out(f"    {node.name} agent ({st['redirectMode']}): capturing {', '.join(names)}")

        out(f"[3/7] client -> server {server.ip}:{SERVER_PORT} (node-1 -> node-2 over HBONE)")
        res = _probe_until_ok(client.netns, server.ip, "hello from client")
        if res.ok:
            out(f"    server answered: {json.dumps(res.answer)}")
        checks.add("allowed client reaches the server", res.ok, res.error or "answered")
        if redirect_mode == "inpod":
            # In-pod redirection: the ztunnels' connections leave from inside the pods, so the
            # server's view of its peer is the client pod itself, not node-1.
            seen = res.peer_ip if res.ok else "(no answer)"
            checks.add("the server sees the client pod's IP", seen == client.ip,
                       f"server saw {seen}, client is {client.ip}")
        access2 = Path(cluster.node("node-2").run_dir) / "access.jsonl"
        deadline = time.monotonic() + 3
        inbound: list[dict[str, Any]] = []
        while not inbound and time.monotonic() < deadline:
            inbound = [r for r in _access_records(access2)
                       if r.get("dst") == f"{server.ip}:{SERVER_PORT}"
                       and r.get("outcome") == "ok" and r.get("listener") == "inbound"]
            time.sleep(0.1)
        checks.add(
            "node-2 ztunnel received it over mTLS (inbound access log)",
            bool(inbound) and inbound[-1].get("mtls") is True,
            json.dumps({k: inbound[-1].get(k) for k in ("listener", "src_identity", "mtls")})
            if inbound else f"no 'ok' inbound record for {server.ip}:{SERVER_PORT} in {access2}",
        )

        out("[4/7] policy allow-client: only the client's identity may call the server")
        cluster.apply([ALLOW_CLIENT])
        deadline = time.monotonic() + 5
        res = mesh.tcp_probe(denied.netns, server.ip, SERVER_PORT, "hello from denied")
        while res.ok and time.monotonic() < deadline:
            time.sleep(0.2)
            res = mesh.tcp_probe(denied.netns, server.ip, SERVER_PORT, "hello from denied")
        checks.add("denied client is refused", not res.ok,
                   f"refused ({res.error})" if not res.ok else f"UNEXPECTED answer {res.answer}")
        res = _probe_until_ok(client.netns, server.ip, "hello again")
        checks.add("the client still gets through", res.ok, res.error or "answered")

        out(f"[5/7] node metrics (GET http://127.0.0.1:{NODE_METRICS_PORT}/metrics in each "
            "node: the agent's and the ztunnel's)")
        denied_count = 0.0
        for node in cluster.nodes:
            text = cluster.node_metrics(node)
            out(f"    {node.name}:")
            lines = [ln for ln in text.splitlines()
                     if ln.startswith(CAPTURE_METRICS) and "_created" not in ln]
            lines += _metric_lines(text)[:8]
            for line in lines or ["(no metrics yet)"]:
                out(f"      {_compact(line)}")
            denied_count += sum(float(ln.rsplit(" ", 1)[1]) for ln in _metric_lines(text)
                                if ln.startswith("ambit_ztunnel_policy_denied_total"))
        checks.add("the denial is counted", denied_count >= 1, f"policy_denied = {denied_count:g}")

        out("[6/7] L7: service web (v1 on node-1, v2 on node-2) gets a waypoint (Envoy, "
            "configured by the controller over xDS)")
        _waypoint_step(cluster, checks, out)

        out("")
        out(f"summary: {sum(ok for _, ok, _ in checks.results)}/{len(checks.results)} checks "
            f"passed; files in {cluster.dir}")  # fmt: skip
        for check, ok, _ in checks.results:
            out(f"  {'PASS' if ok else 'FAIL'}  {check}")
        if keep:
            out("")
            out("[7/7] --keep: the mesh is still running. Try:")
            for line in cluster.status_lines()[1:]:
                out(f"  {line}")
            for line in dashboard_launch.announce(cluster):
                out(f"  {line}")
            out(f"remove it with: ambit dev cluster down --name {name}"
                + (f"  (state in {workdir})" if workdir != STATE_ROOT else ""))
        else:
            out("[7/7] tearing down (pods via CNI DEL, agent uninstall, namespaces)")
    except BaseException:
        cluster.down(quiet=True)  # even with --keep: a half-built mesh is of no use to anyone
        raise
    if not keep:
        cluster.down(quiet=True)
    return 0 if checks.ok else 1


WEB_VIP = "10.96.0.20"
WEB_L7 = [
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
     "metadata": {"name": "web", "namespace": NAMESPACE},
     "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
              "rules": [
                  {"matches": [{"headers": [{"name": "x-version", "value": "v2"}]}],
                   "backendRefs": [{"name": "web-v2", "port": 80}]},
                  {"backendRefs": [{"name": "web-v1", "port": 80, "weight": 80},
                                   {"name": "web-v2", "port": 80, "weight": 20}]}]}},
    {"apiVersion": "security.ambit.dev/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "no-admin-writes", "namespace": NAMESPACE},
     "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                              "name": "waypoint"}],
              "action": "DENY",
              "rules": [{"to": [{"operation": {"methods": ["POST"], "paths": ["/admin*"]}}]}]}},
]


def _web_service(name: str, vip: str, selector: dict[str, str],
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels or {}},
            "spec": {"clusterIP": vip, "selector": selector,
                     "ports": [{"name": "http", "port": 80, "targetPort": SERVER_PORT}]}}


def _load(ns: str, path: str, count: int, *extra: str) -> dict[str, Any]:
    out = netns.ns_run(ns, [mesh.PYTHON, "-m", "ambit.dev.http_load",
                            f"http://{WEB_VIP}{path}", "--count", str(count), *extra],
                       timeout=120)
    doc: dict[str, Any] = json.loads(out)
    return doc


def _waypoint_step(cluster: DevCluster, checks: Checks, out: Out) -> None:
    for pod, node, version in (("web-v1", "node-1", "v1"), ("web-v2", "node-2", "v2")):
        cluster.add_pod(pod, node, labels={"app": "web", "version": version})
        cluster.start_http_echo(pod, SERVER_PORT, version)
    cluster.apply([_web_service("web-v1", "10.96.0.21", {"app": "web", "version": "v1"}),
                   _web_service("web-v2", "10.96.0.22", {"app": "web", "version": "v2"}),
                   _web_service("web", WEB_VIP, {"app": "web"},
                                {"ambit.dev/use-waypoint": "waypoint"})])
    wp = cluster.add_waypoint("waypoint", NAMESPACE, "node-2")
    out(f"    `ambit waypoint apply --name waypoint`: pod {wp.name} {wp.ip} on {wp.node}; "
        "service web labelled ambit.dev/use-waypoint=waypoint")
    out("    HTTPRoute web: x-version: v2 -> web-v2, else 80 % web-v1 / 20 % web-v2; "
        "AuthorizationPolicy: DENY POST /admin*")
    cluster.apply(WEB_L7)
    client = cluster.pod("client").netns
    deadline = time.monotonic() + 20
    split = _load(client, "/", 20)
    while time.monotonic() < deadline and (split["codes"] != {"200": 20}
                                           or "v2" not in split["versions"]):
        time.sleep(0.3)
        split = _load(client, "/", 20)
    split = _load(client, "/", 200)
    v2 = split["versions"].get("v2", 0)
    out(f"    200 requests from client to web: {json.dumps(split['versions'])} "
        f"(p50 {split['p50_ms']} ms)")
    checks.add("the waypoint splits web 80/20", split["codes"] == {"200": 200}
               and 20 <= v2 <= 65, json.dumps(split["codes"]))
    header = _load(client, "/", 20, "--header", "x-version:v2")
    checks.add("x-version: v2 goes to web-v2", header["versions"] == {"v2": 20},
               json.dumps(header["versions"]))
    admin = _load(client, "/admin", 1, "--method", "POST")
    get = _load(client, "/admin", 1)
    checks.add("POST /admin is denied by the waypoint (403), GET passes",
               admin["codes"] == {"403": 1} and get["codes"] == {"200": 1},
               f"POST {admin['codes']}, GET {get['codes']}")
    metrics = ""
    for _ in range(20):
        metrics = cluster.waypoint_metrics("waypoint", NAMESPACE)
        if 'response_code="403"' in metrics:
            break
        time.sleep(0.3)
    for line in metrics.splitlines():
        if line.startswith("istio_requests_total{"):
            out(f"      {_compact(line)}")


def cleanup(out: Out = _print) -> int:
    """Remove a demo cluster that was kept with ``--keep``."""
    try:
        DevCluster.load("demo").down()
    except ClusterError:
        DevCluster("demo").down()  # nothing recorded: remove leftover namespaces, if any
    return 0


def main(keep: bool = False, workdir: Path | None = None, do_cleanup: bool = False,
         redirect_mode: str = "inpod") -> int:
    """Entry point of ``ambit dev demo``; errors are one line, never a traceback."""
    try:
        netns.require_root()
        if do_cleanup:
            return cleanup()
        status = run(workdir or STATE_ROOT, keep=keep, redirect_mode=redirect_mode)
        if status != 0:
            _print(f"logs kept in {(workdir or STATE_ROOT) / 'demo' / 'logs'} until "
                   "`ambit dev demo --cleanup`" if keep else "")
        return status
    except (netns.NetnsError, mesh.MeshError, ClusterError) as e:
        _print(f"ambit dev demo: error: {e}")
        return 1
    except KeyboardInterrupt:
        _print("ambit dev demo: interrupted; cleaned up")
        return 130

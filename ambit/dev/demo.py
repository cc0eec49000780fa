"""``ambit dev demo``: a two-node mesh on this machine, showing what Ambit does in a minute.

Why it exists: it is the quickest end-to-end proof (and the first thing to run after a change
to capture or the ztunnel) that the pieces fit: TPROXY capture on a node, HBONE between the
ztunnels of two nodes, L4 authorization by SPIFFE identity, and metrics. Everything runs in
network namespaces that are not connected to the machine's own network.

The scene: ``client`` and ``denied`` pods on node-1, an echo ``server`` pod on node-2, one
ztunnel per node, and an AuthorizationPolicy that lets only the client's identity reach the
server. The demo prints each step, checks each outcome and exits non-zero if one is wrong.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambit.dev import mesh, netns
from ambit.dev.topology import Cluster

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


def state_document(cluster: Cluster) -> dict[str, Any]:
    """Workloads of the three pods and a policy: only the client may call the server."""
    pods = [cluster.pod(n) for n in ("client", "denied", "server")]
    return {
        "trustDomain": TRUST_DOMAIN,
        "workloads": [mesh.workload(p, namespace=NAMESPACE) for p in pods],
        "authorizationPolicies": [
            {
                "name": "allow-client",
                "namespace": NAMESPACE,
                "spec": {
                    "selector": {"matchLabels": {"app": "server"}},
                    "action": "ALLOW",
                    "rules": [
                        {"from": [{"source": {
                            "principals": [f"{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/client"]}}]}
                    ],
                },
            }
        ],
    }  # fmt: skip


# Of Istio's many labels, the ones that tell the story on one line.
SHOWN_LABELS = ("reporter", "source_workload", "destination_workload", "response_flags",
                "direction", "policy")  # fmt: skip
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


def run(workdir: Path, keep: bool = False, out: Out = _print) -> int:
    """Build, exercise and (unless ``keep``) tear down the demo mesh; 0 if every check passed."""
    checks = Checks(out)
    cluster = Cluster(2)
    try:
        out("[1/6] building a 2-node cluster from network namespaces")
        cluster.start()
        client = cluster.add_pod("node-1", "client")
        denied = cluster.add_pod("node-1", "denied")
        server = cluster.add_pod("node-2", "server")
        for p in (client, denied, server):
            out(f"    pod {p.name:<7} {p.ip:<11} on {p.node.name} (netns {p.netns})")

        out(f"[2/6] starting an echo server in pod server on {server.ip}:{SERVER_PORT}")
        mesh.start_echo(cluster, server, workdir, SERVER_PORT)

        out("[3/6] issuing identities and writing the mesh state")
        identity_dir = workdir / "identity"
        mesh.issue_identities(
            identity_dir, [f"{NAMESPACE}/{p.name}" for p in (client, denied, server)]
        )
        state = mesh.write_state(workdir / "state.yaml", state_document(cluster))
        out(f"    {state}: 3 HBONE workloads, policy allow-client (server <- client only)")

        out("[4/6] starting a ztunnel in each node and capturing the pods' traffic (TPROXY)")
        ztunnels = {}
        for node in cluster.nodes:
            access_log = workdir / f"access-{node.name}.jsonl"
            zt = mesh.start_ztunnel(
                cluster,
                node,
                state_file=state,
                identity_dir=identity_dir,
                workdir=workdir,
                extra_args=["--access-log", str(access_log)],
            )
            ztunnels[node.name] = (zt, access_log)
            out(f"    {node.name}: ztunnel pid {zt.proc.pid} ready, log {zt.log}")
        cluster.capture_pods([client, denied, server])

        out(f"[5/6] client -> server {server.ip}:{SERVER_PORT} (node-1 -> node-2 over HBONE)")
        res = mesh.tcp_probe(client.netns, server.ip, SERVER_PORT, "hello from client")
        if res.ok:
            out(f"    server answered: {json.dumps(res.answer)}")
            out(f"    (the server saw {res.peer_ip}: node-2's ztunnel delivered the call)")
        checks.add("allowed client reaches the server", res.ok, res.error or "answered")
        _, access2 = ztunnels["node-2"]
        deadline = time.monotonic() + 3
        inbound: list[dict[str, Any]] = []
        while not inbound and time.monotonic() < deadline:
            inbound = [
                r
                for r in _access_records(access2)
                if r.get("dst") == f"{server.ip}:{SERVER_PORT}" and r.get("outcome") == "ok"
            ]
            time.sleep(0.1)
        checks.add(
            "node-2 ztunnel carried it (inbound access log)",
            bool(inbound),
            json.dumps({k: inbound[-1].get(k) for k in ("listener", "src_identity", "mtls")})
            if inbound
            else f"no 'ok' record for {server.ip}:{SERVER_PORT} in {access2}",
        )

        out(f"      denied -> server {server.ip}:{SERVER_PORT} (expected: refused by policy)")
        res = mesh.tcp_probe(denied.netns, server.ip, SERVER_PORT, "hello from denied")
        checks.add(
            "denied client is refused",
            not res.ok,
            f"refused ({res.error})" if not res.ok else f"UNEXPECTED answer {res.answer}",
        )

        out("[6/6] ztunnel metrics (GET http://127.0.0.1:15020/metrics inside each node)")
        for name, (zt, _) in ztunnels.items():
            lines = _metric_lines(zt.metrics())
            out(f"    {name}:")
            for line in lines[:12] or ["(no connection metrics yet)"]:
                out(f"      {_compact(line)}")
        denied_count = sum(
            float(line.rsplit(" ", 1)[1])
            for zt, _ in ztunnels.values()
            for line in _metric_lines(zt.metrics())
            if line.startswith("ambit_ztunnel_policy_denied_total")
        )
        checks.add("the denial is counted", denied_count >= 1, f"policy_denied = {denied_count:g}")

        out("")
        out(f"summary: {sum(ok for _, ok, _ in checks.results)}/{len(checks.results)} checks "
            f"passed; files in {workdir}")  # fmt: skip
        for name, ok, _ in checks.results:
            out(f"  {'PASS' if ok else 'FAIL'}  {name}")
        if keep:
            out("")
            out("--keep: the mesh is still running. Try:")
            out(f"  ip netns exec {client.netns} {mesh.PYTHON} -m ambit.dev.probe tcp "
                f"{server.ip} {SERVER_PORT}")  # fmt: skip
            out(f"  ip netns exec {cluster.node(2).netns} {mesh.PYTHON} -m ambit.dev.probe "
                "http http://127.0.0.1:15000/config_dump")  # fmt: skip
            out("remove it with: ambit dev demo --cleanup")
    except BaseException:
        cluster.close()  # even with --keep: a half-built mesh is of no use to anyone
        raise
    if not keep:
        cluster.close()
    return 0 if checks.ok else 1


def cleanup(out: Out = _print) -> int:
    """Remove the namespaces (and their processes) of demos that were run with ``--keep``."""
    removed = netns.remove_stale_netns()
    out(f"removed {len(removed)} namespace(s)" + (f": {' '.join(removed)}" if removed else ""))
    return 0


def main(keep: bool = False, workdir: Path | None = None, do_cleanup: bool = False) -> int:
    """Entry point of ``ambit dev demo``; errors are one line, never a traceback."""
    try:
        netns.require_root()
        if do_cleanup:
            return cleanup()
        own_dir = workdir is None
        wd = Path(tempfile.mkdtemp(prefix="ambit-demo-")) if workdir is None else workdir
        wd.mkdir(parents=True, exist_ok=True)
        status = run(wd, keep=keep)
        if status == 0 and own_dir and not keep:
            shutil.rmtree(wd, ignore_errors=True)
        elif status != 0:
            _print(f"logs kept in {wd}")
        return status
    except (netns.NetnsError, mesh.MeshError) as e:
        _print(f"ambit dev demo: error: {e}")
        return 1
    except KeyboardInterrupt:
        _print("ambit dev demo: interrupted; cleaned up")
        return 130

"""Beyond the upstream Mesh tests (issue 18): a TCP port of a waypoint-bound Service goes
through the waypoint as bytes (never parsed as HTTP), and a TCPRoute splits it."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.conftest import MESH_NS, VIPS, WAYPOINT, Mesh
from tests.conformance.expect import Case, Expect, Req

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

# Not HTTP: if the waypoint parsed it as HTTP, this would get a 400 and no echo.
PAYLOAD = "\x16\x03\x01 not http at all\r\n\r\n"


def greetings(mesh: Mesh, count: int) -> Counter[str]:
    (results,) = mesh.send("echo-v1", [Case("tcp", Req("echo:9090", PAYLOAD,
                                                         protocol="tcp"), Expect())], count)
    out: Counter[str] = Counter()
    for r in results:
        body = r.get("body") or {}
        ok = r.get("status") == 200 and isinstance(body, dict) and body["echoed"] == PAYLOAD
        out[body["pod"] if ok else f"failed: {r}"] += 1
    return out


def access_log(mesh: Mesh, node: str) -> list[dict[str, Any]]:
    path = Path(mesh.cluster.node(node).run_dir) / "access.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tcp_port_passes_through_the_waypoint_untouched(mesh: Mesh) -> None:
    got = greetings(mesh, 20)
    assert set(got) <= {"echo-v1", "echo-v2"} and sum(got.values()) == 20, got
    # The client's ztunnel sent these connections to the waypoint (fail closed otherwise).
    sent = [r for r in access_log(mesh, "node-1")
            if r.get("dst") == f"{VIPS['echo']}:9090"]
    assert sent and all(r.get("waypoint") == f"{MESH_NS}/{WAYPOINT}" for r in sent), sent[-3:]


def test_tcp_route_sends_the_port_to_its_backends(mesh: Mesh) -> None:
    docs = [{"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
             "metadata": {"name": "tcp-to-v2", "namespace": MESH_NS},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo",
                                      "port": 9090}],
                      "rules": [{"backendRefs": [{"name": "echo-v2", "port": 9090}]}]}}]
    mesh.apply(docs)
    try:
        # TCP routes have no route names in Envoy's route dump: poll until only v2 answers.
        for _ in range(60):
            if greetings(mesh, 10) == Counter({"echo-v2": 10}):
                break
            time.sleep(0.5)
        assert greetings(mesh, 30) == Counter({"echo-v2": 30})
    finally:
        mesh.remove(docs)


def test_waypoint_authorization_applies_to_tcp_ports(mesh: Mesh) -> None:
    """A DENY on GET to port 9090 denies every connection to that TCP port (methods cannot be
    judged on bytes, so they are dropped: fail closed, as Istio does); removing it lets the
    connections through again."""
    policy = {"apiVersion": "security.ambit.dev/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "no-get-9090", "namespace": MESH_NS},
              "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                       "action": "DENY",
                       "rules": [{"to": [{"operation": {"methods": ["GET"],
                                                        "ports": ["9090"]}}]}]}}

    def until(ok: bool) -> Counter[str]:
        got: Counter[str] = Counter()
        for _ in range(60):
            got = greetings(mesh, 5)
            served = sum(n for pod, n in got.items() if not pod.startswith("failed"))
            if served == (5 if ok else 0):
                return got
            time.sleep(0.5)
        raise AssertionError(f"connections {'refused' if ok else 'served'}: {got}")

    mesh.cluster.apply([policy])
    try:
        until(ok=False)
        # HTTP on port 80 of the same Service is not port 9090: still served.
        mesh.eventually([Case("http", Req("echo"), Expect(200))])
    finally:
        mesh.cluster.delete("AuthorizationPolicy", MESH_NS, "no-get-9090", missing_ok=True)
    until(ok=True)

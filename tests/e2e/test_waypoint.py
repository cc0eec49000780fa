"""Waypoints end to end in the local cluster: a client pod calls a service through its waypoint.

The waypoint is the real Envoy, run by ``ambit waypoint run`` in a pod of the dev cluster and
configured by the controller over xDS; capture, ztunnels and CNI are the real ones. The module
runs once per redirect mode, eBPF and inpod (one cluster each): a waypoint is only a pod to the
node-level backends, whose semantics test_cluster.py compares, but in inpod mode the ztunnel
dials the waypoint from inside the client pod's namespace and delivers the waypoint's tunnels
to the backends from inside theirs, so the L7 path itself differs. Layout::

    node-1: client, echo-v1 (HTTP, answers "v1")     node-2: echo-v2 ("v2"), the waypoint "wp"
    services: echo (10.96.0.10:80, both versions; bound to wp), echo-v1, echo-v2

so client -> waypoint crosses nodes, and the waypoint reaches one backend on its own node and
one across. Each test sets the L7 config it needs (one HTTPRoute named "echo", replaced).
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambit.dev import mesh, netns
from ambit.dev.cluster import DevCluster
from tests.e2e import waiting
from tests.e2e.clusters import dev_cluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

VIP, VIP_V1, VIP_V2 = "10.96.0.10", "10.96.0.11", "10.96.0.12"
URL = f"http://{VIP}"
WAYPOINT = "wp"
GROUP = "gateway.networking.k8s.io"
# Config travels registry -> controller -> xDS -> Envoy: allow it a little longer.
until = functools.partial(waiting.until, timeout=15.0, interval=0.2)


def service(name: str, vip: str, selector: dict[str, str],
            labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
            "spec": {"clusterIP": vip, "selector": selector,
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def bind(c: DevCluster, bound: bool) -> None:
    labels = {"ambit.dev/use-waypoint": WAYPOINT} if bound else {}
    c.apply([service("echo", VIP, {"app": "echo"}, labels)])


def route(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1", "kind": "HTTPRoute",
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo",
                                     "port": 80}],
                     "rules": list(rules)}}


def backend(name: str, weight: int = 1) -> dict[str, Any]:
    return {"name": name, "port": 80, "weight": weight}


@pytest.fixture(scope="module", params=["ebpf", "inpod"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) \
        -> Iterator[DevCluster]:
    # dev_cluster holds every agent to the mode asked for, so a fallback cannot pass unnoticed.
    with dev_cluster("wp", request.param, tmp_path_factory) as c:
        c.add_pod("client", 1)
        c.add_pod("echo-v1", 1, labels={"app": "echo", "version": "v1"})
        c.add_pod("echo-v2", 2, labels={"app": "echo", "version": "v2"})
        c.start_http_echo("echo-v1", 8080, "v1")
        c.start_http_echo("echo-v2", 8080, "v2")
        c.apply([service("echo-v1", VIP_V1, {"app": "echo", "version": "v1"}),
                 service("echo-v2", VIP_V2, {"app": "echo", "version": "v2"})])
        bind(c, True)
        c.add_waypoint(WAYPOINT, node_ref=2)
        yield c


def load(c: DevCluster, path: str = "/", count: int = 1, method: str = "GET",
         headers: dict[str, str] | None = None) -> dict[str, Any]:
    argv = [mesh.PYTHON, "-m", "ambit.dev.http_load", URL + path, "--count", str(count),
            "--method", method, "--timeout", "10"]
    for k, v in (headers or {}).items():
        argv += ["--header", f"{k}:{v}"]
    out = netns.ns_run(c.pod("client").netns, argv, timeout=300)
    doc: dict[str, Any] = json.loads(out)
    return doc


def get(c: DevCluster, path: str = "/", method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int | None, dict[str, Any]]:
    """One request; (status, the backend's JSON answer or {})."""
    argv = [mesh.PYTHON, "-c", (
        "import http.client,json,sys\n"
        f"c=http.client.HTTPConnection({VIP!r},80,timeout=10)\n"
        f"c.request({method!r},{path!r},body=b'',headers={headers or {}!r})\n"
        "r=c.getresponse();b=r.read()\n"
        "print(json.dumps({'status':r.status,'body':b.decode(errors='replace')}))\n")]
    res = subprocess.run(netns.ns_argv(c.pod("client").netns, argv), capture_output=True,
                         text=True, timeout=30, check=False)
    if res.returncode != 0:
        return None, {"error": res.stderr.strip()[-300:]}
    doc = json.loads(res.stdout)
    try:
        body = json.loads(doc["body"])
    except ValueError:
        body = {"text": doc["body"]}
    return int(doc["status"]), body if isinstance(body, dict) else {"text": body}


def via_waypoint(answer: dict[str, Any]) -> bool:
    # Envoy adds x-request-id and x-forwarded-proto; a direct HBONE path adds nothing.
    return "x-request-id" in answer.get("headers", {})


def access(c: DevCluster, node: str) -> list[dict[str, Any]]:
    path = Path(c.node(node).run_dir) / "access.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_bound_service_traffic_passes_through_the_waypoint(cluster: DevCluster) -> None:
    c = cluster
    c.delete("HTTPRoute", "default", "echo", missing_ok=True)
    _, answer = until(lambda: (r := get(c))[0] == 200 and via_waypoint(r[1]) and r,
                           what="a 200 through the waypoint")
    assert answer["version"] in ("v1", "v2")
    wp = c.pod(c.waypoint_pod(WAYPOINT))
    # The client's ztunnel sent the connection to the waypoint, over HBONE ...
    sent = [r for r in access(c, "node-1") if r.get("waypoint") == f"default/{WAYPOINT}"]
    assert sent and sent[-1]["dst"] == f"{VIP}:80", sent[-1:]
    # ... and the backend's ztunnel accepted the waypoint's HBONE tunnel, with its identity
    # (metrics: the tunnel is pooled by Envoy, so its access record comes only at the end).
    backend = c.pod(f"echo-{answer['version']}")

    def opened_from_waypoint() -> list[str]:
        return [line for line in c.node_metrics(c.node(backend.node)).splitlines()
                if line.startswith("istio_tcp_connections_opened_total{")
                and 'reporter="destination"' in line
                and f'source_principal="spiffe://cluster.local/ns/default/sa/{WAYPOINT}"'
                in line and f'destination_workload="{backend.name}"' in line]

    assert until(opened_from_waypoint, what="the backend's inbound metric")
    assert wp.ip != backend.ip


def test_header_match_routes_to_v2_and_the_rest_to_v1(cluster: DevCluster) -> None:
    c = cluster
    c.apply([route(
        {"matches": [{"headers": [{"name": "x-version", "value": "v2"}]}],
         "backendRefs": [backend("echo-v2")]},
        {"backendRefs": [backend("echo-v1")]})])
    until(lambda: get(c, headers={"x-version": "v2"})[1].get("version") == "v2",
          what="the header route")
    with_header = load(c, count=50, headers={"x-version": "v2"})
    without = load(c, count=50)
    assert with_header["versions"] == {"v2": 50}, with_header
    assert without["versions"] == {"v1": 50}, without


def test_weighted_split_holds_over_1000_requests(cluster: DevCluster) -> None:
    c = cluster
    c.apply([route({"backendRefs": [backend("echo-v1", 90), backend("echo-v2", 10)]})])
    until(lambda: load(c, count=40)["versions"].get("v2"), what="the split")
    got = load(c, count=1000)
    assert got["codes"] == {"200": 1000}, got
    v2 = got["versions"].get("v2", 0)
    # 10 % of 1000: mean 100, standard deviation 9.5; +-40 is over 4 sigma.
    assert 60 <= v2 <= 140, got


def test_injected_aborts_are_hidden_by_retries(cluster: DevCluster) -> None:
    c = cluster
    c.apply([
        {"apiVersion": "networking.ambit.dev/v1alpha1", "kind": "HTTPFault",
         "metadata": {"name": "half-fail", "namespace": "default"},
         "spec": {"abort": {"httpStatus": 500, "percentage": 50}}},
        route(
            {"matches": [{"path": {"type": "PathPrefix", "value": "/raw"}}],
             "filters": [{"type": "ExtensionRef", "extensionRef": {
                 "group": "networking.ambit.dev", "kind": "HTTPFault", "name": "half-fail"}}],
             "backendRefs": [backend("echo-v1")]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/flaky"}}],
             "filters": [{"type": "ExtensionRef", "extensionRef": {
                 "group": "networking.ambit.dev", "kind": "HTTPFault", "name": "half-fail"}}],
             "retry": {"codes": [500], "attempts": 20},
             "backendRefs": [backend("echo-v1")]},
            {"backendRefs": [backend("echo-v1")]}),
    ])
    until(lambda: "500" in load(c, "/raw", count=20)["codes"], what="the fault")
    raw = load(c, "/raw", count=200)
    assert 50 <= raw["codes"].get("500", 0) <= 150, raw  # the fault is there: about half
    hidden = load(c, "/flaky", count=200)
    assert hidden["codes"] == {"200": 200}, hidden  # and retries hide it (0.5^21 per request)


def test_request_timeout_fires(cluster: DevCluster) -> None:
    c = cluster
    c.apply([route(
        {"matches": [{"path": {"type": "PathPrefix", "value": "/delay"}}],
         "timeouts": {"request": "300ms"}, "backendRefs": [backend("echo-v1")]},
        {"backendRefs": [backend("echo-v1")]})])
    until(lambda: get(c, "/delay/2000")[0] == 504, what="the timeout")
    started = time.monotonic()
    status, answer = get(c, "/delay/2000")
    assert status == 504 and "timeout" in answer.get("text", ""), answer
    assert time.monotonic() - started < 1.9  # answered by the waypoint, not the slow backend
    assert get(c, "/delay/10")[0] == 200


def test_l7_deny_post_admin_is_403_while_get_passes(cluster: DevCluster) -> None:
    c = cluster
    c.delete("HTTPRoute", "default", "echo", missing_ok=True)
    policy = {"apiVersion": "security.ambit.dev/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "no-admin-writes", "namespace": "default"},
              "spec": {"targetRefs": [{"group": GROUP, "kind": "Gateway", "name": WAYPOINT}],
                       "action": "DENY",
                       "rules": [{"to": [{"operation": {"methods": ["POST"],
                                                        "paths": ["/admin*"]}}]}]}}
    c.apply([policy])
    try:
        until(lambda: get(c, "/admin", method="POST")[0] == 403, what="the deny policy")
        status, answer = get(c, "/admin", method="POST")
        assert status == 403 and "RBAC" in answer.get("text", ""), answer
        assert get(c, "/")[0] == 200
        assert get(c, "/admin")[0] == 200  # GET is not denied
        assert get(c, "/other", method="POST")[0] == 200
        # Istio's request metrics, from the waypoint: the 403 and the 200s.
        def with_403() -> str | None:
            m = c.waypoint_metrics(WAYPOINT)
            return m if 'response_code="403"' in m else None

        metrics = until(with_403, what="metrics")
        lines = [line for line in metrics.splitlines()
                 if line.startswith("istio_requests_total{")]
        denied = [line for line in lines if 'response_code="403"' in line]
        assert denied and 'reporter="waypoint"' in denied[0], lines
        assert 'source_principal="spiffe://cluster.local/ns/default/sa/client"' in denied[0]
        assert 'destination_service="echo.default.svc.cluster.local"' in denied[0]
        assert "istio_request_duration_milliseconds_bucket{" in metrics
    finally:
        c.delete("AuthorizationPolicy", "default", "no-admin-writes")


def test_unbinding_returns_to_direct_hbone(cluster: DevCluster) -> None:
    c = cluster
    c.delete("HTTPRoute", "default", "echo", missing_ok=True)
    try:
        bind(c, False)
        _, answer = until(lambda: (r := get(c))[0] == 200 and not via_waypoint(r[1])
                               and r, what="direct traffic")
        assert answer["headers"].get("x-forwarded-proto") is None  # no Envoy on the way
    finally:
        bind(c, True)
    until(lambda: via_waypoint(get(c)[1]), what="rebinding")


def test_controller_restart_does_not_interrupt_waypoint_traffic(cluster: DevCluster) -> None:
    c = cluster
    c.apply([route({"backendRefs": [backend("echo-v1")]})])
    until(lambda: load(c, count=5)["versions"] == {"v1": 5}, what="the v1 route")
    argv = [mesh.PYTHON, "-m", "ambit.dev.http_load", URL + "/", "--count", "1500",
            "--timeout", "10"]
    proc = subprocess.Popen(netns.ns_argv(c.pod("client").netns, argv),
                            stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        c.restart_controller()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    got = json.loads(out)
    assert got["errors"] == 0 and got["codes"] == {"200": 1500}, got
    # The waypoint reconnected: a change made after the restart still reaches Envoy.
    c.apply([route({"backendRefs": [backend("echo-v2")]})])
    until(lambda: load(c, count=5)["versions"] == {"v2": 5}, timeout=30,
          what="a route change after the restart")


def test_waypoint_pod_is_not_captured(cluster: DevCluster) -> None:
    c = cluster
    wp = c.pod(c.waypoint_pod(WAYPOINT))
    pods = {p["pod"]: p for p in c.agent_status(c.node(wp.node))["pods"]}
    # Present in the agent's table (it saw the pod through CNI), and reported not captured.
    entry = pods.get(f"default/{wp.name}")
    assert entry is not None, f"the waypoint pod is missing from the agent's pods: {pods}"
    assert entry["captured"] is False, entry
    assert entry["shouldCapture"] is False, entry

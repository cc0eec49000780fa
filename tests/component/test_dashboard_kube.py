"""``ambit dashboard --kubeconfig``: the Kubernetes source against the API-server double,
through the real ``kubernetes_asyncio`` client, and the model built from what it gathered.

No real API server runs on our machines (docs/kubernetes.md), so the cluster is the double
holding a mesh namespace with two workloads, a waypoint, a service bound to it, a policy and a
route, Ambit's DaemonSet, Deployment and ConfigMap, and their pods. The node agents, the
waypoint and the controller are one small HTTP server reached through the double's pod proxy,
as ``ambit status``'s tests reach the agent (tests/component/test_install.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ambit.dashboard import kube, model
from ambit.dashboard.kube import KubernetesSource
from tests.k8s_double import objects as o
from tests.k8s_double.server import ApiServerDouble

NS = "ambit-system"
NODE_LABELS = {"app.kubernetes.io/name": "ambit-node"}
CONTROLLER_LABELS = {"app.kubernetes.io/name": "ambit-controller"}

NODE_A_METRICS = """\
# TYPE ambit_agent_info gauge
ambit_agent_info{node="node-a",version="0.1.0",redirect_mode="ebpf"} 1
# TYPE ambit_agent_ztunnel_scrape_up gauge
ambit_agent_ztunnel_scrape_up 1
# TYPE ambit_xds_connected gauge
ambit_xds_connected 1
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="destination",source_workload="client",\
source_workload_namespace="shop",destination_workload="web",destination_workload_namespace="shop",\
connection_security_policy="mutual_tls",response_flags="-"} 5
istio_tcp_connections_opened_total{reporter="destination",source_workload="client",\
source_workload_namespace="shop",destination_workload="web",destination_workload_namespace="shop",\
connection_security_policy="mutual_tls",response_flags="DENY"} 2
# TYPE ambit_ztunnel_policy_denied_total counter
ambit_ztunnel_policy_denied_total{direction="destination",policy="shop/allow-client"} 2
"""
WAYPOINT_METRICS = """\
# TYPE istio_requests_total counter
istio_requests_total{source_workload="client",source_workload_namespace="shop",\
destination_workload="web",destination_workload_namespace="shop",response_code="200",\
connection_security_policy="mutual_tls"} 7
"""


def agent_pods() -> dict[str, Any]:
    return {"node": "node-a", "redirectMode": "ebpf", "ready": "ready", "pods": [
        {"pod": "shop/web-5d9f-abcde", "captured": True, "shouldCapture": True,
         "reason": "namespace shop is ambient", "ips": ["10.244.1.5"]}]}


class Endpoints:
    """The pods' HTTP endpoints behind the pod proxy; ``hang`` makes a path never answer."""

    def __init__(self) -> None:
        self.hang: set[str] = set()
        self.big = 0  # bytes of padding added to node-a's /metrics
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()  # set at close, so a held request ends with the test

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        if path in self.hang:
            await self._release.wait()
        if path == "/node-a/metrics":
            return web.Response(text=NODE_A_METRICS + "#" * self.big)
        if path == "/node-a/debug/pods":
            return web.json_response(agent_pods())
        if path == "/waypoint/metrics":
            return web.Response(text=WAYPOINT_METRICS)
        if path == "/controller/ready":
            return web.Response(text="ready\n")
        return web.Response(status=404, text="no such endpoint\n")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


def populate(d: ApiServerDouble, ep: Endpoints) -> None:
    d.apply("namespaces", o.namespace("shop"))
    d.apply("namespaces", o.namespace(NS, ambient=False))
    d.apply("configmaps", {"metadata": {"name": "ambit-config", "namespace": NS},
                           "data": {"trustDomain": "example.org"}})
    d.apply("daemonsets", {"metadata": {"name": "ambit-node", "namespace": NS},
                           "spec": {"selector": {"matchLabels": NODE_LABELS},
                                    "template": {"metadata": {"labels": NODE_LABELS},
                                                 "spec": {"containers": []}}}})
    d.apply("deployments", o.deployment("ambit-controller", NS, CONTROLLER_LABELS))
    for node, ip in (("node-a", "192.168.0.10"), ("node-b", "192.168.0.11")):
        d.apply("pods", o.pod(f"ambit-node-{node[-1]}", NS, ip, node=node, labels=NODE_LABELS,
                              host_network=True))
    d.apply("pods", o.pod("ambit-controller-7d9f-xyz", NS, "10.244.0.3",
                          labels=CONTROLLER_LABELS))
    # A pod of another DaemonSet in Ambit's namespace is not a node agent.
    d.apply("pods", o.pod("other-node-a", NS, "192.168.0.10", labels={"app": "other"},
                          host_network=True))
    d.apply("pods", o.pod("web-5d9f-abcde", "shop", "10.244.1.5", node="node-a", sa="web",
                          labels={"app": "web"}, replicaset="web-5d9f"))
    d.apply("pods", o.pod("client", "shop", "10.244.2.7", node="node-b", sa="client",
                          labels={"app": "client"}))
    d.apply("pods", o.pod("waypoint-6c4-q", "shop", "10.244.1.9", node="node-a",
                          sa="waypoint", labels={model.GATEWAY_LABEL: "waypoint"}))
    d.apply("gateways", o.gateway("waypoint", "shop"))
    d.apply("services", o.service("web", "shop", "10.96.0.10", {"app": "web"},
                                  [{"name": "http", "port": 80, "targetPort": 8080,
                                    "protocol": "TCP"}],
                                  labels={"ambit.dev/use-waypoint": "waypoint"}))
    d.apply("authorizationpolicies", o.authorization_policy("allow-client", "shop", {
        "selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
        "rules": [{"from": [{"source": {
            "principals": ["example.org/ns/shop/sa/client"]}}]}]}))
    d.apply("httproutes", o.http_route("web-route", "shop", {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
        "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}))
    # node-b's agent is not registered: the double answers 503, as a real API server does
    # when it cannot dial the pod.
    d.register_pod_proxy(NS, "ambit-node-a", 15022, f"{ep.url}/node-a")
    d.register_pod_proxy("shop", "waypoint-6c4-q", 15020, f"{ep.url}/waypoint")
    d.register_pod_proxy(NS, "ambit-controller-7d9f-xyz", 15014, f"{ep.url}/controller")


@pytest.fixture
async def endpoints() -> AsyncIterator[Endpoints]:
    ep = Endpoints()
    await ep.start()
    yield ep
    await ep.close()


@pytest.fixture
async def source(double: ApiServerDouble, tmp_path: Path) -> AsyncIterator[KubernetesSource]:
    s = KubernetesSource(str(double.write_kubeconfig(tmp_path / "kubeconfig")))
    yield s
    await s.close()


async def test_the_page_shows_the_cluster_read_through_the_api_server(
        double: ApiServerDouble, endpoints: Endpoints, source: KubernetesSource) -> None:
    populate(double, endpoints)
    raw: dict[str, bytes] = {}
    g = await source.gather(raw)
    m = model.build(g)

    wl = {w["id"]: w for w in m["workloads"]}
    # The controller's pod is in the state too, as a plain TCP workload (not ambient); the
    # node pods are on the host network and are not.
    assert set(wl) == {"shop/web", "shop/client", "shop/waypoint-6c4-q",
                       "ambit-system/ambit-controller-7d9f-xyz"}, wl.keys()
    assert wl["ambit-system/ambit-controller-7d9f-xyz"]["protocol"] == "TCP"
    web_ = wl["shop/web"]
    assert web_["identity"] == "spiffe://example.org/ns/shop/sa/web"  # the ConfigMap's domain
    assert web_["protocol"] == "HBONE" and web_["node"] == "node-a"
    assert web_["captured"] is True
    assert web_["pods"][0]["reason"] == "namespace shop is ambient"
    assert web_["raw"] == "/raw/state"
    assert wl["shop/client"]["captured"] is None  # node-b's agent could not be read
    assert wl["shop/waypoint-6c4-q"]["kind"] == "waypoint"

    edges = {e["id"]: e for e in m["edges"]}
    tcp = edges["tcp:shop/client->shop/web"]
    assert tcp["mtls"] is True and tcp["connections"] == 7 and tcp["denied"] == 2
    assert tcp["deniedBy"] == ["shop/allow-client"]
    http = edges["http:shop/waypoint-6c4-q->shop/web"]
    assert http["requests"] == 7 and http["clients"] == [{"id": "shop/client", "requests": 7}]

    nodes = {n["name"]: n for n in m["nodes"]}
    assert set(nodes) == {"node-a", "node-b"}  # the other DaemonSet's pod is not one
    assert nodes["node-a"]["agentVersion"] == "0.1.0"
    assert nodes["node-a"]["redirectMode"] == "ebpf" and nodes["node-a"]["errors"] == {}
    assert "503" in nodes["node-b"]["errors"]["metrics"]
    assert "connection refused" in nodes["node-b"]["errors"]["pods"]

    [policy] = m["policies"]
    assert (policy["namespace"], policy["name"]) == ("shop", "allow-client")
    assert policy["selects"] == ["shop/web"] and policy["denied"] == 2
    assert policy["allowed"] == 5
    [svc] = m["services"]
    assert svc["hostname"] == "web.shop.svc.cluster.local" and svc["vips"] == ["10.96.0.10"]
    assert svc["waypoint"] == "shop/waypoint" and svc["endpoints"] == ["shop/web-5d9f-abcde"]
    [route] = m["routes"]
    assert route["name"] == "web-route" and route["parents"][0]["waypoint"] == "shop/waypoint"
    assert m["waypoints"][0]["services"] == ["web.shop.svc.cluster.local"]
    assert m["controller"]["ready"] is True

    # Only node-b's endpoints are problems: nothing else failed or had to be resolved.
    assert m["problems"] and all(p.startswith("node node-b:") for p in m["problems"]), \
        m["problems"]
    # The raw links lead to what the API and the agents served.
    assert b'"allow-client"' in raw["/raw/registry/AuthorizationPolicy/shop/allow-client"]
    assert raw["/raw/node/node-a/metrics"].startswith(b"# TYPE ambit_agent_info")
    assert b'"shop/web-5d9f-abcde"' in raw["/raw/state"]
    assert "/raw/node/node-a/config_dump" not in raw  # never asked: on the pod's loopback


async def test_a_cluster_without_ambit_says_so(double: ApiServerDouble,
                                                source: KubernetesSource) -> None:
    double.apply("namespaces", o.namespace("shop"))
    double.apply("pods", o.pod("client", "shop", "10.244.2.7", labels={"app": "client"}))
    m = model.build(await source.gather({}))
    assert [w["id"] for w in m["workloads"]] == ["shop/client"]
    assert m["nodes"] == [] and m["controller"]["ready"] is False
    assert any("DaemonSet ambit-system/ambit-node does not exist" in p for p in m["problems"])
    assert any("Deployment ambit-system/ambit-controller does not exist" in p
               for p in m["problems"])


async def test_a_crd_that_is_not_installed_reads_as_empty(
        double: ApiServerDouble, endpoints: Endpoints, source: KubernetesSource) -> None:
    populate(double, endpoints)
    double.unserved |= {"authorizationpolicies", "httproutes"}
    m = model.build(await source.gather({}))
    assert m["policies"] == [] and m["routes"] == []
    assert {w["id"] for w in m["workloads"]} >= {"shop/web", "shop/client"}


async def test_an_agent_that_does_not_answer_is_bounded(
        double: ApiServerDouble, endpoints: Endpoints, source: KubernetesSource,
        monkeypatch: pytest.MonkeyPatch) -> None:
    populate(double, endpoints)
    monkeypatch.setattr(kube, "FETCH_TIMEOUT", 0.5)
    endpoints.hang.add("/node-a/metrics")
    loop = asyncio.get_running_loop()
    started = loop.time()
    m = model.build(await source.gather({}))
    assert loop.time() - started < 3
    node_a = next(n for n in m["nodes"] if n["name"] == "node-a")
    assert "no answer within 0.5 s" in node_a["errors"]["metrics"]
    assert node_a["errors"].keys() == {"metrics"}  # /debug/pods still read
    assert node_a["redirectMode"] == "ebpf"


async def test_an_answer_larger_than_the_limit_is_refused(
        double: ApiServerDouble, endpoints: Endpoints, source: KubernetesSource,
        monkeypatch: pytest.MonkeyPatch) -> None:
    populate(double, endpoints)
    monkeypatch.setattr(kube, "MAX_JSON", 200_000)
    endpoints.big = 300_000
    raw: dict[str, bytes] = {}
    m = model.build(await source.gather(raw))
    node_a = next(n for n in m["nodes"] if n["name"] == "node-a")
    assert "larger than 200000 bytes" in node_a["errors"]["metrics"]
    assert "/raw/node/node-a/metrics" not in raw
    assert {w["id"] for w in m["workloads"]} >= {"shop/web"}  # the lists were small enough

"""The dashboard's model (ambit/dashboard/model.py) held to tables: edges from istio_tcp_* and
istio_requests_total, who denied, capture per workload, rates, policies and routes."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from ambit.dashboard import model, netns_http, promtext
from ambit.dashboard.promtext import Sample

TCP = "istio_tcp_connections_opened_total"


def tcp(src: str, dst: str, value: float, reporter: str = "source", flags: str = "-",
        mtls: bool = True, name: str = TCP) -> Sample:
    return Sample(name, {
        "reporter": reporter, "source_workload": src, "source_workload_namespace": "default",
        "destination_workload": dst, "destination_workload_namespace": "default",
        "response_flags": flags,
        "connection_security_policy": "mutual_tls" if mtls else "none"}, value)


@pytest.mark.parametrize(("samples", "want"), [
    # one connection reported by both ztunnels: counted once
    ([tcp("a", "b", 3, "source"), tcp("a", "b", 3, "destination")],
     {"tcp:default/a->default/b": (3, 0, 0, True)}),
    # the destination saw more (a source outside the mesh reports nothing): the larger wins
    ([tcp("a", "b", 1, "source"), tcp("a", "b", 4, "destination")],
     {"tcp:default/a->default/b": (4, 0, 0, True)}),
    # a denial, and a failure that is not one
    ([tcp("a", "b", 2, flags="DENY"), tcp("a", "b", 5), tcp("a", "b", 1, flags="UF")],
     {"tcp:default/a->default/b": (8, 2, 1, True)}),
    # plaintext: no mTLS mark
    ([tcp("a", "b", 1, mtls=False)], {"tcp:default/a->default/b": (1, 0, 0, False)}),
    # a source the ztunnel does not know
    ([tcp("unknown", "b", 1, "destination", mtls=False)],
     {"tcp:unknown->default/b": (1, 0, 0, False)}),
    # bytes are summed over sent and received, connections only from opened
    ([tcp("a", "b", 1), tcp("a", "b", 100, name="istio_tcp_sent_bytes_total"),
      tcp("a", "b", 50, name="istio_tcp_received_bytes_total")],
     {"tcp:default/a->default/b": (1, 0, 0, True)}),
])
def test_tcp_edges(samples: list[Sample], want: dict[str, tuple[float, float, float, bool]]) \
        -> None:
    edges = model.tcp_edges({"node-1": samples})
    got = {k: (e["connections"], e["denied"], e["failed"], e["mtls"]) for k, e in edges.items()}
    assert got == want


def test_tcp_edge_bytes_and_error_share() -> None:
    e = model.tcp_edges({"n": [tcp("a", "b", 4), tcp("a", "b", 1, flags="DENY"),
                               tcp("a", "b", 100, name="istio_tcp_sent_bytes_total"),
                               tcp("a", "b", 50, name="istio_tcp_received_bytes_total")]})
    edge = e["tcp:default/a->default/b"]
    assert edge["bytes"] == 150 and edge["errorShare"] == pytest.approx(1 / 5)


SERVER = {"id": "default/server", "namespace": "default", "labels": {"app": "server"}}
ALLOW = {"namespace": "default", "name": "allow-client", "selector": {"app": "server"},
         "action": "ALLOW"}
DENY_ALL = {"namespace": "default", "name": "deny-all", "selector": None, "action": "DENY"}
OTHER_NS = {"namespace": "other", "name": "x", "selector": None, "action": "DENY"}
OTHER_APP = {"namespace": "default", "name": "y", "selector": {"app": "web"}, "action": "DENY"}


@pytest.mark.parametrize(("target", "policies", "counts", "want"), [
    (SERVER, [ALLOW], {"default/allow-client": 1}, ["default/allow-client"]),
    # two select it, one counted denials on the node: that one
    (SERVER, [ALLOW, DENY_ALL], {"default/deny-all": 3}, ["default/deny-all"]),
    # none counted yet: every policy that selects it
    (SERVER, [ALLOW, DENY_ALL], {}, ["default/allow-client", "default/deny-all"]),
    # policies of another namespace or selecting other workloads never
    (SERVER, [OTHER_NS, OTHER_APP], {"other/x": 5}, []),
    (None, [ALLOW], {"default/allow-client": 1}, []),
])
def test_denied_by(target: dict[str, Any] | None, policies: list[dict[str, Any]],
                   counts: dict[str, float], want: list[str]) -> None:
    assert model.denied_by(target, policies, counts) == want


def config(*workloads: dict[str, Any]) -> dict[str, Any]:
    return {"version": "7", "workloads": list(workloads), "services": [],
            "authorization_policies": [ALLOW], "certificates": []}


def wl(name: str, node: str, owner: str = "", labels: dict[str, str] | None = None) \
        -> dict[str, Any]:
    return {"name": name, "namespace": "default", "node": node, "workload_name": owner,
            "addresses": ["10.0.0.1"], "labels": labels or {"app": name},
            "service_account": name, "identity": f"spiffe://td/ns/default/sa/{name}"}


def pods(*entries: tuple[str, bool, str]) -> dict[str, Any]:
    return {"redirectMode": "ebpf", "pods": [
        {"pod": f"default/{p}", "captured": c, "shouldCapture": True, "reason": r}
        for p, c, r in entries]}


def test_workloads_group_pods_by_owner_and_join_capture() -> None:
    cfg = config(wl("web-1", "node-1", "web"), wl("web-2", "node-2", "web"),
                 wl("wp", "node-2", labels={model.GATEWAY_LABEL: "waypoint"}))
    nodes = [model.NodeRaw("node-1", config=cfg, pods=pods(("web-1", True, "ambient"))),
             model.NodeRaw("node-2", config=cfg,
                           pods=pods(("web-2", False, "pod labelled none")))]
    got = model.workloads(nodes)
    assert set(got) == {"default/web", "default/wp"}
    web = got["default/web"]
    assert [p["name"] for p in web["pods"]] == ["web-1", "web-2"]
    assert web["nodes"] == ["node-1", "node-2"] and web["node"] is None
    assert web["captured"] is False  # one pod is not
    assert [p["reason"] for p in web["pods"]] == ["ambient", "pod labelled none"]
    assert got["default/wp"]["kind"] == "waypoint"
    assert got["default/wp"]["captured"] is None  # no agent reported it


@pytest.mark.parametrize(("agent_pod", "protocol", "labels", "want"), [
    (None, "HBONE", {}, None),
    ({"captured": True, "reason": "namespace default is ambient"}, "HBONE", {},
     "namespace default is ambient"),
    # taken out of the mesh after enrollment: the agent still says why it once captured it
    ({"captured": False, "reason": "namespace default is ambient"}, "TCP",
     {"ambit.dev/dataplane-mode": "none"},
     "out of the mesh: the pod is labelled ambit.dev/dataplane-mode=none"),
    ({"captured": False, "reason": "namespace default is ambient"}, "TCP", {},
     "out of the mesh: its namespace is not ambient"),
    ({"captured": False, "reason": "namespace default is ambient"}, "TCP",
     {model.GATEWAY_LABEL: "waypoint"}, "a waypoint: never captured (it terminates HBONE itself)"),
    # in the mesh but not captured (a capture failure): the agent's reason is the one
    ({"captured": False, "reason": "no host interface"}, "HBONE", {}, "no host interface"),
])
def test_capture_reason(agent_pod: dict[str, Any] | None, protocol: str,
                        labels: dict[str, str], want: str | None) -> None:
    assert model.capture_reason(agent_pod, protocol, labels) == want


def req(dst: str, code: str, src: str = "unknown", service: str = "web.default.svc") \
        -> Sample:
    return Sample("istio_requests_total", {
        "source_workload": src, "source_workload_namespace": "default",
        "source_principal": "spiffe://td/ns/default/sa/client",
        "destination_workload": dst, "destination_workload_namespace": "default",
        "destination_service": service, "response_code": code,
        "connection_security_policy": "mutual_tls"}, 10)


@pytest.mark.parametrize(("samples", "want"), [
    ([req("web-v1", "200"), req("web-v1", "503")],
     {"http:default/wp->default/web-v1": (20, 0, 10, ["spiffe://td/ns/default/sa/client"])}),
    # a request the waypoint denied reached no workload: the edge goes to the service
    ([req("unknown", "403")],
     {"http:default/wp->service:web.default.svc": (10, 10, 0,
                                                   ["spiffe://td/ns/default/sa/client"])}),
    # with baggage the waypoint names the client workload
    ([req("web-v1", "200", src="client")],
     {"http:default/wp->default/web-v1": (10, 0, 0, ["default/client"])}),
])
def test_http_edges(samples: list[Sample],
                    want: dict[str, tuple[float, float, float, list[str]]]) -> None:
    wp = model.WaypointRaw("default", "waypoint", "wp", "node-2")
    edges = model.http_edges([wp], {"default/wp": samples}, {"default/wp"})
    got = {k: (e["requests"], e["denied"], e["errors"], [c["id"] for c in e["clients"]])
           for k, e in edges.items()}
    assert got == want


def test_rates_from_an_earlier_model() -> None:
    def m(at: float, conns: float, cpu: float | None) -> dict[str, Any]:
        return {"at": at, "edges": [{"id": "e", "kind": "tcp", "connections": conns,
                                     "bytes": conns * 10}],
                "nodes": [{"name": "n", "cpuSeconds": {"agent": cpu, "ztunnel": None}}]}
    first = model.with_rates(m(0, 5, 1.0), None)
    assert first["edges"][0]["rate"] is None and not first["edges"][0]["active"]
    later = model.with_rates(m(10, 25, 2.0), m(0, 5, 1.0))
    assert later["edges"][0]["rate"] == 2.0 and later["edges"][0]["byteRate"] == 20.0
    assert later["nodes"][0]["cpu"] == {"agent": pytest.approx(0.1), "ztunnel": None}
    # a restarted ztunnel's counters start again from zero: no negative rate
    reset = model.with_rates(m(10, 2, 0.5), m(0, 5, 1.0))
    assert reset["edges"][0]["rate"] == 0.0 and reset["nodes"][0]["cpu"]["agent"] is None


NODE_METRICS = """\
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="destination",source_workload="denied",\
source_workload_namespace="default",destination_workload="server",\
destination_workload_namespace="default",response_flags="DENY",\
connection_security_policy="mutual_tls"} 2.0
# TYPE ambit_ztunnel_policy_denied_total counter
ambit_ztunnel_policy_denied_total{direction="destination",policy="default/allow-client"} 2.0
ambit_ztunnel_policy_denied_total{direction="source",policy="-"} 2.0
# TYPE ambit_agent_info gauge
ambit_agent_info{node="node-2",redirect_mode="iptables",version="0.1.0"} 1.0
# TYPE ambit_xds_connected gauge
ambit_xds_connected 1.0
"""


def test_build_names_the_denying_policy_and_reports_problems() -> None:
    cfg = config(wl("server", "node-2"), wl("denied", "node-1"))
    g = model.Gathered(at=100.0, nodes=[
        model.NodeRaw("node-1", config=cfg, pods=pods(("denied", True, "ambient")),
                      errors={"metrics": "GET 127.0.0.1:15022/metrics: refused"}),
        model.NodeRaw("node-2", metrics=NODE_METRICS, config=cfg,
                      pods=pods(("server", True, "ambient")))])
    m = model.build(g)
    (edge,) = m["edges"]
    assert edge["source"] == "default/denied" and edge["denied"] == 2
    assert edge["deniedBy"] == ["default/allow-client"]
    (policy,) = m["policies"]
    assert policy["denied"] == 2 and policy["selects"] == ["default/server"]
    assert policy["allowed"] == 0
    assert m["problems"] == ["node node-1: metrics: GET 127.0.0.1:15022/metrics: refused"]
    node2 = m["nodes"][1]
    assert node2["agentVersion"] == "0.1.0" and node2["stateFeed"]["connected"] is True
    assert node2["stateFeed"]["version"] == "7"


def test_bad_metrics_text_is_a_problem_not_a_crash() -> None:
    samples, err = promtext.parse("istio_tcp_connections_opened_total{oops 1\n",
                                  ["istio_tcp_connections_opened"])
    assert samples == [] and err is not None and "bad metrics text" in err
    many = "".join(f'x_total{{i="{i}"}} 1\n' for i in range(20))
    samples, err = promtext.parse("# TYPE x_total counter\n" + many, ["x"], max_samples=5)
    assert len(samples) == 5 and err is not None and "more than 5" in err


def doc(kind: str, name: str, spec: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None, ns: str = "default") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels or {}}
    return {"kind": kind, "metadata": meta, "spec": spec or {}}


@pytest.mark.parametrize(("docs", "want"), [
    # the Service names its waypoint
    ([doc("Service", "web", labels={"ambit.dev/use-waypoint": "wp"}),
      doc("HTTPRoute", "r", {"parentRefs": [{"kind": "Service", "name": "web"}]})],
     ["default/wp"]),
    # else its namespace's
    ([doc("Namespace", "default", labels={"ambit.dev/use-waypoint": "nswp"}, ns=""),
      doc("Service", "web"),
      doc("HTTPRoute", "r", {"parentRefs": [{"kind": "Service", "name": "web"}]})],
     ["default/nswp"]),
    # a route on a Gateway is that gateway's
    ([doc("HTTPRoute", "r", {"parentRefs": [{"name": "gw"}]})], ["default/gw"]),
    # a Service with no waypoint: none
    ([doc("Service", "web"),
      doc("HTTPRoute", "r", {"parentRefs": [{"kind": "Service", "name": "web"}]})], [None]),
])
def test_routes_per_waypoint(docs: list[dict[str, Any]], want: list[str | None]) -> None:
    (route,) = model.routes_from(model.Gathered(at=0, registry=docs))
    assert [p["waypoint"] for p in route["parents"]] == want


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"x" * (100 if self.path == "/big" else 10)
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_fetch_is_bounded(local_server: int) -> None:
    assert netns_http.get(None, "127.0.0.1", local_server, "/ok", limit=50) == b"x" * 10
    with pytest.raises(netns_http.FetchError, match="larger than 50 bytes"):
        netns_http.get(None, "127.0.0.1", local_server, "/big", limit=50)
    with pytest.raises(netns_http.FetchError, match="404"):
        netns_http.get(None, "127.0.0.1", local_server, "/missing")
    with pytest.raises(netns_http.FetchError, match="cannot enter network namespace"):
        netns_http.get("/nonexistent/netns", "127.0.0.1", local_server, "/ok")


def test_edge_ends_outside_the_state_become_graph_nodes() -> None:
    g = model.Gathered(at=1.0, nodes=[model.NodeRaw("node-1", metrics=(
        "# TYPE istio_tcp_connections_opened_total counter\n"
        'istio_tcp_connections_opened_total{reporter="destination",source_workload="unknown",'
        'destination_workload="gone",destination_workload_namespace="shop"} 1.0\n'))])
    m = model.build(g)
    ends = {w["id"]: (w["kind"], w["namespace"], w["name"]) for w in m["workloads"]}
    assert ends == {"unknown": ("external", None, "unknown"),
                    "shop/gone": ("workload", "shop", "gone")}


def test_a_failed_ztunnel_scrape_is_a_problem() -> None:
    text = "# TYPE ambit_agent_ztunnel_scrape_up gauge\nambit_agent_ztunnel_scrape_up 0\n"
    m = model.build(model.Gathered(at=1.0, nodes=[model.NodeRaw("node-2", metrics=text)]))
    assert m["nodes"][0]["ztunnelScrapeUp"] == 0
    assert m["problems"] == ["node node-2: the agent could not read the ztunnel's metrics; "
                             "its edges, denials and state feed are missing until it can"]
    ok = text.replace(" 0\n", " 1\n")
    assert model.build(model.Gathered(at=1.0, nodes=[model.NodeRaw("n", metrics=ok)]))[
        "problems"] == []

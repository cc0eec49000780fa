"""Kubernetes objects to registry records: the rules of ``k8s_convert`` as data, and Backoff."""

from __future__ import annotations

import ipaddress
from typing import Any

from controller.registry.k8s_convert import (
    build_snapshot,
    gateway_record,
    http_route_records,
    pod_record,
    service_record,
)
from controller.registry.k8s_watch import Backoff
from controller.waypoint.model import Gateway
from tests.k8s_double import objects as o


def collect() -> tuple[list[str], Any]:
    problems: list[str] = []
    return problems, problems.append


def test_pod_fields() -> None:
    problems, report = collect()
    obj = o.pod("web-5c9f8d7b6-x2x4q", "shop", "10.0.0.5", node="n1", sa="web",
                labels={"app": "web"}, replicaset="web-5c9f8d7b6")
    obj["status"]["podIPs"].append({"ip": "fd00::5"})
    pod = pod_record(obj, report)
    assert pod is not None and problems == []
    assert (pod.key, pod.node, pod.service_account, pod.workload_name, pod.ready) == \
        ("shop/web-5c9f8d7b6-x2x4q", "n1", "web", "web", True)
    assert pod.ips == (ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("fd00::5"))
    assert dict(pod.labels)["app"] == "web"


def test_pod_service_account_defaults_and_owner_kinds() -> None:
    obj = o.pod("job-x", "shop", "10.0.0.6")
    del obj["spec"]["serviceAccountName"]
    obj["metadata"]["ownerReferences"] = [
        {"kind": "Node", "name": "not-a-controller"},
        {"kind": "Job", "name": "nightly", "controller": True}]
    pod = pod_record(obj, collect()[1])
    assert pod is not None and (pod.service_account, pod.workload_name) == ("default", "nightly")


def test_pods_that_cannot_or_must_not_be_addressed_are_left_out() -> None:
    problems, report = collect()
    assert pod_record(o.pod("b", "shop", "10.0.0.1", node=None), report) is None  # unscheduled
    assert pod_record(o.pod("c", "shop", "10.0.0.1", host_network=True), report) is None
    assert pod_record(o.pod("d", "shop", "10.0.0.1", phase="Succeeded"), report) is None
    assert problems == []
    bad = o.pod("e", "shop", "10.0.0.300")
    assert pod_record(bad, report) is None
    assert problems == ["Pod shop/e: status.podIPs[0].ip: '10.0.0.300' is not an IP address; "
                        "pod left out"]


def test_a_scheduled_pod_without_ip_is_kept_for_cni_time_membership() -> None:
    # The agent asks about it at CNI ADD, before the kubelet reports its IP.
    pod = pod_record(o.pod("a", "shop", None), collect()[1])
    assert pod is not None and pod.ips == () and pod.node == "node-a"


def test_readiness() -> None:
    assert pod_record(o.pod("a", "shop", "10.0.0.1", ready=False), collect()[1]).ready is False  # type: ignore[union-attr]
    terminating = o.pod("b", "shop", "10.0.0.2")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_record(terminating, collect()[1]).ready is False  # type: ignore[union-attr]


def svc(target: Any, **kw: Any) -> dict[str, Any]:
    port = {"name": "http", "port": 80, "protocol": "TCP"}
    if target is not None:
        port["targetPort"] = target
    return o.service("echo", "shop", "10.96.0.1", {"app": "echo"}, [port], **kw)


def test_service_target_ports() -> None:
    problems, report = collect()
    for target, expected in ((None, 80), (8080, 8080)):
        s = service_record(svc(target), [], [], report)
        assert s is not None and [(p.port, p.target_port) for p in s.ports] == [(80, expected)]
    echo = o.pod("e1", "shop", "10.0.0.1", labels={"app": "echo"}, ports={"web": 8081})
    other = o.pod("x", "shop", "10.0.0.2", labels={"app": "other"}, ports={"web": 9999})
    s = service_record(svc("web"), [], [echo, other], report)
    assert s is not None and s.ports[0].target_port == 8081  # only selected pods count
    # The EndpointSlice is the endpoint controller's own resolution: it wins.
    sl = o.endpoint_slice("echo-abc", "shop", "echo", {"http": 7070}, ["10.0.0.1"])
    unrelated = o.endpoint_slice("x-abc", "shop", "x", {"http": 6060}, ["10.0.0.2"])
    s = service_record(svc("web"), [sl, unrelated], [echo], report)
    assert s is not None and s.ports[0].target_port == 7070
    assert problems == []


def test_unresolvable_named_target_ports_are_left_out_with_the_field() -> None:
    problems, report = collect()
    s = service_record(svc("web"), [], [], report)
    assert s is not None and s.ports == ()
    e1 = o.pod("e1", "shop", "10.0.0.1", labels={"app": "echo"}, ports={"web": 8081})
    e2 = o.pod("e2", "shop", "10.0.0.2", labels={"app": "echo"}, ports={"web": 8082})
    s = service_record(svc("web"), [], [e1, e2], report)
    assert s is not None and s.ports == ()
    assert problems[0].startswith("Service shop/echo: spec.ports[0].targetPort: named port "
                                  "'web' cannot be resolved (no EndpointSlice")
    assert "[8081, 8082] on different pods" in problems[1]


def test_headless_and_external_name_services() -> None:
    headless = svc(80)
    headless["spec"]["clusterIP"] = "None"
    headless["spec"]["clusterIPs"] = ["None"]
    s = service_record(headless, [], [], collect()[1])
    assert s is not None and s.cluster_ips == ()
    external = {"metadata": {"name": "db", "namespace": "shop"},
                "spec": {"type": "ExternalName", "externalName": "db.example.com"}}
    assert service_record(external, [], [], collect()[1]) is None


def test_policies_are_kept_as_written_and_problems_name_the_field() -> None:
    problems, report = collect()
    caches = {
        "namespaces": {"shop": o.namespace("shop")},
        "authorizationpolicies": {
            "shop/ok": o.authorization_policy("ok", "shop", {"action": "DENY"}),
            "shop/bad": o.authorization_policy("bad", "shop", {"action": "NOPE"}),
        },
        "peerauthentications": {
            "shop/pa": o.peer_authentication("pa", "shop", {"mtls": {"mode": "STRICTER"}}),
        },
    }
    snap = build_snapshot(caches, 7, report)
    assert snap.revision == 7 and [n.name for n in snap.namespaces] == ["shop"]
    assert [(p.key, dict(p.spec)) for p in snap.authorization_policies] == [
        ("shop/bad", {"action": "NOPE"}), ("shop/ok", {"action": "DENY"})]
    assert problems == [
        "AuthorizationPolicy shop/bad: spec.action: 'NOPE' is not one of ALLOW, DENY, AUDIT; "
        "it fails closed until fixed",
        "PeerAuthentication shop/pa: spec.mtls.mode: 'STRICTER' is not one of UNSET, STRICT, "
        "PERMISSIVE, DISABLE; it fails closed (STRICT) until fixed",
    ]


def test_backoff_grows_to_its_cap_with_jitter_and_resets() -> None:
    b = Backoff(initial=1.0, cap=8.0, factor=2.0, jitter=0.5)
    delays = [b.delay() for _ in range(6)]
    for d, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert base <= d <= base * 1.5
    b.reset()
    assert 1.0 <= b.delay() <= 1.5


# --- waypoint kinds (issue 5) ----------------------------------------------------------------

SERVICE_PARENT = {"group": "", "kind": "Service", "name": "reviews"}


def test_service_labels_are_kept() -> None:
    s = service_record(o.service("r", "shop", "10.96.0.1", {}, [{"port": 80}],
                                 labels={"ambit.dev/use-waypoint": "waypoint"}),
                       [], [], collect()[1])
    assert s is not None and s.labels == (("ambit.dev/use-waypoint", "waypoint"),)


def test_gateways_of_other_classes_are_skipped_and_bad_waypoints_reported() -> None:
    problems, report = collect()
    ingress = o.gateway("ingress", "shop", gateway_class="istio")
    assert gateway_record(ingress, report) is None and problems == []
    gw = gateway_record(o.gateway("waypoint", "shop", labels={"ambit.dev/waypoint-for": "all"}),
                        report)
    assert gw == Gateway("waypoint", "shop", waypoint_for="all",
                         labels=(("ambit.dev/waypoint-for", "all"),))
    bad = o.gateway("bad", "shop")
    bad["spec"]["listeners"][0]["port"] = 80
    assert gateway_record(bad, report) is None
    assert problems == ["Gateway shop/bad: spec.listeners[0].port: a waypoint listens on port "
                        "15008 (HBONE) only, got 80; it is not run as a waypoint until fixed"]


def test_routes_precedence_relevance_and_problems() -> None:
    problems, report = collect()
    routes = [
        o.http_route("newer", "shop", {"parentRefs": [SERVICE_PARENT]},
                     created="2026-01-02T00:00:00Z"),
        o.http_route("older", "shop", {"parentRefs": [SERVICE_PARENT]},
                     created="2026-01-01T00:00:00Z"),
        # Same time: namespace/name decides.
        o.http_route("b-same", "shop", {"parentRefs": [SERVICE_PARENT]},
                     created="2026-01-01T12:00:00Z"),
        o.http_route("a-same", "shop", {"parentRefs": [SERVICE_PARENT]},
                     created="2026-01-01T12:00:00Z"),
        # Attached to the waypoint Gateway: ours.
        o.http_route("to-waypoint", "shop", {"parentRefs": [{"name": "waypoint"}]},
                     created="2026-01-03T00:00:00Z"),
        # An ingress controller's route (another Gateway): not ours, whatever it contains.
        o.http_route("ingress", "shop", {"parentRefs": [{"name": "public"}],
                                         "hostnames": ["shop.example"]}),
        # Ours, but invalid: left out with the field named.
        o.http_route("bad", "shop", {"parentRefs": [SERVICE_PARENT],
                                     "rules": [{"filters": [{"type": "RequestMirror",
                                                             "requestMirror": {}}]}]}),
    ]
    out = http_route_records(routes, [Gateway("waypoint", "shop")], report)
    by_index = [r.name for r in sorted(out, key=lambda r: r.creation_index)]
    assert by_index == ["older", "a-same", "b-same", "newer", "to-waypoint"]
    assert [r.name for r in out] == sorted(by_index)  # listed by key
    assert problems == ["HTTPRoute shop/bad: spec.rules[0].filters[0].type: RequestMirror is "
                        "not supported by the waypoint yet; supported filters here: "
                        "RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, "
                        "URLRewrite, ExtensionRef (to an HTTPFault); the route is not applied "
                        "until fixed"]


def test_snapshot_carries_waypoint_kinds_and_checks_target_ref_policies() -> None:
    problems, report = collect()
    caches = {
        "gateways": {"shop/waypoint": o.gateway("waypoint", "shop"),
                     "shop/ingress": o.gateway("ingress", "shop", gateway_class="gke-l7")},
        "httproutes": {"shop/r": o.http_route("r", "shop", {
            "parentRefs": [SERVICE_PARENT],
            "rules": [{"filters": [{"type": "ExtensionRef", "extensionRef": {
                "group": "networking.ambit.dev", "kind": "HTTPFault", "name": "slow"}}],
                "backendRefs": [{"group": "", "kind": "Service", "name": "reviews",
                                 "port": 9080, "weight": 1}]}]})},
        "httpfaults": {
            "shop/slow": o.http_fault("slow", "shop", {"delay": {"fixedDelay": "1s"}}),
            "shop/broken": o.http_fault("broken", "shop", {"abort": {"httpStatus": 9}})},
        "authorizationpolicies": {
            "shop/l7": o.authorization_policy("l7", "shop", {
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                "name": "waypoint"}],
                "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
            "shop/l7-bad": o.authorization_policy("l7-bad", "shop", {
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                "name": "waypoint"}], "action": "AUDIT"})},
    }
    snap = build_snapshot(caches, 3, report)
    assert [g.key for g in snap.gateways] == ["shop/waypoint"]
    assert [r.key for r in snap.http_routes] == ["shop/r"]
    assert snap.http_routes[0].rules[0].fault_ref == "shop/slow"
    assert [f.key for f in snap.http_faults] == ["shop/slow"]
    assert [p.key for p in snap.authorization_policies] == ["shop/l7", "shop/l7-bad"]
    assert problems == [
        "AuthorizationPolicy shop/l7-bad: spec.action: 'AUDIT' is not supported by the "
        "waypoint; use ALLOW or DENY; it fails closed until fixed",
        "HTTPFault shop/broken: spec.abort.httpStatus: must be an integer 200..599, got 9; "
        "route rules that use it answer HTTP 500 until it is fixed",
    ]


def test_a_route_with_a_wrong_service_group_is_reported_not_skipped() -> None:
    problems, report = collect()
    # The API server defaults a missing group to the Gateway API's: a common mistake.
    obj = o.http_route("r", "shop", {"parentRefs": [{"group": "gateway.networking.k8s.io",
                                                     "kind": "Service", "name": "reviews"}]})
    assert http_route_records([obj], [], report) == ()
    assert problems[0].startswith("HTTPRoute shop/r: spec.parentRefs[0].group: "
                                  "'gateway.networking.k8s.io': a Service is in the core group")


# --- issue 18: appProtocol, GRPCRoute, TCPRoute -----------------------------------------------

def test_service_app_protocol_is_kept() -> None:
    s = service_record(o.service("echo", "shop", "10.96.0.1", {}, [
        {"name": "grpc", "port": 7070, "appProtocol": "kubernetes.io/h2c"},
        {"name": "tcp", "port": 9090}]), [], [], collect()[1])
    assert s is not None
    assert [(p.name, p.app_protocol) for p in s.ports] == [("grpc", "kubernetes.io/h2c"),
                                                           ("tcp", "")]


def test_snapshot_carries_grpc_and_tcp_routes() -> None:
    problems, report = collect()
    grpc_parent = {"group": "", "kind": "Service", "name": "echo", "port": 7070}
    caches = {
        "httproutes": {"shop/h": o.http_route("h", "shop", {"parentRefs": [SERVICE_PARENT]},
                                              created="2026-01-02T00:00:00Z")},
        "grpcroutes": {
            "shop/g": o.http_route("g", "shop", {"parentRefs": [grpc_parent], "rules": [
                {"matches": [{"method": {"service": "grpc.Echo"}}],
                 "backendRefs": [{"name": "echo-v1", "port": 7070}]}]},
                created="2026-01-01T00:00:00Z"),
            "shop/bad": o.http_route("bad", "shop", {"parentRefs": [grpc_parent], "rules": [
                {"matches": [{"method": {}}]}]})},
        "tcproutes": {
            "shop/t": o.http_route("t", "shop", {
                "parentRefs": [{"group": "", "kind": "Service", "name": "db", "port": 5432}],
                "rules": [{"backendRefs": [{"name": "db-a", "port": 5432}]}]}),
            # An ingress Gateway's TCPRoute: not ours.
            "shop/ingress": o.http_route("ingress", "shop", {
                "parentRefs": [{"name": "public"}], "rules": [{"backendRefs": []}]})},
    }
    snap = build_snapshot(caches, 1, report)
    # One precedence order for HTTP and gRPC routes: the GRPCRoute is older (index 0 went
    # to "bad", which has no timestamp and sorts first).
    assert [(r.kind, r.name, r.creation_index) for r in snap.http_routes] == [
        ("GRPCRoute", "g", 1), ("HTTPRoute", "h", 2)]
    assert [r.key for r in snap.tcp_routes] == ["shop/t"]
    assert problems == ["GRPCRoute shop/bad: spec.rules[0].matches[0].method: needs service, "
                        "method or both; the route is not applied until fixed"]

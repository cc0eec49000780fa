"""The Kubernetes source's pure conversions (``ambit.dashboard.kube``): the API's lists to the
controller's snapshot and the mesh state the model reads, and which pods are node agents and
waypoints. The requests themselves are tested against the API double
(tests/component/test_dashboard_kube.py)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from ambit.dashboard import kube, model
from ambit.dashboard.netns_http import FetchError
from mesh.state.model import MeshConfig, Protocol, Service, ServicePort, WaypointRef, Workload

IP = ipaddress.ip_address


def pod(name: str, ns: str, labels: dict[str, str], *, phase: str = "Running",
        node: str = "node-a", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": node}, "status": {"phase": phase}}


def owner(ns: str, labels: dict[str, str] | None) -> dict[str, Any]:
    return {"metadata": {"name": "ambit-node", "namespace": ns},
            "spec": {"selector": {"matchLabels": labels} if labels is not None else {}}}


def test_selected_pods_are_the_owners_in_its_namespace_by_name() -> None:
    pods = [pod("b", "ambit-system", {"app": "node"}), pod("a", "ambit-system", {"app": "node"}),
            pod("c", "default", {"app": "node"}), pod("d", "ambit-system", {"app": "other"})]
    got = kube.selected_pods(owner("ambit-system", {"app": "node"}), pods)
    assert [p["metadata"]["name"] for p in got] == ["a", "b"]
    # No selector selects nothing (never every pod of the namespace); no owner, nothing.
    assert kube.selected_pods(owner("ambit-system", {}), pods) == []
    assert kube.selected_pods(owner("ambit-system", None), pods) == []
    assert kube.selected_pods(None, pods) == []


def test_waypoint_pods_are_the_running_ones_with_the_gateway_label() -> None:
    label = {model.GATEWAY_LABEL: "wp"}
    pods = [pod("wp-2", "shop", label, node="node-b"), pod("wp-1", "shop", label),
            pod("wp-3", "shop", label, phase="Pending"), pod("wp-4", "shop", label,
                                                             deleting=True),
            pod("web", "shop", {"app": "web"})]
    got = kube.waypoint_pods(pods)
    assert [(w.namespace, w.name, w.pod, w.node) for w in got] == [
        ("shop", "wp", "wp-1", "node-a"), ("shop", "wp", "wp-2", "node-b")]


def test_caches_key_objects_as_the_reflectors_do() -> None:
    ns = {"metadata": {"name": "shop"}}
    p = pod("web", "shop", {})
    assert kube.caches({"namespaces": [ns], "pods": [p]}) == {
        "namespaces": {"/shop": ns}, "pods": {"shop/web": p}}


@pytest.mark.parametrize(("body", "error"), [
    (b"not json", "not JSON"),
    (b"[1]", "not a Kubernetes list"),
    (b'{"items": {}}', "not a Kubernetes list"),
])
def test_items_refuses_what_is_not_a_list(body: bytes, error: str) -> None:
    with pytest.raises(FetchError, match=error):
        kube.items(body, "GET /api/v1/pods")


def test_items_keeps_only_objects() -> None:
    assert kube.items(b'{"items": [{"a": 1}, 2, null]}', "x") == [{"a": 1}]
    assert kube.items(b'{"kind": "PodList"}', "x") == []


def wl(name: str, labels: dict[str, str], *, healthy: bool = True, ns: str = "shop") \
        -> Workload:
    return Workload(uid=f"{ns}/{name}", name=name, namespace=ns, service_account=name,
                    node="node-a", addresses=(IP("10.0.0.1"),), trust_domain="td",
                    labels=tuple(labels.items()), workload_name="", protocol=Protocol.HBONE,
                    healthy=healthy)


def test_state_document_has_the_config_dumps_shape() -> None:
    cfg = MeshConfig(
        trust_domain="td",
        workloads=(wl("web-1", {"app": "web"}), wl("web-2", {"app": "web"}, healthy=False),
                   wl("web-3", {"app": "web"}, ns="other"), wl("db", {"app": "db"})),
        services=(Service("web", "shop", "web.shop.svc.cluster.local", (IP("10.96.0.1"),),
                          (ServicePort(80, 8080),), (("app", "web"),),
                          WaypointRef("shop", "wp")),
                  Service("none", "shop", "none.shop.svc.cluster.local", (IP("10.96.0.2"),),
                          (ServicePort(80, 80),), ())),
        version="12")
    doc = kube.state_document(cfg)
    assert doc["version"] == "12" and doc["trust_domain"] == "td"
    first = doc["workloads"][0]
    assert first == {"uid": "shop/web-1", "name": "web-1", "namespace": "shop",
                     "node": "node-a", "workload_name": "", "service_account": "web-1",
                     "identity": "spiffe://td/ns/shop/sa/web-1", "addresses": ["10.0.0.1"],
                     "labels": {"app": "web"}, "protocol": "HBONE", "healthy": True}
    web, none = doc["services"]
    # Endpoints: healthy, same namespace, selected; a service without a selector has none.
    assert web["endpoints"] == ["shop/web-1"]
    assert web["waypoint"] == {"namespace": "shop", "name": "wp"}
    assert web["vips"] == ["10.96.0.1"] and web["ports"] == [{"port": 80, "target_port": 8080}]
    assert none["endpoints"] == [] and none["waypoint"] is None


def test_mesh_from_converts_as_the_controller_does() -> None:
    lists: dict[str, list[dict[str, Any]]] = {
        "namespaces": [{"metadata": {"name": "shop",
                                     "labels": {"ambit.dev/dataplane-mode": "ambient"}}},
                       {"metadata": {"name": "legacy"}}],
        "pods": [
            {"metadata": {"name": "web-5d9f-abcde", "namespace": "shop",
                          "labels": {"app": "web", "pod-template-hash": "5d9f"},
                          "ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d9f",
                                               "controller": True}]},
             "spec": {"nodeName": "node-a", "serviceAccountName": "web"},
             "status": {"phase": "Running", "podIP": "10.0.0.5",
                        "podIPs": [{"ip": "10.0.0.5"}],
                        "conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "old", "namespace": "legacy"},
             "spec": {"nodeName": "node-b"},
             "status": {"phase": "Running", "podIP": "10.0.0.6",
                        "podIPs": [{"ip": "10.0.0.6"}]}}],
        "authorizationpolicies": [{"metadata": {"name": "deny", "namespace": "shop"},
                                   "spec": {"action": "DENY", "rules": [{}]}}],
    }
    docs, state, problems = kube.mesh_from(lists, "example.org", 9)
    assert problems == []
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == {
        ("Namespace", "shop"), ("Namespace", "legacy"), ("AuthorizationPolicy", "deny")}
    got = {w["name"]: w for w in state["workloads"]}
    assert got["web-5d9f-abcde"]["workload_name"] == "web"
    assert got["web-5d9f-abcde"]["protocol"] == "HBONE"
    assert got["web-5d9f-abcde"]["identity"] == "spiffe://example.org/ns/shop/sa/web"
    assert got["old"]["protocol"] == "TCP"  # its namespace is not ambient
    assert state["version"] == "9"
    # The model groups the state's workloads and links them to the state's raw document.
    wls = model.workloads([], state)
    assert set(wls) == {"shop/web", "legacy/old"}
    assert wls["shop/web"]["raw"] == "/raw/state" and wls["shop/web"]["node"] == "node-a"


def test_a_conflict_is_reported_as_the_controller_reports_it() -> None:
    def p(name: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": "shop"}, "spec": {"nodeName": "n"},
                "status": {"phase": "Running", "podIP": "10.0.0.5",
                           "podIPs": [{"ip": "10.0.0.5"}]}}
    _, state, problems = kube.mesh_from({"pods": [p("a"), p("b")]}, "td", 1)
    assert state["workloads"] == []
    assert problems == ["address 10.0.0.5 is claimed by pods shop/a, shop/b; given to none of "
                        "them until one alone claims it"]

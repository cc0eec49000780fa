"""Waypoint kinds in the embedded registry: documents, round trips, creation order, `ambit get`.

The commands are driven through ``ambit.registry_cli`` with a parser of their own, so
these tests do not depend on the rest of ``ambit``'s command line.
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambit import registry_cli as commands
from controller.registry.documents import (
    DocumentError,
    load_documents,
    parse_document,
    parse_documents,
    to_document,
)
from controller.registry.model import AuthorizationPolicy, Service
from controller.registry.sqlite import EmbeddedRegistry
from controller.registry.translate import translate
from controller.waypoint.model import Fault, Gateway, HTTPFault, HTTPRoute
from controller.waypoint.parse import resolve_faults, waypoint_policies
from mesh.state.model import WaypointRef

DOCS = load_documents("""
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: shop
  labels: {ambit.dev/waypoint-for: service}
spec:
  gatewayClassName: ambit-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop, labels: {app: reviews}}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: shop
  labels: {ambit.dev/use-waypoint: none}
spec: {clusterIP: 10.96.0.21, ports: [{port: 5432}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}, method: GET}]
    filters:
    - type: ExtensionRef
      extensionRef: {group: networking.ambit.dev, kind: HTTPFault, name: slow}
    backendRefs: [{name: reviews, port: 9080, weight: 3}]
    timeouts: {request: 1m30s}
    retry: {attempts: 2, codes: [503], backoff: 50ms}
---
apiVersion: networking.ambit.dev/v1alpha1
kind: HTTPFault
metadata: {name: slow, namespace: shop}
spec:
  delay: {fixedDelay: 2s, percentage: 25}
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  rules:
  - to: [{operation: {methods: [GET]}}]
""")


def route(name: str, ns: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}]}}


@pytest.fixture
def registry(tmp_path: Path) -> Any:
    with EmbeddedRegistry(tmp_path / "r.db") as r:
        yield r


def test_every_waypoint_document_round_trips() -> None:
    for doc in DOCS:
        record = parse_document(doc)
        again = parse_document(to_document(record))
        assert again == record, doc["kind"]
        # The canonical document is stable: what is stored is what is printed.
        assert to_document(again) == to_document(record)


def test_waypoint_records() -> None:
    records = {type(r).__name__ + "/" + r.name: r for r in parse_documents(DOCS)}
    gw = records["Gateway/waypoint"]
    assert gw == Gateway("waypoint", "shop", labels=(("ambit.dev/waypoint-for", "service"),))
    reviews = records["Service/reviews"]
    assert isinstance(reviews, Service) and reviews.labels == (("app", "reviews"),)
    r = records["HTTPRoute/reviews"]
    assert isinstance(r, HTTPRoute) and r.rules[0].fault_ref == "shop/slow"
    assert r.rules[0].timeout_ms == 90_000
    fault = records["HTTPFault/slow"]
    assert fault == HTTPFault("slow", "shop", Fault(delay_ms=2000, delay_percent=25.0))
    policy = records["AuthorizationPolicy/get-only"]
    assert isinstance(policy, AuthorizationPolicy)
    (wp,), problems = waypoint_policies([policy])
    assert problems == () and wp.rules[0].operations[0].methods[0].value == "GET"


def _doc(kind: str, api: str, meta: dict[str, Any], spec: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": api, "kind": kind, "metadata": meta}
    if spec is not None:
        out["spec"] = spec
    return out


WL_SPEC = {"node": "n", "addresses": ["10.0.0.1"]}
SVC_SPEC = {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}


@pytest.mark.parametrize(("doc", "message"), [
    (_doc("Gateway", "gateway.networking.k8s.io/v1", {"name": "w"},
          {"gatewayClassName": "istio-waypoint"}),
     "spec.gatewayClassName: 'istio-waypoint' is not Ambit's waypoint class"),
    (_doc("Gateway", "gateway.networking.k8s.io/v1beta1", {"name": "w"}, {}),
     "apiVersion: 'gateway.networking.k8s.io/v1beta1' does not serve Gateway; use apiVersion: "
     "gateway.networking.k8s.io/v1"),
    (_doc("Gateway", "gateway.networking.k8s.io/v1", {"name": "a.b"},
          {"gatewayClassName": "ambit-waypoint"}),
     "metadata.name: 'a.b' is not a valid DNS label"),
    (_doc("Gateway", "gateway.networking.k8s.io/v1",
          {"name": "w", "labels": {"ambit.dev/waypoint-for": "everything"}},
          {"gatewayClassName": "ambit-waypoint"}),
     "metadata.labels.ambit.dev/waypoint-for: 'everything' is not one of service, workload, "
     "all, none"),
    (_doc("HTTPRoute", "gateway.networking.k8s.io/v1", {"name": "r", "labels": {"a": "b"}},
          {"parentRefs": [{"name": "w"}]}),
     "metadata.labels: labels on a HTTPRoute have no effect"),
    (_doc("HTTPRoute", "gateway.networking.k8s.io/v1", {"name": "r"},
          {"parentRefs": [{"name": "w"}], "rules": [{"backendRefs": [{"name": "s"}]}]}),
     "spec.rules[0].backendRefs[0].port: is required for a Service backend"),
    (_doc("HTTPFault", "networking.ambit.dev/v1alpha1", {"name": "f"}, {}),
     "spec: needs delay, abort or both"),
    (_doc("HTTPFault", "networking.ambit.dev/v1", {"name": "f"}, {}),
     "apiVersion: 'networking.ambit.dev/v1' does not serve HTTPFault"),
    (_doc("Service", "v1", {"name": "s", "labels": {"ambit.dev/use-waypoint": "Way_Point"}},
          SVC_SPEC), "metadata.labels.ambit.dev/use-waypoint: 'Way_Point' is not a valid DNS "
     "label"),
    (_doc("Service", "v1", {"name": "s", "labels": {"ambit.dev/use-waypoint": "way.point"}},
          SVC_SPEC), "metadata.labels.ambit.dev/use-waypoint: 'way.point' is not a valid DNS "
     "label"),
    (_doc("Service", "v1", {"name": "s", "labels": {
        "ambit.dev/use-waypoint-namespace": "infra"}}, SVC_SPEC),
     "metadata.labels.ambit.dev/use-waypoint-namespace: has no effect without "
     "ambit.dev/use-waypoint on the same Service"),
    (_doc("Namespace", "v1", {"name": "n", "labels": {
        "ambit.dev/use-waypoint-namespace": "infra"}}),
     "metadata.labels.ambit.dev/use-waypoint-namespace: has no effect without "
     "ambit.dev/use-waypoint on the same Namespace"),
    (_doc("Service", "v1", {"name": "s", "labels": {"ambit.dev/waypoint-for": "service"}},
          SVC_SPEC),
     "metadata.labels.ambit.dev/waypoint-for: has no effect on a Service; it belongs on a "
     "waypoint Gateway"),
    (_doc("Workload", "ambit.dev/v1", {"name": "w", "labels": {
        "ambit.dev/use-waypoint": "waypoint"}}, WL_SPEC),
     "metadata.labels.ambit.dev/use-waypoint: has no effect on a Workload: only Services and "
     "Namespaces are bound to waypoints"),
    (_doc("AuthorizationPolicy", "security.ambit.dev/v1", {"name": "p"},
          {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                           "name": "w"}], "selector": {"matchLabels": {"a": "b"}}}),
     "spec.selector: a policy either selects workloads"),
    (_doc("AuthorizationPolicy", "security.ambit.dev/v1", {"name": "p"},
          {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                           "name": "w"}], "action": "AUDIT"}),
     "spec.action: 'AUDIT' is not supported by the waypoint"),
])
def test_document_errors(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(DocumentError) as e:
        parse_documents([doc])
    assert message in str(e.value), str(e.value)


def test_waypoint_pod_labels_are_accepted_on_workloads() -> None:
    (pod,) = parse_documents([_doc("Workload", "ambit.dev/v1", {"name": "waypoint-1", "labels": {
        "gateway.networking.k8s.io/gateway-name": "waypoint"}}, WL_SPEC)])
    assert dict(pod.labels)["gateway.networking.k8s.io/gateway-name"] == "waypoint"


def test_snapshot_holds_the_waypoint_kinds(registry: EmbeddedRegistry) -> None:
    registry.apply(DOCS)
    snap = registry.snapshot()
    assert [g.key for g in snap.gateways] == ["shop/waypoint"]
    assert [r.key for r in snap.http_routes] == ["shop/reviews"]
    assert [f.key for f in snap.http_faults] == ["shop/slow"]
    assert snap.gateway("shop", "waypoint") is not None and snap.gateway("x", "waypoint") is None
    (resolved,) = resolve_faults(snap.http_routes, snap.http_faults)
    assert resolved.rules[0].fault == Fault(delay_ms=2000, delay_percent=25.0)
    t = translate(snap, "cluster.local", snap.revision)
    bindings = {s.key: s.waypoint for s in t.config.services}
    assert bindings == {"shop/reviews": WaypointRef("shop", "waypoint"), "shop/db": None}
    assert t.problems == () and [p.key for p in t.config.policies] == []
    # Re-applying the same documents changes nothing (canonical documents are stable).
    assert {c.action for c in registry.apply(DOCS)} == {"unchanged"}


def test_routes_are_numbered_in_order_of_first_creation(registry: EmbeddedRegistry) -> None:
    registry.apply([route("zeta")])
    registry.apply([route("alpha"), route("mid", "other")])

    def order() -> list[str]:
        routes = sorted(registry.snapshot().http_routes, key=lambda r: r.creation_index)
        return [r.key for r in routes]

    assert order() == ["shop/zeta", "shop/alpha", "other/mid"]
    # An update keeps a route's place, as a Kubernetes object keeps its creationTimestamp.
    changed = route("zeta")
    changed["spec"]["rules"] = [{"backendRefs": [{"name": "reviews", "port": 80}]}]
    assert [c.action for c in registry.apply([changed])] == ["configured"]
    assert order() == ["shop/zeta", "shop/alpha", "other/mid"]
    # Deleted and created again, it is the newest.
    registry.delete("HTTPRoute", "shop", "zeta")
    registry.apply([route("zeta")])
    assert order() == ["shop/alpha", "other/mid", "shop/zeta"]
    # Snapshots list records by kind/namespace/name; the index carries the age.
    assert [r.key for r in registry.snapshot().http_routes] == [
        "other/mid", "shop/alpha", "shop/zeta"]


def run(db: Path, *argv: str) -> str:
    parser = argparse.ArgumentParser(prog="ambit")
    commands.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args([*argv, "--db", str(db)])
    out = io.StringIO()
    assert commands.run(args, out) == 0
    return out.getvalue()


def test_ambit_get_lists_waypoint_kinds(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    f = tmp_path / "all.yaml"
    f.write_text(yaml.safe_dump_all(DOCS))
    run(db, "apply", "-f", str(f))
    with EmbeddedRegistry(db) as r:
        r.apply(load_documents("""
apiVersion: ambit.dev/v1
kind: Workload
metadata:
  name: waypoint-1
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: waypoint}
spec: {serviceAccount: waypoint, node: n1, addresses: [10.0.0.9]}
"""))
    table = run(db, "get")
    lines = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert lines["shop/waypoint"].split()[1:] == ["service", "1/1", "ready", "1"]
    (service,) = [line for line in table.splitlines() if "10.96.0.20" in line]
    assert service.split()[-1] == "shop/waypoint"  # the service's binding
    assert lines["shop/db"].split()[-1] == "-"
    assert "TCP (it is an instance of waypoint waypoint" in lines["shop/waypoint-1"]
    assert "targets:Gateway/waypoint" in lines["shop/get-only"]
    assert run(db, "get", "httproutes").splitlines()[-1].split() == [
        "shop/reviews", "Service/shop/reviews:9080", "1", "shop/reviews:9080"]
    assert run(db, "get", "httpfaults").splitlines()[-1].split() == [
        "shop/slow", "2s@25%", "-"]
    assert "shop/waypoint" in run(db, "get", "gtw")
    # -o yaml prints documents that apply back unchanged.
    exported = tmp_path / "exported.yaml"
    exported.write_text(run(db, "get", "-o", "yaml"))
    assert "created" not in run(db, "apply", "-f", str(exported))
    assert "configured" not in run(db, "apply", "-f", str(exported))
    assert run(db, "delete", "httproute", "shop/reviews") == "HTTPRoute shop/reviews deleted\n"
    assert run(db, "delete", "gateway", "shop/waypoint") == "Gateway shop/waypoint deleted\n"


def test_get_one_route_carries_its_creation_index(registry: EmbeddedRegistry) -> None:
    registry.apply([route("a"), route("b")])
    a, b = registry.get("HTTPRoute", "shop", "a"), registry.get("HTTPRoute", "shop", "b")
    assert isinstance(a, HTTPRoute) and isinstance(b, HTTPRoute)
    assert a.creation_index < b.creation_index
    assert a in registry.snapshot().http_routes


def test_the_documented_examples_apply() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "registry.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    kinds = {type(r).__name__ for b in blocks for r in parse_documents(load_documents(b))}
    assert {"Gateway", "HTTPRoute", "HTTPFault"} <= kinds

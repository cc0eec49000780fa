"""Issue 18 in the embedded registry: appProtocol on Service ports, GRPCRoute and TCPRoute
documents (round trips, snapshot, creation order, `ambit get`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.registry.documents import (
    DocumentError,
    load_documents,
    parse_document,
    parse_documents,
    to_document,
)
from controller.registry.model import Service
from controller.registry.sqlite import EmbeddedRegistry
from controller.waypoint.model import GRPC_ROUTE, HTTPRoute, TCPRoute
from tests.unit.test_registry_waypoint import run

DOCS = load_documents("""
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: mesh}
spec:
  clusterIP: 10.96.0.30
  selector: {app: echo}
  ports:
  - {name: http, port: 80, appProtocol: http, targetPort: 8080}
  - {name: grpc, port: 7070, appProtocol: kubernetes.io/h2c}
  - {name: tcp, port: 9090}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-echo, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
  - matches: [{method: {service: grpc.Echo, method: Ping}, headers: [{name: x-a, value: b}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-header-set, value: v}]}
    backendRefs: [{name: echo, port: 7070, weight: 70}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: tcp-echo, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 9090}]
  rules: [{backendRefs: [{name: echo, port: 9090}]}]
""")


def test_documents_round_trip() -> None:
    for doc in DOCS:
        record = parse_document(doc)
        assert parse_document(to_document(record)) == record, doc["kind"]
        assert to_document(record)["kind"] == doc["kind"]


def test_app_protocol_is_kept() -> None:
    svc = parse_document(DOCS[0])
    assert isinstance(svc, Service)
    assert [(p.name, p.app_protocol) for p in svc.ports] == [
        ("http", "http"), ("grpc", "kubernetes.io/h2c"), ("tcp", "")]


@pytest.mark.parametrize(("value", "message"), [
    ("HTTP", "'HTTP' is not a protocol name"),
    ("kubernetes.io/", "'kubernetes.io/' is not a protocol name"),
    ("Bad_Domain/h2c", "'Bad_Domain' is not a valid DNS name"),
    (7, "expected a non-empty string, got 7"),
])
def test_bad_app_protocol(value: Any, message: str) -> None:
    doc = yaml.safe_load(yaml.safe_dump(DOCS[0]))
    doc["spec"]["ports"][1]["appProtocol"] = value
    with pytest.raises(DocumentError) as e:
        parse_documents([doc])
    assert "spec.ports[1].appProtocol: " in str(e.value) and message in str(e.value), \
        str(e.value)


def test_snapshot_and_get(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    f = tmp_path / "all.yaml"
    f.write_text(yaml.safe_dump_all(DOCS))
    run(db, "apply", "-f", str(f))
    with EmbeddedRegistry(db) as r:
        snap = r.snapshot()
        (grpc,) = snap.http_routes
        assert isinstance(grpc, HTTPRoute) and grpc.kind == GRPC_ROUTE
        (tcp,) = snap.tcp_routes
        assert isinstance(tcp, TCPRoute) and grpc.creation_index < tcp.creation_index
        assert r.get("GRPCRoute", "mesh", "grpc-echo") == grpc
        assert r.get("HTTPRoute", "mesh", "grpc-echo") is None
    assert run(db, "get", "grpcroutes").splitlines()[-1].split() == [
        "mesh/grpc-echo", "Service/mesh/echo:7070", "1", "mesh/echo:7070"]
    assert run(db, "get", "tcproute").splitlines()[-1].split() == [
        "mesh/tcp-echo", "Service/mesh/echo:9090", "mesh/echo:9090@1"]
    assert "grpc-echo" not in run(db, "get", "httproutes")
    exported = tmp_path / "exported.yaml"
    exported.write_text(run(db, "get", "-o", "yaml"))
    assert "created" not in run(db, "apply", "-f", str(exported))
    assert "configured" not in run(db, "apply", "-f", str(exported))
    assert run(db, "delete", "grpcroute", "mesh/grpc-echo") == \
        "GRPCRoute mesh/grpc-echo deleted\n"

"""The upstream MESH-GRPC conformance tests (``grpcroute-request-header-modifier.go``,
``grpcroute-weight.go``) against the dev cluster's waypoint: GRPCRoutes on the ``echo``
Service's gRPC port (7070, appProtocol kubernetes.io/h2c), carried over HTTP/2 end to end."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance.conftest import MESH_NS, Mesh
from tests.conformance.expect import Case, Expect, Req
from tests.conformance.test_mesh_http import _weights

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

PARENT = {"group": "", "kind": "Service", "name": "echo", "port": 7070}


def grpc_route(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": name, "namespace": MESH_NS},
            "spec": {"parentRefs": [PARENT], "rules": rules}}


def test_mesh_grpcroute_request_header_modifier(mesh: Mesh) -> None:
    def rule(case: str, modifier: dict[str, Any], target: str) -> dict[str, Any]:
        return {"matches": [{"headers": [{"name": "x-test-case", "value": case}]}],
                "filters": [{"type": "RequestHeaderModifier",
                             "requestHeaderModifier": modifier}],
                "backendRefs": [{"name": target, "port": 7070}]}

    docs = [grpc_route("grpc-request-header-modifier", [
        rule("set", {"set": [{"name": "x-header-set", "value": "set-overwrites-values"}]},
             "echo-v1"),
        rule("add", {"add": [{"name": "x-header-add", "value": "add-appends-values"}]},
             "echo-v1"),
        rule("remove", {"remove": ["x-header-remove"]}, "echo-v1"),
        rule("multi", {"set": [{"name": "x-header-set-1", "value": "header-set-1"},
                               {"name": "x-header-set-2", "value": "header-set-2"}],
                       "add": [{"name": "x-header-add-1", "value": "header-add-1"},
                               {"name": "x-header-add-2", "value": "header-add-2"}],
                       "remove": ["x-header-remove-1", "x-header-remove-2"]}, "echo-v2")])]

    def case(name: str, match: str, sent: dict[str, str], seen: dict[str, str],
             backend: str, client: str, absent: tuple[str, ...] = ()) -> Case:
        return Case(name, Req("echo:7070", protocol="grpc",
                              headers=(("x-test-case", match), *sent.items())),
                    Expect(backend=backend, request_headers={"x-test-case": match, **seen},
                           absent_request_headers=absent), client=client)

    mesh.check(docs, [
        case("Set headers -- overwrites existing header", "set",
             {"some-other-header": "this-header-should-be-set",
              "x-header-set": "this-value-should-be-overwritten"},
             {"some-other-header": "this-header-should-be-set",
              "x-header-set": "set-overwrites-values"}, "echo-v1", "echo-v1"),
        case("Add headers -- appends to existing header", "add",
             {"x-header-add": "this-value-should-be-appended"},
             {"x-header-add": "this-value-should-be-appended,add-appends-values"},
             "echo-v1", "echo-v1"),
        case("Remove headers -- removes headers", "remove",
             {"x-header-remove": "this-should-be-removed"}, {}, "echo-v1", "echo-v1",
             ("x-header-remove",)),
        case("Multiple operations -- set, add, and remove headers", "multi",
             {"x-header-set-2": "set-header-2", "x-header-add-2": "add-header-2",
              "x-header-remove-2": "should-be-removed-2"},
             {"x-header-set-1": "header-set-1", "x-header-set-2": "header-set-2",
              "x-header-add-1": "header-add-1", "x-header-add-2": "add-header-2,header-add-2"},
             "echo-v2", "echo-v2", ("x-header-remove-1", "x-header-remove-2")),
    ])


def test_mesh_grpcroute_weight(mesh: Mesh) -> None:
    docs = [grpc_route("mesh-grpc-weighted-backends", [{"backendRefs": [
        {"name": "echo-v1", "port": 7070, "weight": 70},
        {"name": "echo-v2", "port": 7070, "weight": 30},
        {"name": "echo-v3", "port": 7070, "weight": 0}]}])]
    req = Req("echo:7070", protocol="grpc")
    mesh.apply(docs)  # waits until the waypoint has the route
    try:
        mesh.eventually([Case("gRPC echo answers", req, Expect(200))])
        _weights(mesh, req, {"echo-v1": 0.7, "echo-v2": 0.3})
    finally:
        mesh.remove(docs)

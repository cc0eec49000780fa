"""Parsing the Gateway API features the Mesh profile needs (issue 18): redirects, rewrites,
query parameter matches, per-backend filters, consumer routes, GRPCRoute and TCPRoute, and
their canonical specs round-tripping."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.waypoint.model import (
    GRPC_ROUTE,
    BackendRef,
    GRPCMethodMatch,
    HeaderMatch,
    HeaderMatchType,
    HeaderModifier,
    ParentRef,
    PathMatch,
    PathMatchType,
    PathModifier,
    PathModifierType,
    QueryParamMatch,
    Redirect,
    RouteMatch,
    TCPRoute,
    URLRewrite,
)
from controller.waypoint.parse import (
    http_route_spec,
    parse_grpc_route,
    parse_http_route,
    parse_tcp_route,
    tcp_route_spec,
)
from mesh.state.parse import StateError

SVC = {"group": "", "kind": "Service", "name": "echo", "port": 80}

L7_ROUTE: dict[str, Any] = {
    "parentRefs": [SVC],
    "rules": [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"},
                      "queryParams": [{"name": "animal", "value": "whale"},
                                      {"type": "RegularExpression", "name": "n",
                                       "value": "[0-9]+"}]}],
         "filters": [{"type": "RequestRedirect", "requestRedirect": {
             "scheme": "https", "hostname": "Example.org", "port": 8443, "statusCode": 308,
             "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {
             "hostname": "api.internal",
             "path": {"type": "ReplaceFullPath", "replaceFullPath": "/v2"}}}],
         "backendRefs": [{"name": "echo-v1", "port": 80, "filters": [
             {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                 "set": [{"name": "x-backend", "value": "v1"}]}},
             {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                 "remove": ["server"]}}]},
             {"name": "echo-v2", "port": 80}]},
        {"filters": [{"type": "RequestRedirect", "requestRedirect": {}}]},
    ],
}


def test_redirect_rewrite_query_and_backend_filters() -> None:
    route = parse_http_route("r", "shop", copy.deepcopy(L7_ROUTE))
    redirect, rewrite, bare = route.rules
    assert redirect.matches == (RouteMatch(
        PathMatch(PathMatchType.PATH_PREFIX, "/old"),
        query_params=(QueryParamMatch("animal", "whale"),
                      QueryParamMatch("n", "[0-9]+", HeaderMatchType.REGULAR_EXPRESSION))),)
    # Hostnames compare case-insensitively: kept in lower case.
    assert redirect.redirect == Redirect(
        "https", "example.org", PathModifier(PathModifierType.REPLACE_PREFIX_MATCH, "/new"),
        8443, 308)
    assert rewrite.rewrite == URLRewrite(
        "api.internal", PathModifier(PathModifierType.REPLACE_FULL_PATH, "/v2"))
    assert rewrite.backends == (
        BackendRef("echo-v1", "shop", 80, request_headers=HeaderModifier(
            set=(("x-backend", "v1"),)), response_headers=HeaderModifier(remove=("server",))),
        BackendRef("echo-v2", "shop", 80))
    # Gateway API's defaults: status 302, everything else kept from the request.
    assert bare.redirect == Redirect()


def test_l7_route_spec_round_trips() -> None:
    route = parse_http_route("r", "shop", copy.deepcopy(L7_ROUTE))
    assert parse_http_route("r", "shop", http_route_spec(route)) == route


def test_consumer_route_attaches_to_another_namespaces_service() -> None:
    route = parse_http_route("r", "client-ns", {"parentRefs": [
        {"group": "", "kind": "Service", "name": "echo", "namespace": "server-ns"},
        {"group": "", "kind": "Service", "name": "local"}]})
    consumer, producer = route.parents
    assert consumer == ParentRef("Service", "echo", "server-ns")
    assert route.consumer_of(consumer) and not route.consumer_of(producer)


GRPC_ROUTE_SPEC: dict[str, Any] = {
    "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 7070}],
    "rules": [
        {"matches": [{"method": {"service": "grpc.Echo", "method": "Ping"},
                      "headers": [{"name": "x-test-case", "value": "set"}]},
                     {"method": {"service": "grpc.Echo"}},
                     {"method": {"method": "Ping"}},
                     {"method": {"type": "RegularExpression", "service": "grpc\\..*"}}],
         "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
             "set": [{"name": "x-header-set", "value": "v"}]}}],
         "backendRefs": [{"name": "echo-v1", "port": 7070, "weight": 70},
                         {"name": "echo-v2", "port": 7070, "weight": 30}]},
        {"matches": [{"headers": [{"name": "x-any", "value": "1"}]}],
         "backendRefs": [{"name": "echo-v3", "port": 7070}]},
    ],
}


def test_grpc_route_method_matches_become_path_matches() -> None:
    route = parse_grpc_route("g", "shop", copy.deepcopy(GRPC_ROUTE_SPEC))
    assert route.kind == GRPC_ROUTE
    exact, service, method, regex = route.rules[0].matches
    assert exact.grpc == GRPCMethodMatch("grpc.Echo", "Ping")
    assert exact.path == PathMatch(PathMatchType.EXACT, "/grpc.Echo/Ping")
    assert exact.headers == (HeaderMatch("x-test-case", "set"),)
    assert service.path == PathMatch(PathMatchType.REGULAR_EXPRESSION, r"/grpc\.Echo/[^/]+")
    assert method.path == PathMatch(PathMatchType.REGULAR_EXPRESSION, "/[^/]+/Ping")
    assert regex.path == PathMatch(PathMatchType.REGULAR_EXPRESSION, r"/grpc\..*/[^/]+")
    # No method: every path (a header-only match).
    assert route.rules[1].matches[0].path == PathMatch(PathMatchType.PATH_PREFIX, "/")
    assert [b.weight for b in route.rules[0].backends] == [70, 30]
    assert parse_grpc_route("g", "shop", http_route_spec(route)) == route


@pytest.mark.parametrize(("rule", "message"), [
    ({"matches": [{"method": {}}]}, "spec.rules[0].matches[0].method: needs service, method "
     "or both"),
    ({"matches": [{"method": {"service": "a/b"}}]},
     "spec.rules[0].matches[0].method.service: 'a/b' is not a gRPC service name"),
    ({"matches": [{"method": {"method": "Ping.Pong"}}]},
     "spec.rules[0].matches[0].method.method: 'Ping.Pong' is not a gRPC method name"),
    ({"matches": [{"path": {"value": "/x"}}]},
     "spec.rules[0].matches[0].path: unknown field; expected one of: headers, method"),
    ({"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "a"}}]},
     "spec.rules[0].filters[0].type: URLRewrite cannot be used here; supported filters here: "
     "RequestHeaderModifier, ResponseHeaderModifier, ExtensionRef"),
    ({"timeouts": {"request": "1s"}},
     "spec.rules[0].timeouts: unknown field"),
])
def test_grpc_route_errors(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(StateError) as e:
        parse_grpc_route("g", "shop", {"parentRefs": [SVC], "rules": [rule]})
    assert str(e.value).startswith(message), str(e.value)


def test_tcp_route() -> None:
    spec = {"parentRefs": [{"group": "", "kind": "Service", "name": "db", "port": 5432}],
            "rules": [{"backendRefs": [{"name": "db-a", "port": 5432, "weight": 3},
                                       {"name": "db-b", "port": 5432}]}]}
    route = parse_tcp_route("t", "shop", spec, creation_index=4)
    assert route == TCPRoute("t", "shop", (ParentRef("Service", "db", "shop", 5432),),
                             (BackendRef("db-a", "shop", 5432, 3),
                              BackendRef("db-b", "shop", 5432)), 4)
    assert parse_tcp_route("t", "shop", tcp_route_spec(route), creation_index=4) == route


@pytest.mark.parametrize(("spec", "message"), [
    ({"parentRefs": [{"name": "waypoint"}], "rules": [{"backendRefs": [{"name": "a",
                                                                          "port": 1}]}]},
     "spec.parentRefs[0].kind: a TCPRoute attaches to a Service port"),
    ({"parentRefs": [SVC | {"namespace": "other"}],
      "rules": [{"backendRefs": [{"name": "a", "port": 1}]}]},
     "spec.parentRefs[0].namespace: a TCPRoute attaches to Services of its own namespace"),
    ({"parentRefs": [SVC], "rules": []}, "spec.rules: needs one rule with backendRefs"),
    ({"parentRefs": [SVC], "rules": [{"backendRefs": []}, {"backendRefs": []}]},
     "spec.rules: at most 1 rule"),
    ({"parentRefs": [SVC], "rules": [{}]},
     "spec.rules[0].backendRefs: needs at least one backend"),
    ({"parentRefs": [SVC], "rules": [{"backendRefs": [{"name": "a", "port": 1, "filters": [
        {"type": "RequestHeaderModifier", "requestHeaderModifier": {}}]}]}]},
     "spec.rules[0].backendRefs[0].filters: a TCP connection has no headers"),
    ({"parentRefs": [SVC], "rules": [{"matches": []}]},
     "spec.rules[0].matches: unknown field"),
])
def test_tcp_route_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(StateError) as e:
        parse_tcp_route("t", "shop", spec)
    assert str(e.value).startswith(message), str(e.value)

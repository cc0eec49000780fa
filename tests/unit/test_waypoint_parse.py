"""Waypoint parsers: every accepted shape and default, every rejection with its field path."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.registry.model import AuthorizationPolicy
from controller.waypoint.model import (
    BackendRef,
    Fault,
    Gateway,
    HeaderMatch,
    HeaderMatchType,
    HeaderModifier,
    HTTPFault,
    HTTPRoute,
    L7Operation,
    L7Rule,
    L7Source,
    Match,
    ParentRef,
    PathMatch,
    PathMatchType,
    PolicyAction,
    Retry,
    RouteMatch,
    RouteRule,
    TargetRef,
    WaypointPolicy,
)
from controller.waypoint.parse import (
    format_duration,
    gateway_spec,
    has_target_refs,
    http_fault_spec,
    http_route_spec,
    parse_duration,
    parse_gateway,
    parse_http_fault,
    parse_http_route,
    parse_waypoint_policy,
    resolve_faults,
    waypoint_policies,
)
from mesh.state.parse import StateError

GW = "gateway.networking.k8s.io"
ISTIO_LISTENER = {"name": "mesh", "port": 15008, "protocol": "HBONE"}


def error(fn: Any, *args: Any) -> str:
    with pytest.raises(StateError) as e:
        fn(*args)
    return str(e.value)


# --- durations -----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "ms"), [
    ("0s", 0), ("500ms", 500), ("1s", 1000), ("1m30s", 90_000), ("1h", 3_600_000),
    ("1h30m30s500ms", 5_430_500), ("00060m", 3_600_000), ("1s1s", 2000),
    ("99999h59m59s999ms", 99_999 * 3_600_000 + 3_599_999),
])
def test_durations(text: str, ms: int) -> None:
    assert parse_duration(text, "d") == ms


@pytest.mark.parametrize("text", ["", "1", "1.5s", "-1s", "1d", "100000ms", "1h1m1s1ms1h",
                                  " 1s", "1us", "99999h99999m"])
def test_bad_durations(text: str) -> None:
    assert error(parse_duration, text, "spec.x").startswith("spec.x: ")


def test_format_duration_is_canonical_and_round_trips() -> None:
    assert [format_duration(ms) for ms in (0, 1, 999, 1000, 90_000, 3_600_000, 5_430_500)] \
        == ["0s", "1ms", "999ms", "1s", "1m30s", "1h", "1h30m30s500ms"]
    for ms in (0, 1, 59_999, 86_400_000, 99_999 * 3_600_000 + 3_599_999):
        assert parse_duration(format_duration(ms), "d") == ms


# --- Gateway -------------------------------------------------------------------------------

def test_gateway_as_istio_writes_it() -> None:
    gw = parse_gateway("waypoint", "shop", {"ambit.dev/waypoint-for": "all", "x": "y"}.items(),
                       {"gatewayClassName": "ambit-waypoint", "listeners": [ISTIO_LISTENER]})
    assert gw == Gateway("waypoint", "shop", "ambit-waypoint", "all",
                         (("ambit.dev/waypoint-for", "all"), ("x", "y")))
    assert gw.key == "shop/waypoint"


def test_gateway_defaults_and_kubernetes_defaulted_listener() -> None:
    assert parse_gateway("w", "ns", (), {"gatewayClassName": "ambit-waypoint"}).waypoint_for \
        == "service"
    # What the API server stores after defaulting (allowedRoutes is filled in).
    listener = {**ISTIO_LISTENER, "allowedRoutes": {"namespaces": {"from": "Same"},
                                                    "kinds": [{"group": GW,
                                                               "kind": "HTTPRoute"}]}}
    parse_gateway("w", "ns", (), {"gatewayClassName": "ambit-waypoint",
                                  "listeners": [listener]})


@pytest.mark.parametrize(("labels", "spec", "message"), [
    ({}, {}, "spec.gatewayClassName: is required"),
    ({}, {"gatewayClassName": "istio-waypoint"},
     "spec.gatewayClassName: 'istio-waypoint' is not Ambit's waypoint class; use "
     "gatewayClassName: ambit-waypoint"),
    ({"ambit.dev/waypoint-for": "pods"}, {"gatewayClassName": "ambit-waypoint"},
     "metadata.labels.ambit.dev/waypoint-for: 'pods' is not one of service, workload, all, "
     "none"),
    ({}, {"gatewayClassName": "ambit-waypoint", "addresses": []},
     "spec.addresses: is not supported by Ambit waypoints"),
    ({}, {"gatewayClassName": "ambit-waypoint", "listner": []},
     "spec.listner: unknown field; expected one of: gatewayClassName, listeners"),
    ({}, {"gatewayClassName": "ambit-waypoint", "listeners": [{**ISTIO_LISTENER, "port": 80}]},
     "spec.listeners[0].port: a waypoint listens on port 15008 (HBONE) only, got 80"),
    ({}, {"gatewayClassName": "ambit-waypoint",
          "listeners": [{**ISTIO_LISTENER, "protocol": "HTTP"}]},
     "spec.listeners[0].protocol: a waypoint's listener speaks HBONE only, got 'HTTP'"),
    ({}, {"gatewayClassName": "ambit-waypoint", "listeners": [ISTIO_LISTENER, ISTIO_LISTENER]},
     "spec.listeners[1]: a waypoint has one listener"),
    ({}, {"gatewayClassName": "ambit-waypoint",
          "listeners": [{**ISTIO_LISTENER, "hostname": "a.example"}]},
     "spec.listeners[0].hostname: is not supported on a waypoint's HBONE listener"),
    ({}, {"gatewayClassName": "ambit-waypoint",
          "listeners": [{"port": 15008, "protocol": "HBONE"}]},
     "spec.listeners[0].name: is required"),
    ({}, {"gatewayClassName": "ambit-waypoint",
          "listeners": [{**ISTIO_LISTENER, "allowedRoutes": {"namespaces": {"from": "Any"}}}]},
     "spec.listeners[0].allowedRoutes.namespaces.from: 'Any' is not one of Same, All"),
    ({}, {"gatewayClassName": "ambit-waypoint", "listeners": {"mesh": 15008}},
     "spec.listeners: expected a list, got dict"),
])
def test_gateway_errors(labels: dict[str, str], spec: dict[str, Any], message: str) -> None:
    assert error(parse_gateway, "w", "ns", labels.items(), spec).startswith(message)


def test_gateway_spec_round_trips() -> None:
    gw = Gateway("w", "ns", waypoint_for="none", labels=(("ambit.dev/waypoint-for", "none"),))
    assert gateway_spec(gw) == {"gatewayClassName": "ambit-waypoint",
                                "listeners": [ISTIO_LISTENER]}
    assert parse_gateway("w", "ns", gw.labels, gateway_spec(gw)) == gw


# --- HTTPRoute -----------------------------------------------------------------------------

FULL_ROUTE: dict[str, Any] = {
    "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080},
                   {"group": GW, "kind": "Gateway", "name": "waypoint", "namespace": "infra"}],
    "rules": [
        {"matches": [{"path": {"type": "Exact", "value": "/api/v1"},
                      "headers": [{"name": "x-user", "value": "jason"},
                                  {"type": "RegularExpression", "name": "x-tier",
                                   "value": "gold|silver"}],
                      "method": "POST"},
                     {"path": {"type": "RegularExpression", "value": "/v[0-9]+/.*"}}],
         "filters": [
             {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                 "set": [{"name": "x-a", "value": "1"}], "add": [{"name": "x-b", "value": "2"}],
                 "remove": ["x-c"]}},
             {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                 "remove": ["server"]}},
             {"type": "ExtensionRef", "extensionRef": {
                 "group": "networking.ambit.dev", "kind": "HTTPFault", "name": "slow"}}],
         "backendRefs": [{"name": "reviews-v1", "port": 9080, "weight": 90},
                         {"group": "", "kind": "Service", "name": "reviews-v2",
                          "namespace": "beta", "port": 9080, "weight": 10}],
         "timeouts": {"request": "10s", "backendRequest": "2s"},
         "retry": {"codes": [503], "attempts": 3, "backoff": "100ms"}},
        {"name": "default", "backendRefs": [{"name": "reviews-v1", "port": 9080}]},
    ],
}


def test_full_route() -> None:
    route = parse_http_route("reviews", "shop", copy.deepcopy(FULL_ROUTE), "spec", 7)
    assert route.key == "shop/reviews" and route.creation_index == 7
    assert route.parents == (ParentRef("Service", "reviews", "shop", 9080),
                             ParentRef("Gateway", "waypoint", "infra"))
    first, second = route.rules
    assert first.matches == (
        RouteMatch(PathMatch(PathMatchType.EXACT, "/api/v1"),
                   (HeaderMatch("x-user", "jason"),
                    HeaderMatch("x-tier", "gold|silver", HeaderMatchType.REGULAR_EXPRESSION)),
                   "POST"),
        RouteMatch(PathMatch(PathMatchType.REGULAR_EXPRESSION, "/v[0-9]+/.*")))
    assert first.request_headers == HeaderModifier((("x-a", "1"),), (("x-b", "2"),), ("x-c",))
    assert first.response_headers == HeaderModifier(remove=("server",))
    assert first.fault_ref == "shop/slow" and first.fault is None and first.invalid == ""
    assert first.backends == (BackendRef("reviews-v1", "shop", 9080, 90),
                              BackendRef("reviews-v2", "beta", 9080, 10))
    assert (first.timeout_ms, first.backend_timeout_ms) == (10_000, 2000)
    assert first.retry == Retry(3, (503,), 100)
    assert second == RouteRule(backends=(BackendRef("reviews-v1", "shop", 9080),), name="default")


def test_route_defaults() -> None:
    # Gateway API defaults: parent = a Gateway; no rules = one rule matching everything; a
    # rule without matches matches everything; path PathPrefix "/"; weight 1; 0s = no limit.
    route = parse_http_route("r", "shop", {"parentRefs": [{"name": "waypoint"}]})
    assert route.parents == (ParentRef("Gateway", "waypoint", "shop"),)
    assert route.rules == (RouteRule(),)
    assert route.rules[0].matches == (RouteMatch(PathMatch(PathMatchType.PATH_PREFIX, "/")),)
    route = parse_http_route("r", "shop", {
        "parentRefs": [{"group": "core", "kind": "Service", "name": "s"}],
        "rules": [{"matches": [], "timeouts": {"request": "0s", "backendRequest": "0s"},
                   "retry": {}},
                  {"matches": [{"headers": [{"name": "a", "value": "b"}]}]}]})
    first, second = route.rules
    assert first.matches == (RouteMatch(),) and first.timeout_ms is None
    assert first.backend_timeout_ms is None
    assert first.retry == Retry(2, (500, 502, 503, 504), None)
    assert second.matches[0].path == PathMatch(PathMatchType.PATH_PREFIX, "/")
    assert parse_http_route("r", "shop", {"parentRefs": [{"name": "w"}], "rules": []}).rules \
        == ()
    # backendRequest may be longer than a disabled (0s) request timeout.
    rule = parse_http_route("r", "s", {"parentRefs": [{"name": "w"}], "rules": [
        {"timeouts": {"request": "0s", "backendRequest": "5s"}}]}).rules[0]
    assert (rule.timeout_ms, rule.backend_timeout_ms) == (None, 5000)


def _route(rule: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"parentRefs": [{"group": "", "kind": "Service", "name": "s"}]}
    if rule is not None:
        out["rules"] = [rule]
    out.update(spec)
    return out


def _backend(**kw: Any) -> dict[str, Any]:
    return {"rules": [{"backendRefs": [{"name": "a", "port": 80}, {"name": "b", "port": 80,
                                                                    **kw}]}]}


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "spec.parentRefs: needs at least one parent"),
    (_route(hostnames=["a.example"]), "spec.hostnames: is not supported by the waypoint"),
    (_route(parentref=[]), "spec.parentref: unknown field; expected one of: parentRefs, rules"),
    ({"parentRefs": [{"kind": "Service", "name": "s"}]},
     "spec.parentRefs[0].group: 'gateway.networking.k8s.io': a Service is in the core group"),
    ({"parentRefs": [{"group": "", "name": "s"}]},
     "spec.parentRefs[0].group: '': a Gateway is in group gateway.networking.k8s.io"),
    ({"parentRefs": [{"group": "", "kind": "Pod", "name": "s"}]},
     "spec.parentRefs[0].kind: 'Pod': a route attaches to a Service"),
    ({"parentRefs": [{"name": "w", "port": 15008}]},
     "spec.parentRefs[0].port: a waypoint Gateway has one listener"),
    ({"parentRefs": [{"group": "", "kind": "Service", "name": "s", "namespace": "Prod"}]},
     "spec.parentRefs[0].namespace: 'Prod' is not a valid DNS label"),
    ({"parentRefs": [{"name": "w", "sectionName": "mesh"}]},
     "spec.parentRefs[0].sectionName: is not supported"),
    ({"parentRefs": [{"group": "", "kind": "Service", "name": "s", "port": 0}]},
     "spec.parentRefs[0].port: must be an integer 1..65535, got 0"),
    ({"parentRefs": [{"group": "", "kind": "Service", "name": "S"}]},
     "spec.parentRefs[0].name: 'S' is not a valid DNS label"),
    ({"parentRefs": [{"name": "w"}, {"name": "w", "namespace": "shop"}]},
     "spec.parentRefs[1]: duplicate parentRef 'Gateway shop/w' (first at [0])"),
    ({"parentRefs": [{"name": f"w{i}"} for i in range(33)]},
     "spec.parentRefs: at most 32 parentRefs (a Gateway API limit), got 33"),
    (_route(rules=[{}] * 17), "spec.rules: at most 16 rules (a Gateway API limit), got 17"),
    (_route({"matches": [{}] * 65}),
     "spec.rules[0].matches: at most 64 matches (a Gateway API limit), got 65"),
    (_route(rules=[{"matches": [{}] * 64}, {"matches": [{}] * 64}, {"matches": [{}]}]),
     "spec.rules: at most 128 matches in all rules together"),
    (_route({"sessionPersistence": {}}),
     "spec.rules[0].sessionPersistence: is not supported by the waypoint yet"),
    (_route({"name": "Bad_Name"}), "spec.rules[0].name: 'Bad_Name' is not a valid DNS label"),
    (_route({"matches": [{"queryParams": [{"name": "a b", "value": "x"}]}]}),
     "spec.rules[0].matches[0].queryParams[0].name: 'a b' is not a query parameter name"),
    (_route({"matches": [{"queryParams": [{"name": "a", "value": "x"},
                                          {"name": "a", "value": "y"}]}]}),
     "spec.rules[0].matches[0].queryParams[1]: duplicate parameter name 'a' (first at [0])"),
    (_route({"matches": [{"queryParams": [{"name": "a", "value": "(?=x)",
                                           "type": "RegularExpression"}]}]}),
     "spec.rules[0].matches[0].queryParams[0].value: '(?=x)': '(?=' is not supported by RE2"),
    (_route({"matches": [{"queryParams": [{"name": "a"}]}]}),
     "spec.rules[0].matches[0].queryParams[0].value: is required"),
    (_route({"matches": [{"method": "get"}]}),
     "spec.rules[0].matches[0].method: 'get' is not one of GET, HEAD, POST"),
    (_route({"matches": [{"path": {"type": "Prefix", "value": "/"}}]}),
     "spec.rules[0].matches[0].path.type: 'Prefix' is not one of Exact, PathPrefix, "
     "RegularExpression"),
    (_route({"matches": [{"path": {"value": "api"}}]}),
     "spec.rules[0].matches[0].path.value: 'api' must be an absolute path starting with '/'"),
    (_route({"matches": [{"path": {"value": "/a//b"}}]}),
     "spec.rules[0].matches[0].path.value: '/a//b' must not contain '//'"),
    (_route({"matches": [{"path": {"type": "Exact", "value": "/a/../b"}}]}),
     "spec.rules[0].matches[0].path.value: '/a/../b' must not contain '/../'"),
    (_route({"matches": [{"path": {"value": "/a/."}}]}),
     "spec.rules[0].matches[0].path.value: '/a/.' must not end with"),
    (_route({"matches": [{"path": {"value": "/a b"}}]}),
     "spec.rules[0].matches[0].path.value: '/a b' has characters a path cannot contain"),
    (_route({"matches": [{"path": {"value": "/%2Fetc"}}]}),
     "spec.rules[0].matches[0].path.value: '/%2Fetc' must not contain '%2F'"),
    (_route({"matches": [{"path": {"value": "/" + "a" * 1024}}]}),
     "spec.rules[0].matches[0].path.value: at most 1024 characters"),
    (_route({"matches": [{"path": {"value": ""}}]}),
     "spec.rules[0].matches[0].path.value: expected a non-empty string"),
    (_route({"matches": [{"path": {"type": "RegularExpression", "value": "/(a"}}]}),
     "spec.rules[0].matches[0].path.value: '/(a' is not a valid regular expression"),
    (_route({"matches": [{"path": {"type": "RegularExpression", "value": "/(?!admin).*"}}]}),
     "spec.rules[0].matches[0].path.value: '/(?!admin).*': '(?!' is not supported by RE2"),
    (_route({"matches": [{"headers": [{"type": "RegularExpression", "name": "a",
                                       "value": r"(x)\1"}]}]}),
     r"spec.rules[0].matches[0].headers[0].value: '(x)\\1': '\\1' is not supported by RE2"),
    (_route({"matches": [{"headers": [{"type": "Prefix", "name": "a", "value": "b"}]}]}),
     "spec.rules[0].matches[0].headers[0].type: 'Prefix' is not one of Exact, "
     "RegularExpression"),
    (_route({"matches": [{"headers": [{"name": "a b", "value": "b"}]}]}),
     "spec.rules[0].matches[0].headers[0].name: 'a b' is not an HTTP header name"),
    (_route({"matches": [{"headers": [{"name": "a"}]}]}),
     "spec.rules[0].matches[0].headers[0].value: is required"),
    (_route({"matches": [{"headers": [{"name": "X-A", "value": "1"},
                                      {"name": "x-a", "value": "2"}]}]}),
     "spec.rules[0].matches[0].headers[1]: duplicate header name 'x-a' (first at [0])"),
    (_route({"matches": [{"headers": [{"name": f"h{i}", "value": "v"} for i in range(17)]}]}),
     "spec.rules[0].matches[0].headers: at most 16 headers"),
    (_route({"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}}]}),
     "spec.rules[0].filters[0].requestRedirect.statusCode: 304 is not one of 301, 302, 303, "
     "307, 308"),
    (_route({"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "ftp"}}]}),
     "spec.rules[0].filters[0].requestRedirect.scheme: 'ftp' is not one of http, https"),
    (_route({"filters": [{"type": "RequestRedirect",
                          "requestRedirect": {"hostname": "*.example.org"}}]}),
     "spec.rules[0].filters[0].requestRedirect.hostname: '*.example.org': a redirect or "
     "rewrite needs a precise hostname"),
    (_route({"filters": [{"type": "RequestRedirect", "requestRedirect": {"port": 0}}]}),
     "spec.rules[0].filters[0].requestRedirect.port: must be an integer 1..65535, got 0"),
    (_route({"filters": [{"type": "RequestRedirect", "requestRedirect": {}}],
             "backendRefs": [{"name": "b", "port": 80}]}),
     "spec.rules[0].backendRefs: a rule with a RequestRedirect filter answers the request "
     "itself; remove its backendRefs"),
    (_route({"filters": [{"type": "RequestRedirect", "requestRedirect": {}},
                         {"type": "URLRewrite", "urlRewrite": {"hostname": "a"}}]}),
     "spec.rules[0].filters: RequestRedirect and URLRewrite cannot be used together"),
    (_route({"matches": [{"path": {"type": "Exact", "value": "/a"}}],
             "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
                 "type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}}]}),
     "spec.rules[0].matches[0].path.type: Exact: ReplacePrefixMatch replaces a matched "
     "prefix, so the rule's matches must be PathPrefix"),
    (_route({"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
        "type": "ReplaceFullPath", "replacePrefixMatch": "/b"}}}]}),
     "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch: must not be set when type "
     "is ReplaceFullPath; use replaceFullPath"),
    (_route({"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
        "type": "ReplaceFullPath", "replaceFullPath": "b"}}}]}),
     "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath: is required for type "
     "ReplaceFullPath: an absolute path starting with '/', got 'b'"),
    (_route({"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
        "type": "ReplaceAll", "replaceFullPath": "/b"}}}]}),
     "spec.rules[0].filters[0].urlRewrite.path.type: 'ReplaceAll' is not one of "
     "ReplaceFullPath, ReplacePrefixMatch"),
    (_route({"filters": [{"type": "URLRewrite", "urlRewrite": {}}]}),
     "spec.rules[0].filters[0].urlRewrite: needs hostname, path or both"),
    (_route({"filters": [{"type": "URLRewrite"}]}),
     "spec.rules[0].filters[0].urlRewrite: is required for type URLRewrite"),
    (_route({"filters": [{"type": "RequestMirror", "requestMirror": {}}]}),
     "spec.rules[0].filters[0].type: RequestMirror is not supported by the waypoint yet; "
     "supported filters here: RequestHeaderModifier, ResponseHeaderModifier, "
     "RequestRedirect, URLRewrite, ExtensionRef (to an HTTPFault)"),
    (_route({"filters": [{"type": "Teleport"}]}),
     "spec.rules[0].filters[0].type: 'Teleport' is not a filter type"),
    (_route({"filters": [{"requestHeaderModifier": {}}]}),
     "spec.rules[0].filters[0].type: is required"),
    (_route({"filters": [{"type": "RequestHeaderModifier"}]}),
     "spec.rules[0].filters[0].requestHeaderModifier: is required for type "
     "RequestHeaderModifier"),
    (_route({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {},
                          "extensionRef": {}}]}),
     "spec.rules[0].filters[0].extensionRef: must not be set on a RequestHeaderModifier "
     "filter"),
    (_route({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {}}] * 2}),
     "spec.rules[0].filters[1].type: RequestHeaderModifier may appear once per filters "
     "list (first at [0])"),
    (_route({"filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {}}] * 2}),
     "spec.rules[0].filters[1].type: ResponseHeaderModifier may appear once per filters "
     "list (first at [0])"),
    (_route({"filters": [{"type": "RequestHeaderModifier",
                          "requestHeaderModifier": {"set": [{"name": "a"}]}}]}),
     "spec.rules[0].filters[0].requestHeaderModifier.set[0].value: is required"),
    (_route({"filters": [{"type": "ResponseHeaderModifier",
                          "responseHeaderModifier": {"add": [{"name": "a", "value": "1"},
                                                             {"name": "A", "value": "2"}]}}]}),
     "spec.rules[0].filters[0].responseHeaderModifier.add[1]: duplicate header name 'a'"),
    (_route({"filters": [{"type": "RequestHeaderModifier",
                          "requestHeaderModifier": {"remove": ["a:b"]}}]}),
     "spec.rules[0].filters[0].requestHeaderModifier.remove[0]: 'a:b' is not an HTTP header"),
    (_route({"filters": [{"type": "RequestHeaderModifier",
                          "requestHeaderModifier": {"replace": []}}]}),
     "spec.rules[0].filters[0].requestHeaderModifier.replace: unknown field; expected one of: "
     "add, remove, set"),
    (_route({"filters": [{"type": "ExtensionRef", "extensionRef": {
        "group": "example.com", "kind": "Fault", "name": "f"}}]}),
     "spec.rules[0].filters[0].extensionRef: group 'example.com', kind 'Fault' is not "
     "supported; the waypoint's extension is group: networking.ambit.dev, kind: HTTPFault"),
    (_route({"filters": [{"type": "ExtensionRef", "extensionRef": {
        "group": "networking.ambit.dev", "kind": "HTTPFault", "name": "f"}}] * 2}),
     "spec.rules[0].filters[1].type: ExtensionRef may appear once per filters list"),
    (_route({"filters": [{"type": "ExtensionRef", "extensionRef": {
        "group": "networking.ambit.dev", "kind": "HTTPFault"}}]}),
     "spec.rules[0].filters[0].extensionRef.name: is required"),
    (_route({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {}}] * 17}),
     "spec.rules[0].filters: at most 16 filters"),
    (_route(**_backend(weight=1_000_001)),
     "spec.rules[0].backendRefs[1].weight: must be an integer 0..1000000, got 1000001"),
    (_route(**_backend(weight="5")),
     "spec.rules[0].backendRefs[1].weight: must be an integer 0..1000000, got '5'"),
    (_route(**_backend(weight=True)),
     "spec.rules[0].backendRefs[1].weight: must be an integer 0..1000000, got True"),
    (_route(**_backend(port=None)), "spec.rules[0].backendRefs[1].port: is required for a "
     "Service backend"),
    (_route(**_backend(port="http")),
     "spec.rules[0].backendRefs[1].port: must be an integer 1..65535, got 'http'"),
    (_route(**_backend(kind="ServiceImport")),
     "spec.rules[0].backendRefs[1].kind: 'ServiceImport': backends are Services"),
    (_route(**_backend(group="multicluster.x-k8s.io")),
     "spec.rules[0].backendRefs[1].group: 'multicluster.x-k8s.io': backends are Services"),
    (_route(**_backend(filters=[{"type": "URLRewrite", "urlRewrite": {"hostname": "a"}}])),
     "spec.rules[0].backendRefs[1].filters[0].type: URLRewrite cannot be used here; "
     "supported filters here: RequestHeaderModifier, ResponseHeaderModifier"),
    (_route(**_backend(namespace="Other")),
     "spec.rules[0].backendRefs[1].namespace: 'Other' is not a valid DNS label"),
    (_route({"backendRefs": [{"name": f"b{i}", "port": 80} for i in range(17)]}),
     "spec.rules[0].backendRefs: at most 16 backendRefs"),
    (_route({"timeouts": {"request": "1s", "backendRequest": "2s"}}),
     "spec.rules[0].timeouts.backendRequest: cannot be longer than the request timeout"),
    (_route({"timeouts": {"request": "1sec"}}),
     "spec.rules[0].timeouts.request: '1sec' is not a Gateway API duration"),
    (_route({"timeouts": {"request": 5}}),
     "spec.rules[0].timeouts.request: expected a non-empty string, got 5"),
    (_route({"timeouts": {"idle": "1s"}}),
     "spec.rules[0].timeouts.idle: unknown field; expected one of: backendRequest, request"),
    (_route({"retry": {"codes": [200]}}),
     "spec.rules[0].retry.codes[0]: must be an integer 400..599, got 200"),
    (_route({"retry": {"codes": [503, 503]}}),
     "spec.rules[0].retry.codes[1]: duplicate status code '503'"),
    (_route({"retry": {"attempts": -1}}),
     "spec.rules[0].retry.attempts: must be an integer 0..2147483647, got -1"),
    (_route({"retry": {"backoff": "0s"}}),
     "spec.rules[0].retry.backoff: must be more than 0"),
    (_route({"retry": {"perTryTimeout": "1s"}}),
     "spec.rules[0].retry.perTryTimeout: unknown field; expected one of: attempts, backoff, "
     "codes"),
    (_route(rules="all"), "spec.rules: expected a list, got str"),
    (_route(rules=["x"]), "spec.rules[0]: expected a mapping, got str"),
])
def test_route_errors(spec: dict[str, Any], message: str) -> None:
    assert error(parse_http_route, "r", "shop", spec).startswith(message)


def test_route_spec_round_trips() -> None:
    route = parse_http_route("reviews", "shop", copy.deepcopy(FULL_ROUTE))
    spec = http_route_spec(route)
    assert parse_http_route("reviews", "shop", spec) == route
    assert spec["rules"][0]["filters"][2] == {"type": "ExtensionRef", "extensionRef": {
        "group": "networking.ambit.dev", "kind": "HTTPFault", "name": "slow"}}
    assert spec["rules"][0]["timeouts"] == {"request": "10s", "backendRequest": "2s"}
    for minimal in ({"parentRefs": [{"name": "w"}]},
                    {"parentRefs": [{"name": "w"}], "rules": []},
                    {"parentRefs": [{"group": "", "kind": "Service", "name": "s"}],
                     "rules": [{"retry": {"codes": []}, "filters": [
                         {"type": "RequestHeaderModifier", "requestHeaderModifier": {}}]}]}):
        r = parse_http_route("r", "ns", minimal)
        assert parse_http_route("r", "ns", http_route_spec(r)) == r


# --- HTTPFault and resolution --------------------------------------------------------------

@pytest.mark.parametrize(("spec", "fault"), [
    ({"delay": {"fixedDelay": "5s"}}, Fault(delay_ms=5000, delay_percent=100.0)),
    ({"abort": {"httpStatus": 503, "percentage": 10}},
     Fault(abort_status=503, abort_percent=10.0)),
    ({"delay": {"fixedDelay": "100ms", "percentage": 50.5},
      "abort": {"httpStatus": 200, "percentage": 0}},
     Fault(100, 50.5, 200, 0.0)),
])
def test_faults(spec: dict[str, Any], fault: Fault) -> None:
    parsed = parse_http_fault("f", "ns", spec)
    assert parsed == HTTPFault("f", "ns", fault) and parsed.key == "ns/f"
    assert parse_http_fault("f", "ns", http_fault_spec(parsed)) == parsed


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "spec: needs delay, abort or both"),
    ({"delay": {}}, "spec.delay.fixedDelay: is required"),
    ({"delay": {"fixedDelay": "0s"}}, "spec.delay.fixedDelay: must be more than 0"),
    ({"delay": {"fixedDelay": "1s", "percentage": 101}},
     "spec.delay.percentage: must be a number 0..100, got 101"),
    ({"delay": {"fixedDelay": "1s", "percentage": "50"}},
     "spec.delay.percentage: must be a number 0..100, got '50'"),
    ({"delay": {"fixedDelay": "1s", "percent": 5}},
     "spec.delay.percent: unknown field; expected one of: fixedDelay, percentage"),
    ({"abort": {"percentage": 5}}, "spec.abort.httpStatus: is required"),
    ({"abort": {"httpStatus": 600}}, "spec.abort.httpStatus: must be an integer 200..599"),
    ({"abort": {"grpcStatus": 14}}, "spec.abort.grpcStatus: unknown field"),
    ({"delay": {"fixedDelay": "1s"}, "rate": 1},
     "spec.rate: unknown field; expected one of: abort, delay"),
])
def test_fault_errors(spec: dict[str, Any], message: str) -> None:
    assert error(parse_http_fault, "f", "ns", spec).startswith(message)


def test_resolve_faults() -> None:
    route = parse_http_route("r", "shop", {"parentRefs": [{"name": "w"}], "rules": [
        {"filters": [{"type": "ExtensionRef", "extensionRef": {
            "group": "networking.ambit.dev", "kind": "HTTPFault", "name": "slow"}}]},
        {"filters": [{"type": "ExtensionRef", "extensionRef": {
            "group": "networking.ambit.dev", "kind": "HTTPFault", "name": "gone"}}]},
        {}]})
    slow = HTTPFault("slow", "shop", Fault(delay_ms=100, delay_percent=100.0))
    other_ns = HTTPFault("gone", "elsewhere", Fault(abort_status=503, abort_percent=1.0))
    (resolved,) = resolve_faults((route,), (slow, other_ns))
    found, missing, plain = resolved.rules
    assert found.fault == slow.fault and found.invalid == ""
    assert missing.fault is None
    assert missing.invalid == ("HTTPRoute shop/r rules[1]: its ExtensionRef names HTTPFault "
                               "shop/gone, which does not exist; requests matching the rule "
                               "get HTTP 500 until it is created or the filter removed")
    assert plain == route.rules[2]
    assert resolve_faults(resolve_faults((route,), (slow,)), (slow,)) == \
        resolve_faults((route,), (slow,))  # idempotent
    # The spec keeps the reference, not the resolution.
    assert parse_http_route("r", "shop", http_route_spec(resolved)) == route


# --- AuthorizationPolicy with targetRefs ---------------------------------------------------

def test_waypoint_policy() -> None:
    spec = {
        "targetRefs": [{"group": GW, "kind": "Gateway", "name": "waypoint"},
                       {"group": "", "kind": "Service", "name": "reviews",
                        "namespace": "shop"}],
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["spiffe://td/ns/shop/sa/a", "td/*"],
                                        "notPrincipals": ["*/sa/b"], "namespaces": ["shop"],
                                        "notNamespaces": ["dev-*"]}}],
                   "to": [{"operation": {"methods": ["GET", "HEAD"], "notMethods": ["POST"],
                                         "paths": ["/api/*"], "notPaths": ["/api/admin"],
                                         "ports": ["9080", 9081], "notPorts": ["22"]}}]},
                  {}],
    }
    p = parse_waypoint_policy("deny", "shop", spec)
    assert p == WaypointPolicy(
        "deny", "shop", PolicyAction.DENY,
        (L7Rule((L7Source((Match("td/ns/shop/sa/a"), Match("td/*")), (Match("*/sa/b"),),
                          (Match("shop"),), (Match("dev-*"),)),),
                (L7Operation((Match("GET"), Match("HEAD")), (Match("POST"),),
                             (Match("/api/*"),), (Match("/api/admin"),), (9080, 9081),
                             (22,)),)),
         L7Rule()),
        (TargetRef("Gateway", "waypoint", "shop"), TargetRef("Service", "reviews", "shop")))
    assert p.key == "shop/deny"
    single = parse_waypoint_policy("a", "shop", {"targetRef": {"group": GW, "kind": "Gateway",
                                                               "name": "w"}})
    assert (single.action, single.rules, single.targets) == (
        PolicyAction.ALLOW, (), (TargetRef("Gateway", "w", "shop"),))


def tr(**kw: Any) -> dict[str, Any]:
    return {"targetRefs": [{"group": GW, "kind": "Gateway", "name": "w"}], **kw}


@pytest.mark.parametrize(("spec", "message"), [
    (tr(selector={"matchLabels": {"app": "a"}}),
     "spec.selector: a policy either selects workloads (selector, enforced by the ztunnel) or "
     "targets a waypoint (targetRefs), not both"),
    (tr(action="AUDIT"), "spec.action: 'AUDIT' is not supported by the waypoint; use ALLOW or "
     "DENY"),
    (tr(action="CUSTOM"), "spec.action: 'CUSTOM' is not supported by the waypoint"),
    (tr(action="MAYBE"), "spec.action: 'MAYBE' is not one of ALLOW, DENY"),
    (tr(provider={"name": "ext"}), "spec.provider: CUSTOM providers are not supported"),
    ({"targetRefs": []}, "spec.targetRefs: needs at least one target"),
    ({"targetRefs": [{"group": GW, "kind": "Gateway", "name": "w"}],
      "targetRef": {"group": GW, "kind": "Gateway", "name": "w"}},
     "spec.targetRef: give targetRefs or targetRef, not both"),
    ({"targetRefs": [{"group": GW, "kind": "GatewayClass", "name": "w"}]},
     "spec.targetRefs[0]: group 'gateway.networking.k8s.io', kind 'GatewayClass' cannot be "
     "targeted"),
    ({"targetRefs": [{"kind": "Gateway", "name": "w"}]},
     "spec.targetRefs[0]: group '', kind 'Gateway' cannot be targeted"),
    ({"targetRefs": [{"group": GW, "kind": "Gateway", "name": "w", "namespace": "other"}]},
     "spec.targetRefs[0].namespace: 'other': a policy targets objects of its own namespace "
     "(shop) only"),
    ({"targetRefs": [{"group": GW, "kind": "Gateway", "name": "w"}] * 2},
     "spec.targetRefs[1]: duplicate target 'Gateway w'"),
    ({"targetRefs": [{"group": GW, "kind": "Gateway"}]}, "spec.targetRefs[0].name: is required"),
    (tr(rules=[{"when": [{"key": "request.headers[x]", "values": ["1"]}]}]),
     "spec.rules[0].when: (conditions) is not supported by the waypoint yet"),
    (tr(rules=[{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]),
     "spec.rules[0].from[0].source.ipBlocks: is not supported by the waypoint yet"),
    (tr(rules=[{"from": [{"source": {"requestPrincipals": ["*"]}}]}]),
     "spec.rules[0].from[0].source.requestPrincipals: is not supported by the waypoint yet"),
    (tr(rules=[{"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]}]),
     "spec.rules[0].from[0].source.remoteIpBlocks: is not supported by the waypoint yet"),
    (tr(rules=[{"to": [{"operation": {"hosts": ["a.example"]}}]}]),
     "spec.rules[0].to[0].operation.hosts: is not supported by the waypoint yet"),
    (tr(rules=[{"to": [{"operation": {"verbs": ["GET"]}}]}]),
     "spec.rules[0].to[0].operation.verbs: unknown field; expected one of: methods, notMethods, "
     "notPaths, notPorts, paths, ports"),
    (tr(rules=[{"to": [{"operation": {"ports": ["http"]}}]}]),
     "spec.rules[0].to[0].operation.ports[0]: must be an integer 1..65535, got 'http'"),
    (tr(rules=[{"to": [{"operation": {"paths": ["/a*b"]}}]}]),
     "spec.rules[0].to[0].operation.paths[0]: '/a*b': '*' is only allowed as a prefix or "
     "suffix"),
    (tr(rules=[{"from": [{"principals": ["x"]}]}]),
     "spec.rules[0].from[0].principals: unknown field; expected one of: source"),
])
def test_waypoint_policy_errors(spec: dict[str, Any], message: str) -> None:
    assert error(parse_waypoint_policy, "p", "shop", spec).startswith(message)


def test_has_target_refs() -> None:
    assert has_target_refs({"targetRefs": []}) and has_target_refs({"targetRef": {}})
    assert not has_target_refs({"selector": {}}) and not has_target_refs({})
    assert not has_target_refs({"targetRefs": None}) and not has_target_refs("x")


def test_waypoint_policies_fail_closed() -> None:
    good = AuthorizationPolicy("good", "shop", tr(action="ALLOW", rules=[{}]))
    bad = AuthorizationPolicy("bad", "shop", {
        "targetRefs": [{"group": GW, "kind": "Gateway", "name": "w"},
                       {"group": "", "kind": "Service", "name": "reviews"},
                       {"group": "x", "kind": "Pod", "name": "p"}],
        "rules": [{"when": []}]})
    lost = AuthorizationPolicy("lost", "shop", {"targetRefs": [{"kind": "Pod"}],
                                                "action": "ALLOW"})
    ztunnel = AuthorizationPolicy("l4", "shop", {"selector": {"matchLabels": {"a": "b"}}})
    policies, problems = waypoint_policies([lost, ztunnel, good, bad])
    assert [p.key for p in policies] == ["shop/bad", "shop/good", "shop/lost"]
    deny_all = (L7Rule(),)
    assert policies[0] == WaypointPolicy("bad", "shop", PolicyAction.DENY, deny_all, (
        TargetRef("Gateway", "w", "shop"), TargetRef("Service", "reviews", "shop")))
    assert policies[1] == WaypointPolicy("good", "shop", PolicyAction.ALLOW, (L7Rule(),),
                                         (TargetRef("Gateway", "w", "shop"),))
    assert policies[2] == WaypointPolicy("lost", "shop", PolicyAction.DENY, deny_all, ())
    assert problems == (
        "AuthorizationPolicy shop/bad: spec.targetRefs[2]: group 'x', kind 'Pod' cannot be "
        "targeted; use group: gateway.networking.k8s.io, kind: Gateway (the waypoint) or "
        'group: "", kind: Service; denying all traffic through Gateway shop/w, Service '
        "shop/reviews until it is fixed",
        "AuthorizationPolicy shop/lost: spec.targetRefs[0]: group '', kind 'Pod' cannot be "
        "targeted; use group: gateway.networking.k8s.io, kind: Gateway (the waypoint) or "
        'group: "", kind: Service; its targets cannot be read either, so it applies to '
        "nothing until it is fixed",
    )


def test_parsed_records_are_hashable_and_comparable() -> None:
    route = parse_http_route("reviews", "shop", copy.deepcopy(FULL_ROUTE))
    assert hash(route) == hash(parse_http_route("reviews", "shop", copy.deepcopy(FULL_ROUTE)))
    assert isinstance(route, HTTPRoute)

"""Envoy resources for the Mesh-profile features (issue 18): redirects, rewrites, query
parameter matches, per-backend filters, consumer routes, gRPC and TCP ports (pure)."""

from __future__ import annotations

import re

import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from controller.waypoint import envoy_config as ec
from controller.waypoint.model import (
    BackendRef,
    HeaderModifier,
    HTTPRoute,
    L7Operation,
    L7Rule,
    Match,
    ParentRef,
    PathMatch,
    PathMatchType,
    PathModifier,
    PathModifierType,
    PolicyAction,
    QueryParamMatch,
    Redirect,
    RouteMatch,
    RouteRule,
    TargetRef,
    TCPRoute,
    URLRewrite,
    WaypointPolicy,
)
from controller.waypoint.protocol import PortProtocol, port_key
from controller.waypoint.view import WaypointView, build_view
from mesh.state.model import MeshConfig, Service
from tests.unit.test_waypoint_envoy_config import GW, SERVICES, WORKLOADS, svc

ECHO = ParentRef("Service", "echo", "default")
FULL = PathModifierType.REPLACE_FULL_PATH
PREFIX = PathModifierType.REPLACE_PREFIX_MATCH
# echo: 80 http, 7070 grpc (h2c), 9090 tcp; the others as in test_waypoint_envoy_config.
MULTI = svc("echo", "10.96.0.10", {"app": "echo"}, bound=True,
            ports=((80, 8080), (7070, 7070), (9090, 9090)))
SERVICES_L7 = (MULTI, *SERVICES[1:])
PROTOCOLS = {port_key(s.namespace, s.name, p.port): PortProtocol.HTTP
             for s in SERVICES_L7 for p in s.ports} | {
    port_key("default", "echo", 7070): PortProtocol.HTTP2,
    port_key("default", "echo", 9090): PortProtocol.TCP}
CONFIG = MeshConfig(workloads=WORKLOADS, services=SERVICES_L7, version="1")


def view(routes: tuple[HTTPRoute, ...] = (),
         tcp_routes: tuple[TCPRoute, ...] = ()) -> WaypointView:
    return build_view(GW, CONFIG, routes, (), protocols=PROTOCOLS, tcp_routes=tcp_routes)


def routes_of(v: WaypointView, service: Service = MULTI, port: int = 80) -> list[rc.Route]:
    return list(ec.route_configuration(v, service, port).virtual_hosts[0].routes)


def prefix_match(value: str) -> tuple[RouteMatch, ...]:
    return (RouteMatch(path=PathMatch(PathMatchType.PATH_PREFIX, value)),)


# --- redirects ----------------------------------------------------------------------------

@pytest.mark.parametrize(("redirect", "listener", "port"), [
    # Gateway API: no port and no scheme -> the listener's (the Service port) ...
    (Redirect(), 80, 0),  # ... 80 with http: left out
    (Redirect(hostname="example.org"), 80, 0),
    (Redirect(hostname="example.org"), 8080, 8080),
    (Redirect(), 8080, 8080),
    # ... a scheme given -> its well-known port, left out of the Location
    (Redirect(scheme="https"), 80, 0),
    (Redirect(scheme="https", hostname="example.org"), 8080, 0),
    # the request came to 8080 and keeps its Host: the port must be replaced explicitly
    (Redirect(scheme="https"), 8080, 443),
    (Redirect(scheme="http"), 8080, 80),
    # a port given wins
    (Redirect(port=8083), 80, 8083),
    (Redirect(port=8083, scheme="https"), 80, 8083),
    (Redirect(port=443, scheme="https", hostname="a.b"), 80, 0),
    (Redirect(port=80, hostname="a.b"), 8080, 0),
])
def test_redirect_port(redirect: Redirect, listener: int, port: int) -> None:
    assert ec.redirect_port(redirect, listener) == port


@pytest.mark.parametrize(("matched", "replacement", "path", "expected"), [
    ("/prefix/one", "/one", "/prefix/one/two", "/one/two"),
    ("/prefix/one", "/one", "/prefix/one", "/one"),
    ("/strip-prefix", "/", "/strip-prefix/three", "/three"),
    ("/strip-prefix", "/", "/strip-prefix", "/"),
    ("/strip-prefix", "/", "/strip-prefix//x", "/x"),
    ("/original-prefix", "/replacement-prefix", "/original-prefix/lemon",
     "/replacement-prefix/lemon"),
    ("/path-and-status", "/replacement-prefix", "/path-and-status", "/replacement-prefix"),
    ("/a/", "/b/", "/a/x", "/b/x"),
    ("/", "/api", "/x", "/api/x"),
])
def test_prefix_rewrite(matched: str, replacement: str, path: str, expected: str) -> None:
    """The regex Envoy gets, applied as RE2 would (these patterns mean the same in Python)."""
    rw = ec.prefix_rewrite(matched, replacement)
    assert re.sub(rw.pattern.regex, rw.substitution.replace("\\", "\\\\"), path,
                  count=1) == expected


def test_redirect_route() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (
        RouteRule(matches=prefix_match("/old"), redirect=Redirect(
            scheme="https", hostname="example.org", status_code=301,
            path=PathModifier(PREFIX, "/new"))),
        RouteRule(matches=prefix_match("/full"), redirect=Redirect(
            port=8083, status_code=308, path=PathModifier(FULL, "/replaced")),
            response_headers=HeaderModifier(set=(("x-r", "1"),))),
    ))
    full, old = routes_of(view((route,)))  # the longer prefix first
    assert old.WhichOneof("action") == "redirect"
    assert (old.redirect.scheme_redirect, old.redirect.host_redirect,
            old.redirect.port_redirect) == ("https", "example.org", 0)
    assert old.redirect.response_code == rc.RedirectAction.MOVED_PERMANENTLY
    assert old.redirect.regex_rewrite.pattern.regex == "^/old"
    assert full.redirect.path_redirect == "/replaced"
    assert full.redirect.port_redirect == 8083
    assert full.redirect.response_code == rc.RedirectAction.PERMANENT_REDIRECT
    # A redirect is a response too: ResponseHeaderModifier applies to it.
    assert [h.header.key for h in full.response_headers_to_add] == ["x-r"]


def test_each_status_code_has_its_envoy_code() -> None:
    for code in (301, 302, 303, 307, 308):
        route = HTTPRoute("r", "default", (ECHO,), (RouteRule(
            redirect=Redirect(status_code=code)),))
        (r,) = routes_of(view((route,)))
        assert r.redirect.response_code == ec.REDIRECT_CODES[code]
    assert len(set(ec.REDIRECT_CODES.values())) == 5


# --- rewrites, query parameters, backend filters --------------------------------------------

def test_rewrite_host_and_paths() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (
        RouteRule(matches=prefix_match("/prefix/one"),
                  rewrite=URLRewrite(path=PathModifier(PREFIX, "/one")),
                  backends=(BackendRef("echo-v1", "default", 80),)),
        RouteRule(matches=prefix_match("/full"),
                  rewrite=URLRewrite(hostname="api.internal",
                                     path=PathModifier(FULL, "/one")),
                  backends=(BackendRef("echo-v1", "default", 80),)),
    ))
    prefix, full = routes_of(view((route,)))
    assert prefix.route.regex_rewrite.pattern.regex == "^/prefix/one"
    assert prefix.route.regex_rewrite.substitution == "/one"
    assert full.route.host_rewrite_literal == "api.internal"
    assert full.route.regex_rewrite.pattern.regex == "^/.*$"
    assert full.route.regex_rewrite.substitution == "/one"
    assert full.route.cluster == "outbound|80||echo-v1.default.svc.cluster.local"


def test_query_parameter_matches_and_their_precedence() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (
        RouteRule(matches=(RouteMatch(query_params=(QueryParamMatch("animal", "whale"),)),)),
        RouteRule(matches=(RouteMatch(query_params=(
            QueryParamMatch("animal", "whale"),
            QueryParamMatch("n", "[0-9]+", ec.HeaderMatchType.REGULAR_EXPRESSION))),)),
        RouteRule(matches=(RouteMatch(),)),
    ))
    two, one, none = routes_of(view((route,)))  # more query matches first
    assert [(q.name, q.string_match.WhichOneof("match_pattern"))
            for q in two.match.query_parameters] == [("animal", "exact"), ("n", "safe_regex")]
    assert [q.string_match.exact for q in one.match.query_parameters] == ["whale"]
    assert list(none.match.query_parameters) == []


def test_backend_filters_ride_on_weighted_clusters() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (RouteRule(backends=(
        BackendRef("echo-v1", "default", 80, request_headers=HeaderModifier(
            set=(("x-header-set", "v"),), remove=("x-gone",)),
            response_headers=HeaderModifier(add=(("x-resp", "1"),))),)),))
    (r,) = routes_of(view((route,)))
    # One backend, yet a weighted cluster: only there can Envoy apply per-backend headers.
    (c,) = r.route.weighted_clusters.clusters
    assert c.name == "outbound|80||echo-v1.default.svc.cluster.local"
    assert [(h.header.key, h.header.value) for h in c.request_headers_to_add] == [
        ("x-header-set", "v")]
    assert list(c.request_headers_to_remove) == ["x-gone"]
    assert [h.header.key for h in c.response_headers_to_add] == ["x-resp"]
    assert list(r.request_headers_to_add) == []


# --- consumer routes (GEP-1294) --------------------------------------------------------------

def test_consumer_routes_apply_to_their_namespace_only() -> None:
    producer = HTTPRoute("p", "default", (ECHO,), (RouteRule(
        backends=(BackendRef("echo-v1", "default", 80),)),))
    consumer = HTTPRoute("c", "client-ns", (ECHO,), (RouteRule(
        response_headers=HeaderModifier(set=(("x-header-set", "set"),)),
        backends=(BackendRef("echo-v2", "default", 80),)),))
    v = view((producer, consumer))
    assert {r.key for r in v.routes} == {"default/p", "client-ns/c"}
    c, fence, p = routes_of(v)
    for r in (c, fence):
        (fs,) = r.match.filter_state
        assert fs.key == ec.PEER_PRINCIPAL_KEY
        pattern = fs.string_match.safe_regex.regex
        assert re.fullmatch(pattern, "spiffe://cluster.local/ns/client-ns/sa/app")
        assert not re.fullmatch(pattern, "spiffe://cluster.local/ns/other/sa/app")
        assert not re.fullmatch(pattern, "spiffe://cluster.local/ns/client-nsx/sa/app")
    assert c.route.cluster == "outbound|80||echo-v2.default.svc.cluster.local"
    # The consumer namespace's clients never fall through to the producer's routes.
    assert fence.direct_response.status == 404 and fence.match.prefix == "/"
    assert list(p.match.filter_state) == []
    assert p.route.cluster == "outbound|80||echo-v1.default.svc.cluster.local"


def test_consumer_route_alone_leaves_others_on_the_default_route() -> None:
    consumer = HTTPRoute("c", "client-ns", (ECHO,), (RouteRule(),))
    c, fence, default = routes_of(view((consumer,)))
    assert fence.direct_response.status == 404
    assert c.route.cluster == default.route.cluster == \
        "outbound|80||echo.default.svc.cluster.local"
    assert default.name == "default" and list(default.match.filter_state) == []


# --- protocols: gRPC and TCP ports ----------------------------------------------------------

def test_tcp_port_is_proxied_as_bytes_and_http2_port_speaks_h2_upstream() -> None:
    res = ec.resources(view())
    chains = {c.name: c for c in res[ec.LISTENER_TYPE][ec.MAIN_INTERNAL].filter_chains}
    assert [f.name for f in chains["default/echo:80"].filters] == [
        "envoy.filters.network.http_connection_manager"]
    assert [f.name for f in chains["default/echo:7070"].filters] == [
        "envoy.filters.network.http_connection_manager"]
    (tcp,) = chains["default/echo:9090"].filters
    assert tcp.name == "envoy.filters.network.tcp_proxy"
    proxy = tcp_proxy_pb2.TcpProxy()
    tcp.typed_config.Unpack(proxy)
    assert proxy.cluster == "outbound|9090||echo.default.svc.cluster.local"
    # No HTTP routes for a TCP port.
    assert sorted(res[ec.ROUTE_TYPE]) == ["7070|echo.default.svc.cluster.local",
                                          "80|echo.default.svc.cluster.local"]
    opts = res[ec.CLUSTER_TYPE]["outbound|7070||echo.default.svc.cluster.local"] \
        .typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo

    h2, h1 = hpo.HttpProtocolOptions(), hpo.HttpProtocolOptions()
    opts.Unpack(h2)
    assert h2.WhichOneof("upstream_protocol_options") == "explicit_http_config"
    assert h2.explicit_http_config.WhichOneof("protocol_config") == "http2_protocol_options"
    res[ec.CLUSTER_TYPE]["outbound|80||echo.default.svc.cluster.local"] \
        .typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(h1)
    assert h1.WhichOneof("upstream_protocol_options") == "use_downstream_protocol_config"


def test_unknown_protocol_is_tcp() -> None:
    v = build_view(GW, CONFIG, (), (), protocols={})
    chains = ec.main_internal(v).filter_chains
    assert {f.name for c in chains for f in c.filters} == {"envoy.filters.network.tcp_proxy"}


def test_tcp_route_weights() -> None:
    tcp = TCPRoute("t", "default", (ParentRef("Service", "echo", "default", 9090),), (
        BackendRef("echo-v1", "default", 80, 3), BackendRef("echo-v2", "default", 80, 1),
        BackendRef("echo-v2", "default", 80, 0)))
    v = view(tcp_routes=(tcp,))
    assert sorted(v.services) == ["default/echo", "default/echo-v1", "default/echo-v2"]
    assert ec.tcp_clusters(v, MULTI, 9090) == [
        ("outbound|80||echo-v1.default.svc.cluster.local", 3),
        ("outbound|80||echo-v2.default.svc.cluster.local", 1)]
    assert ec.tcp_clusters(v, MULTI, 80) == [("outbound|80||echo.default.svc.cluster.local", 1)]
    chain = next(c for c in ec.main_internal(v).filter_chains if c.name.endswith(":9090"))
    proxy = tcp_proxy_pb2.TcpProxy()
    chain.filters[0].typed_config.Unpack(proxy)
    assert [(c.name.split("|")[-1], c.weight) for c in proxy.weighted_clusters.clusters] == [
        ("echo-v1.default.svc.cluster.local", 3), ("echo-v2.default.svc.cluster.local", 1)]


def test_grpc_route_is_served_on_its_port() -> None:
    from controller.waypoint.parse import parse_grpc_route

    route = parse_grpc_route("g", "default", {
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 7070}],
        "rules": [{"matches": [{"method": {"service": "grpc.Echo", "method": "Ping"}}],
                   "backendRefs": [{"name": "echo-v1", "port": 80, "weight": 7},
                                   {"name": "echo-v2", "port": 80, "weight": 3}]}]})
    v = view((route,))
    assert routes_of(v, port=80)[0].name == "default"  # the route is on 7070 only
    (r,) = routes_of(v, port=7070)
    assert r.match.path == "/grpc.Echo/Ping"
    assert [c.weight.value for c in r.route.weighted_clusters.clusters] == [7, 3]


# --- authorization on TCP ports ------------------------------------------------------------

GET_ONLY = L7Operation(methods=(Match("GET"),), ports=(9090,))


@pytest.mark.parametrize(("op", "action", "expected"), [
    (L7Operation(ports=(9090,)), PolicyAction.ALLOW, L7Operation(ports=(9090,))),
    (L7Operation(ports=(9090,)), PolicyAction.DENY, L7Operation(ports=(9090,))),
    # Methods or paths cannot be judged on a connection: an ALLOW never matches it ...
    (GET_ONLY, PolicyAction.ALLOW, None),
    (L7Operation(not_paths=(Match("/a"),)), PolicyAction.ALLOW, None),
    # ... and a DENY judges on what is left (fail closed).
    (GET_ONLY, PolicyAction.DENY, L7Operation(ports=(9090,))),
    (L7Operation(paths=(Match("/admin*"),)), PolicyAction.DENY, L7Operation()),
])
def test_tcp_operation(op: L7Operation, action: PolicyAction,
                       expected: L7Operation | None) -> None:
    assert ec.tcp_operation(op, action) == expected


def _tcp_chain(policies: tuple[WaypointPolicy, ...]) -> list[str]:
    v = build_view(GW, CONFIG, (), policies, protocols=PROTOCOLS)
    chain = next(c for c in ec.main_internal(v).filter_chains if c.name.endswith(":9090"))
    return [f.name for f in chain.filters]


def _policy(action: PolicyAction, *ops: L7Operation) -> WaypointPolicy:
    return WaypointPolicy("p", "default", action, (L7Rule(operations=ops),),
                          (TargetRef("Gateway", "wp", "default"),))


def test_tcp_ports_get_the_waypoint_authorization() -> None:
    assert _tcp_chain(()) == ["envoy.filters.network.tcp_proxy"]
    deny = _policy(PolicyAction.DENY, GET_ONLY)
    assert _tcp_chain((deny,)) == ["envoy.filters.network.rbac.deny",
                                   "envoy.filters.network.tcp_proxy"]
    # An ALLOW whose only rule is about methods leaves nothing a connection can match:
    # the filter is there, with no policy, so it denies every connection.
    allow = _policy(PolicyAction.ALLOW, GET_ONLY)
    v = build_view(GW, CONFIG, (), (allow,), protocols=PROTOCOLS)
    chain = next(c for c in ec.main_internal(v).filter_chains if c.name.endswith(":9090"))
    from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2

    config = network_rbac_pb2.RBAC()
    chain.filters[0].typed_config.Unpack(config)
    assert chain.filters[0].name == "envoy.filters.network.rbac.allow"
    assert config.rules.action == config.rules.ALLOW and not config.rules.policies


def test_routes_on_a_port_of_the_wrong_protocol_are_reported() -> None:
    http_on_tcp = HTTPRoute("h", "default", (ParentRef("Service", "echo", "default", 9090),),
                            (RouteRule(),))
    tcp_on_http = TCPRoute("t", "default", (ParentRef("Service", "echo", "default", 80),),
                           (BackendRef("echo-v1", "default", 80),))
    # Without a port, a route attaches to the ports of its kind: nothing to report.
    everywhere = HTTPRoute("all", "default", (ECHO,), (RouteRule(),))
    v = view((http_on_tcp, everywhere), (tcp_on_http,))
    assert v.problems() == (
        "TCPRoute default/t attaches to port 80 of service default/echo, which is HTTP, so "
        "it does not apply there; attach an HTTPRoute",
        "HTTPRoute default/h attaches to port 9090 of service default/echo, which is TCP, so "
        "it does not apply there; attach a TCPRoute, or name the port http-* (grpc-*) or set "
        "its appProtocol")
    # And they change nothing there: port 9090 stays a TCP proxy to the service.
    assert ec.tcp_clusters(v, MULTI, 9090) == [
        ("outbound|9090||echo.default.svc.cluster.local", 1)]
    assert view().problems() == ()

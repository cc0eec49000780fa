"""The waypoint's Envoy resources, generated from typed views (pure, no Envoy process)."""

from __future__ import annotations

import ipaddress

import pytest

from controller.waypoint import envoy_config as ec
from controller.waypoint.model import (
    BackendRef,
    Fault,
    Gateway,
    HeaderMatch,
    HeaderModifier,
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
from controller.waypoint.protocol import PortProtocol, port_key
from controller.waypoint.view import WaypointView, build_view
from mesh.state.model import (
    MeshConfig,
    Protocol,
    Service,
    ServicePort,
    WaypointRef,
    Workload,
)

ip = ipaddress.ip_address
GW = Gateway("wp", "default")
BOUND = WaypointRef("default", "wp")


def svc(name: str, vip: str, selector: dict[str, str], bound: bool = False,
        ports: tuple[tuple[int, int], ...] = ((80, 8080),)) -> Service:
    return Service(name, "default", f"{name}.default.svc.cluster.local", (ip(vip),),
                   tuple(ServicePort(p, t) for p, t in ports), tuple(sorted(selector.items())),
                   BOUND if bound else None)


def wl(name: str, addr: str, labels: dict[str, str], protocol: Protocol = Protocol.HBONE,
       healthy: bool = True) -> Workload:
    return Workload(f"default/{name}", name, "default", "echo", "node-1", (ip(addr),),
                    "cluster.local", tuple(sorted(labels.items())), protocol=protocol,
                    healthy=healthy)


SERVICES = (
    svc("echo", "10.96.0.10", {"app": "echo"}, bound=True),
    svc("echo-v1", "10.96.0.11", {"app": "echo", "version": "v1"}),
    svc("echo-v2", "10.96.0.12", {"app": "echo", "version": "v2"}),
    svc("other", "10.96.0.13", {"app": "other"}),
)
WORKLOADS = (
    wl("e1", "10.244.1.5", {"app": "echo", "version": "v1"}),
    wl("e2", "10.244.2.5", {"app": "echo", "version": "v2"}),
    wl("plain", "10.244.2.6", {"app": "echo", "version": "v2"}, Protocol.TCP, healthy=False),
)
CONFIG = MeshConfig(workloads=WORKLOADS, services=SERVICES, version="7")
ECHO = ParentRef("Service", "echo", "default")


# Every port of these services is HTTP (named http-... in the registry).
HTTP_PORTS = {port_key(s.namespace, s.name, p.port): PortProtocol.HTTP
              for s in SERVICES for p in s.ports}


def view(routes: tuple[HTTPRoute, ...] = (),
         policies: tuple[WaypointPolicy, ...] = ()) -> WaypointView:
    return build_view(GW, CONFIG, routes, policies, protocols=HTTP_PORTS)


def routes_of(v: WaypointView) -> list[object]:
    rc = ec.route_configuration(v, SERVICES[0], 80)
    return list(rc.virtual_hosts[0].routes)


def test_view_binds_only_services_labelled_for_this_waypoint() -> None:
    v = view()
    assert [s.name for s in v.bound] == ["echo"]
    other = build_view(Gateway("other-wp", "default"), CONFIG, (), (), protocols=HTTP_PORTS)
    assert other.bound == ()


def test_view_collects_backend_services_and_endpoints() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (RouteRule(
        backends=(BackendRef("echo-v2", "default", 80),)),))
    v = view((route,))
    assert sorted(v.services) == ["default/echo", "default/echo-v2"]
    assert [w.name for w in v.endpoints["default/echo-v2"]] == ["e2", "plain"]


def test_routes_attached_to_other_services_are_ignored() -> None:
    route = HTTPRoute("r", "default", (ParentRef("Service", "other", "default"),),
                      (RouteRule(),))
    assert view((route,)).routes == ()


def test_default_route_goes_to_the_service_with_istio_retries() -> None:
    (r,) = routes_of(view())
    assert r.match.prefix == "/"
    assert r.route.cluster == "outbound|80||echo.default.svc.cluster.local"
    assert r.route.retry_policy.num_retries.value == ec.DEFAULT_RETRIES
    assert r.route.timeout.seconds == 0  # no timeout unless asked for


def test_matches_are_ordered_by_gateway_api_precedence() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (
        RouteRule(matches=(RouteMatch(path=PathMatch(PathMatchType.PATH_PREFIX, "/")),)),
        RouteRule(matches=(RouteMatch(path=PathMatch(PathMatchType.PATH_PREFIX, "/api/")),)),
        RouteRule(matches=(RouteMatch(headers=(HeaderMatch("X-Version", "v2"),)),)),
        RouteRule(matches=(RouteMatch(path=PathMatch(PathMatchType.EXACT, "/healthz")),)),
        RouteRule(matches=(RouteMatch(method="POST"),)),
    ))
    got = [(r.match.WhichOneof("path_specifier"),
            r.match.path or r.match.prefix or r.match.path_separated_prefix,
            [h.name for h in r.match.headers]) for r in routes_of(view((route,)))]
    assert got == [
        ("path", "/healthz", []),
        ("path_separated_prefix", "/api", []),  # segment prefix: /api, /api/x, not /apix
        ("prefix", "/", [":method"]),
        ("prefix", "/", ["x-version"]),
        ("prefix", "/", []),
    ]


def test_older_route_wins_a_tie() -> None:
    newer = HTTPRoute("a-newer", "default", (ECHO,), (RouteRule(
        backends=(BackendRef("echo-v2", "default", 80),)),), creation_index=2)
    older = HTTPRoute("z-older", "default", (ECHO,), (RouteRule(
        backends=(BackendRef("echo-v1", "default", 80),)),), creation_index=1)
    first = routes_of(view((newer, older)))[0]
    assert first.route.cluster == "outbound|80||echo-v1.default.svc.cluster.local"


def test_weighted_backends_and_header_changes() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (RouteRule(
        backends=(BackendRef("echo-v1", "default", 80, 90),
                  BackendRef("echo-v2", "default", 80, 10),
                  BackendRef("echo-v2", "default", 80, 0)),
        request_headers=HeaderModifier(set=(("x-a", "1"),), add=(("x-b", "2"),),
                                       remove=("x-c",))),))
    (r,) = routes_of(view((route,)))
    weights = [(c.name.split("|")[-1], c.weight.value) for c in r.route.weighted_clusters.clusters]
    assert weights == [("echo-v1.default.svc.cluster.local", 90),
                       ("echo-v2.default.svc.cluster.local", 10)]
    from envoy.config.core.v3 import base_pb2

    opt = base_pb2.HeaderValueOption
    assert [(o.header.key, o.append_action) for o in r.request_headers_to_add] == [
        ("x-a", opt.OVERWRITE_IF_EXISTS_OR_ADD), ("x-b", opt.APPEND_IF_EXISTS_OR_ADD)]
    assert list(r.request_headers_to_remove) == ["x-c"]


def test_unknown_backend_gets_a_cluster_nobody_has_and_all_zero_weights_500() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (
        RouteRule(matches=(RouteMatch(path=PathMatch(PathMatchType.EXACT, "/a")),),
                  backends=(BackendRef("missing", "default", 80),)),
        RouteRule(matches=(RouteMatch(path=PathMatch(PathMatchType.EXACT, "/b")),),
                  backends=(BackendRef("echo-v1", "default", 80, 0),)),
        RouteRule(matches=(RouteMatch(path=PathMatch(PathMatchType.EXACT, "/c")),),
                  invalid="HTTPFault default/x does not exist"),
    ))
    a, b, c = routes_of(view((route,)))
    assert a.route.cluster.startswith("invalid|")
    assert b.direct_response.status == 500
    assert c.direct_response.status == 500
    assert "HTTPFault default/x" in c.direct_response.body.inline_string


def test_timeouts_and_retries() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (RouteRule(
        timeout_ms=500, backend_timeout_ms=200,
        retry=Retry(attempts=5, codes=(500, 503), backoff_ms=25)),))
    (r,) = routes_of(view((route,)))
    assert r.route.timeout.ToMilliseconds() == 500
    rp = r.route.retry_policy
    assert rp.num_retries.value == 5 and list(rp.retriable_status_codes) == [500, 503]
    assert rp.per_try_timeout.ToMilliseconds() == 200
    assert rp.retry_back_off.base_interval.ToMilliseconds() == 25
    assert "retriable-status-codes" in rp.retry_on


def test_a_faulty_rule_passes_through_its_own_fault_stage() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (RouteRule(
        backends=(BackendRef("echo-v1", "default", 80),),
        retry=Retry(attempts=10, codes=(500,)),
        fault=Fault(abort_status=500, abort_percent=50, delay_ms=100, delay_percent=12.5)),))
    v = view((route,))
    (r,) = routes_of(v)
    stage = "fault|default/r/0|80"
    assert r.route.cluster == stage
    res = ec.resources(v)
    listener = res[ec.LISTENER_TYPE][stage]
    assert stage in res[ec.CLUSTER_TYPE]
    from envoy.extensions.filters.http.fault.v3 import fault_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    fault = fault_pb2.HTTPFault()
    hcm.http_filters[0].typed_config.Unpack(fault)
    assert fault.abort.http_status == 500
    assert fault.abort.percentage.numerator == 500_000  # of a million
    assert fault.delay.percentage.numerator == 125_000
    inner = hcm.route_config.virtual_hosts[0].routes[0].route
    assert inner.cluster == "outbound|80||echo-v1.default.svc.cluster.local"
    assert not inner.HasField("retry_policy")  # retries belong to the outer route


def rbac_of(v: WaypointView) -> list[tuple[str, int, list[str]]]:
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2

    out = []
    for f in ec.rbac_filters(v.policies_for(SERVICES[0])):
        r = rbac_pb2.RBAC()
        f.typed_config.Unpack(r)
        out.append((f.name, r.rules.action, sorted(r.rules.policies)))
    return out


def test_policies_deny_first_then_allow() -> None:
    deny = WaypointPolicy("no-admin", "default", PolicyAction.DENY, (L7Rule(operations=(
        L7Operation(methods=(Match("POST"),), paths=(Match("/admin*"),)),)),),
        (TargetRef("Gateway", "wp", "default"),))
    allow = WaypointPolicy("only-client", "default", PolicyAction.ALLOW, (L7Rule(sources=(
        L7Source(principals=(Match("cluster.local/ns/default/sa/client"),)),)),),
        (TargetRef("Service", "echo", "default"),))
    elsewhere = WaypointPolicy("x", "default", PolicyAction.DENY, (L7Rule(),),
                               (TargetRef("Service", "other", "default"),))
    v = view(policies=(deny, allow, elsewhere))
    assert rbac_of(v) == [
        ("envoy.filters.http.rbac.deny", 1, ["ns[default]-policy[no-admin]-rule[0]"]),
        ("envoy.filters.http.rbac.allow", 0, ["ns[default]-policy[only-client]-rule[0]"]),
    ]


@pytest.mark.parametrize(("match", "field", "value"), [
    (Match("cluster.local/ns/a/sa/b"), "exact", "spiffe://cluster.local/ns/a/sa/b"),
    (Match("cluster.local/ns/a/*"), "prefix", "spiffe://cluster.local/ns/a/"),
    (Match("*"), "prefix", "spiffe://"),
])
def test_principals_match_the_client_spiffe_uri(match: Match, field: str, value: str) -> None:
    p = ec._principal_match(match)
    assert p.filter_state.key == ec.PEER_PRINCIPAL_KEY
    assert getattr(p.filter_state.string_match, field) == value


def test_namespaces_match_the_namespace_segment_only() -> None:
    import re

    regex = ec._namespace_match(Match("prod")).filter_state.string_match.safe_regex.regex
    assert re.fullmatch(regex, "spiffe://cluster.local/ns/prod/sa/x")
    assert not re.fullmatch(regex, "spiffe://cluster.local/ns/prod2/sa/x")
    assert not re.fullmatch(regex, "spiffe://cluster.local/ns/x/sa/prod")


def test_endpoints_hbone_through_connect_originate_plain_directly() -> None:
    route = HTTPRoute("r", "default", (ECHO,), (RouteRule(
        backends=(BackendRef("echo-v2", "default", 80),)),))
    cla = ec.load_assignment(view((route,)), SERVICES[2], 80)
    e2, plain = cla.endpoints[0].lb_endpoints
    assert e2.endpoint.address.envoy_internal_address.server_listener_name == "connect_originate"
    tunnel = e2.metadata.filter_metadata["tunnel"]
    assert tunnel["destination"] == "10.244.2.5:8080"
    assert tunnel["address"] == "10.244.2.5:15008"
    assert e2.metadata.filter_metadata["ambit"]["principal"] == \
        "spiffe://cluster.local/ns/default/sa/echo"
    assert plain.endpoint.address.socket_address.address == "10.244.2.6"
    from envoy.config.core.v3 import health_check_pb2

    assert plain.health_status == health_check_pb2.UNHEALTHY  # not ready


def test_main_internal_has_a_chain_per_bound_service_port() -> None:
    listener = ec.main_internal(view())
    (chain,) = listener.filter_chains
    assert chain.filter_chain_match.prefix_ranges[0].address_prefix == "10.96.0.10"
    assert chain.filter_chain_match.destination_port.value == 80


def test_resources_are_deterministic() -> None:
    assert ec.content_version(ec.resources(view())) == ec.content_version(ec.resources(view()))

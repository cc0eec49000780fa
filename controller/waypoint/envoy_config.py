"""A waypoint's view, spelled as Envoy resources (listeners, routes, clusters, endpoints).

Why a pure function: every L7 feature (matches, splits, retries, timeouts, faults,
authorization) is a few lines of Envoy config, and getting those lines right is the whole
job. Here they are produced from typed records with no I/O, so each feature is a table test,
and the same output is what the controller's ADS server pushes and what ``envoy --mode
validate`` checks in the tests.

The packet path inside Envoy (names as in Istio's waypoints, so Istio habits carry over):

* ``connect_terminate`` (0.0.0.0, the HBONE port): mutual TLS with the waypoint's certificate (SDS
  ``default``, trust bundle ``ROOTCA``), HTTP/2 ``CONNECT`` terminated. Filter state records
  the tunnel's ``:authority`` (the service VIP:port the client dialled) and the client's
  SPIFFE ID, both shared with the upstream (internal) connection;
* ``main_internal`` (internal listener): ``original_dst`` restores VIP:port as the local
  address, so the filter chain of that service port is chosen; its HTTP connection manager
  runs authorization (RBAC on the client SPIFFE ID, methods, paths), the routes (RDS), and
  logs each request to the waypoint agent (ALS) for Istio metrics;
* clusters ``outbound|<port>||<hostname>`` (EDS): each endpoint is the internal listener
  ``connect_originate`` with the pod's address in metadata; there ``tcp_proxy`` opens an
  HBONE tunnel (``CONNECT pod:port`` over mutual TLS) to the pod's HBONE port, where the pod's
  ztunnel receives it. Pods outside the mesh are reached directly in plaintext;
* a rule with a fault goes through one more internal listener (``fault|...``) that injects
  it, so the rule's retries and timeouts (in ``main_internal``'s router) act on faults as on
  a failing backend.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.internal_upstream.v3 import internal_upstream_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import (
    filter_state_pb2,
    path_pb2,
    regex_pb2,
    string_pb2,
)
from envoy.type.metadata.v3 import metadata_pb2 as metadata_kind_pb2
from envoy.type.tracing.v3 import custom_tag_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from controller.waypoint.model import (
    BackendRef,
    Fault,
    HeaderMatchType,
    HeaderModifier,
    HTTPRoute,
    L7Operation,
    L7Rule,
    L7Source,
    Match,
    PathMatchType,
    PathModifierType,
    PolicyAction,
    Redirect,
    RouteMatch,
    RouteRule,
    URLRewrite,
    WaypointPolicy,
)
from controller.waypoint.peer_baggage import BAGGAGE_FORMAT, PEER_BAGGAGE_KEY
from controller.waypoint.protocol import PortProtocol
from controller.waypoint.view import WaypointView
from mesh.ports import HBONE_PORT
from mesh.state.model import Protocol, Service, Workload

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

AGENT_CLUSTER = "waypoint-agent"  # the waypoint agent's unix socket: SDS and ALS
CERT_SECRET = "default"
ROOT_SECRET = "ROOTCA"
ALS_LOG_NAME = "ambit-waypoint"
PEER_PRINCIPAL_KEY = "io.istio.peer_principal"
CONNECT_TERMINATE = "connect_terminate"
MAIN_INTERNAL = "main_internal"
CONNECT_ORIGINATE = "connect_originate"
TUNNEL_METADATA = "tunnel"
AMBIT_METADATA = "ambit"  # endpoint metadata read by the access log's custom tags
# Istio's default retry policy for routes without one.
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRY_CODES = (503,)
DEFAULT_RETRIES = 2
# Retries configured by a route also retry these transport failures (GEP-1731 leaves it to us).
RETRY_ON = "connect-failure,refused-stream,reset,retriable-status-codes"
# HTTP/2 windows matched to the ztunnel's (docs/architecture.md, HBONE protocol details).
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024

Resources = dict[str, dict[str, Message]]


def _any(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _ms(ms: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(ms)
    return d


def _percent(value: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=round(value * 10_000), denominator=percent_pb2.FractionalPercent.MILLION)


def cluster_name(service: Service, port: int) -> str:
    """Istio's name for a service port's cluster; the waypoint agent parses it for metrics."""
    return f"outbound|{port}||{service.hostname}"


def route_name(service: Service, port: int) -> str:
    return f"{port}|{service.hostname}"


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC,
            transport_api_version=config_source_pb2.V3,
            grpc_services=[grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=AGENT_CLUSTER))]),
        resource_api_version=config_source_pb2.V3))


def mesh_tls_context(trust_domain: str) -> tls_pb2.CommonTlsContext:
    """TLS 1.3, ALPN h2, our certificate and trust bundle over SDS, and the peer must prove
    an identity of this trust domain (HBONE's rules, as the ztunnel applies them)."""
    return tls_pb2.CommonTlsContext(
        tls_params=tls_common_pb2.TlsParameters(
            tls_minimum_protocol_version=tls_common_pb2.TlsParameters.TLSv1_3,
            tls_maximum_protocol_version=tls_common_pb2.TlsParameters.TLSv1_3),
        alpn_protocols=["h2"],
        tls_certificate_sds_secret_configs=[_sds(CERT_SECRET)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=tls_common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=[tls_common_pb2.SubjectAltNameMatcher(
                    san_type=tls_common_pb2.SubjectAltNameMatcher.URI,
                    matcher=string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/"))]),
            validation_context_sds_secret_config=_sds(ROOT_SECRET)))


def _h2_options(allow_connect: bool = False) -> protocol_pb2.Http2ProtocolOptions:
    return protocol_pb2.Http2ProtocolOptions(
        allow_connect=allow_connect,
        initial_stream_window_size=wrappers_pb2.UInt32Value(value=STREAM_WINDOW),
        initial_connection_window_size=wrappers_pb2.UInt32Value(value=CONNECTION_WINDOW))


def _hcm_filter(hcm: hcm_pb2.HttpConnectionManager) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                          typed_config=_any(hcm))


def _http_filter(name: str, config: Message) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=name, typed_config=_any(config))


def _router() -> hcm_pb2.HttpFilter:
    return _http_filter("envoy.filters.http.router", router_pb2.Router())


def _internal_cluster(name: str, metadata: Mapping[str, str] | None = None) \
        -> cluster_pb2.Cluster:
    """A cluster whose one endpoint is the internal listener of the same name."""
    endpoint = endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
        address=address_pb2.Address(envoy_internal_address=address_pb2.EnvoyInternalAddress(
            server_listener_name=name))))
    if metadata:
        endpoint.metadata.CopyFrom(_metadata({AMBIT_METADATA: metadata}))
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.STATIC, connect_timeout=_ms(2000),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])]),
        transport_socket=_internal_upstream())


def _internal_upstream() -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(
        name="envoy.transport_sockets.internal_upstream",
        typed_config=_any(internal_upstream_pb2.InternalUpstreamTransport(
            passthrough_metadata=[internal_upstream_pb2.InternalUpstreamTransport.MetadataValueSource(
                kind=metadata_kind_pb2.MetadataKind(host=metadata_kind_pb2.MetadataKind.Host()),
                name=TUNNEL_METADATA)],
            transport_socket=base_pb2.TransportSocket(
                name="envoy.transport_sockets.raw_buffer",
                typed_config=_any(raw_buffer_pb2.RawBuffer())))))


def _metadata(namespaces: Mapping[str, Mapping[str, str]]) -> base_pb2.Metadata:
    md = base_pb2.Metadata()
    for ns, values in namespaces.items():
        s = struct_pb2.Struct()
        s.update(dict(values))
        md.filter_metadata[ns].CopyFrom(s)
    return md


# --- listeners ----------------------------------------------------------------------------

def connect_terminate(trust_domain: str, bind: str = "0.0.0.0",
                      port: int = HBONE_PORT) -> listener_pb2.Listener:
    """HBONE in: terminate mTLS + CONNECT and hand the tunnel's bytes to ``main_internal``."""
    def state(key: str, fmt: str, factory: str = "") -> value_pb2.FilterStateValue:
        return value_pb2.FilterStateValue(
            object_key=key, factory_key=factory,
            format_string=substitution_format_string_pb2.SubstitutionFormatString(
                text_format_source=base_pb2.DataSource(inline_string=fmt)),
            shared_with_upstream=value_pb2.FilterStateValue.ONCE)

    set_state = set_filter_state_pb2.Config(on_request_headers=[
        # The VIP:port the client dialled: main_internal's original_dst restores it as the
        # local address, which selects that service port's filter chain.
        state("envoy.filters.listener.original_dst.local_ip", "%REQ(:AUTHORITY)%"),
        # The client's SPIFFE ID, for authorization and metrics in main_internal.
        state(PEER_PRINCIPAL_KEY, "%DOWNSTREAM_PEER_URI_SAN%", "envoy.string"),
        # The source's peer metadata (the ztunnel's baggage header), for the request metrics.
        state(PEER_BAGGAGE_KEY, BAGGAGE_FORMAT, "envoy.string"),
    ])
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(
            connect_matcher=route_components_pb2.RouteMatch.ConnectMatcher()),
        route=route_components_pb2.RouteAction(
            cluster=MAIN_INTERNAL,
            upgrade_configs=[route_components_pb2.RouteAction.UpgradeConfig(
                upgrade_type="CONNECT",
                connect_config=route_components_pb2.RouteAction.UpgradeConfig.ConnectConfig())]))
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=CONNECT_TERMINATE,
        codec_type=hcm_pb2.HttpConnectionManager.HTTP2,
        http2_protocol_options=_h2_options(allow_connect=True),
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="CONNECT")],
        route_config=route_pb2.RouteConfiguration(
            name=CONNECT_TERMINATE,
            virtual_hosts=[route_components_pb2.VirtualHost(
                name="connect", domains=["*"], routes=[route])]),
        http_filters=[_http_filter("envoy.filters.http.set_filter_state", set_state),
                      _router()],
        # Tunnels are long-lived TCP connections: no stream idle timeout on them.
        stream_idle_timeout=_ms(0),
    )
    tls = tls_pb2.DownstreamTlsContext(
        common_tls_context=mesh_tls_context(trust_domain),
        require_client_certificate=wrappers_pb2.BoolValue(value=True))
    return listener_pb2.Listener(
        name=CONNECT_TERMINATE,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address=bind, port_value=port)),
        filter_chains=[listener_components_pb2.FilterChain(
            filters=[_hcm_filter(hcm)],
            transport_socket=base_pb2.TransportSocket(name="envoy.transport_sockets.tls",
                                                      typed_config=_any(tls)))])


def connect_originate() -> listener_pb2.Listener:
    """HBONE out: each connection becomes a CONNECT tunnel to the pod named in the endpoint's
    ``tunnel`` metadata (``destination`` = pod:port, ``address`` = pod:HBONE_PORT)."""
    proxy = tcp_proxy_pb2.TcpProxy(
        stat_prefix=CONNECT_ORIGINATE, cluster=CONNECT_ORIGINATE,
        tunneling_config=tcp_proxy_pb2.TcpProxy.TunnelingConfig(
            hostname=f"%DYNAMIC_METADATA({TUNNEL_METADATA}:destination)%"))
    return listener_pb2.Listener(
        name=CONNECT_ORIGINATE, internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy",
                                           typed_config=_any(proxy))])])


def _access_log(addressed: Service) -> accesslog_pb2.AccessLog:
    def tag(name: str, key: str) -> custom_tag_pb2.CustomTag:
        return custom_tag_pb2.CustomTag(tag=name, metadata=custom_tag_pb2.CustomTag.Metadata(
            kind=metadata_kind_pb2.MetadataKind(host=metadata_kind_pb2.MetadataKind.Host()),
            metadata_key=metadata_kind_pb2.MetadataKey(
                key=AMBIT_METADATA, path=[metadata_kind_pb2.MetadataKey.PathSegment(key=key)])))

    als = als_pb2.HttpGrpcAccessLogConfig(common_config=als_pb2.CommonGrpcAccessLogConfig(
        log_name=ALS_LOG_NAME,
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=AGENT_CLUSTER)),
        transport_api_version=config_source_pb2.V3,
        buffer_flush_interval=_ms(250),
        filter_state_objects_to_log=[PEER_PRINCIPAL_KEY, PEER_BAGGAGE_KEY],
        custom_tags=[tag("destination_workload", "workload"),
                     tag("destination_workload_namespace", "namespace"),
                     tag("destination_principal", "principal"),
                     tag("destination_app", "app"),
                     tag("destination_service", "service"),
                     # The service the client dialled: what a denied request is counted as.
                     custom_tag_pb2.CustomTag(tag="addressed_service",
                                              literal=custom_tag_pb2.CustomTag.Literal(
                                                  value=addressed.hostname))],
        ),
        # gRPC or plain HTTP, for request_protocol.
        additional_request_headers_to_log=["content-type"])
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.http_grpc", typed_config=_any(als))


def _http_chain_filter(view: WaypointView, service: Service,
                      port: int) -> listener_components_pb2.Filter:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=f"{service.namespace}_{service.name}_{port}",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(route_config_name=route_name(service, port), config_source=_ads()),
        http_filters=[*rbac_filters(view.policies_for(service)), _router()],
        access_log=[_access_log(service)],
        # Authorization matches paths: match what the application will see.
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.UNESCAPE_AND_FORWARD,
        http2_protocol_options=_h2_options(),
    )
    return _hcm_filter(hcm)


def _tcp_chain_filters(view: WaypointView, service: Service,
                       port: int) -> list[listener_components_pb2.Filter]:
    """A port that is not HTTP: the waypoint's authorization as it applies to connections
    (``network_rbac_filters``), then its bytes go to the service's endpoints as they are (a
    TCPRoute's backends and weights, when one is attached), never parsed."""
    clusters = tcp_clusters(view, service, port)
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=f"{service.namespace}_{service.name}_{port}")
    if not clusters:
        # Every backend weighted 0: nothing may take the connection (Envoy closes it).
        proxy.cluster = f"invalid|{service.key}:{port}|no-backend"
    elif len(clusters) == 1:
        proxy.cluster = clusters[0][0]
    else:
        proxy.weighted_clusters.CopyFrom(tcp_proxy_pb2.TcpProxy.WeightedCluster(clusters=[
            tcp_proxy_pb2.TcpProxy.WeightedCluster.ClusterWeight(name=name, weight=weight)
            for name, weight in clusters]))
    return [*network_rbac_filters(view.policies_for(service)),
            listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy",
                                           typed_config=_any(proxy))]


def tcp_clusters(view: WaypointView, service: Service, port: int) -> list[tuple[str, int]]:
    """(cluster, weight) of a TCP port: its TCPRoute's backends, else the port's own."""
    for route in view.tcp_routes_for(service, port):
        return [(t.cluster, t.weight) for t in _backend_clusters(view, route.backends)]
    return [(cluster_name(service, port), 1)]


def main_internal(view: WaypointView) -> listener_pb2.Listener:
    """One filter chain per bound service port, chosen by the restored VIP:port: an HTTP
    connection manager for HTTP ports, a TCP proxy for the others."""
    chains = []
    for service in view.bound:
        for sp in service.ports:
            if view.protocol(service, sp.port).is_http:
                chain_filters = [_http_chain_filter(view, service, sp.port)]
            else:
                chain_filters = _tcp_chain_filters(view, service, sp.port)
            chains.append(listener_components_pb2.FilterChain(
                name=f"{service.key}:{sp.port}",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    prefix_ranges=[address_pb2.CidrRange(
                        address_prefix=str(vip), prefix_len=wrappers_pb2.UInt32Value(
                            value=vip.max_prefixlen)) for vip in service.vips],
                    destination_port=wrappers_pb2.UInt32Value(value=sp.port)),
                filters=chain_filters))
    return listener_pb2.Listener(
        name=MAIN_INTERNAL, internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        listener_filters=[listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.original_dst",
            typed_config=_any(original_dst_pb2.OriginalDst()))],
        filter_chains=chains)


# --- authorization ------------------------------------------------------------------------

def _string(m: Match, transform: str = "") -> string_pb2.StringMatcher:
    v = m.value
    if v == "*":
        return string_pb2.StringMatcher(prefix=transform)
    if v.endswith("*"):
        return string_pb2.StringMatcher(prefix=transform + v[:-1])
    if v.startswith("*"):
        return string_pb2.StringMatcher(suffix=v[1:]) if not transform else \
            string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(
                regex=re.escape(transform) + ".*" + re.escape(v[1:])))
    return string_pb2.StringMatcher(exact=transform + v)


def _principal_match(m: Match) -> rbac_pb2.Principal:
    # Istio principals have no scheme ("td/ns/x/sa/y"); the filter state holds the URI.
    return rbac_pb2.Principal(filter_state=filter_state_pb2.FilterStateMatcher(
        key=PEER_PRINCIPAL_KEY, string_match=_string(m, "spiffe://")))


def _namespace_match(m: Match) -> rbac_pb2.Principal:
    v = m.value
    if v == "*":
        ns = "[^/]+"
    elif v.endswith("*"):
        ns = re.escape(v[:-1]) + "[^/]*"
    elif v.startswith("*"):
        ns = "[^/]*" + re.escape(v[1:])
    else:
        ns = re.escape(v)
    return rbac_pb2.Principal(filter_state=filter_state_pb2.FilterStateMatcher(
        key=PEER_PRINCIPAL_KEY, string_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=f"spiffe://[^/]+/ns/{ns}/sa/[^/]+"))))


def _or_principals(items: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return items[0] if len(items) == 1 else rbac_pb2.Principal(
        or_ids=rbac_pb2.Principal.Set(ids=items))


def _source(src: L7Source) -> rbac_pb2.Principal:
    parts: list[rbac_pb2.Principal] = []
    for values, make, negate in ((src.principals, _principal_match, False),
                                 (src.not_principals, _principal_match, True),
                                 (src.namespaces, _namespace_match, False),
                                 (src.not_namespaces, _namespace_match, True)):
        if values:
            p = _or_principals([make(m) for m in values])
            parts.append(rbac_pb2.Principal(not_id=p) if negate else p)
    if not parts:
        return rbac_pb2.Principal(any=True)
    return parts[0] if len(parts) == 1 else rbac_pb2.Principal(
        and_ids=rbac_pb2.Principal.Set(ids=parts))


def _or_permissions(items: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return items[0] if len(items) == 1 else rbac_pb2.Permission(
        or_rules=rbac_pb2.Permission.Set(rules=items))


def _method(m: Match) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(header=route_components_pb2.HeaderMatcher(
        name=":method", string_match=_string(m)))


def _path(m: Match) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=_string(m)))


def _port(port: int) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(destination_port=port)


def _operation(op: L7Operation) -> rbac_pb2.Permission:
    parts: list[rbac_pb2.Permission] = []
    table: tuple[tuple[Sequence[Any], Callable[[Any], rbac_pb2.Permission], bool], ...] = (
        (op.methods, _method, False), (op.not_methods, _method, True),
        (op.paths, _path, False), (op.not_paths, _path, True),
        (op.ports, _port, False), (op.not_ports, _port, True))
    for values, make, negate in table:
        if values:
            p = _or_permissions([make(v) for v in values])
            parts.append(rbac_pb2.Permission(not_rule=p) if negate else p)
    if not parts:
        return rbac_pb2.Permission(any=True)
    return parts[0] if len(parts) == 1 else rbac_pb2.Permission(
        and_rules=rbac_pb2.Permission.Set(rules=parts))


def _rbac_policy(rule: L7Rule) -> rbac_pb2.Policy:
    principals = [_source(s) for s in rule.sources] or [rbac_pb2.Principal(any=True)]
    permissions = [_operation(o) for o in rule.operations] or [rbac_pb2.Permission(any=True)]
    return rbac_pb2.Policy(permissions=permissions, principals=principals)


def rbac_filters(policies: Sequence[WaypointPolicy]) -> list[hcm_pb2.HttpFilter]:
    """Istio's evaluation order: any matching DENY denies; then, when ALLOW policies exist,
    one must match. A policy with no rules matches nothing (ALLOW with no rules denies all)."""
    filters = []
    for action, name in ((PolicyAction.DENY, "deny"), (PolicyAction.ALLOW, "allow")):
        chosen = [p for p in policies if p.action is action]
        if not chosen:
            continue
        rules = {f"ns[{p.namespace}]-policy[{p.name}]-rule[{i}]": _rbac_policy(r)
                 for p in chosen for i, r in enumerate(p.rules)}
        rbac = rbac_pb2.RBAC(
            action=rbac_pb2.RBAC.DENY if action is PolicyAction.DENY else rbac_pb2.RBAC.ALLOW,
            policies=rules)
        filters.append(_http_filter(f"envoy.filters.http.rbac.{name}",
                                    http_rbac_pb2.RBAC(rules=rbac)))
    return filters


def tcp_operation(op: L7Operation, action: PolicyAction) -> L7Operation | None:
    """An operation as it applies to a TCP connection, Istio's rule: methods and paths
    cannot be evaluated without HTTP. In an ALLOW policy such an operation matches no
    connection (None); in a DENY policy they are dropped and the rest (ports) decides, so a
    policy never lets through on a TCP port what it would stop on an HTTP one."""
    if not (op.methods or op.not_methods or op.paths or op.not_paths):
        return op
    if action is PolicyAction.ALLOW:
        return None
    return L7Operation(ports=op.ports, not_ports=op.not_ports)


def _tcp_rbac_policy(rule: L7Rule, action: PolicyAction) -> rbac_pb2.Policy | None:
    """``_rbac_policy`` for a TCP port; None: the rule can never match a connection."""
    principals = [_source(s) for s in rule.sources] or [rbac_pb2.Principal(any=True)]
    if not rule.operations:
        return rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)],
                               principals=principals)
    kept = [o for o in (tcp_operation(op, action) for op in rule.operations) if o is not None]
    if not kept:
        return None
    return rbac_pb2.Policy(permissions=[_operation(o) for o in kept], principals=principals)


def network_rbac_filters(policies: Sequence[WaypointPolicy]) \
        -> list[listener_components_pb2.Filter]:
    """The same authorization for a TCP port (network RBAC, before the TCP proxy): DENY
    first, then, when ALLOW policies exist, one must match; rules over methods or paths as
    ``tcp_operation`` says (an ALLOW with nothing left for TCP denies every connection)."""
    filters = []
    for action, name in ((PolicyAction.DENY, "deny"), (PolicyAction.ALLOW, "allow")):
        chosen = [p for p in policies if p.action is action]
        if not chosen:
            continue
        rules = {f"ns[{p.namespace}]-policy[{p.name}]-rule[{i}]": policy
                 for p in chosen for i, r in enumerate(p.rules)
                 if (policy := _tcp_rbac_policy(r, action)) is not None}
        rbac = rbac_pb2.RBAC(
            action=rbac_pb2.RBAC.DENY if action is PolicyAction.DENY else rbac_pb2.RBAC.ALLOW,
            policies=rules)
        filters.append(listener_components_pb2.Filter(
            name=f"envoy.filters.network.rbac.{name}",
            typed_config=_any(network_rbac_pb2.RBAC(rules=rbac, stat_prefix=f"tcp_{name}_"))))
    return filters


# --- routes -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    """One Envoy route: a match of a rule of a route, with its precedence key."""

    order: tuple[Any, ...]
    route: HTTPRoute
    rule_index: int
    rule: RouteRule
    match: RouteMatch


class _Target(NamedTuple):
    """Where a share of a rule's requests goes: a cluster, its weight, and the backendRef it
    stands for (None: the addressed service itself), whose own filters apply there."""

    cluster: str
    weight: int
    backend: BackendRef | None = None


def _precedence(route: HTTPRoute, rule_index: int, match_index: int,
                m: RouteMatch) -> tuple[Any, ...]:
    # Gateway API: exact path, then the longest prefix, then method, then most headers, then
    # most query parameters; ties by oldest route, then namespace/name, then rule and match
    # order.
    kind = {PathMatchType.EXACT: 0, PathMatchType.REGULAR_EXPRESSION: 1,
            PathMatchType.PATH_PREFIX: 2}[m.path.type]
    return (kind, -len(m.path.value), m.method is None, -len(m.headers),
            -len(m.query_params), route.creation_index, route.namespace, route.name,
            rule_index, match_index)


def _string_match(value: str, kind: HeaderMatchType) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(exact=value) if kind is HeaderMatchType.EXACT else \
        string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=value))


def client_namespace_matcher(namespace: str) -> filter_state_pb2.FilterStateMatcher:
    """Requests whose client (its certificate, as connect_terminate recorded it) runs in
    ``namespace``: how a consumer route is kept to its own namespace's clients."""
    return filter_state_pb2.FilterStateMatcher(
        key=PEER_PRINCIPAL_KEY, string_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(
                regex=f"spiffe://[^/]+/ns/{re.escape(namespace)}/sa/[^/]+")))


def _route_match(m: RouteMatch, client_namespace: str = "") -> route_components_pb2.RouteMatch:
    rm = route_components_pb2.RouteMatch()
    value = m.path.value
    if m.path.type is PathMatchType.EXACT:
        rm.path = value
    elif m.path.type is PathMatchType.REGULAR_EXPRESSION:
        rm.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=value))
    elif value.rstrip("/") == "":
        rm.prefix = "/"
    else:
        # Gateway API prefixes match whole segments: /foo matches /foo and /foo/x, not /foox.
        rm.path_separated_prefix = value.rstrip("/")
    for h in m.headers:
        rm.headers.append(route_components_pb2.HeaderMatcher(
            name=h.name.lower(), string_match=_string_match(h.value, h.type)))
    if m.method:
        rm.headers.append(route_components_pb2.HeaderMatcher(
            name=":method", string_match=string_pb2.StringMatcher(exact=m.method)))
    for q in m.query_params:
        # Envoy compares the first value of the parameter, as Gateway API's core level asks.
        rm.query_parameters.append(route_components_pb2.QueryParameterMatcher(
            name=q.name, string_match=_string_match(q.value, q.type)))
    if client_namespace:
        rm.filter_state.append(client_namespace_matcher(client_namespace))
    return rm


def _header_options(mod: HeaderModifier | None) -> tuple[list[base_pb2.HeaderValueOption],
                                                         list[str]]:
    if mod is None:
        return [], []
    options = [base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=k, value=v),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD) for k, v in mod.set]
    options += [base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=k, value=v),
        append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD) for k, v in mod.add]
    return options, list(mod.remove)


def fault_listener_name(route: HTTPRoute, rule_index: int, port: int) -> str:
    # Per service port too: a rule without backends goes to the port it was reached on.
    return f"fault|{route.namespace}/{route.name}/{rule_index}|{port}"


def _backend_clusters(view: WaypointView, backends: Sequence[BackendRef]) -> list[_Target]:
    """Where each backend with a weight goes; unknown services or ports get a cluster name no
    cluster has, so their share of requests fails (503 NC) as Gateway API asks."""
    out = []
    for b in backends:
        if b.weight == 0:
            continue
        svc = view.services.get(f"{b.namespace}/{b.name}")
        if svc is None or svc.target_port(b.port) is None:
            out.append(_Target(f"invalid|{b.namespace}/{b.name}:{b.port}", b.weight, b))
        else:
            out.append(_Target(cluster_name(svc, b.port), b.weight, b))
    return out


def _forward(action: route_components_pb2.RouteAction, targets: Sequence[_Target]) -> None:
    """Send to one cluster, or split by weight; a backendRef's own filters need a weighted
    cluster entry (Envoy's per-cluster header options), even for a single backend."""
    filtered = any(t.backend is not None and (t.backend.request_headers is not None
                                              or t.backend.response_headers is not None)
                   for t in targets)
    if len(targets) == 1 and not filtered:
        action.cluster = targets[0].cluster
        return
    weighted = []
    for t in targets:
        cw = route_components_pb2.WeightedCluster.ClusterWeight(
            name=t.cluster, weight=wrappers_pb2.UInt32Value(value=t.weight))
        if t.backend is not None:
            add, remove = _header_options(t.backend.request_headers)
            cw.request_headers_to_add.extend(add)
            cw.request_headers_to_remove.extend(remove)
            add, remove = _header_options(t.backend.response_headers)
            cw.response_headers_to_add.extend(add)
            cw.response_headers_to_remove.extend(remove)
        weighted.append(cw)
    action.weighted_clusters.CopyFrom(route_components_pb2.WeightedCluster(clusters=weighted))


def _retry(rule: RouteRule) -> route_components_pb2.RetryPolicy:
    r = rule.retry
    if r is None:
        policy = route_components_pb2.RetryPolicy(
            retry_on=DEFAULT_RETRY_ON, num_retries=wrappers_pb2.UInt32Value(
                value=DEFAULT_RETRIES), retriable_status_codes=list(DEFAULT_RETRY_CODES))
    else:
        policy = route_components_pb2.RetryPolicy(
            retry_on=RETRY_ON, num_retries=wrappers_pb2.UInt32Value(value=r.attempts),
            retriable_status_codes=list(r.codes))
        if r.backoff_ms:
            policy.retry_back_off.CopyFrom(route_components_pb2.RetryPolicy.RetryBackOff(
                base_interval=_ms(r.backoff_ms), max_interval=_ms(r.backoff_ms * 10)))
    if rule.backend_timeout_ms:
        policy.per_try_timeout.CopyFrom(_ms(rule.backend_timeout_ms))
    return policy


def prefix_rewrite(matched: str, replacement: str) -> regex_pb2.RegexMatchAndSubstitute:
    """Gateway API's ReplacePrefixMatch as a regex rewrite of the path: the matched prefix
    (whole segments) becomes ``replacement``, the rest of the path is kept, and the seam has
    one ``/`` (``/strip`` -> ``/``: ``/strip/x`` is ``/x``, not ``//x``; ``/strip`` is ``/``).
    Envoy's own prefix_rewrite would double or drop the slash in those cases."""
    prefix = matched.rstrip("/")
    if replacement.endswith("/") or not prefix:
        # The replacement ends the segment: swallow the request's slashes after the prefix.
        return regex_pb2.RegexMatchAndSubstitute(
            pattern=regex_pb2.RegexMatcher(regex=f"^{re.escape(prefix)}/*"),
            substitution=replacement.rstrip("/") + "/")
    return regex_pb2.RegexMatchAndSubstitute(
        pattern=regex_pb2.RegexMatcher(regex=f"^{re.escape(prefix)}"),
        substitution=replacement)


def _full_path(value: str) -> regex_pb2.RegexMatchAndSubstitute:
    return regex_pb2.RegexMatchAndSubstitute(pattern=regex_pb2.RegexMatcher(regex="^/.*$"),
                                             substitution=value.replace("\\", "\\\\"))


REDIRECT_CODES = {
    301: route_components_pb2.RedirectAction.MOVED_PERMANENTLY,
    302: route_components_pb2.RedirectAction.FOUND,
    303: route_components_pb2.RedirectAction.SEE_OTHER,
    307: route_components_pb2.RedirectAction.TEMPORARY_REDIRECT,
    308: route_components_pb2.RedirectAction.PERMANENT_REDIRECT,
}
WELL_KNOWN_PORTS = {"http": 80, "https": 443}


def redirect_port(redirect: Redirect, listener_port: int) -> int:
    """The ``port_redirect`` for Envoy (0: leave the port out), by Gateway API's rules: the
    port given, else the well-known port of the scheme given, else the port the request
    came to (the Service port: a mesh route's listener); a Location with the scheme's
    well-known port leaves the port out. Requests reach the waypoint in plain HTTP (HBONE
    is the transport), so a redirect without a scheme stays http."""
    scheme = redirect.scheme or "http"
    if redirect.port is not None:
        port = redirect.port
    elif redirect.scheme is not None:
        port = WELL_KNOWN_PORTS[redirect.scheme]
    else:
        port = listener_port
    # Envoy leaves the port out when port_redirect is unset and it writes a new host (or
    # changes the scheme of a request that came to port 80); otherwise it keeps the
    # request's, so a request that came to another port must be told the port explicitly.
    if port == WELL_KNOWN_PORTS[scheme] and (redirect.hostname is not None
                                             or listener_port == WELL_KNOWN_PORTS["http"]):
        return 0
    return port


def redirect_action(redirect: Redirect, match: RouteMatch,
                    listener_port: int) -> route_components_pb2.RedirectAction:
    """A RequestRedirect as Envoy's redirect: scheme, host, port (``redirect_port``), path
    (full, or the matched prefix replaced) and status code; the query string is kept."""
    action = route_components_pb2.RedirectAction(response_code=REDIRECT_CODES[
        redirect.status_code])
    if redirect.scheme is not None:
        action.scheme_redirect = redirect.scheme
    if redirect.hostname is not None:
        action.host_redirect = redirect.hostname
    port = redirect_port(redirect, listener_port)
    if port:
        action.port_redirect = port
    if redirect.path is not None:
        if redirect.path.type is PathModifierType.REPLACE_FULL_PATH:
            action.path_redirect = redirect.path.value
        else:
            action.regex_rewrite.CopyFrom(prefix_rewrite(match.path.value, redirect.path.value))
    return action


def _rewrite(action: route_components_pb2.RouteAction, rewrite: URLRewrite,
             match: RouteMatch) -> None:
    if rewrite.hostname is not None:
        action.host_rewrite_literal = rewrite.hostname
    if rewrite.path is not None:
        if rewrite.path.type is PathModifierType.REPLACE_FULL_PATH:
            action.regex_rewrite.CopyFrom(_full_path(rewrite.path.value))
        else:
            action.regex_rewrite.CopyFrom(prefix_rewrite(match.path.value, rewrite.path.value))


def _envoy_route(view: WaypointView, e: _Entry, default_targets: list[_Target], port: int,
                 client_namespace: str = "") -> route_components_pb2.Route:
    rule = e.rule
    label = f".{rule.name}" if rule.name else ""
    r = route_components_pb2.Route(
        name=f"{e.route.namespace}.{e.route.name}.{e.rule_index}{label}",
        match=_route_match(e.match, client_namespace))
    if rule.invalid:
        r.direct_response.CopyFrom(route_components_pb2.DirectResponseAction(
            status=500, body=base_pb2.DataSource(inline_string=rule.invalid + "\n")))
        return r
    add, remove = _header_options(rule.response_headers)
    r.response_headers_to_add.extend(add)
    r.response_headers_to_remove.extend(remove)
    if rule.redirect is not None:
        r.redirect.CopyFrom(redirect_action(rule.redirect, e.match, port))
        return r
    targets = _backend_clusters(view, rule.backends) if rule.backends else default_targets
    if not targets:
        r.direct_response.CopyFrom(route_components_pb2.DirectResponseAction(
            status=500, body=base_pb2.DataSource(
                inline_string="no backend with a weight above 0\n")))
        return r
    action = route_components_pb2.RouteAction(timeout=_ms(rule.timeout_ms or 0),
                                              retry_policy=_retry(rule))
    if rule.fault is not None:
        action.cluster = fault_listener_name(e.route, e.rule_index, port)
    else:
        _forward(action, targets)
    if rule.rewrite is not None:
        _rewrite(action, rule.rewrite, e.match)
    r.route.CopyFrom(action)
    add, remove = _header_options(rule.request_headers)
    r.request_headers_to_add.extend(add)
    r.request_headers_to_remove.extend(remove)
    return r


def _entries(routes: Iterable[HTTPRoute]) -> list[_Entry]:
    entries = [_Entry(_precedence(route, ri, mi, m), route, ri, rule, m)
               for route in routes
               for ri, rule in enumerate(route.rules)
               for mi, m in enumerate(rule.matches)]
    return sorted(entries, key=lambda e: e.order)


def route_configuration(view: WaypointView, service: Service, port: int) \
        -> route_pb2.RouteConfiguration:
    """The routes of a service port. Clients of a namespace with consumer routes for the
    service (GEP-1294) get those routes only (404 when none matches); everyone else gets
    the producer routes (the service's own namespace), or straight to the service."""
    own = [_Target(cluster_name(service, port), 1)]
    attached = view.routes_for(service, port)
    consumers: dict[str, list[HTTPRoute]] = {}
    producer: list[HTTPRoute] = []
    for route in attached:
        if route.namespace != service.namespace:
            consumers.setdefault(route.namespace, []).append(route)
        else:
            producer.append(route)
    routes: list[route_components_pb2.Route] = []
    for ns in sorted(consumers):
        routes += [_envoy_route(view, e, own, port, ns) for e in _entries(consumers[ns])]
        routes.append(route_components_pb2.Route(
            name=f"consumer.{ns}.no-match",
            match=route_components_pb2.RouteMatch(
                prefix="/", filter_state=[client_namespace_matcher(ns)]),
            direct_response=route_components_pb2.DirectResponseAction(status=404)))
    if producer:
        routes += [_envoy_route(view, e, own, port) for e in _entries(producer)]
    else:
        routes.append(route_components_pb2.Route(
            name="default", match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(
                cluster=own[0].cluster, timeout=_ms(0), retry_policy=_retry(RouteRule()))))
    return route_pb2.RouteConfiguration(
        name=route_name(service, port),
        virtual_hosts=[route_components_pb2.VirtualHost(
            name=f"{service.hostname}:{port}", domains=["*"], routes=routes)])


def fault_stage(route: HTTPRoute, rule_index: int, port: int, fault: Fault,
                clusters: Sequence[_Target]) -> listener_pb2.Listener:
    """The internal listener a faulty rule's requests pass through: fault, then the split."""
    config = fault_pb2.HTTPFault()
    if fault.delay_ms is not None and fault.delay_percent > 0:
        config.delay.CopyFrom(common_fault_pb2.FaultDelay(
            fixed_delay=_ms(fault.delay_ms), percentage=_percent(fault.delay_percent)))
    if fault.abort_status is not None and fault.abort_percent > 0:
        config.abort.CopyFrom(fault_pb2.FaultAbort(
            http_status=fault.abort_status, percentage=_percent(fault.abort_percent)))
    action = route_components_pb2.RouteAction(timeout=_ms(0))
    _forward(action, clusters)
    name = fault_listener_name(route, rule_index, port)
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name.replace("|", "_").replace("/", "_"),
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(name=name, virtual_hosts=[
            route_components_pb2.VirtualHost(name=name, domains=["*"], routes=[
                route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"),
                                           route=action)])]),
        http_filters=[_http_filter("envoy.filters.http.fault", config), _router()])
    return listener_pb2.Listener(
        name=name, internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        filter_chains=[listener_components_pb2.FilterChain(filters=[_hcm_filter(hcm)])])


# --- clusters and endpoints ---------------------------------------------------------------

def service_cluster(service: Service, port: int,
                    protocol: PortProtocol = PortProtocol.HTTP) -> cluster_pb2.Cluster:
    """A service port's cluster. HTTP/2 and gRPC ports speak HTTP/2 to the backend whatever
    the client spoke; HTTP ports speak the client's protocol (the options are unused when
    the port is TCP: a TCP proxy sends bytes)."""
    name = cluster_name(service, port)
    if protocol.h2_upstream:
        options = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=_h2_options()))
    else:
        options = http_protocol_options_pb2.HttpProtocolOptions(
            use_downstream_protocol_config=(
                http_protocol_options_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
                    http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
                    http2_protocol_options=_h2_options())))
    c = cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.EDS, connect_timeout=_ms(10_000),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(),
                                                                service_name=name),
        transport_socket=_internal_upstream())
    c.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(options)
    return c


def connect_originate_cluster(trust_domain: str) -> cluster_pb2.Cluster:
    tls = tls_pb2.UpstreamTlsContext(common_tls_context=mesh_tls_context(trust_domain))
    c = cluster_pb2.Cluster(
        name=CONNECT_ORIGINATE, type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED, connect_timeout=_ms(2000),
        cleanup_interval=_ms(60_000),
        original_dst_lb_config=cluster_pb2.Cluster.OriginalDstLbConfig(
            metadata_key=metadata_kind_pb2.MetadataKey(
                key=TUNNEL_METADATA,
                path=[metadata_kind_pb2.MetadataKey.PathSegment(key="address")])),
        transport_socket=base_pb2.TransportSocket(name="envoy.transport_sockets.tls",
                                                  typed_config=_any(tls)))
    c.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(
        http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=_h2_options())))
    return c


def _endpoint(w: Workload, port: int, service: Service) -> endpoint_components_pb2.LbEndpoint:
    ip = w.addresses[0]
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    labels = w.label_map
    info = {"workload": w.owner_name, "namespace": w.namespace, "principal": str(w.identity),
            "app": labels.get("app", labels.get("app.kubernetes.io/name", w.owner_name)),
            "service": service.hostname}
    if w.protocol is Protocol.HBONE:
        address = address_pb2.Address(envoy_internal_address=address_pb2.EnvoyInternalAddress(
            server_listener_name=CONNECT_ORIGINATE, endpoint_id=f"{host}:{port}"))
        metadata = _metadata({TUNNEL_METADATA: {"destination": f"{host}:{port}",
                                                "address": f"{host}:{HBONE_PORT}"},
                              AMBIT_METADATA: info})
    else:
        # Not in the mesh: plain TCP to the pod, as a ztunnel's passthrough would do.
        address = address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address=str(ip), port_value=port))
        metadata = _metadata({AMBIT_METADATA: info})
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=address),
        metadata=metadata,
        health_status=health_check_pb2.HEALTHY if w.healthy else health_check_pb2.UNHEALTHY)


def load_assignment(view: WaypointView, service: Service, port: int) \
        -> endpoint_pb2.ClusterLoadAssignment:
    target = service.target_port(port)
    endpoints = [_endpoint(w, target, service) for w in view.endpoints.get(service.key, ())
                 if w.addresses and target is not None]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name(service, port),
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=endpoints)]
        if endpoints else [])


def _ports(view: WaypointView) -> Iterable[tuple[Service, int]]:
    for key in sorted(view.services):
        s = view.services[key]
        for sp in s.ports:
            yield s, sp.port


def resources(view: WaypointView, bind: str = "0.0.0.0", port: int = HBONE_PORT) -> Resources:
    """Every resource the waypoint needs, by type URL and name."""
    listeners: dict[str, Message] = {
        CONNECT_TERMINATE: connect_terminate(view.trust_domain, bind, port),
        MAIN_INTERNAL: main_internal(view),
        CONNECT_ORIGINATE: connect_originate(),
    }
    clusters: dict[str, Message] = {
        MAIN_INTERNAL: _internal_cluster(MAIN_INTERNAL),
        CONNECT_ORIGINATE: connect_originate_cluster(view.trust_domain),
    }
    endpoints: dict[str, Message] = {}
    routes: dict[str, Message] = {}
    for service, sp in _ports(view):
        name = cluster_name(service, sp)
        clusters[name] = service_cluster(service, sp, view.protocol(service, sp))
        endpoints[name] = load_assignment(view, service, sp)
    for service in view.bound:
        for p in service.ports:
            if not view.protocol(service, p.port).is_http:
                continue
            rc = route_configuration(view, service, p.port)
            routes[rc.name] = rc
            for route in view.routes_for(service, p.port):
                for ri, rule in enumerate(route.rules):
                    if rule.fault is None or rule.invalid:
                        continue
                    name = fault_listener_name(route, ri, p.port)
                    if name in listeners:
                        continue
                    own = [_Target(cluster_name(service, p.port), 1)]
                    backends = _backend_clusters(view, rule.backends) if rule.backends else own
                    listeners[name] = fault_stage(route, ri, p.port, rule.fault, backends)
                    clusters[name] = _internal_cluster(name, {"service": service.hostname})
    return {LISTENER_TYPE: listeners, ROUTE_TYPE: routes, CLUSTER_TYPE: clusters,
            ENDPOINT_TYPE: endpoints}


def content_version(res: Resources) -> str:
    """A stable digest of every resource (deterministic protobuf serialization)."""
    h = hashlib.sha256()
    for type_url in sorted(res):
        for name in sorted(res[type_url]):
            h.update(type_url.encode() + b"\0" + name.encode() + b"\0")
            h.update(res[type_url][name].SerializeToString(deterministic=True))
    return h.hexdigest()[:16]

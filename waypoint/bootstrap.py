"""Envoy's bootstrap for a waypoint: a pure function of the config, written as JSON.

Why it exists: everything L7 (listeners, routes, clusters) comes from the controller over ADS;
the bootstrap only says who this Envoy is and how to reach the two things it needs before ADS
can work (docs: waypoint contract):

* ``xds-grpc``: the controller, mutual TLS with the waypoint's own certificate (SDS secret
  ``default``) and the mesh trust bundle (``ROOTCA``), accepting only a server certificate whose
  SAN is the controller's SPIFFE ID; plaintext with ``--insecure-xds``. An IP address gives a
  STATIC cluster, a DNS name a STRICT_DNS one (the Kubernetes Service name).
* ``waypoint-agent``: this agent on ``<run-dir>/agent.sock`` (HTTP/2), serving SDS and ALS.

HTTP/2 keepalive pings are deliberately absent on ``xds-grpc``: gRPC servers count pings more
often than every 5 minutes on a quiet stream as abuse and close the connection; TCP keepalive
detects a dead controller instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mesh.files import write_atomic
from waypoint.config import WaypointConfig, is_ip, split_host_port

XDS_CLUSTER = "xds-grpc"
AGENT_CLUSTER = "waypoint-agent"
SECRET_DEFAULT = "default"
SECRET_ROOTCA = "ROOTCA"
# Global cap on downstream connections (overload manager): a flood runs into this instead of
# the process's file descriptor limit, where Envoy would also lose its xDS and SDS streams.
MAX_DOWNSTREAM_CONNECTIONS = 100_000

_TYPE = "type.googleapis.com/"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _http2_options() -> dict[str, Any]:
    return {_HTTP_OPTIONS: {"@type": _TYPE + _HTTP_OPTIONS,
                            "explicit_http_config": {"http2_protocol_options": {}}}}


def sds_config() -> dict[str, Any]:
    """Where Envoy gets secrets: this agent's SDS server. No initial fetch timeout: a cluster
    that needs a secret waits for it rather than starting without."""
    return {
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": AGENT_CLUSTER}}],
            "set_node_on_first_message_only": True,
        },
        "initial_fetch_timeout": "0s",
        "resource_api_version": "V3",
    }


def _xds_tls(config: WaypointConfig, host: str) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [
                {"name": SECRET_DEFAULT, "sds_config": sds_config()}],
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [{
                        "san_type": "URI",
                        "matcher": {"exact": str(config.controller_identity)},
                    }],
                },
                "validation_context_sds_secret_config": {
                    "name": SECRET_ROOTCA, "sds_config": sds_config()},
            },
        },
    }
    if not is_ip(host):
        tls["sni"] = host
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3."
                             "UpstreamTlsContext", **tls}}


def _xds_cluster(config: WaypointConfig) -> dict[str, Any]:
    host, port = split_host_port(config.controller_address)
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if is_ip(host) else "STRICT_DNS",
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port}}}}]}],
        },
        "typed_extension_protocol_options": _http2_options(),
        "upstream_connection_options": {
            "tcp_keepalive": {"keepalive_time": 300, "keepalive_interval": 30,
                              "keepalive_probes": 3}},
        # The ADS stream is one long request; default breakers (1024) are not the limit that
        # matters here, but a reconnect storm must never be refused by them either.
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT", "max_connections": 100000, "max_pending_requests": 100000,
            "max_requests": 100000, "max_retries": 3}]},
    }
    if not is_ip(host):
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if not config.insecure_xds:
        cluster["transport_socket"] = _xds_tls(config, host)
    return cluster


def _agent_cluster(config: WaypointConfig) -> dict[str, Any]:
    return {
        "name": AGENT_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": AGENT_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "pipe": {"path": str(config.agent_socket)}}}}]}],
        },
        "typed_extension_protocol_options": _http2_options(),
    }


def build_bootstrap(config: WaypointConfig) -> dict[str, Any]:
    """The bootstrap document (JSON-ready) for ``config``; pure."""
    return {
        "node": {
            "id": config.node_id,
            "cluster": config.node_cluster,
            "metadata": {
                "NAMESPACE": config.namespace,
                "GATEWAY": config.gateway,
                "POD": config.pod_name,
                "POD_IP": config.pod_ip,
                "TRUST_DOMAIN": config.trust_domain,
            },
        },
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1",
                                           "port_value": config.admin_port}},
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [_xds_cluster(config), _agent_cluster(config)]},
        "bootstrap_extensions": [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {"@type": _TYPE + "envoy.extensions.bootstrap.internal_listener.v3."
                             "InternalListener"},
        }],
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": _TYPE + "envoy.extensions.resource_monitors.downstream_connections."
                    "v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                },
            }],
        },
    }


def write_bootstrap(config: WaypointConfig) -> Path:
    """Write ``build_bootstrap(config)`` to ``<run-dir>/envoy.json`` (atomically)."""
    path = config.bootstrap_path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(build_bootstrap(config), indent=2, sort_keys=True) + "\n")
    return path

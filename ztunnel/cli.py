"""``ambit ztunnel``: the ztunnel's sub-parser and its handler, flags to ``ZtunnelConfig``.

Why apart from ``ztunnel.app`` and ``ztunnel.config``: ``ambit`` builds every command's parser
at each start, so this module imports nothing heavy; ``run`` imports the config and the process
core only when a ztunnel actually runs. A bad setting is a ``mesh.cli.UsageError``, which
``ambit`` prints as ``ambit: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.cli import UsageError
from mesh.ports import (
    ADMIN_PORT,
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    READINESS_PORT,
)

if TYPE_CHECKING:
    from mesh.cli import SubParsers

# Every flag that overrides a setting of --config, by its ZtunnelConfig name.
_OVERRIDES: tuple[str, ...] = (
              "node", "state_file", "identity_dir", "controller_address", "ca_address",
              "node_token_file", "ca_root_cert", "trust_domain", "inbound_bind", "bind_host",
              "outbound_port", "inbound_plaintext_port", "inbound_port", "socks5_port",
              "socks5_host", "admin_host", "admin_port", "stats_host", "metrics_port",
              "readiness_port", "transparent", "drain_seconds", "workers", "agent_socket",
              "access_log", "log_level")

# HBONE limits: one flag per ZtunnelConfig.hbone_* setting: (name, type, default, meaning).
# tests/unit check the defaults against ZtunnelConfig's.
HBONE_LIMITS: tuple[tuple[str, type, object, str], ...] = (
    ("hbone_max_frame_size", int, 256 * 1024,
     "largest HTTP/2 frame accepted; a larger frame header closes the connection at once"),
    ("hbone_max_header_list_size", int, 16 * 1024,
     "largest request header block, also its compressed size over HEADERS+CONTINUATIONs"),
    ("hbone_max_continuations", int, 8, "CONTINUATION frames allowed after one HEADERS"),
    ("hbone_max_empty_frames", int, 1,
     "consecutive DATA/HEADERS/CONTINUATION frames with an empty payload"),
    ("hbone_max_priority_frames_per_stream", int, 100,
     "PRIORITY frames per stream opened (plus one)"),
    ("hbone_max_window_updates_per_data_frame", int, 10,
     "WINDOW_UPDATE frames per DATA frame sent"),
    ("hbone_max_premature_resets", int, 100,
     "streams the peer may reset before they are answered, per --hbone-reset-window"),
    ("hbone_reset_window", float, 10.0, "seconds over which premature resets are counted"),
    ("hbone_max_pending_streams", int, 100,
     "tunnels of one connection waiting for their backend; more are refused"),
    ("hbone_connection_buffer", int, 8 * 1024 * 1024,
     "bytes one connection may buffer: half for DATA received (its connection window), half "
     "for DATA to send; beyond, backends and then the peer are not read"),
    ("hbone_peer_buffer", int, 16 * 1024 * 1024,
     "bytes all connections of one peer identity may buffer together (shared out over the "
     "workers): at half received, the peer is not read; at half queued, its backends; 0 = off"),
    ("hbone_max_control_frames", int, 1000,
     "PING/SETTINGS acknowledgements queued while the peer does not read"),
    ("hbone_handshake_timeout", float, 5.0,
     "seconds after TLS for the HTTP/2 preface and SETTINGS; 0 disables"),
    ("hbone_idle_timeout", float, 120.0,
     "seconds a connection without tunnels stays open (the pool closes its side at 60); "
     "0 disables"),
    ("hbone_keepalive_interval", float, 30.0,
     "seconds without a frame from the peer before it gets a PING; 0 disables"),
    ("hbone_keepalive_timeout", float, 10.0,
     "seconds for the PING's acknowledgement before the connection is closed"),
    ("hbone_stream_idle_timeout", float, 0.0,
     "seconds a tunnel may carry nothing before it is reset; 0 (default) never, like TCP"),
)
_OVERRIDES = (*_OVERRIDES, *(name for name, _, _, _ in HBONE_LIMITS))


# Connection limits: one flag per ZtunnelConfig max_*_connections* setting (name, default,
# meaning); tests/unit check the defaults against ZtunnelConfig's. 0 = unlimited.
CONNECTION_LIMITS: tuple[tuple[str, int, str], ...] = (
    ("max_hbone_connections", 4096, "inbound HBONE connections open at once"),
    ("max_hbone_connections_per_ip", 1024,
     "inbound HBONE connections from one source IP (refused before the TLS handshake)"),
    ("max_hbone_connections_per_identity", 1024,
     "inbound HBONE connections from one peer SPIFFE ID (closed after the handshake)"),
    ("max_plaintext_connections", 4096, "inbound plaintext (15006) connections open at once"),
    ("max_plaintext_connections_per_ip", 1024,
     "inbound plaintext connections from one source IP"),
    ("max_outbound_connections_per_pod", 2048,
     "captured outbound (15001) connections from one local pod"),
    ("max_socks5_connections", 1024, "SOCKS5 (15080) connections open at once"),
)
_OVERRIDES = (*_OVERRIDES, *(name for name, _, _ in CONNECTION_LIMITS))


# Pod start: one flag per ZtunnelConfig pod_start_* setting (name, type, default, meaning);
# tests/unit check the defaults against ZtunnelConfig's.
POD_START: tuple[tuple[str, type, object, str], ...] = (
    ("pod_start_hold", float, 3.0,
     "seconds a captured connection from a source not yet in the state is held for the "
     "state that names it (0: refused at once)"),
    ("pod_start_hold_max", int, 512, "connections held at once, in all (beyond: refused)"),
    ("pod_start_hold_per_source", int, 32, "connections held at once from one source IP"),
    ("pod_start_provisional_max", int, 256,
     "pods the agent reported at CNI ADD that may wait for the controller's state"),
    ("pod_start_provisional_max_age", float, 300.0,
     "seconds such a pod may wait before it is dropped"),
)
_OVERRIDES = (*_OVERRIDES, *(name for name, _, _, _ in POD_START))


def add_parser(sub: SubParsers) -> None:
    """Register ``ambit ztunnel`` and its handler."""
    p = sub.add_parser(
        "ztunnel",
        help="run the per-node HBONE proxy",
        description="Run the ztunnel: the per-node proxy that carries mesh traffic over HBONE "
        "(HTTP/2 CONNECT in mutual TLS) and enforces L4 authorization. Flags override the "
        "settings of --config.",
    )
    p.set_defaults(func=run)
    p.add_argument("--config", type=Path, help="YAML file of ztunnel settings (see docs)")
    p.add_argument("--node", help="name of the node this ztunnel serves (required)")
    p.add_argument("--state", dest="state_file", type=Path,
                   help="workloads/services/policies file, hot-reloaded (docs/state-file.md)")
    p.add_argument("--identity-dir", type=Path,
                   help="directory of certificates: trust-bundle.pem, <ns>/<sa>/cert-chain.pem "
                   "and key.pem (create with `ambit dev certs`)")
    p.add_argument("--controller", dest="controller_address", metavar="HOST:PORT",
                   help="get the mesh state from this controller (instead of --state); also "
                   "the CA address when --node-token-file is given")
    p.add_argument("--ca-address", metavar="HOST:PORT",
                   help="mesh CA for workload certificates (default: --controller)")
    p.add_argument("--node-token-file", type=Path,
                   help="node credential for the CA and the state push (`ambit node join NODE` "
                   "in embedded mode; the service-account token in Kubernetes)")
    p.add_argument("--ca-root-cert", type=Path,
                   help="mesh root certificate that verifies the controller's TLS "
                   "(the controller writes it to DATA_DIR/trust-bundle.pem)")
    p.add_argument("--trust-domain", help="SPIFFE trust domain (default cluster.local)")
    p.add_argument("--inbound-bind", choices=["shared", "workload"],
                   help="shared: capture listeners on --bind-host (TPROXY/eBPF); workload: "
                   f"{INBOUND_PLAINTEXT_PORT}/{HBONE_PORT} on each local workload's IP "
                   "(default shared)")
    p.add_argument("--bind-host", help="address of the capture listeners (default 0.0.0.0)")
    for name, default in (("outbound", OUTBOUND_PORT),
                          ("inbound-plaintext", INBOUND_PLAINTEXT_PORT), ("inbound", HBONE_PORT),
                          ("socks5", 0), ("admin", ADMIN_PORT), ("metrics", METRICS_PORT),
                          ("readiness", READINESS_PORT)):
        p.add_argument(f"--{name}-port", type=int,
                       help=f"listener port, 0 disables (default {default})")
    p.add_argument("--socks5-host", help="address of the SOCKS5 listener (default 127.0.0.1)")
    p.add_argument("--admin-host", help="address of the admin listener (default 127.0.0.1)")
    p.add_argument("--stats-host", help="address of metrics/readiness (default 127.0.0.1: the "
                   "node only; the kubelet probes 127.0.0.1, Prometheus scrapes the agent's "
                   "15022)")
    p.add_argument("--no-transparent", dest="transparent", action="store_const", const=False,
                   help="do not set IP_TRANSPARENT on capture listeners")
    p.add_argument("--drain-seconds", type=float, help="drain deadline on SIGTERM (default 5)")
    p.add_argument("--workers", metavar="N|P%",
                   help="worker processes sharing the data-path listeners (SO_REUSEPORT), a "
                   "count or a percentage of the cores; 1 = one process (default max(2, 25%% "
                   "of the cores))")
    p.add_argument("--agent-socket", type=Path,
                   help="the node agent's link socket (/var/run/ambit/ztunnel.sock): hand the "
                   "capture listeners to it, as eBPF redirect mode needs")
    p.add_argument("--access-log", help="'-' for stderr (default), '' to disable, or a file")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    limits = p.add_argument_group("HBONE limits", "what one HBONE peer may cost; beyond a "
                                  "limit its connection gets GOAWAY and is closed")
    for limit, kind, limit_default, meaning in HBONE_LIMITS:
        limits.add_argument("--" + limit.replace("_", "-"), type=kind,
                            help=f"{meaning} (default {limit_default})")
    conn_limits = p.add_argument_group(
        "connection limits", "connections open at once, per source and in total (0 = "
        "unlimited); the one beyond a limit is reset and counted in "
        "ambit_ztunnel_connections_refused_total{listener,reason}")
    for name, default, meaning in CONNECTION_LIMITS:
        conn_limits.add_argument("--" + name.replace("_", "-"), type=int, metavar="N",
                                 help=f"{meaning} (default {default})")
    # Pod start
    pod_start = p.add_argument_group(
        "pod start", "a new pod's first connections: the agent hands its workload over at CNI "
        "ADD; until the state lists it, a connection from an unknown source is held")
    for name, kind, start_default, meaning in POD_START:
        pod_start.add_argument("--" + name.replace("_", "-"), type=kind,
                               help=f"{meaning} (default {start_default})")


def run(args: argparse.Namespace) -> int:
    """Run the ztunnel until SIGTERM; ``UsageError`` for a bad setting."""
    from ztunnel.app import run as run_ztunnel
    from ztunnel.config import ConfigError, ZtunnelConfig

    overrides = {k: getattr(args, k) for k in _OVERRIDES}
    if overrides["controller_address"] and overrides["node_token_file"] \
            and not overrides["ca_address"]:
        overrides["ca_address"] = overrides["controller_address"]
    try:
        if args.config is not None:
            config = ZtunnelConfig.from_file(args.config, **overrides)
        else:
            config = ZtunnelConfig.from_mapping({}, **overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return run_ztunnel(config)

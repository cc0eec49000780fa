"""Entry point of ``ambit controller``: pick the registry, open the CA, serve.

Kept apart from ``controller.app`` so the process core stays testable with any feed, while
this module does the wiring a user's flags ask for.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import uvloop

from controller.app import GRPC_PORT, MONITORING_PORT, Controller, ControllerConfig, serve
from controller.ca_service import CertificateService
from controller.ca_store import CaStoreError, open_ca
from controller.embedded import EmbeddedFeed
from controller.registry.sqlite import EmbeddedRegistry, RegistryError

log = logging.getLogger("controller")

DEFAULT_DATA_DIR = Path("/var/lib/ambit")


class ControllerUsageError(Exception):
    """Bad flags or unusable files; the CLI prints it and exits 2."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "controller", help="run the control plane (registry, mesh CA, state push)",
        description="Run the controller: watch the registry, push mesh state to every "
        "ztunnel over gRPC and sign workload certificates. Embedded mode keeps the registry "
        "in SQLite, managed with the `ambit namespace|workload|service|policy|apply` commands.",
    )
    p.add_argument("--db", type=Path, help="embedded registry database (default $AMBIT_DB or "
                   "/var/lib/ambit/registry.db)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="where the generated mesh root is kept (default /var/lib/ambit)")
    p.add_argument("--ca-cert", type=Path, help="user-supplied root certificate (PEM)")
    p.add_argument("--ca-key", type=Path, help="user-supplied root key (PEM)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--listen-host", default="0.0.0.0")
    p.add_argument("--grpc-port", type=int, default=GRPC_PORT,
                   help=f"state push and CA (default {GRPC_PORT})")
    p.add_argument("--monitoring-host", default="0.0.0.0")
    p.add_argument("--monitoring-port", type=int, default=MONITORING_PORT,
                   help=f"/metrics and /ready (default {MONITORING_PORT}; 0 disables)")
    p.add_argument("--serving-name", action="append", default=[],
                   help="DNS name ztunnels dial (repeatable; goes into the serving cert)")
    p.add_argument("--serving-ip", action="append", default=[],
                   help="IP ztunnels dial (repeatable; goes into the serving cert)")
    p.add_argument("--insecure", action="store_true",
                   help="serve gRPC in plaintext (loopback development only)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    db = args.db or Path(os.environ.get("AMBIT_DB", DEFAULT_DATA_DIR / "registry.db"))
    try:
        ca = open_ca(args.trust_domain, args.data_dir, args.ca_cert, args.ca_key)
    except CaStoreError as e:
        raise ControllerUsageError(str(e)) from None
    try:
        registry = EmbeddedRegistry(db)
    except RegistryError as e:
        raise ControllerUsageError(f"registry {db}: {e}") from None
    for port_name in ("grpc_port", "monitoring_port"):
        if not 0 <= getattr(args, port_name) <= 65535:
            raise ControllerUsageError(f"--{port_name.replace('_', '-')}: not a port number")
    config = ControllerConfig(
        trust_domain=args.trust_domain, listen_host=args.listen_host, grpc_port=args.grpc_port,
        monitoring_host=args.monitoring_host, monitoring_port=args.monitoring_port,
        serving_names=(*ControllerConfig.serving_names, *args.serving_name),
        serving_ips=(*ControllerConfig.serving_ips, *args.serving_ip),
        insecure=args.insecure,
    )
    feed = EmbeddedFeed(registry, args.trust_domain)
    controller = Controller(config, feed, ca)
    ca_service = CertificateService(ca, args.trust_domain, feed, feed, controller.metrics)
    controller.add_services = ca_service.add_to_server
    bundle = args.data_dir / "trust-bundle.pem"
    try:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        bundle.write_bytes(ca.root_pem)
    except OSError as e:
        raise ControllerUsageError(f"cannot write the trust bundle to {bundle}: {e}") from None
    log.info("embedded registry %s; trust bundle for ztunnels: %s", db, bundle)
    uvloop.run(serve(controller))
    return 0

"""Entry point of ``ambit controller``: pick the registry, open the CA, serve.

Kept apart from ``controller.app`` so the process core stays testable with any feed, while
this module does the wiring a user's flags ask for.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller import GRPC_PORT, MONITORING_PORT, XDS_PORT

if TYPE_CHECKING:
    from controller.app import StateFeed

# The controller's own modules (gRPC, protobuf, the CA, the registries) are imported when it
# runs, not here: every `ambit` command, the ztunnel included, builds this parser, and gRPC
# alone costs a process ~12 MiB.

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
    p.add_argument("--mode", choices=["auto", "embedded", "kubernetes"], default="auto",
                   help="registry: kubernetes (watch the API server), embedded (SQLite), or "
                   "auto: kubernetes when --kubeconfig, $KUBECONFIG or in-cluster credentials "
                   "exist, else embedded")
    p.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG; in-cluster "
                   "service account when running in a pod)")
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
    p.add_argument("--xds-port", type=int, default=XDS_PORT,
                   help=f"waypoints' xDS (ADS), client certificate required (default {XDS_PORT}; "
                   "-1 disables; not opened with --insecure, where 15012 serves it)")
    p.add_argument("--monitoring-host", default="0.0.0.0")
    p.add_argument("--monitoring-port", type=int, default=MONITORING_PORT,
                   help=f"/metrics and /ready (default {MONITORING_PORT}; 0 disables)")
    p.add_argument("--serving-name", action="append", default=[],
                   help="DNS name ztunnels dial (repeatable; goes into the serving cert)")
    p.add_argument("--serving-ip", action="append", default=[],
                   help="IP ztunnels dial (repeatable; goes into the serving cert)")
    p.add_argument("--insecure", action="store_true",
                   help="serve gRPC in plaintext (loopback development only)")
    p.add_argument("--waypoint-image", default="",
                   help="Kubernetes: the image of waypoint pods (the controller renders each "
                   "ambit-waypoint Gateway's Deployment with it); empty: do not deploy them")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def choose_mode(mode: str, kubeconfig: str | None, environ: dict[str, str]) -> str:
    """auto -> kubernetes when there are credentials for an API server, else embedded."""
    if mode != "auto":
        return mode
    if kubeconfig or environ.get("KUBECONFIG") or environ.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    return "embedded"


async def _kubernetes_feed(args: argparse.Namespace, root_pem: bytes) \
        -> tuple[StateFeed, Callable[[], Any]]:
    from controller.kubernetes_feed import KubernetesFeed
    from controller.registry.k8s_auth import WORKLOAD_AUDIENCE, TokenReviewAuthenticator
    from controller.registry.kubernetes import KubernetesRegistry, api_client
    from controller.waypoint.k8s_deployer import GatewayDeployer

    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG")
    try:
        api = await api_client(kubeconfig)
    except Exception as e:  # kubernetes_asyncio raises several unrelated types here
        source = f"kubeconfig {kubeconfig}" if kubeconfig else "in-cluster service account"
        raise ControllerUsageError(f"cannot load Kubernetes credentials ({source}): {e}; "
                                   "pass --kubeconfig or use --mode embedded") from None
    registry = KubernetesRegistry(api)
    registry.start()
    # Waypoint pods authenticate with their own projected token (audience ambit-ca).
    feed = KubernetesFeed(registry, TokenReviewAuthenticator(
        api, workload_audiences=(WORKLOAD_AUDIENCE,)), args.trust_domain)
    deployer: GatewayDeployer | None = None
    if args.waypoint_image:
        service = "ambit-controller.ambit-system.svc"
        deployer = GatewayDeployer(api, args.waypoint_image, args.trust_domain,
                                   f"{service}:{XDS_PORT}", ca_address=f"{service}:{GRPC_PORT}",
                                   root_cert_pem=root_pem)
        await deployer.start()
    feed.deployer = deployer

    async def cleanup() -> None:
        if deployer is not None:
            await deployer.stop()
        await registry.stop()

    return feed, cleanup


async def _main(args: argparse.Namespace, mode: str) -> int:
    from controller.app import Controller, ControllerConfig, serve
    from controller.ca_service import CertificateService
    from controller.ca_store import CaStoreError, open_ca
    from controller.embedded import EmbeddedFeed
    from controller.node_service import NodeService
    from controller.registry.sqlite import EmbeddedRegistry, RegistryError
    from controller.waypoint.publisher import WaypointPublisher, node_metadata
    from controller.xds.server import AdsServer, XdsCache

    try:
        ca = open_ca(args.trust_domain, args.data_dir, args.ca_cert, args.ca_key)
    except CaStoreError as e:
        raise ControllerUsageError(str(e)) from None
    if not -1 <= args.xds_port <= 65535:
        raise ControllerUsageError("--xds-port: not a port number (-1 disables)")
    for port_name in ("grpc_port", "monitoring_port"):
        if not 0 <= getattr(args, port_name) <= 65535:
            raise ControllerUsageError(f"--{port_name.replace('_', '-')}: not a port number")
    cleanup: Callable[[], Any] | None = None
    if mode == "kubernetes":
        feed, cleanup = await _kubernetes_feed(args, ca.root_pem)
        auth: Any = feed
        where = "Kubernetes API server"
    else:
        db = args.db or Path(os.environ.get("AMBIT_DB", DEFAULT_DATA_DIR / "registry.db"))
        try:
            embedded = EmbeddedFeed(EmbeddedRegistry(db), args.trust_domain)
        except RegistryError as e:
            raise ControllerUsageError(f"registry {db}: {e}") from None
        feed = auth = embedded
        where = f"embedded registry {db}"
    config = ControllerConfig(
        trust_domain=args.trust_domain, listen_host=args.listen_host, grpc_port=args.grpc_port,
        monitoring_host=args.monitoring_host, monitoring_port=args.monitoring_port,
        serving_names=(*ControllerConfig.serving_names, *args.serving_name),
        serving_ips=(*ControllerConfig.serving_ips, *args.serving_ip),
        insecure=args.insecure,
        mtls_port=None if args.xds_port < 0 else args.xds_port,
    )
    controller = Controller(config, feed, ca)
    policy: Any = auth
    if mode == "kubernetes":
        from controller.registry.k8s_auth import WorkloadScopedPolicy

        policy = WorkloadScopedPolicy(auth, auth.registry.snapshot, args.trust_domain)
    ca_service = CertificateService(ca, args.trust_domain, auth, policy, controller.metrics)
    node_service = NodeService(auth, auth.pod_membership, controller.metrics)

    cache = XdsCache()
    waypoints = WaypointPublisher(cache, controller.metrics, insecure=args.insecure)
    ads = AdsServer(cache, lambda node, identity: waypoints.authorize(
        node_metadata(node), identity), controller.metrics)

    def on_state(config: Any) -> None:
        snapshot = getattr(feed, "snapshot", None)
        if snapshot is not None:
            waypoints.update(snapshot, config)
            deployer = getattr(feed, "deployer", None)
            if deployer is not None:
                deployer.update(snapshot.gateways)

    controller.on_state.append(on_state)

    def add_services(server: Any) -> None:
        ca_service.add_to_server(server)
        node_service.add_to_server(server)
        ads.add_to_server(server)

    controller.add_services = add_services
    bundle = args.data_dir / "trust-bundle.pem"
    try:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        bundle.write_bytes(ca.root_pem)
    except OSError as e:
        raise ControllerUsageError(f"cannot write the trust bundle to {bundle}: {e}") from None
    log.info("registry: %s; trust bundle for ztunnels: %s", where, bundle)
    try:
        await serve(controller)
    finally:
        if cleanup is not None:
            await cleanup()
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    mode = choose_mode(args.mode, args.kubeconfig, dict(os.environ))
    return uvloop.run(_main(args, mode))

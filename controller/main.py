"""Entry point of ``ambit controller``: pick the registry, open the CA, serve.

Kept apart from ``controller.app`` so the process core stays testable with any feed, while
this module does the wiring a user's flags ask for. The sub-parser is the controller's own:
``add_parser`` registers ``run`` as its handler, so ``ambit`` only calls it; bad flags or files
raise ``ControllerUsageError``, a ``mesh.cli.UsageError`` that ``ambit`` prints with exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.cli import UsageError
from mesh.ports import GRPC_PORT, MONITORING_PORT, XDS_PORT

if TYPE_CHECKING:
    from mesh.cli import SubParsers

# The controller's own modules (gRPC, protobuf, the CA, the registries) are imported when it
# runs, not here: every `ambit` command, the ztunnel included, builds this parser, and gRPC
# alone costs a process ~12 MiB.

log = logging.getLogger("controller")

DEFAULT_DATA_DIR = Path("/var/lib/ambit")
LEASE_NAME = "ambit-controller"


class ControllerUsageError(UsageError):
    """Bad flags or unusable files; ``ambit`` prints it and exits 2."""


def add_parser(sub: SubParsers) -> None:
    """Register ``ambit controller`` and its handler, ``run``."""
    p = sub.add_parser(
        "controller", help="run the control plane (registry, mesh CA, state push)",
        description="Run the controller: watch the registry, push mesh state to every "
        "ztunnel over gRPC and sign workload certificates. Embedded mode keeps the registry "
        "in SQLite, managed with the `ambit namespace|workload|service|policy|apply` commands.",
    )
    p.set_defaults(func=run)
    p.add_argument("--mode", choices=["auto", "embedded", "kubernetes"], default="auto",
                   help="registry: kubernetes (watch the API server), embedded (SQLite), or "
                   "auto: kubernetes when --kubeconfig, $KUBECONFIG or in-cluster credentials "
                   "exist, else embedded")
    p.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG; in-cluster "
                   "service account when running in a pod)")
    p.add_argument("--db", type=Path, help="embedded registry database (default $AMBIT_DB or "
                   "/var/lib/ambit/registry.db)")
    p.add_argument("--data-dir", type=Path,
                   help="embedded mode: where the generated mesh root is kept (default "
                   "/var/lib/ambit); both modes: where trust-bundle.pem is written (Kubernetes "
                   "mode: only when given; node pods read ConfigMap ambit-ca-root)")
    p.add_argument("--ca-cert", type=Path, help="user-supplied root certificate (PEM); with "
                   "--ca-key, overrides the data directory and the --ca-secret Secret")
    p.add_argument("--ca-key", type=Path, help="user-supplied root key (PEM)")
    k8s = p.add_argument_group("Kubernetes mode: mesh root and leader election")
    k8s.add_argument("--ca-secret", metavar="NAMESPACE/NAME",
                     help="the Secret holding the mesh root (keys root-cert.pem, root-key.pem; "
                     "default $POD_NAMESPACE/ambit-ca, else ambit-system/ambit-ca): used as is "
                     "when present, created by the leader when absent")
    k8s.add_argument("--leader-election-namespace", metavar="NAMESPACE",
                     help=f"namespace of the Lease {LEASE_NAME} (default $POD_NAMESPACE, else "
                     "ambit-system)")
    k8s.add_argument("--leader-election-id", metavar="ID",
                     help="this replica's identity in the Lease (default $POD_NAME, else the "
                     "hostname with a random suffix)")
    k8s.add_argument("--no-leader-election", action="store_true",
                     help="act as the leader always (a single replica only)")
    k8s.add_argument("--leader-election-lease-duration", type=int, default=15, metavar="SEC",
                     help="how long followers wait before taking over a lease no longer "
                     "renewed (default 15)")
    k8s.add_argument("--leader-election-renew-deadline", type=float, default=10.0,
                     metavar="SEC", help="how long the leader tries to renew before it stops "
                     "leading (default 10)")
    k8s.add_argument("--leader-election-retry-period", type=float, default=2.0, metavar="SEC",
                     help="how often replicas try to acquire or renew (default 2)")
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
                   help="serve gRPC in plaintext (development only: needs a loopback "
                   "--listen-host, e.g. 127.0.0.1)")
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


class KubernetesMode:
    """Kubernetes mode's moving parts, opened in order and closed in reverse: the API client,
    the registry, leader election, the mesh root (Secret) and the leader-only work."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.api: Any = None
        self.rest: Any = None
        self.registry: Any = None
        self.elector: Any = None
        self.deployer: Any = None
        self.root_pem: bytes | None = None
        self._duties_ready = asyncio.Event()
        self.election_error: str | None = None

    async def open(self) -> None:
        from controller.leader import AlwaysLeader, LeaderElector, Timings
        from controller.registry.kubernetes import KubernetesRegistry, api_client
        from controller.waypoint.k8s_apply import Rest

        args = self.args
        kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG")
        try:
            self.api = await api_client(kubeconfig)
        except Exception as e:  # kubernetes_asyncio raises several unrelated types here
            source = f"kubeconfig {kubeconfig}" if kubeconfig else "in-cluster service account"
            raise ControllerUsageError(f"cannot load Kubernetes credentials ({source}): {e}; "
                                       "pass --kubeconfig or use --mode embedded") from None
        self.rest = Rest(self.api)
        # Listing the cluster overlaps with waiting for the mesh root.
        self.registry = KubernetesRegistry(self.api)
        self.registry.start()
        if args.no_leader_election:
            self.elector = AlwaysLeader(lead=self._lead, identity=args.leader_election_id)
        else:
            self.elector = LeaderElector(
                self.rest, args.leader_election_namespace, LEASE_NAME, args.leader_election_id,
                timings=Timings(args.leader_election_lease_duration,
                                args.leader_election_renew_deadline,
                                args.leader_election_retry_period),
                lead=self._lead)
            log.info("leader election: campaigning for Lease %s/%s as %s",
                     args.leader_election_namespace, LEASE_NAME, args.leader_election_id)
        self.elector.start().add_done_callback(self._election_ended)

    def _election_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.election_error = str(task.exception())

    async def load_ca(self, stop: asyncio.Event) -> Any:
        """The mesh root: --ca-cert/--ca-key files when given, else the Secret (created by the
        leader when absent). Returns None when ``stop`` is set first."""
        from controller.ca_store import CaStoreError, open_ca
        from controller.k8s_ca import load_or_create_ca

        args = self.args
        if args.ca_cert is not None or args.ca_key is not None:
            try:
                return open_ca(args.trust_domain, None, args.ca_cert, args.ca_key)
            except CaStoreError as e:
                raise ControllerUsageError(str(e)) from None
        ns, name = args.ca_secret
        elector = self.elector
        loading = asyncio.ensure_future(load_or_create_ca(
            self.rest, ns, name, args.trust_domain, is_leader=lambda: elector.is_leader,
            leader=lambda: elector.leader, became_leader=elector.leading))
        stopping = asyncio.ensure_future(stop.wait())
        election = elector.start()
        try:
            await asyncio.wait({loading, stopping, election},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (loading, stopping):
                if not t.done():
                    t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        if loading.done() and not loading.cancelled():
            try:
                ca, _created = loading.result()
            except CaStoreError as e:
                raise ControllerUsageError(str(e)) from None
            return ca
        if election.done() and not election.cancelled() and election.exception() is not None:
            raise ControllerUsageError(str(election.exception()))
        return None

    def feed(self, ca: Any) -> Any:
        from controller.kubernetes_feed import KubernetesFeed
        from controller.registry.k8s_auth import WORKLOAD_AUDIENCE, TokenReviewAuthenticator
        from controller.waypoint.k8s_deployer import GatewayDeployer

        args = self.args
        # Waypoint pods authenticate with their own projected token (audience ambit-ca).
        feed = KubernetesFeed(self.registry, TokenReviewAuthenticator(
            self.api, workload_audiences=(WORKLOAD_AUDIENCE,)), args.trust_domain)
        if args.waypoint_image:
            service = "ambit-controller.ambit-system.svc"
            # Started and stopped by the leader-only work (_lead): one writer at a time.
            self.deployer = GatewayDeployer(
                self.api, args.waypoint_image, args.trust_domain, f"{service}:{XDS_PORT}",
                ca_address=f"{service}:{GRPC_PORT}", root_cert_pem=ca.root_pem)
        feed.deployer = self.deployer
        self.root_pem = ca.root_pem
        self._duties_ready.set()
        return feed

    async def _lead(self) -> None:
        """The leader-only work: publish the root for node pods, run the waypoint deployer.
        Cancelled when leadership is lost."""
        from controller.k8s_ca import keep_ca_root

        await self._duties_ready.wait()  # the root is known (the leader may create it first)
        assert self.root_pem is not None
        deployer = self.deployer
        if deployer is not None:
            await deployer.start()
            log.info("waypoint deployer started (leader)")
        try:
            await keep_ca_root(self.rest, self.args.system_namespace, self.root_pem)
        finally:
            if deployer is not None:
                await deployer.stop()
                log.info("waypoint deployer stopped")

    async def close(self) -> None:
        """Stop everything (idempotent): the leader-only work first, then release the Lease."""
        elector, self.elector = self.elector, None
        if elector is not None:
            await elector.close()
        registry, self.registry = self.registry, None
        if registry is not None:
            await registry.stop()
        api, self.api = self.api, None
        if api is not None:
            await api.close()


def resolve_flags(args: argparse.Namespace, mode: str, environ: dict[str, str]) -> None:
    """Fill in defaults that depend on the mode and the pod's environment; check the flags."""
    from controller.app import InsecureBindError, check_insecure_bind
    from controller.k8s_ca import CA_SECRET, SYSTEM_NAMESPACE, parse_secret_ref
    from controller.leader import Timings, default_identity

    try:  # before anything is opened: a refused --insecure is a usage error (exit 2)
        check_insecure_bind(args.insecure, args.listen_host)
    except InsecureBindError as e:
        raise ControllerUsageError(str(e)) from None
    if (args.ca_cert is None) != (args.ca_key is None):
        raise ControllerUsageError("--ca-cert and --ca-key go together: give both (a "
                                   "user-supplied root) or neither")
    system_ns = environ.get("POD_NAMESPACE", "").strip() or SYSTEM_NAMESPACE
    args.system_namespace = system_ns
    if mode != "kubernetes":
        if args.ca_secret is not None:
            raise ControllerUsageError("--ca-secret is for --mode kubernetes (embedded mode "
                                       "keeps the root in --data-dir, or takes "
                                       "--ca-cert/--ca-key)")
        args.data_dir = args.data_dir or DEFAULT_DATA_DIR
        return
    if args.ca_secret is not None and args.ca_cert is not None:
        raise ControllerUsageError("--ca-secret and --ca-cert/--ca-key are two sources of the "
                                   "mesh root: give one")
    try:
        args.ca_secret = parse_secret_ref(args.ca_secret or f"{system_ns}/{CA_SECRET}")
    except ValueError as e:
        raise ControllerUsageError(f"--ca-secret: {e}") from None
    args.leader_election_namespace = args.leader_election_namespace or system_ns
    args.leader_election_id = args.leader_election_id or default_identity(environ)
    try:
        Timings(args.leader_election_lease_duration, args.leader_election_renew_deadline,
                args.leader_election_retry_period).check()
    except ValueError as e:
        raise ControllerUsageError(f"leader election: {e}") from None


async def _main(args: argparse.Namespace, mode: str) -> int:
    if not -1 <= args.xds_port <= 65535:
        raise ControllerUsageError("--xds-port: not a port number (-1 disables)")
    for port_name in ("grpc_port", "monitoring_port"):
        if not 0 <= getattr(args, port_name) <= 65535:
            raise ControllerUsageError(f"--{port_name.replace('_', '-')}: not a port number")
    resolve_flags(args, mode, dict(os.environ))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if mode != "kubernetes":
        return await _serve(args, mode, stop, None)
    k8s = KubernetesMode(args)
    try:
        await k8s.open()
        return await _serve(args, mode, stop, k8s)
    finally:
        await k8s.close()


async def _serve(args: argparse.Namespace, mode: str, stop: asyncio.Event,
                 k8s: KubernetesMode | None) -> int:
    from prometheus_client import Gauge

    from controller.app import Controller, ControllerConfig, serve
    from controller.ca_service import CertificateService
    from controller.ca_store import CaStoreError, open_ca
    from controller.embedded import EmbeddedFeed
    from controller.node_service import NodeService
    from controller.registry.sqlite import EmbeddedRegistry, RegistryError
    from controller.waypoint.publisher import WaypointPublisher, node_metadata
    from controller.xds.server import AdsServer, XdsCache

    feed: Any
    if k8s is not None:
        ca = await k8s.load_ca(stop)
        if ca is None:
            return 0  # stopped (SIGTERM) while waiting for the mesh root
        feed = auth = k8s.feed(ca)
        where = "Kubernetes API server"
    else:
        try:
            ca = open_ca(args.trust_domain, args.data_dir, args.ca_cert, args.ca_key)
        except CaStoreError as e:
            raise ControllerUsageError(str(e)) from None
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
    controller = Controller(config, feed, ca, authenticator=auth)
    elector = k8s.elector if k8s is not None else None
    Gauge("ambit_controller_leader", "1 while this replica does the leader-only work (holds "
          "the leader Lease, or is the only controller: embedded mode, --no-leader-election)",
          registry=controller.metrics).set_function(
        lambda: 1.0 if elector is None or elector.is_leader else 0.0)
    policy: Any = auth
    if mode == "kubernetes":
        from controller.registry.k8s_auth import WorkloadScopedPolicy

        policy = WorkloadScopedPolicy(auth, auth.registry.snapshot, args.trust_domain)
    ca_service = CertificateService(ca, args.trust_domain, auth, policy, controller.metrics)
    node_service = NodeService(auth, auth.pod_membership, controller.metrics)

    cache = XdsCache()
    waypoints = WaypointPublisher(cache, controller.metrics, insecure=args.insecure,
                                  trust_domain=args.trust_domain)
    ads = AdsServer(cache, lambda node, identity: waypoints.authorize(
        node_metadata(node), identity), controller.metrics, trust_domain=args.trust_domain)

    def on_state(config: Any) -> None:
        snapshot = getattr(feed, "snapshot", None)
        if snapshot is not None:
            waypoints.update(snapshot, config)
            deployer = getattr(feed, "deployer", None)
            if deployer is not None:
                # Only sets what is wanted; the deployer acts only while started (leader).
                deployer.update(snapshot.gateways)

    controller.on_state.append(on_state)

    def add_services(server: Any) -> None:
        ca_service.add_to_server(server)
        node_service.add_to_server(server)
        ads.add_to_server(server)

    controller.add_services = add_services
    if args.data_dir is not None:
        bundle = args.data_dir / "trust-bundle.pem"
        try:
            args.data_dir.mkdir(parents=True, exist_ok=True)
            bundle.write_bytes(ca.root_pem)
        except OSError as e:
            raise ControllerUsageError(f"cannot write the trust bundle to {bundle}: {e}") \
                from None
        log.info("registry: %s; trust bundle for ztunnels: %s", where, bundle)
    else:
        from controller.waypoint.deploy import CA_ROOT_CONFIGMAP

        log.info("registry: %s; trust bundle for node pods: ConfigMap %s/%s (written by the "
                 "leader)", where, args.system_namespace, CA_ROOT_CONFIGMAP)
    if k8s is not None:
        def election_failed(task: asyncio.Task[None]) -> None:
            if k8s.election_error is not None:
                stop.set()

        k8s.elector.start().add_done_callback(election_failed)
    await serve(controller, stop)
    if k8s is not None and k8s.election_error is not None:
        raise ControllerUsageError(k8s.election_error)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the controller until SIGTERM; ``ControllerUsageError`` for bad flags or files."""
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    mode = choose_mode(args.mode, args.kubeconfig, dict(os.environ))
    return uvloop.run(_main(args, mode))

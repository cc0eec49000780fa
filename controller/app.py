"""The ``ambit controller`` process: registry in, state push and certificates out.

It watches a registry (embedded SQLite by default, Kubernetes when configured), translates each
change into the ztunnels' mesh state and publishes it on the gRPC ``StateService``; it also
serves the mesh CA (``CertificateService``) on the same port. gRPC runs over TLS with a serving
certificate from the mesh root, so a ztunnel that holds the trust bundle can verify it;
``insecure`` serves plaintext for loopback development and tests only. Only nodes may
subscribe to the state (``controller/push.py``): with their node token, TLS or not.
Monitoring (Prometheus ``/metrics`` and ``/ready``) is on its own port, as istiod's 15014.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, generate_latest

from controller.ca import CertificateAuthority
from controller.ca_service import NodeAuthenticator
from controller.push import StatePublisher, StateService
from mesh.api.ambit.v1 import state_pb2_grpc
from mesh.http_server import Response, serve_http
from mesh.listener import Listener, bind_socket
from mesh.ports import GRPC_PORT, MONITORING_PORT
from mesh.spiffe import SpiffeId
from mesh.state.model import MeshConfig

log = logging.getLogger("controller")

CONTROLLER_IDENTITY = ("ambit-system", "ambit-controller")


class StateFeed(Protocol):
    """A registry, seen as a stream of translated mesh states (one per change)."""

    def states(self) -> AsyncIterator[MeshConfig]: ...


@dataclasses.dataclass
class ControllerConfig:
    trust_domain: str = "cluster.local"
    listen_host: str = "0.0.0.0"
    grpc_port: int = GRPC_PORT
    monitoring_host: str = "0.0.0.0"
    monitoring_port: int = MONITORING_PORT
    # Names ztunnels use to dial the controller; they go into the serving certificate.
    serving_names: tuple[str, ...] = ("ambit-controller.ambit-system.svc", "localhost")
    serving_ips: tuple[str, ...] = ("127.0.0.1",)
    # Plaintext gRPC; loopback listen_host only (check_insecure_bind).
    insecure: bool = False
    # A second gRPC port, same services, that REQUIRES a client certificate from the mesh root,
    # so handlers can read the caller's SPIFFE ID (Envoy waypoints' ADS). None: no such port;
    # 0: any free port. Not opened with `insecure`. See serving_credentials for why.
    mtls_port: int | None = None


class InsecureBindError(ValueError):
    """``insecure`` asked for on an address other machines can reach; the message says why
    that is refused and what to do instead."""


def check_insecure_bind(insecure: bool, listen_host: str) -> None:
    """Plaintext gRPC only on a loopback address, else ``InsecureBindError``.

    Why: on 15012 the CA's answers, the node tokens (``authorization`` metadata) and the whole
    mesh state travel; in plaintext on a reachable address anyone on the path reads the tokens
    and can then subscribe as those nodes. ``--insecure`` is kept for development on one
    machine (tests, the push benchmark), where only loopback is involved. ``localhost`` counts
    as loopback; any other name is refused, as it cannot be checked here. The dev cluster
    serves TLS, so nothing in the repository needs plaintext off loopback."""
    if not insecure:
        return
    host = listen_host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise InsecureBindError(
        f"--insecure with --listen-host {listen_host}: plaintext gRPC is refused on an address "
        "other machines can reach, since node tokens, certificates and the mesh state would "
        "cross the network in clear text. For development on this machine use --listen-host "
        "127.0.0.1; otherwise drop --insecure and give ztunnels and agents the trust bundle "
        "(--ca-root-cert DATA_DIR/trust-bundle.pem)")


def serving_credentials(ca: CertificateAuthority, config: ControllerConfig,
                        require_client_cert: bool = False) -> grpc.ServerCredentials:
    """TLS for the gRPC port with a serving certificate from the mesh root; client
    certificates are verified against that root.

    grpcio has no "optional client certificate" mode: with ``require_client_auth=False`` the
    server does not even ask for one (C-core GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE), so a
    handler never sees the caller's certificate. Ztunnels authenticate with bearer tokens and
    must not need one, hence ``require_client_cert=True`` only for a separate port whose callers
    (Envoy waypoints) always present their mesh certificate."""
    ident = SpiffeId(config.trust_domain, *CONTROLLER_IDENTITY)
    ips = tuple(dict.fromkeys((*config.serving_ips,
                               *([config.listen_host] if config.listen_host not in
                                 ("0.0.0.0", "::") else []))))
    issued = ca.issue(ident, ttl=dt.timedelta(days=365), dns_names=config.serving_names,
                      ip_addresses=ips)
    return grpc.ssl_server_credentials([(issued.key_pem, issued.chain_pem)],
                                       root_certificates=ca.root_pem,
                                       require_client_auth=require_client_cert)


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        feed: StateFeed,
        ca: CertificateAuthority,
        add_services: Callable[[grpc.aio.Server], None] | None = None,
        *,
        authenticator: NodeAuthenticator,
    ) -> None:
        self.config = config
        # Who may subscribe to the state push: the nodes the CA's authenticator knows.
        self.authenticator = authenticator
        self.feed = feed
        self.ca = ca
        self.metrics = CollectorRegistry(auto_describe=True)
        self.publisher = StatePublisher(self.metrics)
        self.feed_errors = Counter("ambit_controller_feed_errors",
                                   "Registry watch failures (the last state keeps serving)",
                                   registry=self.metrics)
        self.add_services = add_services
        # Called with each published state, after the push (e.g. the waypoint publisher).
        self.on_state: list[Callable[[MeshConfig], None]] = []
        self.server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.mtls_port = 0  # bound port of config.mtls_port (0 when not opened)
        self._tasks: list[asyncio.Task[None]] = []
        self._monitoring: Listener | None = None

    def _route(self, method: str, target: str) -> Response:
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return Response(200, generate_latest(self.metrics),
                            "text/plain; version=0.0.4; charset=utf-8")
        if path in ("/ready", "/healthz/ready"):
            ok = self.publisher.ready.is_set()
            return Response(200 if ok else 503,
                            b"ready\n" if ok else b"waiting for the first registry state\n")
        return Response(404, b"try /metrics or /ready\n")

    async def _follow(self) -> None:
        while True:
            try:
                async for config in self.feed.states():
                    self.publisher.publish(config)
                    for hook in self.on_state:
                        hook(config)
                    log.info("state version %s: %d workloads, %d services, %d policies",
                             config.version, len(config.workloads), len(config.services),
                             len(config.policies))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the registry failing must not stop the push
                self.feed_errors.inc()
                log.error("registry watch failed (%s: %s); retrying, last state keeps serving",
                          type(e).__name__, e)
            await asyncio.sleep(1)

    async def start(self) -> None:
        c = self.config
        check_insecure_bind(c.insecure, c.listen_host)
        self.server = grpc.aio.server()
        state_pb2_grpc.add_StateServiceServicer_to_server(
            StateService(self.publisher, self.authenticator), self.server)
        if self.add_services is not None:
            self.add_services(self.server)
        address = f"{c.listen_host}:{c.grpc_port}"
        if c.insecure:
            self.grpc_port = self.server.add_insecure_port(address)
        else:
            self.grpc_port = self.server.add_secure_port(address,
                                                         serving_credentials(self.ca, c))
        if not self.grpc_port:
            raise OSError(f"cannot listen on {address} for gRPC")
        if c.mtls_port is not None and not c.insecure:
            mtls_address = f"{c.listen_host}:{c.mtls_port}"
            self.mtls_port = self.server.add_secure_port(
                mtls_address, serving_credentials(self.ca, c, require_client_cert=True))
            if not self.mtls_port:
                raise OSError(f"cannot listen on {mtls_address} for gRPC (mutual TLS)")
        await self.server.start()
        log.info("gRPC (state push, CA) on %s:%d (%s)", c.listen_host, self.grpc_port,
                 "plaintext" if c.insecure else "TLS")
        if self.mtls_port:
            log.info("gRPC with required client certificates on %s:%d", c.listen_host,
                     self.mtls_port)
        if c.monitoring_port:
            self._monitoring = Listener("monitoring",
                                        bind_socket(c.monitoring_host, c.monitoring_port),
                                        serve_http(self._route))
            self._monitoring.start()
        self._tasks.append(asyncio.create_task(self._follow()))

    async def stop(self, grace: float = 1.0) -> None:
        for t in self._tasks:
            t.cancel()
        if self._monitoring is not None:
            self._monitoring.close()
        if self.server is not None:
            await self.server.stop(grace)


async def serve(controller: Controller, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await controller.start()
    try:
        await stop.wait()
    finally:
        await controller.stop()



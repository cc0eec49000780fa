"""The waypoint agent process: certificate, SDS/ALS socket, Envoy, metrics and readiness.

Why it exists: this is where the pieces meet, in the shape of uvicorn's ``Server``:
``startup()`` brings everything up in dependency order, ``serve()`` runs until SIGTERM/SIGINT
or until Envoy dies, ``shutdown()`` drains and tears down in reverse.

Startup: the bootstrap is written; the gRPC server (SDS + ALS) listens on
``<run-dir>/agent.sock`` (mode 0600: only this user's Envoy may fetch the key); ``/metrics``
and ``/healthz/ready`` start answering (503 with the reason while starting); the certificate
loop runs and, once the first certificate is issued, Envoy starts. An unreachable or refusing CA
keeps the agent waiting and saying why, not exiting: the CA may come up later.

Shutdown on a signal: readiness turns 503 at once (so the Service stops sending new
connections), Envoy's listeners drain gracefully for ``drain_seconds``, then Envoy gets SIGTERM
(SIGKILL 5 s later) and the agent's servers stop. If Envoy exits on its own, the agent logs its
exit status and last log lines and exits 1: the orchestrator restarts the pod, and a fresh pod
is the only state known to be good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import aiohttp
import grpc
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from mesh.http_server import Response, serve_http
from mesh.listener import BindError, Listener, bind_socket
from mesh.unix import file_mode
from waypoint.als import AlsServer, IstioMetrics
from waypoint.bootstrap import write_bootstrap
from waypoint.certs import CertificateManager
from waypoint.config import WaypointConfig
from waypoint.envoy_proc import EnvoyAdmin, EnvoyProcess, describe_exit, envoy_command
from waypoint.sds import SdsServer, SecretStore

log = logging.getLogger("waypoint")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENVOY_STATS_UP = "ambit_waypoint_envoy_stats_up"
ENVOY_STOP_TIMEOUT = 5.0


def merge_envoy_stats(own: str, envoy: str | None) -> str:
    """Our exposition, ``ambit_waypoint_envoy_stats_up`` (0 when Envoy's stats could not be
    read), then Envoy's ``/stats/prometheus`` as is (its names all start with ``envoy_``, so
    no family collides with ours)."""
    head = own if not own or own.endswith("\n") else own + "\n"
    head += (f"# HELP {ENVOY_STATS_UP} 1 if Envoy's /stats/prometheus answered this scrape\n"
             f"# TYPE {ENVOY_STATS_UP} gauge\n"
             f"{ENVOY_STATS_UP} {0 if envoy is None else 1}\n")
    if not envoy:
        return head
    return head + (envoy if envoy.endswith("\n") else envoy + "\n")


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


class WaypointRunner:
    """One waypoint pod's agent. ``serve()`` returns the process exit status."""

    def __init__(self, config: WaypointConfig, registry: CollectorRegistry | None = None) \
            -> None:
        self.config = config
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self.certs = CertificateManager(
            config.identity, config.ca_target, config.token_file or config.run_dir / "token",
            config.ca_root_cert if config.ca_uses_tls else None, registry,
            ttl_seconds=config.cert_ttl_seconds, request_timeout=config.ca_timeout,
            backoff_initial=config.backoff_initial, backoff_max=config.backoff_max)
        self.store = SecretStore()
        self.certs.subscribe(self.store.update)
        self.sds = SdsServer(self.store, registry)
        self.istio = IstioMetrics(registry, config.max_series)
        self.als = AlsServer(self.istio)
        self.admin = EnvoyAdmin(config.admin_port)
        self.envoy: EnvoyProcess | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.listeners: list[Listener] = []
        self.metrics_port = config.metrics_port  # the bound ports once started
        self.readiness_port = config.readiness_port
        self.draining = False
        self.should_exit: asyncio.Event | None = None
        self._cert_task: asyncio.Task[None] | None = None
        self._envoy_wait: asyncio.Task[int] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def startup(self) -> bool:
        """Bring everything up; False if told to exit before Envoy could start."""
        c = self.config
        if self.should_exit is None:
            self.should_exit = asyncio.Event()
        if not c.run_dir.exists():
            c.run_dir.mkdir(parents=True, mode=0o700)
        path = write_bootstrap(c)
        log.info("waypoint %s (pod %s, identity %s): bootstrap %s, controller %s (%s), CA %s "
                 "(%s)", c.node_cluster, c.pod_name, c.identity, path, c.controller_address,
                 "plaintext" if c.insecure_xds else "mTLS", c.ca_target, self.certs.transport)
        await self._start_grpc()
        self._start_http()
        self._cert_task = asyncio.create_task(self.certs.run())
        got = asyncio.create_task(self.certs.obtained.wait())
        stop = asyncio.create_task(self.should_exit.wait())
        try:
            await asyncio.wait({got, stop, self._cert_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            got.cancel()
            stop.cancel()
        if self._cert_task.done():
            self._cert_task.result()  # the loop never ends by itself: raise what killed it
        if self.certs.current is None:
            return False
        self.envoy = EnvoyProcess(envoy_command(c.envoy_path, path, c.concurrency,
                                                c.envoy_log_level, c.drain_seconds))
        await self.envoy.start()
        self._envoy_wait = asyncio.create_task(self.envoy.wait())
        log.info("Envoy started (pid %s, admin 127.0.0.1:%d)", self.envoy.pid, c.admin_port)
        return True

    async def _start_grpc(self) -> None:
        sock = self.config.agent_socket
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # a stale socket from an earlier run
        server = grpc.aio.server()
        self.sds.add_to_server(server)
        self.als.add_to_server(server)
        # gRPC binds here, synchronously: under the umask, the socket is 0600 from creation
        # (Envoy runs as the agent's user).
        with file_mode(0o600):
            bound = server.add_insecure_port(f"unix:{sock}")
        if not bound:
            raise OSError(f"cannot listen on the agent socket {sock}")
        await server.start()
        self.grpc_server = server
        log.info("SDS and ALS on unix:%s", sock)

    def _start_http(self) -> None:
        c = self.config
        routes: dict[int, dict[str, Callable[[], Awaitable[Response]]]] = {}
        if c.metrics_port:
            routes.setdefault(c.metrics_port, {})["/metrics"] = self._metrics_response
        if c.readiness_port:
            routes.setdefault(c.readiness_port, {})["/healthz/ready"] = self._ready_response
        for port, table in routes.items():
            listener = Listener(f"waypoint-{port}", bind_socket(c.stats_host, port),
                                serve_http(self._router(table)))
            listener.start()
            self.listeners.append(listener)
            bound = listener.address[1]
            if "/metrics" in table:
                self.metrics_port = bound
            if "/healthz/ready" in table:
                self.readiness_port = bound
            log.info("%s on %s:%d", " and ".join(table), c.stats_host, bound)

    async def main_loop(self) -> int:
        """Until told to exit (0) or Envoy exits on its own (1)."""
        assert self.should_exit is not None and self._envoy_wait is not None
        assert self._cert_task is not None
        stop = asyncio.create_task(self.should_exit.wait())
        try:
            await asyncio.wait({stop, self._envoy_wait, self._cert_task},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if self._envoy_wait.done() and not self.should_exit.is_set():
            assert self.envoy is not None
            code = self._envoy_wait.result()
            tail = "\n  ".join(self.envoy.tail) or "(none)"
            log.error("Envoy exited unexpectedly (%s); exiting so the waypoint pod is "
                      "restarted. Envoy's last log lines:\n  %s", describe_exit(code), tail)
            return 1
        if self._cert_task.done() and not self.should_exit.is_set():
            exc = self._cert_task.exception()
            log.error("the certificate loop stopped (%s: %s); exiting", type(exc).__name__, exc)
            return 1
        return 0

    async def shutdown(self) -> None:
        """Drain Envoy (if it runs), stop it, then stop the agent's own servers."""
        self.draining = True
        envoy = self.envoy
        if envoy is not None and envoy.running:
            await self._drain(envoy)
            code = await envoy.stop(ENVOY_STOP_TIMEOUT)
            log.info("Envoy stopped (%s)", describe_exit(code or 0))
        if self._envoy_wait is not None:
            self._envoy_wait.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._envoy_wait
        await _cancel(self._cert_task)
        for listener in self.listeners:
            listener.close()
        for listener in self.listeners:
            await listener.drain(1.0)
        self.listeners.clear()
        if self.grpc_server is not None:
            await self.grpc_server.stop(1.0)
            self.grpc_server = None
        with contextlib.suppress(FileNotFoundError):
            self.config.agent_socket.unlink()
        await self.admin.close()
        await self.certs.close()

    async def _drain(self, envoy: EnvoyProcess) -> None:
        seconds = self.config.drain_seconds
        if seconds <= 0:
            return
        try:
            await self.admin.drain_listeners()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.warning("could not start Envoy's graceful drain through its admin port (%s); "
                        "stopping it without draining", e)
            return
        log.info("draining Envoy's listeners for %.1fs", seconds)
        assert self._envoy_wait is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._envoy_wait), seconds)

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or until Envoy dies (exit 1)."""
        self.should_exit = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        try:
            code = await self.main_loop() if await self.startup() else 0
        finally:
            await self.shutdown()
            for sig in installed:
                loop.remove_signal_handler(sig)
        return code

    def _on_signal(self, sig: signal.Signals) -> None:
        assert self.should_exit is not None
        if self.should_exit.is_set():
            log.info("%s again; still shutting down", sig.name)
            return
        log.info("%s: draining and shutting down", sig.name)
        self.should_exit.set()

    # -- HTTP -----------------------------------------------------------------------------

    @staticmethod
    def _router(table: dict[str, Callable[[], Awaitable[Response]]]) \
            -> Callable[[str, str], Awaitable[Response]]:
        async def route(method: str, target: str) -> Response:
            path = target.split("?", 1)[0]
            handler = table.get(path)
            if handler is None:
                return Response(404, f"no such endpoint {path}; try "
                                f"{', '.join(table)}\n".encode())
            if method != "GET":
                return Response(405, b"only GET\n")
            return await handler()
        return route

    async def readiness(self) -> tuple[bool, str]:
        """(ready, why): ready when Envoy is LIVE and has at least one listener from xDS."""
        if self.draining:
            return False, "draining"
        if self.certs.current is None:
            why = self.certs.last_error or "first request in progress"
            return False, f"waiting for the certificate from CA {self.certs.ca_address}: {why}"
        if self.envoy is None or not self.envoy.running:
            return False, "Envoy is not running"
        controller = self.config.controller_address
        try:
            state = await self.admin.server_state()
            if state != "LIVE":
                return False, (f"Envoy is {state or 'not ready'} (waiting for its first "
                               f"configuration from the controller {controller})")
            names = await self.admin.listeners()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            return False, f"Envoy's admin port {self.config.admin_port} does not answer: {e}"
        if not names:
            return False, (f"Envoy has no listeners yet (none received from the controller "
                           f"{controller})")
        return True, f"ready: Envoy is LIVE with {len(names)} listener(s)"

    async def _ready_response(self) -> Response:
        ok, why = await self.readiness()
        return Response(200 if ok else 503, (why + "\n").encode())

    async def render_metrics(self) -> str:
        own = (await asyncio.to_thread(generate_latest, self.registry)).decode()
        envoy: str | None = None
        if self.envoy is not None and self.envoy.running:
            try:
                envoy = await self.admin.stats_prometheus()
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                log.debug("Envoy stats unavailable: %s", e)
        return merge_envoy_stats(own, envoy)

    async def _metrics_response(self) -> Response:
        return Response(200, (await self.render_metrics()).encode(), METRICS_CONTENT_TYPE)


def run(config: WaypointConfig) -> int:
    """Run the waypoint agent on uvloop until signalled; the process exit status (1 when a
    port, the socket, the run directory or the Envoy binary cannot be used)."""
    import uvloop

    try:
        return uvloop.run(WaypointRunner(config).serve())
    except (BindError, OSError) as e:
        log.error("cannot run the waypoint: %s", e)
        return 1

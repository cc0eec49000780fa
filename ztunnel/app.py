"""The ztunnel process: startup, serve, drain, shutdown.

``Ztunnel`` owns the listeners and the shared proxy context. Capture listeners are either
shared (one socket per port on ``bind_host``, fed by TPROXY or eBPF) or per workload (the
plaintext and HBONE inbound listeners on each local pod IP, reconciled whenever the state
changes). On SIGTERM it drains:
readiness fails, listeners stop accepting, inbound HBONE peers get GOAWAY, open connections get
``drain_seconds`` to finish, then the rest are closed.

Restarts lose nothing (issue 15): with the node agent (``--agent-socket``), a starting ztunnel
first takes the capture listeners the agent keeps from its predecessor
(``agent_link.take_listeners``) and serves those very sockets, so connections the kernel queued
while no ztunnel accepted are not refused. It starts accepting on them, and registers with the
agent, only once it is ready (state loaded, every worker ready); a predecessor still running
is then told it is superseded and drains: it stops accepting (its successor accepts from the
same queues), releases its admin, metrics and readiness ports for the successor, and gives its
established connections ``drain_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from mesh.http_server import serve_http
from mesh.listener import BindError, Listener, bind_socket
from mesh.netns import is_netns, same_netns
from mesh.ports import NODE_OWN_PORTS
from mesh.state.file_source import FileSource
from mesh.state.model import IPAddress
from mesh.state.store import OverlayStateStore, ProvisionalWorkloads, StateSnapshot
from ztunnel.accesslog import AccessLog
from ztunnel.config import BIND_WORKLOAD, ZtunnelConfig
from ztunnel.hbone.pool import HbonePool
from ztunnel.identity import SecretManager, Secrets
from ztunnel.inpod import POD_LISTENERS, InpodPod, listener_port_problem, open_pod_listeners
from ztunnel.listeners import inbound_plaintext, outbound, socks5
from ztunnel.listeners.admin import admin_routes, stats_routes
from ztunnel.listeners.inbound import InboundServer
from ztunnel.metrics import Metrics
from ztunnel.node_addresses import read_node_addresses
from ztunnel.pod_start import SourceHold
from ztunnel.proxy import ProxyContext
from ztunnel.routing import OwnEndpoints

if TYPE_CHECKING:
    import grpc

    from mesh.state.controller_source import ControllerSource
    from ztunnel.agent_link import AgentLink, LinkRequest, PodNetns

log = logging.getLogger("ztunnel")


def make_secrets(config: ZtunnelConfig, metrics: Metrics) -> Secrets:
    """Certificates from the controller's CA when ``ca_address`` is set, else from the
    identity directory."""
    if not config.ca_address:
        return SecretManager(config.identity_dir)
    assert config.node_token_file is not None  # validated: they go together
    # gRPC costs ~12 MiB per process: loaded only by ztunnels that talk to a controller.
    from ztunnel.ca_client import CaSecretManager

    return CaSecretManager(config.ca_address, config.node_token_file, metrics,
                           controller_credentials(config))


# The listeners the node agent steers captured connections into (eBPF mode needs the sockets).
CAPTURE_LISTENERS = ("outbound", "inbound", "inbound_plaintext")


class Ztunnel:
    def __init__(self, config: ZtunnelConfig) -> None:
        self.config = config
        # Pod start: the controller's state plus the pods the agent reported at CNI ADD that it
        # does not list yet (mesh/state/store.py "Provisional workloads").
        self.store = OverlayStateStore(config.root_namespace, ProvisionalWorkloads(
            config.pod_start_provisional_max, config.pod_start_provisional_max_age))
        self.metrics = Metrics()
        self.secrets = self._make_secrets()
        self.ctx = ProxyContext(config, self.store, self.secrets, self.metrics,
                                AccessLog(config.access_log))
        # The pool's client connections get the same HTTP/2 limits and timers (keepalive finds
        # half-open peers on the client side too) as the server's.
        self.ctx.pool = HbonePool(self.secrets.client_context, self.ctx.make_socket,
                                  connect_timeout=config.connect_timeout,
                                  settings=config.hbone_settings())
        self.ctx.reserved_ports = frozenset(
            p for p in (config.outbound_port, config.inbound_plaintext_port, config.inbound_port,
                        config.socks5_port, config.admin_port, config.metrics_port,
                        config.readiness_port) if p)
        # The node itself, never dialled for a pod: the mesh's well-known ports and this
        # ztunnel's configured ones; the node's addresses are read in start() and refreshed.
        self.ctx.own = OwnEndpoints(ports=NODE_OWN_PORTS | self.ctx.reserved_ports,
                                    loopback_pods=config.loopback_pods)
        self.ctx.source_hold = SourceHold(self.store, config, self.metrics)
        self.inbound = InboundServer(self.ctx)
        self.listeners: dict[str, Listener] = {}
        self._workload_listeners: dict[IPAddress, list[Listener]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Restarts: the capture sockets taken over from the node agent (its predecessor's;
        # empty on a fresh start), the capture sockets served (name -> group members), and
        # the listeners that start accepting only once this ztunnel is ready.
        self.taken: dict[str, list[socket.socket]] = {}
        self.capture: dict[str, list[socket.socket]] = {}
        self._deferred: list[Listener] = []
        self._agent_task: asyncio.Task[None] | None = None
        # Set when the agent says another ztunnel took over (``serve`` then drains).
        self.superseded_by: int | None = None
        self.on_superseded: Callable[[], None] | None = None
        self.draining = False
        self.started = False
        # Listeners this process opens itself share their port with the other workers' (only
        # the per-workload ones: ztunnel/workers.py opens the shared ones in the parent).
        self.reuseport = False
        self.file_source: FileSource | None = None
        self.controller_source: ControllerSource | None = None
        self.agent_link: AgentLink | None = None

    def _make_secrets(self) -> Secrets:
        """Where certificates come from (a worker's: its parent, ztunnel/workers.py)."""
        return make_secrets(self.config, self.metrics)

    # -- listeners -------------------------------------------------------------------------

    def _on_error(self, listener: str, exc: BaseException) -> None:
        self.metrics.connection_errors.labels(listener, type(exc).__name__).inc()

    def _open(self, name: str, host: str, port: int, transparent: bool,
              handler: Callable[[socket.socket], Awaitable[None]]) -> Listener:
        listener = Listener(name, bind_socket(host, port, transparent, reuseport=self.reuseport),
                            handler, self._on_error)
        listener.start()
        log.info("listening: %s on %s:%d", name, host, port)
        return listener

    def _open_port(self, name: str, host: str, port: int,
                   handler: Callable[[socket.socket], Awaitable[None]]) -> None:
        """Open a port that is not captured (admin, metrics, readiness, SOCKS5). After a
        takeover the ztunnel being replaced may still hold it for a moment (until it is told
        it is superseded): then wait for it instead of failing."""
        try:
            self.listeners[name] = self._open(name, host, port, False, handler)
        except BindError:
            if not self.taken:
                raise
            log.info("%s port %s:%d is still the previous ztunnel's: opening it once it lets "
                     "go", name, host, port)
            self._tasks.append(asyncio.create_task(self._open_later(name, host, port, handler)))

    async def _open_later(self, name: str, host: str, port: int,
                          handler: Callable[[socket.socket], Awaitable[None]]) -> None:
        while not self.draining:
            await asyncio.sleep(0.1)
            try:
                self.listeners[name] = self._open(name, host, port, False, handler)
                return
            except BindError:
                continue

    def _serve_capture(self, name: str, port: int,
                       handler: Callable[[socket.socket], Awaitable[None]]) -> None:
        """A capture listener: the sockets taken over from the agent, else one bound here.
        Taken-over ones accept only once this ztunnel is ready (``_take_over``)."""
        c = self.config
        socks = self.taken.get(name) or [
            bind_socket(c.bind_host, port, c.transparent, reuseport=self.reuseport)]
        self.capture[name] = socks
        self._serve_sockets(name, socks, handler, defer=bool(self.taken))
        log.info("listening: %s on %s:%d%s", name, c.bind_host, port,
                 f" ({len(socks)} socket(s) taken over from the previous ztunnel)"
                 if self.taken else "")

    def _serve_sockets(self, name: str, socks: list[socket.socket],
                       handler: Callable[[socket.socket], Awaitable[None]], defer: bool) -> None:
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            listener = Listener(name, sock, handler, self._on_error)
            self.listeners[name if i == 0 else f"{name}#{i}"] = listener
            if defer:
                self._deferred.append(listener)
            else:
                listener.start()

    def add_listener(self, name: str, sock: socket.socket) -> Listener:
        """Serve an already-bound socket (e.g. opened in a pod's network namespace) as one of
        the capture listeners: ``outbound``, ``inbound_plaintext`` or ``inbound``."""
        handlers = self._capture_handlers()
        sock.setblocking(False)
        listener = Listener(name, sock, handlers[name.split("@")[0]], self._on_error)
        listener.start()
        self.listeners[f"{name}@{sock.getsockname()}"] = listener
        return listener

    def _capture_handlers(self) -> dict[str, Callable[[socket.socket], Awaitable[None]]]:
        ctx = self.ctx
        return {
            "outbound": functools.partial(outbound.handle_captured, ctx),
            "inbound_plaintext": functools.partial(inbound_plaintext.handle, ctx),
            "inbound": self.inbound.handle,
        }

    def _open_static(self) -> None:
        c = self.config
        h = self._capture_handlers()
        capture = [("outbound", c.outbound_port)]
        if c.inbound_bind != BIND_WORKLOAD:
            capture += [("inbound_plaintext", c.inbound_plaintext_port),
                        ("inbound", c.inbound_port)]
        for name, port in capture:
            if port:
                self._serve_capture(name, port, h[name])
        stats = serve_http(stats_routes(self.ctx, self.readiness))
        specs: list[tuple[str, str, int, Callable[[socket.socket], Awaitable[None]]]] = [
            ("socks5", c.socks5_host, c.socks5_port, functools.partial(socks5.handle, self.ctx)),
            ("admin", c.admin_host, c.admin_port, serve_http(admin_routes(self.ctx))),
            ("metrics", c.stats_host, c.metrics_port, stats),
        ]
        if c.readiness_port != c.metrics_port:
            specs.append(("readiness", c.stats_host, c.readiness_port, stats))
        for name, host, port, handler in specs:
            if port:
                self._open_port(name, host, port, handler)

    def _reconcile_workload_listeners(self, _old: StateSnapshot, new: StateSnapshot) -> None:
        """Per-workload mode: plaintext and HBONE inbound on every local mesh pod IP, no more."""
        if self.config.inbound_bind != BIND_WORKLOAD or self.draining:
            return
        wanted = {ip for w in new.local_workloads(self.config.node) if new.in_mesh(w)
                  for ip in w.addresses}
        for ip in set(self._workload_listeners) - wanted:
            for listener in self._workload_listeners.pop(ip):
                listener.close()
            log.info("closed listeners of %s (workload gone)", ip)
        h = self._capture_handlers()
        c = self.config
        for ip in wanted - set(self._workload_listeners):
            opened = []
            try:
                for name, port in (("inbound", c.inbound_port),
                                   ("inbound_plaintext", c.inbound_plaintext_port)):
                    if port:
                        opened.append(self._open(f"{name}", str(ip), port, c.transparent,
                                                 h[name]))
            except BindError as e:
                log.error("cannot open listeners for workload %s: %s", ip, e)
                for listener in opened:
                    listener.close()
                continue
            self._workload_listeners[ip] = opened

    def all_listeners(self) -> list[Listener]:
        return [*self.listeners.values(),
                *(x for ls in self._workload_listeners.values() for x in ls),
                *(x for pod in self.ctx.pods.by_uid.values() for x in pod.listeners)]

    # -- lifecycle -------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.started:
            return False, "starting"
        if not self.store.ready:
            return False, "no mesh state loaded yet"
        return True, "ready"

    def _on_state(self, ok: bool, message: str) -> None:
        if ok:
            self.metrics.config_loaded.inc()
        else:
            self.metrics.config_rejected.inc()

    def _after_state(self, old: StateSnapshot, new: StateSnapshot) -> None:
        self.metrics.state_workloads.set(len(new.config.workloads))
        # Obtain certificates of local identities early (the CA source in the background) so
        # a missing one is reported now and the first connection does not wait for it.
        self.secrets.prefetch({w.identity for w in new.local_workloads(self.config.node)
                               if new.in_mesh(w)})
        for c in self.secrets.certificates():
            self.metrics.cert_expiry.labels(str(c.identity)).set(c.not_after.timestamp())

    def refresh_node_addresses(self) -> None:
        """Re-read the node's own addresses (I/O here, so routing stays pure)."""
        try:
            addresses = read_node_addresses()
        except OSError as e:
            # Loopback stays refused by its kind; only the node's other addresses go unknown.
            log.error("cannot read the node's addresses (%s): keeping the %d known", e,
                      len(self.ctx.own.addresses))
            return
        if addresses != self.ctx.own.addresses:
            log.info("node addresses protected from pod traffic: %s",
                     " ".join(sorted(map(str, addresses))))
            self.ctx.own = dataclasses.replace(self.ctx.own, addresses=addresses)

    async def _watch_node_addresses(self) -> None:
        while True:
            await asyncio.sleep(self.config.node_address_refresh)
            self.refresh_node_addresses()

    async def start(self) -> None:
        self.refresh_node_addresses()
        self.store.subscribe(self._after_state)
        self.store.subscribe(self._reconcile_workload_listeners)
        if self._links_agent():
            from ztunnel.agent_link import take_listeners

            assert self.config.agent_socket is not None
            self.taken = await take_listeners(self.config.agent_socket, self._capture_ports())
        self._open_static()
        self._start_sources()
        if self.taken or self._deferred:
            self._tasks.append(asyncio.create_task(self._take_over()))
        else:
            self._start_agent_link()
        self._tasks.append(asyncio.create_task(self._gauges()))
        self._tasks.append(asyncio.create_task(self._watch_node_addresses()))
        self.started = True
        log.info("ztunnel for node %s started", self.config.node)

    def _start_sources(self) -> None:
        """The mesh state: the state file and/or the controller's push, into ``store``."""
        if self.config.state_file is not None:
            self.file_source = FileSource(self.config.state_file, self.store,
                                          self.config.reload_interval, self._on_state)
            self.file_source.load()
            self._tasks.append(asyncio.create_task(self.file_source.watch()))
        if self.config.controller_address:
            from mesh.state.controller_source import ControllerSource

            self.controller_source = ControllerSource(
                self.config.controller_address, self.config.node, self.store,
                credentials=controller_credentials(self.config),
                token_file=self.config.node_token_file,
                on_result=self._on_state,
                on_connected=lambda up: self.metrics.xds_connected.set(1 if up else 0))
            self.metrics.xds_connected.set(0)
            self._tasks.append(asyncio.create_task(self.controller_source.run()))

    def _links_agent(self) -> bool:
        """The ztunnel hands its capture listeners to a node agent (and takes them back)."""
        return self.config.agent_socket is not None and \
            self.config.inbound_bind != BIND_WORKLOAD

    def _capture_ports(self) -> dict[str, int]:
        c = self.config
        ports = {"outbound": c.outbound_port, "inbound_plaintext": c.inbound_plaintext_port,
                 "inbound": c.inbound_port}
        return {n: p for n, p in ports.items() if p}

    def _capture_sockets(self) -> dict[str, list[socket.socket]]:
        """The capture listeners' sockets the node agent gets (eBPF SOCKMAP), every member of
        each one's group (the agent keeps them for the next ztunnel)."""
        return {n: self.capture[n] for n in CAPTURE_LISTENERS if n in self.capture}

    def _ready_to_serve(self) -> bool:
        return self.readiness()[0]

    async def _take_over(self) -> None:
        """After a takeover: accept on the sockets taken over, and register with the agent
        (which then tells the previous ztunnel it is superseded), once ready. Until then the
        previous ztunnel, if it still runs, serves them, or the kernel queues connections."""
        while not self._ready_to_serve():
            if self.draining:
                return
            await asyncio.sleep(0.05)
        for listener in self._deferred:
            listener.start()
        if self._deferred:
            log.info("ready: accepting on the %d capture socket(s) taken over",
                     len(self._deferred))
        self._deferred = []
        self._start_agent_link()

    def _start_agent_link(self, barrier: Callable[[], Awaitable[None]] | None = None) -> None:
        if self._links_agent():
            from ztunnel.agent_link import AgentLink

            assert self.config.agent_socket is not None
            self.agent_link = AgentLink(self.config.agent_socket, self._capture_sockets(),
                                        node=self.config.node,
                                        trust_domain=self._trust_domain,
                                        on_request=self.on_agent_request, barrier=barrier)
            self._agent_task = asyncio.create_task(self.agent_link.run())
            self._tasks.append(self._agent_task)

    def _trust_domain(self) -> str:
        return (self.store.base.config.trust_domain if self.store.ready
                else self.config.trust_domain)

    def on_agent_request(self, request: LinkRequest) -> list[tuple[str, socket.socket]] | None:
        """Carry out the agent's pod-start request (ztunnel/agent_link.py). A pod added goes
        into the store's provisional overlay; the store's listeners run before this returns,
        so its certificate fetch has started (``_after_state``) and held connections from its
        IP are released. Raises ValueError (the reason) to refuse it."""
        from ztunnel.agent_link import PodDeleted, PodNetns, PodNetnsGone, Superseded

        if isinstance(request, PodNetns):
            return self._pod_netns(request)
        if isinstance(request, PodNetnsGone):
            if self.ctx.pods.remove(request.uid):
                log.info("pod %s gone: its in-pod listeners closed", request.uid)
            return None
        if isinstance(request, Superseded):
            if self.superseded_by is None:
                log.info("superseded by the ztunnel pid %d (it accepts on the same listeners "
                         "now): draining", request.by)
                self.superseded_by = request.by
                if self.on_superseded is not None:
                    self.on_superseded()
            return None
        if isinstance(request, PodDeleted):
            if self.store.remove_provisional(request.uid):
                log.info("pod %s deleted (CNI DEL): provisional workload removed", request.uid)
            self.metrics.provisional.set(len(self.store.overlay))
            return None
        w = request.workload
        if self.ctx.own.addresses & set(w.addresses):
            raise ValueError(f"pod {w.uid}: {', '.join(map(str, w.addresses))} is an address "
                             "of this node, not a pod's")
        displaced = self.store.add_provisional(w, time.time())
        self.metrics.provisional.set(len(self.store.overlay))
        log.info("pod %s (%s, %s) added by the node agent at CNI ADD; provisional until the "
                 "state lists it%s", w.uid, ", ".join(map(str, w.addresses)), w.identity,
                 f" (replaces {', '.join(displaced)}: same address)" if displaced else "")
        return None

    # -- in-pod mode (ztunnel/inpod.py) ----------------------------------------------------

    def _pod_netns(self, request: PodNetns) -> list[tuple[str, socket.socket]]:
        """Serve a pod's listeners inside its network namespace: the ones the agent kept (a
        previous ztunnel's), else new ones. Returns them, for the agent to keep. With
        ``--workers`` the parent serves them itself (it is a whole ztunnel: state, secrets,
        pool), so in-pod traffic does not spread over the workers yet."""
        handed = [request.netns, *(s.detach() for _, s in request.listeners)]
        names = [n for n, _ in request.listeners]
        try:
            pod = self._pod_from(request.uid, request.ips, handed[0], names, handed[1:])
        except (OSError, ValueError) as e:
            raise ValueError(f"pod {request.uid}: cannot serve its network namespace: "
                             f"{e}") from None
        return [(n, s) for n, socks in pod.sockets.items() for s in socks]

    def _pod_from(self, uid: str, ips: tuple[IPAddress, ...], netns: int, names: list[str],
                  fds: list[int]) -> InpodPod:
        """Take ownership of a pod's namespace and handed-over listener descriptors (closed
        on failure) and serve the pod."""
        socks: list[socket.socket] = []
        try:
            socks = [socket.socket(fileno=fd) for fd in fds]
            fds = []
            if not is_netns(netns):
                raise ValueError("the descriptor is not a network namespace")
            known = self.ctx.pods.by_uid.get(uid)
            if known is not None and same_netns(known.netns, netns):
                # Already served (the agent restarted and hands its pods over again).
                for s in socks:
                    s.close()
                os.close(netns)
                return known
            sockets: dict[str, list[socket.socket]] = {}
            problems = [p for n, s in zip(names, socks, strict=True)
                        if (p := listener_port_problem(n, s)) is not None]
            for n, s in zip(names, socks, strict=True):
                sockets.setdefault(n, []).append(s)
            if problems or set(sockets) != set(POD_LISTENERS):
                if socks:
                    log.warning("pod %s: the listeners handed over are not usable (%s); "
                                "opening new ones", uid, "; ".join(problems) or "incomplete")
                for s in socks:
                    s.close()
                socks = []
                sockets = open_pod_listeners(netns)
            pod = InpodPod(uid, ips, netns, sockets)
        except BaseException:
            for s in socks:
                s.close()
            for fd in (netns, *fds):
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        self._serve_pod(pod)
        self.ctx.pods.put(pod)
        log.info("pod %s (%s): serving its listeners inside its network namespace%s", uid,
                 ", ".join(map(str, ips)), " (taken over)" if socks else "")
        return pod

    def _serve_pod(self, pod: InpodPod) -> None:
        handlers: dict[str, Callable[[socket.socket], Awaitable[None]]] = {
            "outbound": functools.partial(outbound.handle_captured, self.ctx, via=pod),
            "inbound_plaintext": functools.partial(inbound_plaintext.handle, self.ctx,
                                                   redirected=True),
            "inbound": self.inbound.handle,
        }
        for name, socks in pod.sockets.items():
            for sock in socks:
                sock.setblocking(False)
                listener = Listener(name, sock, handlers[name], self._on_error)
                listener.start()
                pod.listeners.append(listener)


    async def _gauges(self) -> None:
        while True:
            if self.store.expire_provisional(time.time()):
                log.warning("provisional workloads expired: the controller's state did not "
                            "list them within %gs", self.config.pod_start_provisional_max_age)
            self.metrics.provisional.set(len(self.store.overlay))
            if self.ctx.pool is not None:
                self.metrics.hbone_pool_connections.set(self.ctx.pool.size)
            if self.store.ready:
                confirmed = self.store.current.loaded_at
                if self.controller_source is not None and self.controller_source.connected:
                    confirmed = time.time()  # a live subscription means the state is current
                self.metrics.state_age.set(max(0.0, time.time() - confirmed))
            await asyncio.sleep(1)

    def _begin_drain(self) -> None:
        """The first steps of a drain: leave the node agent (it keeps the capture listeners
        for the next ztunnel, and sends new pods to it), and, when superseded, let the
        successor have the admin, metrics and readiness ports at once."""
        if self._agent_task is not None:
            self._agent_task.cancel()
            self._agent_task = None
        for pod in self.ctx.pods.by_uid.values():  # stop accepting in the pods too
            for in_pod in pod.listeners:
                in_pod.close()
        if self.superseded_by is not None:
            for name in ("admin", "metrics", "readiness"):
                listener = self.listeners.get(name)
                if listener is not None:
                    listener.close()

    async def shutdown(self) -> None:
        """Drain: stop accepting, GOAWAY inbound peers, let connections finish, then close."""
        if self.draining:
            return
        self.draining = True
        log.info("draining for up to %.1fs", self.config.drain_seconds)
        self._begin_drain()
        capture = [x for x in self.all_listeners()
                   if x.name not in ("admin", "metrics", "readiness")]
        for listener in capture:
            listener.close()
        self.inbound.start_drain()
        deadline = self.config.drain_seconds
        # HBONE connections are long-lived and pooled, so the inbound listener's connection
        # tasks are not what we wait for: its tunnels are (InboundServer.drain).
        plain = [x for x in capture if x.name != "inbound"]
        results = await asyncio.gather(
            *(x.drain(deadline) for x in plain), self.inbound.drain(deadline))
        await asyncio.gather(*(x.drain(1.0) for x in capture if x.name == "inbound"))
        cancelled = sum(results)
        if cancelled:
            log.warning("drain deadline passed: closed %d connection(s)", cancelled)
        for listener in self.all_listeners():
            listener.close()
        for t in self._tasks:
            t.cancel()
        self.ctx.pods.close()
        if self.ctx.pool is not None:
            await self.ctx.pool.close()
        await self.secrets.close()
        self.ctx.access_log.close()
        log.info("ztunnel stopped")


def controller_credentials(config: ZtunnelConfig) -> grpc.ChannelCredentials | None:
    """TLS to the controller (state push and CA), verified with the mesh root; None
    (plaintext, which each channel reports when it starts) without one."""
    if config.ca_root_cert is None:
        return None
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=config.ca_root_cert.read_bytes())


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def serve(config: ZtunnelConfig, stop: asyncio.Event | None = None,
                zt: Ztunnel | None = None) -> None:
    """Run ``zt`` (a single-process Ztunnel by default; the --workers parent passes its
    Supervisor) until SIGTERM, SIGINT or ``stop``, then shut it down."""
    zt = zt or Ztunnel(config)
    stop = stop or asyncio.Event()
    zt.on_superseded = stop.set
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await zt.start()
        await stop.wait()
    finally:
        await zt.shutdown()


def run(config: ZtunnelConfig) -> int:
    """Entry point of ``ambit ztunnel``; returns the exit status."""
    _setup_logging(config.log_level)
    import uvloop

    from ztunnel.allocator import tune

    tune()
    try:
        if config.workers > 1:
            from ztunnel.workers import supervise

            uvloop.run(supervise(config))
        else:
            uvloop.run(serve(config))
    except BindError as e:
        log.error("%s", e)
        return 1
    return 0

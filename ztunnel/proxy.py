"""What every listener shares: the proxy context and per-connection accounting.

``ProxyContext`` bundles the state store, certificates, HBONE pool, metrics and access log.
``ConnectionRecord`` follows one proxied connection from accept to close, so that every
connection, whether it succeeds, is denied or fails, yields exactly one opened/closed metric
pair and one access-log line with its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesh.ratelimit import RateLimitedLog
from mesh.state.model import AuthorizationPolicy, IPAddress, Service, Workload
from mesh.state.store import StateStore
from ztunnel.accesslog import AccessLog
from ztunnel.admission import OVERFLOW, ConnectionLimits
from ztunnel.authz import ConnectionInfo, authorize
from ztunnel.config import ZtunnelConfig
from ztunnel.hbone.pool import HbonePool
from ztunnel.identity import Secrets
from ztunnel.inpod import IP_TRANSPARENT, InpodPod, InpodPods, socket_in
from ztunnel.metrics import ConnectionLabels, Metrics
from ztunnel.relay import relay_tcp
from ztunnel.routing import OwnEndpoints

if TYPE_CHECKING:
    from ztunnel.pod_start import SourceHold

log = logging.getLogger("ztunnel.proxy")

SO_MARK = 36


# What a backend connection's reader may hold before it stops reading the socket (asyncio
# pauses at twice this). It sits outside the HBONE connection's budget, once per tunnel, so it
# is kept small: the kernel's socket buffer holds the rest, and TCP pushes back on the backend.
# Reads still return up to twice this, large enough for big HTTP/2 frames.
BACKEND_READ_LIMIT = 64 * 1024


@dataclass
class ProxyContext:
    config: ZtunnelConfig
    store: StateStore
    secrets: Secrets
    metrics: Metrics
    access_log: AccessLog
    pool: HbonePool | None = None
    reserved_ports: frozenset[int] = frozenset()
    # The node itself (its addresses, the own ports): never dialled for a pod. The app fills in
    # the addresses at start and refreshes them; routing only reads this value.
    own: OwnEndpoints = field(default_factory=OwnEndpoints)
    rng: random.Random = field(default_factory=random.Random)
    _mark_ok: bool = True
    # Connection limits (ztunnel/admission.py), read from ``config`` at each admission.
    limits: ConnectionLimits = field(init=False)
    # Pod start: holds a captured connection from a source not in the state yet (the app
    # sets it; ztunnel/pod_start.py). None: refused at once.
    source_hold: SourceHold | None = None
    # A failed or refused connection's log line, at most one per listener and outcome every
    # 10 s (with the count left out since): a flood of refusals must not become a log flood.
    # Every connection still gets its access-log line and its metrics.
    failure_log: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(
        log, 10.0, level=logging.INFO, what="such connections"))
    # In-pod mode (ztunnel/inpod.py): the pods whose network namespace the agent handed over.
    # A connection to one of their addresses is made from inside its namespace, one for a pod
    # (``via``) from inside the pod's.
    pods: InpodPods = field(default_factory=InpodPods)

    def __post_init__(self) -> None:
        self.limits = ConnectionLimits(self.config, self.metrics)

    @property
    def node(self) -> str:
        return self.config.node

    def pick(self, n: int) -> int:
        return self.rng.randrange(n) if n > 1 else 0

    def make_socket(self, family: int, via: str = "") -> socket.socket:
        """A socket for the ztunnel's own outgoing connections, marked so that capture rules
        never steer them back into the ztunnel; inside pod ``via``'s network namespace when it
        is an in-pod pod (its connections leave with its address)."""
        pod = self.pods.by_uid.get(via) if via else None
        sock = (socket_in(pod.netns, family) if pod is not None
                else socket.socket(family, socket.SOCK_STREAM))
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.config.socket_mark and self._mark_ok:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.config.socket_mark)
            except PermissionError:
                self._mark_ok = False
                log.warning("cannot set SO_MARK (needs CAP_NET_ADMIN): outgoing connections are "
                            "unmarked and must not be captured by other means")
        return sock

    async def connect_tcp(self, address: tuple[IPAddress, int], *,
                          source: IPAddress | None = None, via: InpodPod | None = None) \
            -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``address``. In-pod mode: to a pod of this node, from inside its
        namespace with ``source`` (the original client) as the source address; else, for pod
        ``via``, from inside that pod's namespace."""
        ip, port = address
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        local = self.pods.by_ip.get(ip)
        sock = self.make_socket(family, local.uid if local else via.uid if via else "")
        if local is not None and source is not None and source != ip:
            try:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.bind((str(source), 0))
            except OSError:
                sock.close()
                raise
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                await asyncio.get_running_loop().sock_connect(sock, (str(ip), port))
        except TimeoutError:
            sock.close()
            raise ConnectionRefusedError(errno.ETIMEDOUT, f"timed out connecting to {ip}:{port}")\
                from None
        except OSError:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=BACKEND_READ_LIMIT)


def sock_addr(sockaddr: Any) -> tuple[str, int]:
    return str(sockaddr[0]), int(sockaddr[1])


def reset(sock: socket.socket) -> None:
    """Close an accepted socket with a TCP RST (SO_LINGER 0), as a refused connection is
    closed: no FIN handshake, no TIME_WAIT, nothing read or written."""
    with contextlib.suppress(OSError):  # already reset by the peer: closing is all left
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# A listener's answer to its client once the outcome is known: ``rec.outcome`` is "ok" when the
# connection opened, else why it was refused (with the exception behind it, if any).
Answer = Callable[["ConnectionRecord", BaseException | None], None]


class ConnectionRecord:
    """Metrics and the access-log line for one proxied connection."""

    def __init__(
        self,
        ctx: ProxyContext,
        reporter: str,
        listener: str,
        source_ip: IPAddress,
        destination: tuple[IPAddress, int],
    ) -> None:
        self.ctx = ctx
        self.reporter = reporter
        self.listener = listener
        self.source_ip = source_ip
        self.destination = destination
        self.start = time.monotonic()
        self.source: Workload | None = None
        self.source_principal: str | None = None
        self.dest_workload: Workload | None = None
        self.service: Service | None = None
        self.mtls = False
        self.sent = 0
        self.received = 0
        self.outcome = "ok"
        self.reason = ""
        self.flags = "-"
        self.extra: dict[str, Any] = {}
        self._opened = False
        # Set by a listener that answers its client in its own protocol (SOCKS5): called once,
        # before any byte is relayed, when the connection opens or is refused (see refuse).
        self.answer: Answer | None = None
        self._answered = False
        self._labels: tuple[str, ...] | None = None
        self._sent_counter: Any = None
        self._received_counter: Any = None

    def labels(self) -> tuple[str, ...]:
        if self._labels is None:
            self._labels = ConnectionLabels(
                self.reporter, self.source, self.source_principal, self.dest_workload,
                self.service, self.mtls, self.flags).values()
        return self._labels

    def opened(self) -> None:
        """Count the connection as established (it will carry bytes). Its labels are fixed
        from here on, so opened, bytes and closed always pair up in the metrics."""
        self._opened = True
        labels = self.labels()
        m = self.ctx.metrics
        m.opened.labels(*labels).inc()
        m.active.labels(self.listener).inc()
        # Resolved once: byte counters are bumped for every chunk on the data path.
        self._sent_counter = m.sent.labels(*labels)
        self._received_counter = m.received.labels(*labels)
        if self.answer is not None and not self._answered:
            self._answered = True
            self.answer(self, None)

    def refuse(self, writer: asyncio.StreamWriter, error: BaseException | None = None) -> None:
        """Refuse the client after ``fail`` recorded why: with a reset (what a closed port gives
        a captured client), or, before the connection opened, with the listener's ``answer``;
        the caller's ``writer.close()`` then flushes that answer."""
        if self.answer is None or self._answered:
            writer.transport.abort()
        else:
            self._answered = True
            self.answer(self, error)

    def count_sent(self, n: int) -> None:
        self.sent += n
        self._sent_counter.inc(n)

    def count_received(self, n: int) -> None:
        self.received += n
        self._received_counter.inc(n)

    def authorize(self, policies: tuple[AuthorizationPolicy, ...], info: ConnectionInfo, *,
                  record_audit: bool = True) -> bool:
        """Authorize the connection against the policies selecting its destination; False if
        denied, with the denial recorded (outcome ``denied``, flag ``DENY``, the deciding
        policy in the access log and the denied metric). The caller then refuses the client
        in its own way (abort, or HTTP 403 on a tunnel)."""
        decision = authorize(policies, info)
        if record_audit and decision.audit:
            self.extra["audit"] = list(decision.audit)
        if decision.allowed:
            return True
        self.extra["policy"] = decision.policy
        self.fail("denied", decision.reason, "DENY")
        return False

    def fail(self, outcome: str, reason: str, flags: str) -> None:
        """Record how the connection ended. Before it opened, the flag goes into its metric
        labels (it is counted opened+closed as refused); after, only into the access log."""
        self.outcome, self.reason, self.flags = outcome, reason, flags
        if not self._opened:
            self._labels = None

    def finish(self) -> None:
        m = self.ctx.metrics
        if self._opened:
            m.active.labels(self.listener).dec()
            # Closed is counted with the labels it was opened with, so the pairs match.
            m.closed.labels(*self.labels()).inc()
        else:
            # Never established (denied, no route, upstream failure): opened+closed together
            # with the failure's response flag, as Istio reports refused connections.
            m.opened.labels(*self.labels()).inc()
            m.closed.labels(*self.labels()).inc()
        if self.outcome == "denied":
            m.denied.labels(self.reporter, self.extra.get("policy") or "-").inc()
        elif self.outcome not in ("ok", OVERFLOW):
            # A connection limit's refusals have their own counter and a rate-limited log
            # line (ztunnel/admission.py): a flood of them must not become a log flood.
            m.connection_errors.labels(self.listener, self.outcome).inc()
        self.ctx.access_log.write({
            "listener": self.listener,
            "reporter": self.reporter,
            "src": f"{self.source_ip}",
            "src_workload": self.source.uid if self.source else None,
            "src_identity": f"spiffe://{self.source_principal}" if self.source_principal
            else None,
            "dst": f"{self.destination[0]}:{self.destination[1]}",
            "dst_workload": self.dest_workload.uid if self.dest_workload else None,
            "dst_identity": str(self.dest_workload.identity) if self.dest_workload else None,
            "dst_service": self.service.hostname if self.service else None,
            "mtls": self.mtls,
            "bytes_sent": self.sent,
            "bytes_received": self.received,
            "duration_ms": round((time.monotonic() - self.start) * 1000, 3),
            "outcome": self.outcome,
            "response_flags": self.flags,
            "reason": self.reason or None,
            **self.extra,
        })
        if self.outcome not in ("ok", OVERFLOW):
            self.ctx.failure_log.log((self.listener, self.outcome), "%s %s -> %s:%s %s: %s",
                                     self.listener, self.source_ip, self.destination[0],
                                     self.destination[1], self.outcome, self.reason)


async def connect_and_relay(
    ctx: ProxyContext,
    rec: ConnectionRecord,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    address: tuple[IPAddress, int],
    client_to_upstream: Callable[[int], None],
    upstream_to_client: Callable[[int], None],
    *,
    source: IPAddress | None = None,
    via: InpodPod | None = None,
) -> None:
    """Plain-TCP delivery: connect to ``address`` and relay both ways. A refused connect
    (``UF``) or a mid-stream failure (``UC``) is recorded on ``rec`` and closes the client.
    ``source`` and ``via``: ``ProxyContext.connect_tcp``."""
    try:
        up_reader, up_writer = await ctx.connect_tcp(address, source=source, via=via)
    except OSError as e:
        rec.fail("connect_failed", f"{address[0]}:{address[1]}: {e.strerror or e}", "UF")
        rec.refuse(writer, e)
        return
    rec.opened()
    try:
        await relay_tcp(reader, writer, up_reader, up_writer, client_to_upstream,
                        upstream_to_client)
    except (ConnectionError, OSError) as e:
        rec.fail("error", f"{type(e).__name__}: {e}", "UC")
    finally:
        up_writer.close()

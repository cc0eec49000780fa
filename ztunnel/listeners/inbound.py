"""Inbound HBONE (``mesh.ports.HBONE_PORT``): terminate mutual TLS as the destination workload,
then serve each CONNECT tunnel to a pod on this node after L4 authorization.

The certificate presented is chosen by the connection's local address (the destination pod IP,
preserved by capture), not by SNI. The client's SPIFFE ID comes from its verified certificate.
The source IP for policy is the ``Forwarded: for=`` address when it belongs to a workload with
that same identity, else the TCP peer address, so a node cannot claim another pod's IP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl

from mesh.listener import finish_or_cancel
from mesh.ratelimit import RateLimitedLog
from mesh.spiffe import SpiffeId
from mesh.state.model import IPAddress
from ztunnel.authz import ConnectionInfo
from ztunnel.hbone.conn import HboneProtocol, HboneStream, PeerBudget
from ztunnel.hbone.core import parse_authority, parse_forwarded_for
from ztunnel.hbone.events import RequestRejected
from ztunnel.identity import IdentityError, peer_identity
from ztunnel.proxy import ConnectionRecord, ProxyContext, reset, sock_addr
from ztunnel.relay import relay_stream
from ztunnel.routing import NODE_PROTECTION, resolve_inbound

log = logging.getLogger("ztunnel.inbound")
LISTENER = "inbound"


class InboundServer:
    """Tracks inbound HBONE connections so draining can send them GOAWAY."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.connections: set[HboneProtocol] = set()
        self.tunnels: set[asyncio.Task[None]] = set()
        self.draining = False
        self.hbone_settings = ctx.config.hbone_settings()
        self._limit_log = RateLimitedLog(log)
        # One shared buffer budget per peer identity with a connection open (PeerBudget).
        self.peer_budgets: dict[str, PeerBudget] = {}

    def _hbone_error(self, cause: str, detail: str, peer: str) -> None:
        """A connection ended by the HBONE core (a limit or a protocol error): counted, and
        logged at most once per reason and 10 s, since a peer can repeat it at will."""
        self.ctx.metrics.connection_errors.labels(LISTENER, cause).inc()
        self._limit_log.log(cause, "inbound HBONE from %s closed: %s: %s", peer, cause, detail)

    def _error(self, reason: str, detail: str, peer: str) -> None:
        # Counted always, logged at most once per reason and 10 s: failed handshakes and bad
        # requests are the peer's to repeat.
        self.ctx.metrics.connection_errors.labels(LISTENER, reason).inc()
        self._limit_log.log(reason, "inbound HBONE from %s closed: %s: %s", peer, reason,
                            detail)

    async def handle(self, sock: socket.socket) -> None:
        # Connection limits per source IP and in total, checked before any work for the
        # connection (the TLS handshake above all): beyond them it is reset, counted and logged
        # at a bounded rate (ztunnel/admission.py). The slot is released however it ends.
        peer_ip, _ = sock_addr(sock.getpeername())
        with self.ctx.limits.hbone_accept.acquire(peer_ip) as slot:
            if not slot.admitted:
                reset(sock)
                return
            await self._serve(sock)

    async def _serve(self, sock: socket.socket) -> None:
        ctx = self.ctx
        peer_ip, peer_port = sock_addr(sock.getpeername())
        local_ip, _ = sock_addr(sock.getsockname())
        peer = f"{peer_ip}:{peer_port}"
        state = ctx.store.current
        dest = state.workload_by_ip(ipaddress.ip_address(local_ip))
        if dest is None or dest.node != ctx.node or not state.in_mesh(dest):
            self._error("unknown_destination", f"{local_ip} is not a mesh pod on this node", peer)
            return
        try:
            tls = await ctx.secrets.server_context(dest.identity)
        except IdentityError as e:
            self._error("no_certificate", str(e), peer)
            return
        loop = asyncio.get_running_loop()
        proto_box: list[HboneProtocol] = []

        def on_request(stream: HboneStream) -> None:
            task = asyncio.create_task(
                self._tunnel(proto_box[0], stream, ipaddress.ip_address(peer_ip), dest.identity))
            stream.cancel_on_reset(task)  # a tunnel reset before its answer dials nothing
            self.tunnels.add(task)
            task.add_done_callback(self.tunnels.discard)

        def on_rejected(e: RequestRejected) -> None:
            self._error("bad_request", f"HTTP {e.status}: {e.reason}", peer)

        def factory() -> HboneProtocol:
            p = HboneProtocol(False, on_request=on_request, on_rejected=on_rejected,
                              settings=self.hbone_settings,
                              on_error=lambda cause, detail: self._hbone_error(cause, detail, peer))
            proto_box.append(p)
            return p

        try:
            await loop.connect_accepted_socket(factory, sock=sock.dup(), ssl=tls,
                                               ssl_handshake_timeout=10)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as e:
            self._error("tls_handshake", f"{type(e).__name__}: {e}", peer)
            return
        proto = proto_box[0]
        # The limit per peer identity, known now: beyond it the connection gets GOAWAY and is
        # closed before it carries a tunnel.
        with ctx.limits.hbone_identity.acquire(peer_key(proto), peer) as slot:
            if not slot.admitted:
                proto.goaway("too many connections from this identity")
                if proto.transport is not None:
                    proto.transport.close()
                return
            self.connections.add(proto)
            if self.draining:
                proto.start_drain()
            key = peer_key(proto)
            limit = ctx.config.hbone_peer_buffer
            budget = self.peer_budgets.get(key)
            if budget is None and limit:
                budget = self.peer_budgets[key] = PeerBudget(limit)
            if budget is not None:
                proto.join_peer(budget)
            try:
                await proto.closed
            finally:
                proto.leave_peer()
                if budget is not None and not budget.members:
                    self.peer_budgets.pop(key, None)
                self.connections.discard(proto)

    async def _tunnel(self, proto: HboneProtocol, stream: HboneStream, peer_ip: IPAddress,
                      served: SpiffeId) -> None:
        ctx = self.ctx
        assert proto.transport is not None
        if stream.failed is not None:
            return  # reset by the peer before this task ran
        try:
            # The mesh's trust domain, not whatever the root would sign: see mesh.spiffe.
            client = peer_identity(proto.transport.get_extra_info("peercert"),
                                   ctx.store.current.config.trust_domain)
        except IdentityError as e:
            stream.reject(401)
            self._error(e.reason, str(e), str(peer_ip))
            return
        try:
            dest = parse_authority(stream.authority)
        except ValueError as e:
            stream.reject(400)
            self._error("bad_request", str(e), str(peer_ip))
            return
        state = ctx.store.current
        source_ip = peer_ip
        claimed = parse_forwarded_for(stream.headers.get("forwarded", ""))
        if claimed is not None:
            owner = state.workload_by_ip(claimed)
            if owner is not None and owner.identity == client:
                source_ip = claimed
        rec = ConnectionRecord(ctx, "destination", LISTENER, source_ip, dest)
        rec.mtls = True
        rec.source = state.workload_by_ip(source_ip)
        rec.source_principal = client.principal
        try:
            target = resolve_inbound(state, ctx.node, dest, ctx.reserved_ports, ctx.own)
            rec.dest_workload = target.destination
            if target.protected:
                # A peer must not use us to reach the node's admin or loopback services.
                stream.reject(403)
                rec.extra["policy"] = NODE_PROTECTION
                rec.fail("denied", target.reason, "DENY")
                return
            if target.address is None or target.destination is None:
                stream.reject(400)
                rec.fail("unknown_destination", target.reason, "NR")
                return
            if target.destination.identity != served:
                # The TLS connection proved one pod's identity; it may only reach that pod.
                stream.reject(400)
                rec.fail("wrong_destination",
                         f"tunnel to {target.destination.identity} over a connection for "
                         f"{served}", "NR")
                return
            if not rec.authorize(state.policies_for(target.destination), ConnectionInfo(
                    source_ip, dest[1], client.principal, client.namespace)):
                stream.reject(403)
                return
            try:
                # In-pod mode: from inside the pod, as the client (ProxyContext.connect_tcp).
                reader, writer = await ctx.connect_tcp(target.address, source=source_ip)
            except OSError as e:
                stream.reject(503)
                rec.fail("connect_failed", f"{dest[0]}:{dest[1]}: {e.strerror or e}", "UF")
                return
            if stream.failed is not None:  # reset by the peer while we dialled
                writer.close()
                rec.fail("client_reset", stream.failed, "DC")
                return
            stream.accept()
            rec.opened()
            try:
                await relay_stream(reader, writer, stream, rec.count_received, rec.count_sent)
            except Exception as e:
                rec.fail("error", f"{type(e).__name__}: {e}", "UC")
            finally:
                writer.close()
        finally:
            rec.finish()

    def start_drain(self) -> None:
        self.draining = True
        for proto in list(self.connections):
            proto.start_drain()

    async def drain(self, deadline: float) -> int:
        """Wait for open tunnels up to ``deadline``, then GOAWAY and close every connection.
        Returns how many tunnels had to be cut."""
        cut = await finish_or_cancel(self.tunnels, deadline)
        for proto in list(self.connections):
            proto.goaway("ztunnel shutting down")
            if proto.transport is not None:
                proto.transport.close()
        return cut


def peer_key(proto: HboneProtocol) -> str:
    """The peer's identity as the per-identity connection limit counts it: its certificate's
    URI SANs (one SPIFFE ID for a valid peer; tunnels check it properly, ``_tunnel``)."""
    cert = proto.transport.get_extra_info("peercert") if proto.transport is not None else None
    uris = sorted(v for k, v in (cert or {}).get("subjectAltName", ()) if k == "URI")
    return ",".join(uris) or "(no URI SAN)"

"""Inbound plaintext (15006): a connection to a mesh pod that did not arrive over HBONE
(from a client outside the mesh). PeerAuthentication decides: STRICT refuses it before any
byte is forwarded; PERMISSIVE (the default) admits it, subject to authorization with no
source identity (so principal and namespace rules cannot match it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from mesh.state.model import MtlsMode
from ztunnel.authz import ConnectionInfo
from ztunnel.inpod import original_dst
from ztunnel.proxy import ConnectionRecord, ProxyContext, connect_and_relay, reset, sock_addr
from ztunnel.routing import NODE_PROTECTION, resolve_inbound

LISTENER = "inbound_plaintext"


async def handle(ctx: ProxyContext, sock: socket.socket, redirected: bool = False) -> None:
    """``redirected``: in-pod mode, the original destination is the REDIRECT's."""
    src, _ = sock_addr(sock.getpeername())
    # Connection limits per source IP and in total: beyond them, a reset before anything else
    # (counted and logged at a bounded rate by the limits, no access-log line: a flood from
    # outside the mesh must stay cheap); the slot is released however the handler ends.
    with ctx.limits.plaintext.acquire(src) as slot:
        if not slot.admitted:
            reset(sock)
            return
        await _serve(ctx, sock, src, redirected)


async def _serve(ctx: ProxyContext, sock: socket.socket, src: str, redirected: bool) -> None:
    source_ip = ipaddress.ip_address(src)
    if redirected:
        dest = original_dst(sock)
    else:
        dst_ip, dst_port = sock_addr(sock.getsockname())
        dest = (ipaddress.ip_address(dst_ip), dst_port)
    reader, writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
    state = ctx.store.current
    rec = ConnectionRecord(ctx, "destination", LISTENER, source_ip, dest)
    rec.source = state.workload_by_ip(source_ip)
    try:
        target = resolve_inbound(state, ctx.node, dest, ctx.reserved_ports, ctx.own)
        dst = rec.dest_workload = target.destination
        # PeerAuthentication first: a STRICT pod refuses plaintext whatever else is wrong.
        if (dst is not None and dst.node == ctx.node and state.in_mesh(dst)
                and state.mtls_mode(dst, dest[1]) is MtlsMode.STRICT):
            rec.fail("denied", f"plaintext refused: PeerAuthentication is STRICT for "
                     f"{dst.uid}", "DENY")
            rec.extra["policy"] = "peer-authentication"
            writer.transport.abort()
            return
        if target.protected:  # the node itself (loopback, its own ports): a denial
            rec.extra["policy"] = NODE_PROTECTION
            rec.fail("denied", target.reason, "DENY")
            writer.transport.abort()
            return
        if target.address is None or target.destination is None:
            rec.fail("unknown_destination", target.reason, "NR")
            writer.transport.abort()
            return
        # Unlike the HBONE listeners, this one has never put AUDIT matches in the access log.
        if not rec.authorize(state.policies_for(target.destination),
                             ConnectionInfo(source_ip, dest[1]), record_audit=False):
            writer.transport.abort()
            return
        await connect_and_relay(ctx, rec, reader, writer, target.address, rec.count_received,
                                rec.count_sent, source=source_ip)
    finally:
        rec.finish()
        writer.close()

"""Outbound: a local workload's connection, captured (15001) or via SOCKS5 (15080), carried
to its destination as the routing plan says: HBONE to a remote node, HBONE to a waypoint
instance for a service bound to one, policy-checked direct delivery to a pod on this node, or
passthrough for destinations outside the mesh.

Under capture, the original destination is ``getsockname()`` of the accepted socket (TPROXY
and eBPF ``sk_assign`` both preserve it); in in-pod mode (``via``, the pod whose listener it
is) the REDIRECT's ``SO_ORIGINAL_DST``, and the connection leaves from inside the pod.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import assert_never

import h2.errors

from mesh.ports import HBONE_PORT
from mesh.state.model import IPAddress, Workload
from ztunnel.admission import OVERFLOW, OVERFLOW_FLAG
from ztunnel.authz import ConnectionInfo
from ztunnel.hbone.conn import StreamError
from ztunnel.hbone.core import format_authority, forwarded_for
from ztunnel.hbone.pool import PoolKey, UpstreamConnectError
from ztunnel.inpod import InpodPod, original_dst
from ztunnel.peer_metadata import baggage_headers
from ztunnel.proxy import (
    Answer,
    ConnectionRecord,
    ProxyContext,
    connect_and_relay,
    reset,
    sock_addr,
)
from ztunnel.relay import relay_stream
from ztunnel.routing import (
    NODE_PROTECTION,
    DenyPlan,
    HbonePlan,
    LocalPlan,
    PassthroughPlan,
    WaypointPlan,
    plan_outbound,
)

LISTENER = "outbound"
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM


async def handle_captured(ctx: ProxyContext, sock: socket.socket,
                          via: InpodPod | None = None) -> None:
    src, _ = sock_addr(sock.getpeername())
    source_ip = ipaddress.ip_address(src)
    if via is not None:
        dest = original_dst(sock)
    else:
        dst_ip, dst_port = sock_addr(sock.getsockname())
        dest = (ipaddress.ip_address(dst_ip), dst_port)
    # Connection limit per local pod (by its uid; a source the state does not know, by IP):
    # the slot is held while the connection lives and released however the handler ends.
    source = ctx.store.current.workload_by_ip(source_ip)
    if source is None and ctx.source_hold is not None:
        # Pod start: a pod the state does not name yet (its first connection may come before
        # the push): hold it, bounded, until a state change names it; then plan as usual
        # (proxy_outbound reads the state again). Still unknown: refused as unknown source.
        source = await ctx.source_hold.wait_for(source_ip)
    with ctx.limits.outbound.acquire(source.uid if source else src, src) as slot:
        if not slot.admitted:
            _refuse_overflow(ctx, sock, source_ip, dest, source, slot.decision.message)
            return
        reader, writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
        await proxy_outbound(ctx, reader, writer, source_ip, dest, LISTENER, via=via)


def _refuse_overflow(ctx: ProxyContext, sock: socket.socket, source_ip: IPAddress,
                     dest: tuple[IPAddress, int], source: Workload | None, why: str) -> None:
    """Reset a connection beyond the pod's limit, recorded like any refusal: opened+closed
    with flag ``UO`` (Envoy's upstream overflow) and an access-log line; the log line is the
    limits' rate-limited one."""
    reset(sock)
    rec = ConnectionRecord(ctx, "source", LISTENER, source_ip, dest)
    rec.source = source
    rec.source_principal = source.identity.principal if source is not None else None
    rec.fail(OVERFLOW, why, OVERFLOW_FLAG)
    rec.finish()


async def proxy_outbound(
    ctx: ProxyContext,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    source_ip: IPAddress,
    dest: tuple[IPAddress, int],
    listener: str,
    answer: Answer | None = None,
    via: InpodPod | None = None,
) -> None:
    """Route, check and carry one connection. A refused one is reset, unless ``answer`` is
    given: it is then told the outcome (before any byte is relayed) and the client is closed.
    ``via``: the in-pod pod it comes from (its connections leave from inside that pod)."""
    state = ctx.store.current
    plan = plan_outbound(state, ctx.node, source_ip, dest, ctx.pick,
                         hbone_port=ctx.config.inbound_port or HBONE_PORT, own=ctx.own)
    rec = ConnectionRecord(ctx, "source", listener, source_ip, dest)
    rec.answer = answer
    rec.source, rec.service = plan.source, plan.service
    rec.dest_workload = None if isinstance(plan, DenyPlan) else plan.destination
    rec.source_principal = plan.source.identity.principal if plan.source else None
    rec.extra["plan"] = plan.kind.value
    if isinstance(plan, WaypointPlan | DenyPlan) and plan.waypoint is not None:
        # The destination workload/identity are the waypoint instance's; this says why.
        rec.extra["waypoint"] = plan.waypoint.key
    try:
        match plan:
            case DenyPlan() if plan.protected:
                # The node itself (loopback, its own ports): a denial (SOCKS5 0x02), not NR.
                rec.extra["policy"] = NODE_PROTECTION
                rec.fail("denied", plan.reason, "DENY")
                rec.refuse(writer)
            case DenyPlan():
                rec.fail("no_route", plan.reason, "NR")
                rec.refuse(writer)
            case HbonePlan() | WaypointPlan():
                await _via_hbone(ctx, plan, reader, writer, rec, via)
            case LocalPlan():
                await _local(ctx, plan, reader, writer, rec)
            case PassthroughPlan():
                await connect_and_relay(ctx, rec, reader, writer, plan.address, rec.count_sent,
                                        rec.count_received, via=via)
            case _:
                assert_never(plan)
    except (ConnectionError, OSError, StreamError) as e:
        if rec.outcome == "ok":
            rec.fail("error", f"{type(e).__name__}: {e}", "UC")
        rec.refuse(writer, e)
    finally:
        rec.finish()
        writer.close()


async def _local(ctx: ProxyContext, plan: LocalPlan, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, rec: ConnectionRecord) -> None:
    # Same node: we are also the destination's ztunnel, so enforce its inbound policy here.
    ident = plan.source.identity
    rec.mtls = True  # identity is established by the node itself, as in Istio's fast path
    if not rec.authorize(ctx.store.current.policies_for(plan.destination), ConnectionInfo(
            rec.source_ip, plan.address[1], ident.principal, ident.namespace)):
        rec.refuse(writer)
        return
    # In-pod mode: from inside the destination pod, as the client (ProxyContext.connect_tcp).
    await connect_and_relay(ctx, rec, reader, writer, plan.address, rec.count_sent,
                            rec.count_received, source=rec.source_ip)


async def _via_hbone(ctx: ProxyContext, plan: HbonePlan | WaypointPlan,
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     rec: ConnectionRecord, via: InpodPod | None = None) -> None:
    assert ctx.pool is not None
    rec.mtls = True
    # A waypoint instance is pooled like a ztunnel: its address and identity are in the key;
    # in-pod mode, the pod it leaves from too.
    key = PoolKey(plan.source.identity, plan.expected_identity,
                  (str(plan.address[0]), plan.address[1]), via.uid if via else "")
    authority = format_authority(*plan.target)
    headers = [("forwarded", forwarded_for(rec.source_ip)), *baggage_headers(plan.source)]
    for attempt in (1, 2):
        try:
            stream = await ctx.pool.open_stream(key, authority, headers)
            async with asyncio.timeout(ctx.config.connect_timeout):
                await stream.response
            break
        except UpstreamConnectError as e:
            rec.fail("connect_failed", str(e), e.flag)
        except StreamError as e:
            if stream.reset_code == REFUSED_STREAM and attempt == 1:
                continue  # the peer is draining that connection; the pool opens another
            flags = "DENY" if stream.refused_status == 403 else "UF"
            rec.fail("denied" if flags == "DENY" else "connect_failed",
                     f"{key.address[0]}:{key.address[1]}: {e}", flags)
        except TimeoutError:
            rec.fail("connect_failed", f"no answer to CONNECT {authority} from {key.address}",
                     "UF")
            stream.reset()
        rec.refuse(writer)
        return
    rec.opened()
    await relay_stream(reader, writer, stream, rec.count_sent, rec.count_received)

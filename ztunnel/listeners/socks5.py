"""SOCKS5 outbound listener (15080, off by default): lets a client use the mesh without any
capture, and lets tests drive the outbound path. RFC 1928, no authentication, CONNECT only.
Hostnames resolve against mesh service hostnames first, then the system resolver.

The message parsing is pure (``parse_greeting``/``parse_request``) so malformed input is unit
tested without sockets. The reply to CONNECT waits for the outcome (``proxy_outbound``'s
answer): success only once routing and policy allowed the connection and the upstream is
connected, else the RFC 1928 error that fits, then close.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
import struct
from dataclasses import dataclass

from mesh.state.model import IPAddress
from ztunnel.listeners.outbound import proxy_outbound
from ztunnel.proxy import ConnectionRecord, ProxyContext, reset, sock_addr

LISTENER = "socks5"
VERSION = 5
NO_AUTH = 0
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 1
ATYP_V4, ATYP_DOMAIN, ATYP_V6 = 1, 3, 4
# RFC 1928 section 6 reply codes.
REP_OK, REP_FAILURE, REP_NOT_ALLOWED, REP_NET_UNREACHABLE = 0, 1, 2, 3
REP_HOST_UNREACHABLE, REP_REFUSED = 4, 5
REP_CMD_UNSUPPORTED, REP_ATYP_UNSUPPORTED = 7, 8
# A hostname as DNS spells it (and nothing getaddrinfo could choke on, like NUL).
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")


class SocksError(Exception):
    def __init__(self, message: str, reply: int = REP_FAILURE) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class SocksRequest:
    host: str
    port: int
    is_domain: bool


def greeting_length(head: bytes) -> int:
    """Total length of a greeting given its first 2 bytes, checked before reading the rest (a
    SOCKS4 or HTTP client is refused at once, not after reading what its byte 2 claims)."""
    if len(head) < 2 or head[0] != VERSION:
        raise SocksError(f"not a SOCKS5 greeting (first bytes {head[:2]!r})")
    if head[1] == 0:
        raise SocksError("SOCKS5 greeting offers no method")
    return 2 + head[1]


def parse_greeting(data: bytes) -> list[int]:
    """``VER NMETHODS METHODS...`` -> methods; raises SocksError on anything else."""
    if len(data) != greeting_length(data[:2]):
        raise SocksError("SOCKS5 greeting has a wrong method count")
    return list(data[2:])


def request_length(head: bytes) -> int:
    """Total length of a request given its first 5 bytes."""
    if len(head) < 5 or head[0] != VERSION:
        raise SocksError("not a SOCKS5 request")
    atyp = head[3]
    if atyp == ATYP_V4:
        return 10
    if atyp == ATYP_V6:
        return 22
    if atyp == ATYP_DOMAIN:
        return 7 + head[4]
    raise SocksError(f"address type {atyp} is not supported", REP_ATYP_UNSUPPORTED)


def parse_request(data: bytes) -> SocksRequest:
    if len(data) < 5 or data[0] != VERSION:
        raise SocksError("not a SOCKS5 request")
    if data[1] != CMD_CONNECT:
        raise SocksError(f"command {data[1]} is not supported (CONNECT only)",
                         REP_CMD_UNSUPPORTED)
    atyp = data[3]
    if len(data) != request_length(data[:5]):
        raise SocksError("SOCKS5 request has a wrong length")
    (port,) = struct.unpack("!H", data[-2:])
    if port == 0:
        raise SocksError("SOCKS5 request names port 0")
    if atyp == ATYP_V4:
        return SocksRequest(str(ipaddress.IPv4Address(data[4:8])), port, False)
    if atyp == ATYP_V6:
        return SocksRequest(str(ipaddress.IPv6Address(data[4:20])), port, False)
    try:
        host = data[5:5 + data[4]].decode("ascii")
    except UnicodeDecodeError:
        raise SocksError("SOCKS5 hostname is not ASCII") from None
    if not _HOSTNAME.fullmatch(host):
        raise SocksError(f"SOCKS5 hostname {host[:64]!r} is not a DNS name")
    return SocksRequest(host, port, True)


def reply(code: int) -> bytes:
    return bytes([VERSION, code, 0, ATYP_V4, 0, 0, 0, 0, 0, 0])


def outcome_reply(outcome: str, error: BaseException | None = None) -> int:
    """The reply for a ``ConnectionRecord`` outcome (``proxy_outbound``'s answer)."""
    if outcome == "ok":
        return REP_OK
    if outcome == "denied":  # an authorization policy, here or at the destination
        return REP_NOT_ALLOWED
    if outcome == "no_route":  # unknown source, no endpoint, no waypoint instance
        return REP_HOST_UNREACHABLE
    if outcome == "connect_failed":
        code = error.errno if isinstance(error, OSError) else None
        if code == errno.ECONNREFUSED:
            return REP_REFUSED
        if code == errno.ENETUNREACH:
            return REP_NET_UNREACHABLE
        return REP_HOST_UNREACHABLE  # timeouts, unreachable peers, HBONE refusals
    return REP_FAILURE


async def _resolve(ctx: ProxyContext, req: SocksRequest) -> IPAddress:
    if not req.is_domain:
        return ipaddress.ip_address(req.host)
    for svc in ctx.store.current.config.services:
        if svc.vips and req.host in (svc.hostname, f"{svc.name}.{svc.namespace}"):
            return svc.vips[0]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(req.host, req.port,
                                                             type=socket.SOCK_STREAM)
    except OSError:
        raise SocksError(f"cannot resolve {req.host}", REP_HOST_UNREACHABLE) from None
    return ipaddress.ip_address(infos[0][4][0])


async def handle(ctx: ProxyContext, sock: socket.socket) -> None:
    src_ip, _ = sock_addr(sock.getpeername())
    # Connection limit in total: beyond it, a reset before the greeting is read (counted and
    # logged at a bounded rate by the limits); the slot is released however the handler ends.
    with ctx.limits.socks5.acquire("", src_ip) as slot:
        if not slot.admitted:
            reset(sock)
            return
        await _serve(ctx, sock, src_ip)


async def _serve(ctx: ProxyContext, sock: socket.socket, src_ip: str) -> None:
    reader, writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
    greeted = False
    try:
        async with asyncio.timeout(10):
            head = await reader.readexactly(2)
            greeting = head + await reader.readexactly(greeting_length(head) - 2)
            if NO_AUTH not in parse_greeting(greeting):
                raise SocksError("client offers no acceptable auth method (only 'no auth')")
            writer.write(bytes([VERSION, NO_AUTH]))
            greeted = True
            head = await reader.readexactly(5)
            req = parse_request(head + await reader.readexactly(request_length(head) - 5))
            dest_ip = await _resolve(ctx, req)
    except SocksError as e:
        # Each stage refuses in its own message: the method selection, then the reply.
        if not writer.is_closing():
            writer.write(reply(e.reply) if greeted else bytes([VERSION, NO_ACCEPTABLE]))
        ctx.metrics.connection_errors.labels(LISTENER, "bad_request").inc()
        writer.close()
        raise
    except (asyncio.IncompleteReadError, TimeoutError):
        ctx.metrics.connection_errors.labels(LISTENER, "bad_request").inc()
        writer.close()
        raise SocksError("incomplete SOCKS5 handshake") from None

    def answer(rec: ConnectionRecord, error: BaseException | None) -> None:
        # Called once routing, policy and the upstream connect have decided, before any byte
        # is relayed, so the client never sees success for a connection that then fails.
        writer.write(reply(outcome_reply(rec.outcome, error)))

    await proxy_outbound(ctx, reader, writer, ipaddress.ip_address(src_ip),
                         (dest_ip, req.port), LISTENER, answer)

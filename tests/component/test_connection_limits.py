"""Connection limits on two ztunnels on loopback: the connection beyond a limit is refused
while another source is still served, closing one frees its place, and each refusal is
counted and logged at a bounded rate (ztunnel/admission.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from mesh.listener import Listener, bind_socket
from mesh.spiffe import SpiffeId
from tests.component.harness import (
    CLIENT_IP,
    ECHO_IP,
    ECHO_PORT,
    NET,
    OTHER_CLIENT_IP,
    TD,
    Mesh,
    base_state,
    exchange,
    sample,
)
from tests.component.waiting import until
from ztunnel.accesslog import AccessLog
from ztunnel.app import Ztunnel
from ztunnel.listeners import inbound_plaintext, outbound

# Sources that are no pods: peers dialling 15008/15006 from addresses of their own.
PEER_1, PEER_2, PEER_3 = (f"127.{NET}.50.{i}" for i in (1, 2, 3))
# A workload outside the mesh on node-b: where the captured outbound test connects to.
LEGACY_IP, LEGACY_PORT = f"127.{NET}.60.1", 7070
# A port of the echo pod where plaintext "captured" into ztunnel B arrives (see _captured).
PLAIN_PORT = 7071

wait_for = partial(until, limit=5.0, interval=0.02)
CLIENT = SpiffeId(TD, "default", "client")
OTHER = SpiffeId(TD, "other", "other")


def refused_total(zt: Ztunnel, listener: str, reason: str) -> float:
    return sample(zt, "ambit_ztunnel_connections_refused_total", listener=listener,
                  reason=reason)


class RawHbone:
    """An HBONE client by hand over mTLS from a chosen source address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))

    @classmethod
    async def open(cls, m: Mesh, source: str, identity: SpiffeId = CLIENT) -> RawHbone:
        """Raises OSError when the server resets the connection before the handshake."""
        ctx = await m.a.secrets.client_context(identity)
        r, w = await asyncio.wait_for(asyncio.open_connection(
            ECHO_IP, 15008, ssl=ctx, server_hostname=ECHO_IP, local_addr=(source, 0)), 5)
        return cls(r, w)

    async def tunnel(self) -> str | None:
        """CONNECT to the echo pod and bounce a byte: the status, or None when the server
        ended the connection instead of answering. The tunnel stays open."""
        self.conn.initiate_connection()
        self.conn.send_headers(1, [(":method", "CONNECT"),
                                   (":authority", f"{ECHO_IP}:{ECHO_PORT}")])
        self.w.write(self.conn.data_to_send())
        try:
            async with asyncio.timeout(5):
                while True:
                    data = await self.r.read(65536)
                    if not data:
                        return None
                    for e in self.conn.receive_data(data):
                        if isinstance(e, h2.events.ResponseReceived):
                            return dict(e.headers)[b":status"].decode()
                        if isinstance(e, h2.events.ConnectionTerminated | h2.events.StreamReset):
                            return None
                    self.w.write(self.conn.data_to_send())
        except (ConnectionError, OSError):
            return None

    def close(self) -> None:
        self.w.close()


async def test_hbone_per_ip_limit_refuses_before_the_handshake(tmp_path: Path) -> None:
    m = Mesh(tmp_path)
    m.b.config.max_hbone_connections_per_ip = 2
    async with m:
        held = [await RawHbone.open(m, PEER_1) for _ in range(2)]
        for h in held:
            assert await h.tunnel() == "200"
        # The third from that IP is reset before a TLS handshake is spent on it.
        with pytest.raises(OSError):
            await RawHbone.open(m, PEER_1)
        assert refused_total(m.b, "inbound", "per_ip") == 1
        assert sample(m.b, "ambit_ztunnel_connection_errors_total", reason="tls_handshake") == 0
        # Other sources are served meanwhile: another peer, and ztunnel A's own traffic.
        other = await RawHbone.open(m, PEER_2)
        assert await other.tunnel() == "200"
        r, w = await m.connect()
        assert await exchange(r, w, b"alive") == b"alive"
        # Closing one frees its place.
        held[0].close()
        await wait_for(lambda: m.b.ctx.limits.hbone_accept.by_key.get(PEER_1) == 1,
                       "the closed connection's slot released")
        again = await RawHbone.open(m, PEER_1)
        assert await again.tunnel() == "200"
        for h in (held[1], other, again):
            h.close()
        await wait_for(lambda: not m.b.ctx.limits.hbone_accept.by_key.get(PEER_1),
                       "every slot of the peer released")


async def test_hbone_total_limit(tmp_path: Path) -> None:
    m = Mesh(tmp_path)
    m.b.config.max_hbone_connections = 2
    m.b.config.max_hbone_connections_per_ip = 0  # unlimited: the total decides
    async with m:
        held = [await RawHbone.open(m, p) for p in (PEER_1, PEER_2)]
        with pytest.raises(OSError):
            await RawHbone.open(m, PEER_3)
        assert refused_total(m.b, "inbound", "total") == 1
        held[1].close()
        await wait_for(lambda: m.b.ctx.limits.hbone_accept.total == 1, "a place freed")
        third = await RawHbone.open(m, PEER_3)
        assert await third.tunnel() == "200"
        for h in (held[0], third):
            h.close()


async def test_hbone_per_identity_limit_closes_after_the_handshake(tmp_path: Path) -> None:
    m = Mesh(tmp_path)
    m.b.config.max_hbone_connections_per_identity = 1
    async with m:
        first = await RawHbone.open(m, PEER_1, CLIENT)
        assert await first.tunnel() == "200"
        # The same identity from another IP: the handshake completes (the identity is only
        # known then), then GOAWAY and close, no tunnel.
        second = await RawHbone.open(m, PEER_2, CLIENT)
        assert await second.tunnel() is None
        second.close()
        assert refused_total(m.b, "inbound", "per_identity") == 1
        # Another identity is served, over ztunnel A as well; the capped identity is not.
        other = await RawHbone.open(m, PEER_2, OTHER)
        assert await other.tunnel() == "200"
        other.close()
        key = f"spiffe://{TD}/ns/other/sa/other"
        await wait_for(lambda: not m.b.ctx.limits.hbone_identity.by_key.get(key),
                       "the other identity's slot released")
        r, w = await m.connect(source=OTHER_CLIENT_IP)
        assert await exchange(r, w, b"other") == b"other"
        with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
            r, w = await m.connect(source=CLIENT_IP)
            if await exchange(r, w, b"capped") != b"capped":
                raise ConnectionError("no bytes back")
        # Closing the first frees the identity's place.
        first.close()
        key = f"spiffe://{TD}/ns/default/sa/client"
        await wait_for(lambda: not m.b.ctx.limits.hbone_identity.by_key.get(key),
                       "the identity's slot released")
        r, w = await m.connect(source=CLIENT_IP)
        assert await exchange(r, w, b"freed") == b"freed"


async def _plaintext(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(ECHO_IP, PLAIN_PORT, local_addr=(source, 0))


def _captured_plaintext(m: Mesh) -> contextlib.AbstractAsyncContextManager[None]:
    """Plaintext from the peers to the echo pod's PLAIN_PORT, into ztunnel B's 15006 handler."""
    return _captured((ECHO_IP, PLAIN_PORT), (PEER_1, PEER_2, PEER_3),
                     partial(inbound_plaintext.handle, m.b.ctx))


async def _served(r: asyncio.StreamReader, w: asyncio.StreamWriter, payload: bytes) -> bool:
    """Bounce ``payload`` without closing: True if it came back."""
    try:
        w.write(payload)
        return await asyncio.wait_for(r.readexactly(len(payload)), 5) == payload
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        return False


async def test_plaintext_per_ip_limit_and_a_flood_is_a_few_log_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = Mesh(tmp_path)
    m.b.config.max_plaintext_connections_per_ip = 1
    async with m, _captured_plaintext(m):
        r1, w1 = await _plaintext(PEER_1)
        assert await _served(r1, w1, b"one")
        with caplog.at_level(logging.INFO, "ztunnel"):
            for _ in range(1000):
                r, w = await _plaintext(PEER_1)
                assert not await _served(r, w, b"x")
                w.close()
        assert refused_total(m.b, "inbound_plaintext", "per_ip") == 1000
        # A flood of refusals is one line (per listener and reason per 10 s), nothing else.
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("ztunnel")]
        assert len(lines) == 1, lines[:5]
        assert lines[0].startswith(f"inbound_plaintext: refused a connection from {PEER_1}: "
                                   f"1 connections already open from source IP {PEER_1}")
        # Another source is served meanwhile; closing the first frees its place.
        r2, w2 = await _plaintext(PEER_2)
        assert await _served(r2, w2, b"two")
        w1.close()
        await wait_for(lambda: not m.b.ctx.limits.plaintext.by_key.get(PEER_1), "slot freed")
        r3, w3 = await _plaintext(PEER_1)
        assert await _served(r3, w3, b"three")
        w2.close()
        w3.close()


async def test_plaintext_total_limit(tmp_path: Path) -> None:
    m = Mesh(tmp_path)
    m.b.config.max_plaintext_connections = 1
    async with m, _captured_plaintext(m):
        r1, w1 = await _plaintext(PEER_1)
        assert await _served(r1, w1, b"one")
        r2, w2 = await _plaintext(PEER_2)
        assert not await _served(r2, w2, b"two")
        assert refused_total(m.b, "inbound_plaintext", "total") == 1
        w1.close()
        w2.close()


@contextlib.asynccontextmanager
async def _captured(address: tuple[str, int], sources: tuple[str, ...],
                    handle: Callable[[socket.socket], Awaitable[None]]) -> AsyncIterator[None]:
    """Capture without capture: a listener on a pod's address hands connections from
    ``sources`` to a ztunnel handler (their original destination is the listener's address,
    as under TPROXY) and echoes every other, i.e. the ztunnel's own connection to that
    destination, as capture leaves the ztunnel's own connections alone."""
    async def echo(sock: socket.socket) -> None:
        r, w = await asyncio.open_connection(sock=sock)
        while data := await r.read(65536):
            w.write(data)
        w.close()

    async def handler(sock: socket.socket) -> None:
        if sock.getpeername()[0] in sources:
            await handle(sock)
        else:
            await echo(sock)

    listener = Listener("captured", bind_socket(*address), handler)
    listener.start()
    try:
        yield
    finally:
        listener.close()


async def _from_pod(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(LEGACY_IP, LEGACY_PORT, local_addr=(source, 0))


async def test_outbound_per_pod_limit_is_recorded_like_a_refusal(tmp_path: Path) -> None:
    state = base_state()
    state["workloads"].append({"name": "legacy", "namespace": "default", "node": "node-b",
                               "addresses": [LEGACY_IP], "protocol": "TCP"})
    m = Mesh(tmp_path, state)
    m.a.config.max_outbound_connections_per_pod = 2
    access = tmp_path / "access-a.log"
    m.a.ctx.access_log = AccessLog(str(access))
    async with m, _captured((LEGACY_IP, LEGACY_PORT), (CLIENT_IP, OTHER_CLIENT_IP),
                            partial(outbound.handle_captured, m.a.ctx)):
        held = [await _from_pod(CLIENT_IP) for _ in range(2)]
        for r, w in held:
            assert await _served(r, w, b"held")
        r, w = await _from_pod(CLIENT_IP)
        assert not await _served(r, w, b"over")  # reset
        w.close()
        assert refused_total(m.a, "outbound", "per_pod") == 1
        assert sample(m.a, "istio_tcp_connections_opened_total", response_flags="UO",
                      source_workload="client", reporter="source") == 1
        assert sample(m.a, "istio_tcp_connections_closed_total", response_flags="UO") == 1
        # Another pod is served meanwhile.
        r2, w2 = await _from_pod(OTHER_CLIENT_IP)
        assert await _served(r2, w2, b"other pod")
        # Closing one frees the pod's place.
        held[0][1].close()
        pod = m.a.store.current.workload_by_ip(ipaddress.ip_address(CLIENT_IP))
        assert pod is not None
        await wait_for(lambda: m.a.ctx.limits.outbound.by_key.get(pod.uid) == 1, "slot freed")
        r3, w3 = await _from_pod(CLIENT_IP)
        assert await _served(r3, w3, b"freed")
        for wr in (held[1][1], w2, w3):
            wr.close()
        await wait_for(lambda: not m.a.ctx.limits.outbound.by_key, "every slot released")
    records = [json.loads(line) for line in access.read_text().splitlines()]
    over = [x for x in records if x["outcome"] == "overflow"]
    assert len(over) == 1
    assert over[0]["response_flags"] == "UO" and over[0]["src"] == CLIENT_IP
    assert "connections already open from pod" in over[0]["reason"]


async def test_socks5_total_limit(tmp_path: Path) -> None:
    m = Mesh(tmp_path)
    m.a.config.max_socks5_connections = 1
    async with m:
        r1, w1 = await m.connect()
        with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(m.connect(source=OTHER_CLIENT_IP), 5)
        assert refused_total(m.a, "socks5", "total") == 1
        assert await exchange(r1, w1, b"first") == b"first"
        await wait_for(lambda: m.a.ctx.limits.socks5.total == 0, "slot freed")
        r2, w2 = await m.connect(source=OTHER_CLIENT_IP)
        assert await exchange(r2, w2, b"second") == b"second"

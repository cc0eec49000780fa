"""HBONE limits over real mTLS connections: an attacker client holding a valid mesh
certificate speaks raw HTTP/2 to ztunnel B; its connection must be closed within a bounded
time while a legitimate client, on its own connection, is served during and after."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import struct
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.settings
import pytest

from mesh.spiffe import SpiffeId
from tests.component.harness import ECHO_IP, TD, Mesh, exchange, mesh, sample
from tests.component.waiting import until
from tests.unit.test_hbone_limits import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    frames_of,
)


class Attacker:
    """A TLS connection to ztunnel B's HBONE port that sends whatever bytes it is told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = b""

    @classmethod
    async def open(cls, m: Mesh) -> Attacker:
        ctx = await m.a.secrets.client_context(SpiffeId(TD, "default", "client"))
        r, w = await asyncio.open_connection(ECHO_IP, 15008, ssl=ctx, server_hostname=ECHO_IP)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed_within(self, limit: float) -> float:
        """Read until the server closes; the seconds it took (fails after ``limit``)."""
        start = time.monotonic()
        async with asyncio.timeout(limit):
            while data := await self.reader.read(65536):
                self.received += data
        self.writer.close()
        return time.monotonic() - start

    def goaway_code(self) -> int | None:
        for ftype, _, _, payload in frames_of(self.received):
            if ftype == GOAWAY:
                return int.from_bytes(payload[4:8], "big")
        return None


async def served(m: Mesh, payload: bytes = b"legit") -> bool:
    r, w = await m.connect()
    return await asyncio.wait_for(exchange(r, w, payload), 5) == payload


def connect_block() -> bytes:
    def literal(name: bytes, value: bytes) -> bytes:
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
    return literal(b":method", b"CONNECT") + literal(b":authority", f"{ECHO_IP}:8080".encode())


async def test_oversized_frame_header_closes_before_its_payload(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        assert await served(m)
        attackers = [await Attacker.open(m) for _ in range(8)]
        for a in attackers:
            # A DATA frame header declaring 16 MiB; the payload is never sent.
            await a.send(PREFACE + frame(SETTINGS) + frame(DATA, 0, 1, length=(16 << 20) - 1)
                         + b"x" * 1000)
        assert await served(m)  # a legitimate client, during the attack
        for a in attackers:
            assert await a.closed_within(3) < 3
            assert a.goaway_code() == h2.errors.ErrorCodes.FRAME_SIZE_ERROR
        assert sample(m.b, "ambit_ztunnel_connection_errors_total",
                      reason="frame_too_large") == 8
        assert await served(m)


async def test_continuation_flood_is_cut(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        attackers = [await Attacker.open(m) for _ in range(8)]
        block = connect_block()
        for a in attackers:
            await a.send(PREFACE + frame(SETTINGS) + frame(HEADERS, 0, 1, block[:4]))
            # Endless CONTINUATIONs, never END_HEADERS; the server must stop it early.
            try:
                for _ in range(200):
                    await a.send(frame(CONTINUATION, 0, 1, b"\x00" * 64))
            except (ConnectionError, OSError):
                pass
        assert await served(m)
        for a in attackers:
            await a.closed_within(3)
            assert a.goaway_code() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert sample(m.b, "ambit_ztunnel_connection_errors_total",
                      reason="continuation_flood") == 8
        assert await served(m)


async def test_no_settings_first_is_refused(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        a = await Attacker.open(m)
        await a.send(PREFACE + frame(HEADERS, END_HEADERS, 1, connect_block()))
        await a.closed_within(3)
        assert a.goaway_code() == h2.errors.ErrorCodes.PROTOCOL_ERROR
        assert sample(m.b, "ambit_ztunnel_connection_errors_total", reason="bad_preface") == 1
        assert await served(m)


async def test_rapid_reset_dials_nothing_and_is_cut(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    async with mesh(tmp_path) as m:
        assert await served(m)
        dialled = len(m.echo.peers)
        a = await Attacker.open(m)
        block = connect_block()
        flood = b"".join(frame(HEADERS, END_HEADERS, sid, block)
                         + frame(RST, 0, sid, b"\0\0\0\x08")
                         for sid in range(1, 40_001, 2))
        await a.send(PREFACE + frame(SETTINGS))

        async def send_flood() -> None:
            try:
                for i in range(0, len(flood), 16384):
                    await a.send(flood[i:i + 16384])
            except (ConnectionError, OSError):
                pass

        sender = asyncio.create_task(send_flood())
        assert await served(m)  # during the flood
        assert await a.closed_within(5) < 5
        await sender
        assert a.goaway_code() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert sample(m.b, "ambit_ztunnel_connection_errors_total", reason="reset_flood") == 1
        assert await served(m)
        # Only the three legitimate tunnels reached the backend.
        assert len(m.echo.peers) == dialled + 2
        # 20000 refused tunnels are not 20000 log lines.
        assert len([r for r in caplog.records if r.name.startswith("ztunnel")
                    and r.levelno >= logging.INFO and "inbound" in r.getMessage()]) <= 3


async def test_reset_while_dialling_never_connects(tmp_path: Path) -> None:
    """HEADERS and RST_STREAM in separate writes: a reset stream costs at most the dial that
    was already under way (the task checks the stream first, the dial is cancelled or its
    connection closed at once), and 20 resets stay under the flood limit."""
    async with mesh(tmp_path) as m:
        dialled = len(m.echo.peers)
        a = await Attacker.open(m)
        await a.send(PREFACE + frame(SETTINGS))
        block = connect_block()
        for sid in range(1, 41, 2):
            await a.send(frame(HEADERS, END_HEADERS, sid, block))
            await a.send(frame(RST, 0, sid, b"\0\0\0\x08"))
        assert await served(m)
        a.writer.close()
        assert len(m.echo.peers) <= dialled + 1 + 20  # never more than one per stream
        assert sample(m.b, "ambit_ztunnel_connection_errors_total", reason="reset_flood") == 0


def peak_buffered(m: Mesh) -> tuple[asyncio.Task[None], list[int]]:
    """Sample, every 5 ms, the most any of ztunnel B's HBONE connections holds by its own
    accounting (received and undelivered, queued and unsent, written and not taken)."""
    peak = [0]

    async def sample_loop() -> None:
        while True:
            for proto in list(m.b.inbound.connections):
                peak[0] = max(peak[0], proto.buffered)
            await asyncio.sleep(0.005)

    return asyncio.create_task(sample_loop()), peak


async def silent_attacker(m: Mesh) -> Attacker:
    """A client whose tiny socket receive buffer is never read: whatever the server writes
    stays with the server. It announces the largest windows, so flow control never stops the
    server's output, and knows the server's windows without reading its SETTINGS."""
    ctx = await m.a.secrets.client_context(SpiffeId(TD, "default", "client"))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (ECHO_IP, 15008))
    r, w = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=ECHO_IP)
    a = Attacker(r, w)
    await a.send(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 2**31 - 1))
                 + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1 - 65535)))
    return a


async def gone_within(a: Attacker, limit: float) -> None:
    """The server closed or aborted the attacker's connection within ``limit`` seconds."""
    with contextlib.suppress(ConnectionError, OSError):  # a reset is as good as a FIN
        await a.closed_within(limit)


async def test_uploads_never_read_stay_within_the_budget(tmp_path: Path) -> None:
    """Probe: 4 connections x 100 tunnels uploading to the echo backend as much as the server's
    windows allow, the echoed answers never read."""
    async with mesh(tmp_path) as m:
        settings = m.b.inbound.hbone_settings
        sampler, peak = peak_buffered(m)
        block = connect_block()
        per_stream = settings.connection_window // 100 // 16384 * 16384
        attackers = []
        for _ in range(4):
            a = await silent_attacker(m)
            await a.send(b"".join(frame(HEADERS, END_HEADERS, 1 + 2 * i, block)
                                  for i in range(100)))
            for _ in range(per_stream // 16384):
                await a.send(b"".join(frame(DATA, 0, 1 + 2 * i, b"u" * 16384)
                                      for i in range(100)))
            attackers.append(a)
        assert await served(m, os.urandom(1_000_000))  # during: a legitimate client
        await asyncio.sleep(1.0)
        sampler.cancel()
        # Each connection holds at most its budget plus a read and the TLS record slack.
        assert 3 * settings.connection_window <= peak[0] * 4, peak[0]  # the probe worked
        assert peak[0] <= settings.buffer_limit + 512 * 1024, peak[0]
        for a in attackers:
            a.writer.transport.abort()
        assert await served(m)


async def test_ping_flood_never_read_is_cut(tmp_path: Path) -> None:
    """Probe: PINGs sent without ever reading their acknowledgements."""
    async with mesh(tmp_path) as m:
        sampler, peak = peak_buffered(m)
        a = await silent_attacker(m)
        burst = frame(PING, 0, 0, b"\0" * 8) * 4096

        async def flood() -> None:
            try:
                for _ in range(2000):  # up to 140 MB; the server must end it long before
                    a.writer.write(burst)
                    await asyncio.wait_for(a.writer.drain(), 5)
            except (TimeoutError, ConnectionError, OSError):
                pass

        flooder = asyncio.create_task(flood())
        assert await served(m)  # during
        await asyncio.wait_for(flooder, 20)
        await until(lambda: sample(m.b, "ambit_ztunnel_connection_errors_total",
                                   reason="control_frame_flood") == 1, limit=10)
        await gone_within(a, 5)
        sampler.cancel()
        assert peak[0] <= m.b.inbound.hbone_settings.buffer_limit + 512 * 1024, peak[0]
        assert await served(m)


def with_settings(m: Mesh, **kw: float) -> None:
    """Change ztunnel B's HBONE settings for connections accepted from now on."""
    m.b.inbound.hbone_settings = dataclasses.replace(
        m.b.inbound.hbone_settings, **kw)  # type: ignore[arg-type]


async def test_connections_that_send_nothing_after_tls_are_closed(tmp_path: Path) -> None:
    """Probe: 50 connections finish mTLS and then send nothing."""
    async with mesh(tmp_path) as m:
        with_settings(m, handshake_timeout=0.5)
        start = time.monotonic()
        silent = [await Attacker.open(m) for _ in range(50)]
        assert await served(m)  # during
        for a in silent:
            await gone_within(a, 3)
        assert time.monotonic() - start < 4
        assert sample(m.b, "ambit_ztunnel_connection_errors_total",
                      reason="handshake_timeout") == 50
        assert await served(m)


async def test_idle_connection_is_closed_and_a_silent_peer_fails_keepalive(
        tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        # Idle: preface and SETTINGS, then no tunnel; the peer reads (and so sees GOAWAY).
        with_settings(m, idle_timeout=0.3, keepalive_interval=0)
        idle = await Attacker.open(m)
        await idle.send(PREFACE + frame(SETTINGS))
        await gone_within(idle, 3)
        assert idle.goaway_code() == 0
        # Keepalive: a peer that never answers the PING (it never reads) is closed.
        with_settings(m, idle_timeout=0, keepalive_interval=0.3, keepalive_timeout=0.3)
        dead = await silent_attacker(m)
        await gone_within(dead, 3)
        assert sample(m.b, "ambit_ztunnel_connection_errors_total",
                      reason="keepalive_timeout") == 1
        assert await served(m)


async def test_keepalive_answered_keeps_an_idle_tunnel_open(tmp_path: Path) -> None:
    """A tunnel may stay quiet like TCP: keepalive PINGs are answered by ztunnel A, so the
    pooled connection and its tunnel outlive many keepalive intervals."""
    async with mesh(tmp_path) as m:
        with_settings(m, keepalive_interval=0.1, keepalive_timeout=0.5)
        r, w = await m.connect()
        w.write(b"hello")
        assert await r.readexactly(5) == b"hello"
        await asyncio.sleep(1.5)  # 15 keepalive intervals without a byte
        w.write(b"again")
        assert await asyncio.wait_for(r.readexactly(5), 2) == b"again"
        w.close()
        assert sample(m.b, "ambit_ztunnel_connection_errors_total",
                      reason="keepalive_timeout") == 0

"""HBONE limits over real mTLS connections: an attacker client holding a valid mesh
certificate speaks raw HTTP/2 to ztunnel B; its connection must be closed within a bounded
time while a legitimate client, on its own connection, is served during and after."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import h2.errors

from mesh.spiffe import SpiffeId
from tests.component.harness import ECHO_IP, TD, Mesh, exchange, mesh, sample
from tests.unit.test_hbone_limits import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PREFACE,
    RST,
    SETTINGS,
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


async def test_rapid_reset_dials_nothing_and_is_cut(tmp_path: Path) -> None:
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

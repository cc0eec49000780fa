"""The relay (ztunnel/relay.py): bytes both ways with half-close, the bytes a listener's
reader already held delivered first, failures cut both sides and raise, and memory bounded:
a destination that does not read stops the source being read, and a tunnel's credit is held
until its socket has drained."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from ztunnel.hbone.conn import StreamError
from ztunnel.relay import READ_SIZE, relay_stream, relay_tcp


async def _pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter],
                           tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TCP connection on loopback as asyncio streams: (the relay's end, the test's end).
    TCP, not a socketpair: an abort must be a reset, not an EOF."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        b = socket.create_connection(listener.getsockname())
        a, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)


@asynccontextmanager
async def _tcp_relay(counts: dict[str, int]) -> AsyncIterator[tuple[
        asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter,
        asyncio.Task[None]]]:
    (ar, aw), (cr, cw) = await _pair()  # client <-> relay side a
    (br, bw), (sr, sw) = await _pair()  # relay side b <-> server

    def count(key: str) -> object:
        return lambda n: counts.__setitem__(key, counts.get(key, 0) + n)

    task = asyncio.create_task(relay_tcp(ar, aw, br, bw, count("sent"),  # type: ignore[arg-type]
                                         count("received")))  # type: ignore[arg-type]
    try:
        yield cr, cw, sr, sw, task
    finally:
        task.cancel()
        for w in (cw, sw):
            w.transport.abort()


async def test_tcp_relay_carries_both_ways_with_half_close_and_counts() -> None:
    counts: dict[str, int] = {}
    async with _tcp_relay(counts) as (cr, cw, sr, sw, task):
        cw.write(b"hello")
        assert await asyncio.wait_for(sr.readexactly(5), 2) == b"hello"
        cw.write_eof()  # the client is done sending; the server still answers
        assert await asyncio.wait_for(sr.read(), 2) == b""
        sw.write(b"world" * 1000)
        sw.write_eof()
        assert await asyncio.wait_for(cr.read(), 2) == b"world" * 1000
        await asyncio.wait_for(task, 2)  # both directions ended: the relay returns
    assert counts == {"sent": 5, "received": 5000}


async def test_bytes_and_eof_the_reader_held_are_delivered_first() -> None:
    (ar, aw), (_, cw) = await _pair()
    (br, bw), (sr, sw) = await _pair()
    cw.write(b"early")
    cw.write_eof()
    await asyncio.sleep(0.05)  # the StreamReader has read them before the relay starts
    task = asyncio.create_task(relay_tcp(ar, aw, br, bw, lambda n: None, lambda n: None))
    assert await asyncio.wait_for(sr.read(), 2) == b"early"
    sw.write_eof()
    await asyncio.wait_for(task, 2)


async def test_a_reset_side_aborts_the_other_and_raises() -> None:
    async with _tcp_relay({}) as (cr, cw, sr, sw, task):
        cw.write(b"x")
        await sr.readexactly(1)
        sock = sw.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sw.transport.abort()  # the server resets (closing with linger 0 sends RST)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(task, 2)
        assert await asyncio.wait_for(cr.read(), 2) == b""  # the client is cut too


async def test_a_destination_that_does_not_read_stops_the_source_being_read() -> None:
    """50 MiB offered while the server reads nothing: the relay stops reading the client, so
    what the kernel buffers cannot take stays with the client (TCP pushes back on it)."""
    async with _tcp_relay({}) as (_, cw, sr, _sw, task):
        sr._transport.pause_reading()  # type: ignore[attr-defined]
        chunk = b"z" * (1 << 20)
        writes = 0
        for _ in range(50):
            cw.write(chunk)
            writes += 1
            await asyncio.sleep(0.01)
        assert not task.done()
        # What the client could not get into the kernel stays in its own buffer: the relay
        # stopped reading, so the kernel buffers filled up behind it.
        assert cw.transport.get_write_buffer_size() > 20 * (1 << 20)
        # Read it all: every byte arrives, in order.
        sr._transport.resume_reading()  # type: ignore[attr-defined]
        got = 0
        while got < writes * len(chunk):
            got += len(await asyncio.wait_for(sr.read(1 << 20), 5))
        assert got == writes * len(chunk)


class _FakeStream:
    """The HboneStream calls a stream relay makes, recorded."""

    def __init__(self, room: int = 1 << 20) -> None:
        self.sink: object = None
        self._room = room
        self.sent: list[bytes] = []
        self.consumed_flow: list[int] = []
        self.eof_written = False
        self.was_reset = False

    def attach(self, sink: object) -> None:
        self.sink = sink

    def room(self) -> int:
        return self._room

    def send_nowait(self, data: bytes) -> bool:
        self.sent.append(data)
        return self._room > 0

    def consumed(self, flow: int) -> None:
        self.consumed_flow.append(flow)

    def write_eof(self) -> None:
        self.eof_written = True

    def reset(self) -> None:
        self.was_reset = True


async def test_tunnel_credit_is_held_until_the_socket_drains() -> None:
    (ar, aw), (cr, cw) = await _pair()
    stream = _FakeStream()
    task = asyncio.create_task(relay_stream(ar, aw, stream, lambda n: None,  # type: ignore[arg-type]
                                            lambda n: None))
    await asyncio.sleep(0.01)
    sink = stream.sink
    cr._transport.pause_reading()  # type: ignore[attr-defined]
    # Far more than the kernel takes: some stays in the relay's write buffer.
    for _ in range(40):
        sink.on_data(b"d" * READ_SIZE, READ_SIZE + 9)  # type: ignore[attr-defined]
    held = 40 * (READ_SIZE + 9) - sum(stream.consumed_flow)
    assert held > 0  # the bytes the socket did not take keep their credit
    cr._transport.resume_reading()  # type: ignore[attr-defined]
    got = 0
    while got < 40 * READ_SIZE:
        got += len(await asyncio.wait_for(cr.read(1 << 20), 5))
    await asyncio.sleep(0.05)
    assert sum(stream.consumed_flow) == 40 * (READ_SIZE + 9)  # all returned once drained
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.was_reset  # a cancelled relay resets its tunnel
    cw.transport.abort()


async def test_a_full_tunnel_stops_reading_its_socket_until_writable() -> None:
    (ar, aw), (cr, cw) = await _pair()
    stream = _FakeStream(room=0)
    task = asyncio.create_task(relay_stream(ar, aw, stream, lambda n: None,  # type: ignore[arg-type]
                                            lambda n: None))
    await asyncio.sleep(0.01)
    cw.write(b"a" * 100)
    await asyncio.sleep(0.05)
    assert len(stream.sent) == 1  # taken (already read), then reading stopped
    cw.write(b"b" * 100)
    await asyncio.sleep(0.05)
    assert len(stream.sent) == 1  # not read while the tunnel has no room
    stream._room = 1 << 20
    stream.sink.on_writable()  # type: ignore[attr-defined]
    await asyncio.sleep(0.05)
    assert b"".join(stream.sent) == b"a" * 100 + b"b" * 100
    stream.sink.on_error("reset by peer (code 8)")  # type: ignore[attr-defined]
    with pytest.raises(StreamError):
        await asyncio.wait_for(task, 2)
    assert await asyncio.wait_for(cr.read(), 2) == b""  # the socket is cut
    cw.transport.abort()


async def test_a_lost_socket_gives_held_credit_back_and_resets_the_tunnel() -> None:
    (ar, aw), (cr, cw) = await _pair()
    stream = _FakeStream()
    task = asyncio.create_task(relay_stream(ar, aw, stream, lambda n: None,  # type: ignore[arg-type]
                                            lambda n: None))
    await asyncio.sleep(0.01)
    cr._transport.pause_reading()  # type: ignore[attr-defined]
    for _ in range(40):
        stream.sink.on_data(b"d" * READ_SIZE, READ_SIZE)  # type: ignore[attr-defined]
    cw.transport.abort()  # the destination is gone with bytes unwritten
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(task, 2)
    assert sum(stream.consumed_flow) == 40 * READ_SIZE and stream.was_reset


class _Conn:
    """What an HboneStream calls on its connection, recorded."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []
        self.reset: list[int] = []
        self._waiting: set[object] = set()

    def _ack(self, sid: int, flow: int) -> None:
        self.acked.append((sid, flow))

    def _reset(self, sid: int) -> None:
        self.reset.append(sid)


async def test_a_locally_reset_tunnel_gives_its_unread_credit_back() -> None:
    """A tunnel reset because its destination failed had up to a stream window of chunks
    unread; their credit must go back, or the connection window (shared by every tunnel on it)
    shrinks with each such reset until the other tunnels stall (seen in make bench)."""
    from ztunnel.hbone.conn import HboneStream

    conn = _Conn()
    stream = HboneStream(conn, 3)  # type: ignore[arg-type]
    stream._feed(b"a" * 100, 100)
    stream._feed(b"b" * 50, 50)
    stream.reset()
    assert conn.acked == [(3, 100), (3, 50)] and conn.reset == [3]


def test_pausing_a_transport_whose_connection_is_gone_is_a_no_op() -> None:
    """uvloop raises RuntimeError on pause/resume of a transport whose connection is lost
    while is_closing() is still False (a reset backend): that escaped the relay, the tunnel
    was never reset, and its HBONE peer hung (make bench)."""
    from ztunnel.hbone.conn import _paused

    class Lost:
        def is_closing(self) -> bool:
            return False

        def is_reading(self) -> bool:
            return True

        def pause_reading(self) -> None:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

        resume_reading = pause_reading

    with _paused(Lost()):
        pass

"""relay._both: when both directions of a tunnel fail at once, one error is raised and the
other is retrieved, so asyncio never reports "Task exception was never retrieved" (once per
tunnel, on stderr: a log flood under attack)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from ztunnel.relay import _both


async def _fail(exc: BaseException) -> None:
    raise exc


async def test_both_directions_failing_leave_no_unretrieved_exception() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        for _ in range(20):
            a = asyncio.create_task(_fail(ConnectionResetError("a")))
            b = asyncio.create_task(_fail(BrokenPipeError("b")))
            await asyncio.sleep(0)  # both finish in the same iteration
            with pytest.raises(OSError) as err:
                await _both(a, b)
            assert str(err.value) in ("a", "b")
            del a, b, err
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert [c.get("message") for c in reported] == []


async def test_one_direction_failing_cancels_the_other() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    other = asyncio.create_task(forever())
    await started.wait()
    with pytest.raises(ConnectionResetError):
        await _both(asyncio.create_task(_fail(ConnectionResetError("x"))), other)
    assert other.cancelled()


class _Conn:
    """What an HboneStream calls on its connection, recorded."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []
        self.reset: list[int] = []

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


async def test_a_chunk_lost_with_a_failing_destination_gives_its_credit_back() -> None:
    from ztunnel.relay import _stream_to_tcp

    class Stream:
        consumed_flow: list[int] = []

        async def read(self) -> tuple[bytes, int]:
            return b"x" * 10, 10

        def consumed(self, flow: int) -> None:
            self.consumed_flow.append(flow)

    class Writer:
        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            raise ConnectionResetError("destination gone")

    s = Stream()
    with pytest.raises(ConnectionResetError):
        await _stream_to_tcp(s, Writer(), lambda n: None)  # type: ignore[arg-type]
    assert s.consumed_flow == [10]


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

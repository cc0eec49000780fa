"""Copy bytes both ways between a TCP connection and a peer (an HBONE tunnel or TCP), with
protocol callbacks: no task, no StreamReader/StreamWriter and no await per chunk.

Why callbacks: the byte path is the ztunnel's cost. A chunk read from a socket goes straight
into the tunnel (or the other socket) in the same callback that read it, and a chunk from a
tunnel is written to its socket in the callback that decoded it. The asyncio streams this
replaced copied every chunk twice more (into the reader's buffer and out of it) and woke a task
per chunk in each direction.

Memory stays bounded, inside the HBONE connection's budget (ztunnel/hbone/conn.py):

* reads go into one buffer shared by every relay of the process (a read is copied out in the
  callback that filled it), and each read is at most the room the tunnel has left
  (``HboneStream.room``), so a backend's bytes wait in the kernel, not here, while the tunnel
  cannot take them (TCP pushes back on the backend);
* a tunnel's chunk written to a socket that cannot take all of it at once keeps its
  flow-control credit until the socket has drained (write buffers have a high-water mark of
  0, so asyncio reports any leftover): what the socket holds stays counted in the budget.

Half-close is preserved in both directions (a FIN on one side becomes a FIN on the other), so
protocols that shut down their sending side early keep working. Reads are up to 256 KiB, as in
Istio's ztunnel: big reads mean fewer, larger HTTP/2 frames and TLS records.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ztunnel.hbone.conn import HboneStream, StreamError

READ_SIZE = 256 * 1024
# The smallest read offered while the tunnel's room is shorter (reading then pauses at once):
# asyncio needs a non-empty buffer, and a tiny one would cost a syscall per few bytes.
MIN_READ = 16 * 1024

# One read buffer for every relay: asyncio fills it and calls buffer_updated at once, which
# copies the bytes out before any other callback can run.
_buffer = bytearray(READ_SIZE)
_view = memoryview(_buffer)

Counter = Callable[[int], None]


def _suppressed(action: Callable[[], None]) -> None:
    # uvloop raises RuntimeError on pause/resume of a transport whose connection is already
    # lost while is_closing() is still False (the peer reset it): nothing is left to do.
    with contextlib.suppress(RuntimeError):
        action()


class TcpSide(asyncio.BufferedProtocol):
    """One TCP socket of a relay: reads go to ``on_bytes``, the relay writes to ``transport``."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.room: Callable[[], int] = lambda: READ_SIZE
        self.on_bytes: Callable[[bytes], None] = lambda data: None
        self.paused = False  # reading paused by the relay
        self.write_paused = False  # the socket's write buffer is not empty
        self.eof_in = False  # the FIN was read
        self.eof_out = False  # a FIN was written
        self.lost = False
        self._reader: asyncio.StreamReader | None = None

    # -- reading -------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        room = self.room()
        return _view if room >= READ_SIZE else _view[:max(room, MIN_READ)]

    def buffer_updated(self, nbytes: int) -> None:
        self.on_bytes(bytes(_view[:nbytes]))

    def eof_received(self) -> bool:
        self.eof_in = True
        self.relay.eof_from(self)
        return True  # keep writing: a half-closed connection goes on in the other direction

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            if self.transport is not None and not self.transport.is_closing():
                _suppressed(self.transport.pause_reading)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.transport.is_closing():
                _suppressed(self.transport.resume_reading)

    # -- writing -------------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.relay.drained(self)

    def write_eof(self) -> None:
        t = self.transport
        if not self.eof_out and t is not None and not t.is_closing():
            self.eof_out = True
            if t.can_write_eof():
                t.write_eof()  # sent once the buffered bytes are

    # -- end -----------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.lost(self, exc)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def take_over(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Become the protocol of ``writer``'s transport, which asyncio streams served until
        now (a listener read a SOCKS5 greeting through them, say). Nothing is delivered until
        ``start``, so every side of a relay has its transport first."""
        transport = writer.transport
        self.transport = transport  # type: ignore[assignment]
        self._reader = reader
        if transport.is_closing():  # gone already (its loss went to the reader)
            return
        transport.set_protocol(self)
        # Every byte left in the write buffer counts (see the module docstring).
        transport.set_write_buffer_limits(high=0)
        self.write_paused = transport.get_write_buffer_size() > 0

    def start(self) -> None:
        """Deliver the bytes the reader already holds, then its EOF, and read on."""
        reader, transport = self._reader, self.transport
        assert reader is not None and transport is not None
        if transport.is_closing():
            self.lost = True
            self.relay.lost(self, reader.exception() or ConnectionResetError(
                "the connection was closed before the relay started"))
            return
        # StreamReader keeps what it read in private fields and has no way to hand them over
        # without awaiting; what arrived after the last read is there.
        held = bytes(getattr(reader, "_buffer", b""))
        if held:
            self.on_bytes(held)
        if getattr(reader, "_eof", False):
            self.eof_received()
        elif not self.paused and not transport.is_closing() and not transport.is_reading():
            _suppressed(transport.resume_reading)


class _Relay:
    """What a TcpSide reports to; one per relayed connection."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def eof_from(self, side: TcpSide) -> None:
        raise NotImplementedError

    def drained(self, side: TcpSide) -> None:
        raise NotImplementedError

    def lost(self, side: TcpSide, exc: Exception | None) -> None:
        raise NotImplementedError

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)


class _StreamRelay(_Relay):
    """TCP <-> HBONE tunnel."""

    def __init__(self, stream: HboneStream, sent: Counter, received: Counter) -> None:
        super().__init__()
        self.stream = stream
        self.sent = sent
        self.received = received
        self.tcp = TcpSide(self)
        self.tcp.room = stream.room
        self.tcp.on_bytes = self._to_stream
        self.held = 0  # credit of tunnel bytes the socket has not taken yet
        self.stream_eof = False

    def start(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tcp.take_over(reader, writer)
        self.tcp.start()
        if not self.tcp.lost:
            self.stream.attach(self)

    # TCP -> tunnel
    def _to_stream(self, data: bytes) -> None:
        self.sent(len(data))
        try:
            more = self.stream.send_nowait(data)
        except StreamError as e:
            self._fail(e)
            return
        if not more:
            self.tcp.pause()  # until on_writable

    def on_writable(self) -> None:
        self.tcp.resume()

    def eof_from(self, side: TcpSide) -> None:
        self.stream.write_eof()
        self._maybe_close()

    # tunnel -> TCP
    def on_data(self, data: bytes, flow: int) -> None:
        t = self.tcp.transport
        if t is None or t.is_closing():
            self.stream.consumed(flow)  # lost with the socket: the credit goes back
            return
        t.write(data)
        self.received(len(data))
        if self.tcp.write_paused:
            self.held += flow  # returned when the socket has drained
        else:
            self.stream.consumed(flow)

    def drained(self, side: TcpSide) -> None:
        if self.held:
            held, self.held = self.held, 0
            self.stream.consumed(held)

    def on_eof(self) -> None:
        self.stream_eof = True
        self.tcp.write_eof()
        self._maybe_close()

    def on_error(self, reason: str) -> None:
        self._fail(StreamError(reason))

    # end
    def _maybe_close(self) -> None:
        if self.tcp.eof_in and self.stream_eof and self.tcp.transport is not None:
            self.tcp.transport.close()  # after the buffered bytes; connection_lost finishes

    def _fail(self, error: BaseException) -> None:
        self.stream.reset()  # the peer must learn the tunnel is gone (a no-op once failed)
        self.tcp.abort()
        self.finish(error)

    def lost(self, side: TcpSide, exc: Exception | None) -> None:
        if self.held:  # never to be written: the credit goes back
            held, self.held = self.held, 0
            self.stream.consumed(held)
        if exc is not None or not (side.eof_in and self.stream_eof):
            self.stream.reset()
            self.finish(exc or ConnectionResetError("the connection closed before the tunnel"
                                                    " finished"))
        else:
            self.finish()


class _TcpRelay(_Relay):
    """TCP a <-> TCP b."""

    def __init__(self, sent: Counter, received: Counter) -> None:
        super().__init__()
        self.a = TcpSide(self)
        self.b = TcpSide(self)
        self.a.on_bytes = lambda data: self._copy(self.a, self.b, data, sent)
        self.b.on_bytes = lambda data: self._copy(self.b, self.a, data, received)
        self.error: BaseException | None = None

    @staticmethod
    def _copy(src: TcpSide, dst: TcpSide, data: bytes, count: Counter) -> None:
        count(len(data))
        t = dst.transport
        if t is None or t.is_closing():
            return
        t.write(data)
        if dst.write_paused:
            src.pause()  # until dst has drained

    def _other(self, side: TcpSide) -> TcpSide:
        return self.b if side is self.a else self.a

    def eof_from(self, side: TcpSide) -> None:
        self._other(side).write_eof()
        if self.a.eof_in and self.b.eof_in:
            for s in (self.a, self.b):
                if s.transport is not None:
                    s.transport.close()

    def drained(self, side: TcpSide) -> None:
        self._other(side).resume()

    def lost(self, side: TcpSide, exc: Exception | None) -> None:
        other = self._other(side)
        if exc is not None or not (self.a.eof_in and self.b.eof_in):
            if self.error is None:
                self.error = exc or ConnectionResetError("one side closed before the other")
            other.abort()
        if other.lost:
            self.finish(self.error)


async def _run(relay: _Relay, sides: tuple[TcpSide, ...],
               on_error: Callable[[], None]) -> None:
    try:
        await relay.done
    except BaseException:  # an error, or the task cancelled (a drain): cut everything
        on_error()
        for side in sides:
            side.abort()
        raise


async def relay_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       stream: HboneStream, sent: Counter, received: Counter) -> None:
    """TCP ``reader/writer`` <-> HBONE ``stream``; returns when both directions have ended,
    raises (StreamError, ConnectionError) when either failed; the tunnel is then reset and
    the socket aborted. ``sent`` counts TCP->stream bytes."""
    relay = _StreamRelay(stream, sent, received)
    relay.start(reader, writer)
    await _run(relay, (relay.tcp,), stream.reset)


async def relay_tcp(a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
                    b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter,
                    sent: Counter, received: Counter) -> None:
    """TCP a <-> TCP b; raises ConnectionError when either side failed (both are then
    aborted). ``sent`` counts a->b bytes."""
    relay = _TcpRelay(sent, received)
    relay.a.take_over(a_reader, a_writer)
    relay.b.take_over(b_reader, b_writer)
    relay.a.start()
    relay.b.start()
    await _run(relay, (relay.a, relay.b), lambda: None)

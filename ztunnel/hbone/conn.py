"""asyncio adapter around the HBONE core: one Protocol per TLS connection, one stream object
per tunnel.

The adapter only moves bytes: socket data goes into the core, core events wake the streams,
core output is written to the transport once per loop iteration (coalescing many small
frames into one TLS write). Backpressure runs both ways: a writer waits while its stream is
over the core's high-water mark or the transport is paused; a reader returns flow-control
credit only after the application has taken the bytes, so a slow consumer slows the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

import h2.errors

from ztunnel.hbone import events as ev
from ztunnel.hbone.core import DEFAULT_SETTINGS, HboneConnection, HboneSettings

log = logging.getLogger("ztunnel.hbone")
# Seconds a connection ended for an error may take to deliver its GOAWAY before it is aborted.
_CLOSE_GRACE = 1.0


class ReadSource(Protocol):
    """What a tunnel's writer may pause: a transport that reads (asyncio's or uvloop's, whose
    TCP transport is no ``asyncio.ReadTransport`` subclass)."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_reading(self) -> bool: ...
    def is_closing(self) -> bool: ...


@contextlib.contextmanager
def _paused(source: ReadSource | None) -> Iterator[None]:
    """Stop reading ``source`` for the duration. A no-op without one, once it is closing, or
    while it is already paused (by its StreamReader, whose buffer is full: resuming it here
    would override that)."""
    if source is None or source.is_closing() or not source.is_reading():
        yield
        return
    # uvloop raises RuntimeError on a transport whose connection is already lost even while
    # is_closing() is still False (the peer reset it): then there is nothing left to pause.
    with contextlib.suppress(RuntimeError):
        source.pause_reading()
    try:
        yield
    finally:
        if not source.is_closing():
            with contextlib.suppress(RuntimeError):
                source.resume_reading()


class StreamError(Exception):
    """The tunnel was reset, refused, or its connection died."""


class StreamSink(Protocol):
    """Where an attached tunnel delivers its events, in the callback that decoded them (the
    relay, ztunnel/relay.py): no queue and no task switch per chunk."""

    def on_data(self, data: bytes, flow: int) -> None: ...
    def on_eof(self) -> None: ...
    def on_error(self, reason: str) -> None: ...
    def on_writable(self) -> None: ...


class HboneStream:
    """One CONNECT tunnel: an async byte stream with half-close."""

    def __init__(self, conn: HboneProtocol, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._eof = False
        self._error: str | None = None
        self.response: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.headers: dict[str, str] = {}
        self.authority = ""
        self.reset_code: int | None = None
        self.refused_status: int | None = None
        self._answered = False
        self._task: asyncio.Task[None] | None = None
        self._sink: StreamSink | None = None

    def cancel_on_reset(self, task: asyncio.Task[None]) -> None:
        """Cancel ``task`` (the server's work for this tunnel, e.g. dialling its backend) if
        the stream fails before it is answered: a reset tunnel must cost no connection."""
        self._task = task

    # called by the protocol
    def _feed(self, data: bytes, flow: int) -> None:
        if self._sink is not None:
            self._sink.on_data(data, flow)
            return
        self._chunks.append((data, flow))
        self._readable.set()

    def _feed_eof(self) -> None:
        self._eof = True
        if self._sink is not None:
            self._sink.on_eof()
            return
        self._readable.set()

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        if self._chunks:
            # Never to be read: give their flow-control credit (and budget) back.
            for _, flow in self._chunks:
                self.conn._ack(self.id, flow)
            self._chunks.clear()
        if self._task is not None and not self._answered:
            self._task.cancel()
            self._task = None
        self._readable.set()
        self._writable.set()
        if not self.response.done():
            self.response.set_exception(StreamError(reason))
            self.response.exception()  # mark retrieved: nobody may be waiting on it
        self.conn._waiting.discard(self)
        if self._sink is not None:
            self._sink.on_error(reason)

    def _set_writable(self) -> None:
        self._writable.set()
        if self._sink is not None:
            self.conn._wake(self)

    @property
    def failed(self) -> str | None:
        return self._error

    async def read(self) -> tuple[bytes, int]:
        """Next chunk and its flow-control length; ``(b"", 0)`` at EOF. Call ``consumed`` after
        delivering it."""
        while not self._chunks:
            if self._error is not None:
                raise StreamError(self._error)
            if self._eof:
                return b"", 0
            self._readable.clear()
            await self._readable.wait()
        return self._chunks.popleft()

    def consumed(self, flow: int) -> None:
        self.conn._ack(self.id, flow)

    def attach(self, sink: StreamSink) -> None:
        """Deliver this tunnel's bytes, EOF and failure to ``sink`` as they arrive, instead of
        through ``read``; what is queued already goes first."""
        self._sink = sink
        while self._chunks:
            data, flow = self._chunks.popleft()
            sink.on_data(data, flow)
        if self._error is not None:
            sink.on_error(self._error)
        elif self._eof:
            sink.on_eof()

    def room(self) -> int:
        """How many bytes the tunnel may take now without going over the connection's send
        budget (0 while it must not take any: the writer stops reading its source)."""
        conn = self.conn
        if self._error is not None or conn._paused or not conn._budget_ok.is_set() \
                or not self._writable.is_set():
            return 0
        room = conn._send_budget - conn._unflushed - conn.core.send_buffered
        peer = conn._peer
        if peer is not None:
            if peer.writing_stopped:
                return 0
            room = min(room, peer.limit // 2 - peer.queued)
        return max(0, room)

    def send_nowait(self, data: bytes) -> bool:
        """Queue ``data`` (bytes already read, so taken whatever the room); False when the
        writer must stop reading its source until its sink's ``on_writable``."""
        if self._error is not None:
            raise StreamError(self._error)
        if not self.conn._send(self.id, data):
            self._writable.clear()
        if self.room() > 0:
            return True
        self.conn._waiting.add(self)
        return False

    async def write(self, data: bytes, source: ReadSource | None = None) -> None:
        """Queue ``data`` on the tunnel; return once it may take more. ``source`` is where the
        bytes come from (the backend's transport): it is not read while this waits, so what
        the kernel holds stays in the kernel (and TCP pushes back on the sender) instead of
        piling up in the reader's buffer, outside the connection's budget."""
        if self._error is not None:
            raise StreamError(self._error)
        budget = self.conn._budget_ok
        if not budget.is_set():  # the connection's send budget is spent: wait first
            with _paused(source):
                while not budget.is_set():
                    await budget.wait()
                    if self._error is not None:
                        raise StreamError(self._error)
        below = self.conn._send(self.id, data)
        if not below:
            self._writable.clear()
        if not self._writable.is_set() or self.conn._paused:
            with _paused(source):
                while not self._writable.is_set() or self.conn._paused:
                    if not self._writable.is_set():
                        await self._writable.wait()
                    else:
                        await self.conn._resumed.wait()
                    if self._error is not None:
                        raise StreamError(self._error)

    def write_eof(self) -> None:
        if self._error is None:
            self.conn._end(self.id)

    def reset(self) -> None:
        if self._error is None:
            self._error = "reset locally"
            # Chunks never to be read give their flow-control credit back, as in _fail: a
            # tunnel reset because its destination failed left up to a stream window unacked,
            # and the connection window (shared by every tunnel on it) shrank by that much each
            # time, until the other tunnels stalled.
            for _, flow in self._chunks:
                self.conn._ack(self.id, flow)
            self._chunks.clear()
            self.conn._waiting.discard(self)
            self.conn._reset(self.id)
            self._readable.set()
            self._writable.set()

    def accept(self) -> None:
        self._answered = True
        self.conn._accept(self.id)

    def reject(self, status: int) -> None:
        self._answered = True
        self.conn._reject(self.id, status)


RequestHandler = Callable[[HboneStream], None]


class PeerBudget:
    """What all the HBONE connections of one peer (one SPIFFE identity) may buffer together.

    Each connection is bounded by its own budget (``HboneSettings.buffer_limit``); without
    this, a peer's total would be that times the connections it may open. Split like a
    connection's: when the bytes received from the peer and not yet delivered to backends
    reach half of ``limit``, every connection of the peer stops being read (they drain into
    the backends, which do not depend on the peer; reading resumes below a quarter); when the
    bytes queued towards the peer reach half, its tunnels' writers stop reading their backends
    (resumed below a quarter). The peer's own acknowledgements are never waited for while its
    reading is stopped, so this cannot deadlock a peer that reads.

    The members report their counts when they read and when they flush, a few integer
    operations per loop iteration, not per byte.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0
        self.queued = 0
        self.members: set[HboneProtocol] = set()
        self.reading_stopped = False
        self.writing_stopped = False
        self.times_stopped = 0  # how often reading was stopped (a figure for tests and docs)

    def update(self, received: int, queued: int) -> None:
        self.received += received
        self.queued += queued
        if not self.reading_stopped and self.received >= self.limit // 2:
            self.reading_stopped = True
            self.times_stopped += 1
            for m in self.members:
                m._peer_pause()
        elif self.reading_stopped and self.received < self.limit // 4:
            self.reading_stopped = False
            for m in list(self.members):
                m._peer_resume()
        if not self.writing_stopped and self.queued >= self.limit // 2:
            self.writing_stopped = True
        elif self.writing_stopped and self.queued < self.limit // 4:
            self.writing_stopped = False
            for m in list(self.members):
                m._wake_all()


class HboneProtocol(asyncio.Protocol):
    """Drives one HBONE connection (either side) over an already-secured transport."""

    def __init__(
        self,
        client_side: bool,
        on_request: RequestHandler | None = None,
        settings: HboneSettings = DEFAULT_SETTINGS,
        on_close: Callable[[HboneProtocol], None] | None = None,
        on_rejected: Callable[[ev.RequestRejected], None] | None = None,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        # The core's timers run on the loop's clock; it reads it only on its timers.
        self.core = HboneConnection(client_side, settings, clock=loop.time)
        self._timer: asyncio.TimerHandle | None = None
        self.streams: dict[int, HboneStream] = {}
        self.transport: asyncio.Transport | None = None
        self._on_request = on_request
        self._on_close = on_close
        self._on_rejected = on_rejected
        # (cause, detail) when the core ends the connection for breaking a limit or the
        # protocol: the owner counts it and logs it at a rate limit.
        self._on_error = on_error
        self._flush_scheduled = False
        self._paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        # The buffer budget (HboneSettings.buffer_limit). Writers wait while the bytes they
        # queued and not yet written (core.send_buffered + _unflushed) reach half of it, and
        # go on below a quarter; reading from the peer stops while output it does not read
        # exceeds the whole budget (a flood of frames that each want an answer).
        self._send_budget = settings.buffer_limit // 2
        self._read_budget = settings.buffer_limit
        self._unflushed = 0
        self._budget_ok = asyncio.Event()
        self._budget_ok.set()
        self._reading_paused = False
        self.closed = asyncio.get_running_loop().create_future()
        self.last_idle = asyncio.get_running_loop().time()
        # Attached tunnels whose writer stopped reading for want of room (send_nowait).
        self._waiting: set[HboneStream] = set()
        # The peer's shared budget (join_peer), and what this connection counts in it.
        self._peer: PeerBudget | None = None
        self._peer_received = 0
        self._peer_queued = 0
        self._peer_paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's SSL transport
        self.core.initiate()
        self._flush_now()
        self._arm()

    def data_received(self, data: bytes) -> None:
        events = self.core.receive(data)
        for e in events:
            self._dispatch(e)
        self._prune()
        if not self._budget_ok.is_set():
            self._check_budget()
        if self._paused and not self._reading_paused:
            self._check_reading()
        if self._peer is not None:
            self._sync_peer()
        self._schedule_flush()

    def eof_received(self) -> bool | None:
        return False  # close the connection: a TLS half-close means the peer is gone

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reason = f"connection lost: {exc}" if exc else "connection closed"
        for s in list(self.streams.values()):
            s._fail(reason)
        self.streams.clear()
        self._resumed.set()
        self._budget_ok.set()
        self._waiting.clear()
        self.leave_peer()
        if not self.closed.done():
            self.closed.set_result(None)
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        self._paused = True
        self._resumed.clear()

    def resume_writing(self) -> None:
        self._paused = False
        self._resumed.set()
        self.core.output_drained()
        self._wake_all()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            if not self._peer_paused:
                self.transport.resume_reading()

    @property
    def buffered(self) -> int:
        """Bytes this connection holds: received and not delivered, queued and not sent,
        written and not taken by the socket (what the budget bounds)."""
        size = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self.core.recv_buffered + self.core.send_buffered + self._unflushed + size

    # -- public ----------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return (self.transport is not None and not self.transport.is_closing()
                and self.core.can_open_stream())

    def open_stream(self, authority: str, headers: list[tuple[str, str]] | None = None) \
            -> HboneStream:
        sid = self.core.open_stream(authority, headers)
        stream = HboneStream(self, sid)
        stream.authority = authority
        self.streams[sid] = stream
        self._schedule_flush()
        return stream

    def join_peer(self, budget: PeerBudget) -> None:
        """Count this connection in its peer's shared budget (once its identity is known)."""
        self._peer = budget
        budget.members.add(self)
        if budget.reading_stopped:
            self._peer_pause()
        self._sync_peer()

    def leave_peer(self) -> None:
        budget, self._peer = self._peer, None
        if budget is not None:
            budget.members.discard(self)
            received, queued = self._peer_received, self._peer_queued
            self._peer_received = self._peer_queued = 0
            budget.update(-received, -queued)

    def start_drain(self) -> None:
        """Refuse new tunnels; open ones continue (see ``HboneConnection.draining``)."""
        self.core.draining = True

    def goaway(self, reason: str = "draining") -> None:
        """Send GOAWAY: the connection carries nothing more after this."""
        self.core.close(0, reason)
        self._flush_now()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- called by streams -----------------------------------------------------------------

    def _send(self, sid: int, data: bytes) -> bool:
        below = self.core.send(sid, data)
        self._unflushed += len(data)
        if self._unflushed + self.core.send_buffered >= self._send_budget:
            self._budget_ok.clear()
        if self._peer is not None:
            # At once, not at the next flush: the peer's other connections read their
            # backends in the same loop iteration and must see the room this took.
            self._sync_peer()
        self._schedule_flush()
        return below

    def _end(self, sid: int) -> None:
        self.core.end(sid)
        self._stream_maybe_done(sid)
        self._schedule_flush()

    def _ack(self, sid: int, flow: int) -> None:
        self.core.ack(sid, flow)
        self._schedule_flush()

    def _reset(self, sid: int) -> None:
        self.core.reset(sid, h2.errors.ErrorCodes.CANCEL)
        self.streams.pop(sid, None)
        if not self._budget_ok.is_set():
            self._check_budget()
        self._schedule_flush()
        self._note_idle()

    def _accept(self, sid: int) -> None:
        self.core.accept_stream(sid)
        if not self.core.has_stream(sid):  # closed by the peer before it could be answered
            stream = self.streams.pop(sid, None)
            if stream is not None:
                stream._fail("the stream was closed before it was answered")
        self._schedule_flush()

    def _reject(self, sid: int, status: int) -> None:
        self.core.reject_stream(sid, status)
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream._fail(f"rejected with {status}")
        self._schedule_flush()
        self._note_idle()

    # -- internals -------------------------------------------------------------------------

    def _arm(self) -> None:
        """Set the loop timer to the core's next deadline (handshake, keepalive, idle)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.core.next_deadline()
        if when is not None and self.transport is not None and not self.transport.is_closing():
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for e in self.core.tick(asyncio.get_running_loop().time()):
            self._dispatch(e)
        self._prune()
        self._flush_now()
        self._arm()

    def _check_budget(self) -> None:
        if self.core.send_buffered + self._unflushed < self._send_budget // 2:
            self._budget_ok.set()
            self._wake_all()

    def _sync_peer(self) -> None:
        assert self._peer is not None
        received = self.core.recv_buffered
        queued = self.core.send_buffered + self._unflushed
        dr, dq = received - self._peer_received, queued - self._peer_queued
        if dr or dq:
            self._peer_received, self._peer_queued = received, queued
            self._peer.update(dr, dq)

    def _peer_pause(self) -> None:
        t = self.transport
        if not self._peer_paused and t is not None and not t.is_closing():
            self._peer_paused = True
            if not self._reading_paused:
                t.pause_reading()

    def _peer_resume(self) -> None:
        if self._peer_paused:
            self._peer_paused = False
            t = self.transport
            if t is not None and not t.is_closing() and not self._reading_paused:
                t.resume_reading()

    def _wake(self, stream: HboneStream) -> None:
        """Let a waiting writer read again once its tunnel has room."""
        if stream in self._waiting and stream.room() > 0:
            self._waiting.discard(stream)
            assert stream._sink is not None
            stream._sink.on_writable()

    def _wake_all(self) -> None:
        for stream in list(self._waiting):
            self._wake(stream)

    def _check_reading(self) -> None:
        """Called while the peer does not read our output: stop reading its frames once that
        output exceeds the budget (resume_writing reads again)."""
        t = self.transport
        if t is not None and t.get_write_buffer_size() > self._read_budget:
            self._reading_paused = True
            if not self._peer_paused:
                t.pause_reading()

    def _note_idle(self) -> None:
        if not self.streams:
            self.last_idle = asyncio.get_running_loop().time()
            if self.core.settings.idle_timeout and self._timer is None:
                self._arm()  # the idle clock starts at the next tick

    def _stream_maybe_done(self, sid: int) -> None:
        if not self.core.has_stream(sid):
            self.streams.pop(sid, None)
            self._note_idle()

    def _prune(self) -> None:
        """Forget tunnels the core has finished (both directions closed)."""
        for sid in [sid for sid in self.streams if not self.core.has_stream(sid)]:
            del self.streams[sid]
        self._note_idle()

    def _dispatch(self, e: ev.Event) -> None:
        if isinstance(e, ev.DataReceived):
            s = self.streams.get(e.stream_id)
            if s is not None:
                s._feed(e.data, e.flow_length)
            else:
                self.core.ack(e.stream_id, e.flow_length)
        elif isinstance(e, ev.ConnectRequest):
            s = HboneStream(self, e.stream_id)
            s.authority = e.authority
            s.headers = e.headers
            self.streams[e.stream_id] = s
            if self._on_request is None:
                self.core.reject_stream(e.stream_id, 501)
            else:
                self._on_request(s)
        elif isinstance(e, ev.StreamAccepted):
            s = self.streams.get(e.stream_id)
            if s is not None and not s.response.done():
                s.response.set_result(200)
        elif isinstance(e, ev.StreamRefused):
            s = self.streams.pop(e.stream_id, None)
            if s is not None:
                s.refused_status = e.status
                s._fail(f"peer refused the tunnel with HTTP {e.status}")
            self._note_idle()
        elif isinstance(e, ev.StreamEnded):
            s = self.streams.get(e.stream_id)
            if s is not None:
                s._feed_eof()
                self._stream_maybe_done(e.stream_id)
        elif isinstance(e, ev.StreamReset):
            s = self.streams.pop(e.stream_id, None)
            if s is not None:
                s.reset_code = e.error_code
                s._fail(f"reset by peer (code {e.error_code})")
            self._note_idle()
        elif isinstance(e, ev.StreamWritable):
            s = self.streams.get(e.stream_id)
            if s is not None:
                s._set_writable()
        elif isinstance(e, ev.RequestRejected):
            self.streams.pop(e.stream_id, None)
            if e.cause and self._on_error is not None:
                self._on_error(e.cause, e.reason)  # a limit: counted, logged at a rate
            elif self._on_rejected is not None:
                self._on_rejected(e)
        elif isinstance(e, ev.ConnectionTerminated):
            if e.fatal:
                if e.cause == "idle_timeout":
                    log.debug("HBONE connection closed: %s", e.reason)
                elif e.cause and self._on_error is not None:
                    self._on_error(e.cause, e.reason)
                else:
                    log.info("HBONE connection terminated: %s", e.reason)
                self._flush_now()
                if self.transport is not None:
                    self.transport.close()
                    # close() waits for the output to drain: a peer that does not read would
                    # keep the connection (and its buffer); cut it after a grace period.
                    asyncio.get_running_loop().call_later(_CLOSE_GRACE, self.abort)
            else:
                for sid, s in list(self.streams.items()):
                    if sid > e.last_stream_id and self.core.client_side:
                        s._fail("peer is going away (GOAWAY)")

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        data = self.core.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        self._unflushed = 0
        if self._peer is not None:
            self._sync_peer()
        if not self._paused:
            self.core.output_drained()
        elif not self._reading_paused:
            self._check_reading()
        if not self._budget_ok.is_set():
            self._check_budget()

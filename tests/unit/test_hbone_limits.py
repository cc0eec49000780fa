"""HBONE limits in the sans-I/O core: raw bytes in, events and GOAWAY out (issue 13)."""

from __future__ import annotations

import struct

import h2.errors
import pytest

from ztunnel.hbone import events as ev
from ztunnel.hbone.core import HboneConnection, HboneSettings

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = \
    0, 1, 2, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
PROTOCOL = h2.errors.ErrorCodes.PROTOCOL_ERROR
FRAME_SIZE = h2.errors.ErrorCodes.FRAME_SIZE_ERROR


def frame(ftype: int, flags: int = 0, sid: int = 0, payload: bytes = b"",
          length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


# A CONNECT to 10.0.0.1:80 as HPACK: literal without indexing, new names.
def _literal(name: bytes, value: bytes) -> bytes:
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


CONNECT_BLOCK = _literal(b":method", b"CONNECT") + _literal(b":authority", b"10.0.0.1:80")
START = PREFACE + frame(SETTINGS)


def frames_of(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, i = [], 0
    while i + 9 <= len(data):
        n = int.from_bytes(data[i:i + 3], "big")
        out.append((data[i + 3], data[i + 4], int.from_bytes(data[i + 5:i + 9], "big"),
                    data[i + 9:i + 9 + n]))
        i += 9 + n
    return out


def goaway_code(server: HboneConnection) -> int | None:
    for ftype, _, _, payload in frames_of(server.data_to_send()):
        if ftype == GOAWAY:
            return int.from_bytes(payload[4:8], "big")
    return None


def server(settings: HboneSettings | None = None) -> HboneConnection:
    s = HboneConnection(False, settings or HboneSettings())
    s.initiate()
    s.data_to_send()
    return s


def feed(s: HboneConnection, data: bytes, step: int = 0) -> list[ev.Event]:
    """Feed ``data`` whole, or ``step`` bytes at a time (frame headers split anywhere)."""
    if not step:
        return s.receive(data)
    out: list[ev.Event] = []
    for i in range(0, len(data), step):
        out += s.receive(data[i:i + step])
    return out


def terminated(events: list[ev.Event]) -> ev.ConnectionTerminated | None:
    last = events[-1] if events else None
    return last if isinstance(last, ev.ConnectionTerminated) else None


def headers(sid: int, flags: int = END_HEADERS, block: bytes = CONNECT_BLOCK) -> bytes:
    return frame(HEADERS, flags, sid, block)


REFUSED = [
    # (name, bytes after nothing, GOAWAY code, cause)
    ("16 MiB frame header, payload never sent", START + frame(DATA, 0, 1, length=(16 << 20) - 1),
     FRAME_SIZE, "frame_too_large"),
    ("oversized SETTINGS as the first frame", PREFACE + frame(SETTINGS, length=300_000),
     FRAME_SIZE, "frame_too_large"),
    ("one byte above the max frame", START + frame(PING, 0, 0, length=256 * 1024 + 1),
     FRAME_SIZE, "frame_too_large"),
    ("not the preface", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", PROTOCOL, "bad_preface"),
    ("first frame is not SETTINGS", PREFACE + frame(PING, 0, 0, b"\0" * 8),
     PROTOCOL, "bad_preface"),
    ("first frame is a SETTINGS ACK", PREFACE + frame(SETTINGS, ACK), PROTOCOL, "bad_preface"),
    ("9 CONTINUATIONs", START + headers(1, 0) + frame(CONTINUATION, 0, 1, b"\0") * 9,
     CALM, "continuation_flood"),
    ("2 empty CONTINUATIONs", START + headers(1, 0) + frame(CONTINUATION, 0, 1) * 2,
     CALM, "empty_frame_flood"),
    ("header block above the header list limit", START + headers(1, 0, b"\0" * 16_000)
     + frame(CONTINUATION, 0, 1, b"\0" * 1000), CALM, "header_block_too_large"),
    ("one HEADERS frame above the header list limit", START + headers(1, END_HEADERS,
                                                                      b"\0" * 17_000),
     CALM, "header_block_too_large"),
    ("header block interrupted by a PING", START + headers(1, 0) + frame(PING, 0, 0, b"\0" * 8),
     PROTOCOL, "protocol_error"),
    ("CONTINUATION of another stream", START + headers(1, 0) + frame(CONTINUATION, 4, 3, b""),
     PROTOCOL, "protocol_error"),
    ("two empty DATA frames", START + headers(1) + frame(DATA, 0, 1) + frame(DATA, 0, 1),
     CALM, "empty_frame_flood"),
    ("101 PRIORITY frames, no stream", START + frame(PRIORITY, 0, 1, b"\0\0\0\0\x10") * 101,
     CALM, "priority_flood"),
    ("6 WINDOW_UPDATEs, no DATA sent", START + frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\1") * 6,
     CALM, "window_update_flood"),
]


@pytest.mark.parametrize("step", [0, 1, 7])
@pytest.mark.parametrize(("name", "data", "code", "cause"), REFUSED, ids=[r[0] for r in REFUSED])
def test_frame_limits_end_the_connection(name: str, data: bytes, code: int, cause: str,
                                         step: int) -> None:
    s = server()
    events = feed(s, data, step)
    end = terminated(events)
    assert end is not None, events
    assert (end.error_code, end.cause, end.fatal) == (code, cause, True)
    assert goaway_code(s) == code
    assert s.receive(frame(PING, 0, 0, b"\0" * 8)) == []  # nothing is read after that


ACCEPTED = [
    ("preface and SETTINGS split anywhere", START, []),
    ("frame of exactly the max size", START + headers(1) + frame(DATA, 0, 1, b"x" * 262_144),
     [ev.ConnectRequest(1, "10.0.0.1:80"), ev.DataReceived(1, b"x" * 262_144, 262_144)]),
    ("8 CONTINUATIONs", START + headers(1, 0, CONNECT_BLOCK[:1]) + b"".join(
        frame(CONTINUATION, 0, 1, CONNECT_BLOCK[i:i + 1]) for i in range(1, 8))
     + frame(CONTINUATION, END_HEADERS, 1, CONNECT_BLOCK[8:]),
     [ev.ConnectRequest(1, "10.0.0.1:80")]),
    ("block split over CONTINUATIONs", START + headers(1, 0, CONNECT_BLOCK[:5])
     + frame(CONTINUATION, END_HEADERS, 1, CONNECT_BLOCK[5:]),
     [ev.ConnectRequest(1, "10.0.0.1:80")]),
    ("empty DATA with END_STREAM (a FIN)", START + headers(1) + frame(DATA, END_STREAM, 1),
     [ev.ConnectRequest(1, "10.0.0.1:80"), ev.StreamEnded(1)]),
    ("one empty DATA between data", START + headers(1) + frame(DATA, 0, 1) + frame(DATA, 0, 1, b"a")
     + frame(DATA, 0, 1), [ev.ConnectRequest(1, "10.0.0.1:80"), ev.DataReceived(1, b"a", 1)]),
    ("100 PRIORITY frames", START + frame(PRIORITY, 0, 1, b"\0\0\0\0\x10") * 100, []),
    ("5 WINDOW_UPDATEs", START + frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\1") * 5, []),
]


@pytest.mark.parametrize("step", [0, 10, 4099])
@pytest.mark.parametrize(("name", "data", "expected"), ACCEPTED, ids=[r[0] for r in ACCEPTED])
def test_frames_within_limits_are_served(name: str, data: bytes, expected: list[ev.Event],
                                         step: int) -> None:
    s = server()
    events = [e for e in feed(s, data, step) if not isinstance(e, ev.StreamWritable)]
    merged: list[ev.Event] = []
    for e in events:  # byte-at-a-time feeding splits DATA into many events
        last = merged[-1] if merged else None
        if (isinstance(e, ev.DataReceived) and isinstance(last, ev.DataReceived)
                and last.stream_id == e.stream_id):
            merged[-1] = ev.DataReceived(e.stream_id, last.data + e.data,
                                         last.flow_length + e.flow_length)
        else:
            merged.append(e)
    assert merged == expected
    assert goaway_code(s) is None


def test_limits_follow_the_settings() -> None:
    s = server(HboneSettings(max_continuations=2, max_empty_frames=3,
                             max_frame_size=16384))
    assert terminated(s.receive(START + frame(DATA, 0, 1, length=16385))) is not None
    s = server(HboneSettings(max_continuations=2))
    end = terminated(s.receive(START + headers(1, 0) + frame(CONTINUATION, 0, 1, b"\0") * 3))
    assert end is not None and end.cause == "continuation_flood"


def test_window_updates_are_allowed_per_data_frame_sent() -> None:
    s = server()
    s.receive(START + headers(1))
    s.accept_stream(1)
    for _ in range(3):
        s.send(1, b"x")
        s.data_to_send()
    # 5 + 2 * (1 stream + 10 * 3 DATA frames) = 67 WINDOW_UPDATEs are fine, the 68th is not.
    assert terminated(s.receive(frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\1") * 67)) is None
    end = terminated(s.receive(frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\1")))
    assert end is not None and end.cause == "window_update_flood"


def test_client_side_wants_settings_first_but_no_preface() -> None:
    c = HboneConnection(True)
    c.initiate()
    assert c.receive(frame(SETTINGS)) == []
    c = HboneConnection(True)
    c.initiate()
    end = terminated(c.receive(frame(PING, 0, 0, b"\0" * 8)))
    assert end is not None and end.cause == "bad_preface"


def test_every_limit_has_a_flag_with_the_config_default() -> None:
    import dataclasses

    from ambit.cli import build_parser
    from ztunnel.cli import HBONE_LIMITS
    from ztunnel.config import ZtunnelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ZtunnelConfig)
                if f.name.startswith("hbone_")}
    assert {name: default for name, _, default, _ in HBONE_LIMITS} == defaults
    flags = [f"--{name.replace('_', '-')}" for name in defaults]
    args = build_parser().parse_args(["ztunnel", *(x for f in flags for x in (f, "300000"))])
    config = ZtunnelConfig.from_mapping({}, **{k: getattr(args, k) for k in defaults},
                                        node="n")
    settings = config.hbone_settings()
    assert settings.max_continuations == 300000 and settings.max_frame_size == 300000


@pytest.mark.parametrize(("setting", "value"), [
    ("hbone_max_frame_size", 1000), ("hbone_max_frame_size", 1 << 24),
    ("hbone_max_continuations", -1), ("hbone_max_header_list_size", 10),
    ("hbone_peer_buffer", 1000),
])
def test_bad_limits_are_config_errors(setting: str, value: int) -> None:
    from ztunnel.config import ConfigError, ZtunnelConfig

    with pytest.raises(ConfigError, match=setting):
        ZtunnelConfig.from_mapping({setting: value}, node="n")


# -- rapid reset (issue 13 item 2) -------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rst(sid: int, code: int = 8) -> bytes:
    return frame(RST, 0, sid, code.to_bytes(4, "big"))


def reset_server(**kw: float) -> tuple[HboneConnection, FakeClock]:
    clock = FakeClock()
    s = HboneConnection(False, HboneSettings(**kw), clock=clock)  # type: ignore[arg-type]
    s.initiate()
    s.data_to_send()
    s.receive(START)
    return s, clock


def test_a_stream_requested_and_reset_in_the_same_bytes_never_reaches_the_application() -> None:
    s, _ = reset_server()
    events = s.receive(headers(1) + frame(DATA, 0, 1, b"abc") + rst(1) + headers(3))
    assert events == [ev.ConnectRequest(3, "10.0.0.1:80")]
    assert s.pending_streams == 1
    # The 3 bytes of the dropped stream were credited back, not left to the application.
    assert s.recv_buffered == 0


# (seconds at which a request is made and reset in separate reads, limit, window) -> closed?
RESETS = [
    ([0, 1, 2], 3, 10.0, False),
    ([0, 1, 2, 3], 3, 10.0, True),
    ([0, 1, 2, 12.5, 13], 3, 10.0, False),  # the first three slid out of the window
    ([0, 0, 0, 0, 0, 0], 5, 1.0, True),
    ([0, 2, 4, 6, 8, 10], 2, 3.0, False),
]


@pytest.mark.parametrize(("times", "limit", "window", "closed"), RESETS)
def test_premature_resets_in_a_sliding_window(times: list[float], limit: int, window: float,
                                               closed: bool) -> None:
    s, clock = reset_server(max_premature_resets=limit, reset_window=window)
    sid = 1
    last: list[ev.Event] = []
    for t in times:
        clock.now = 1000.0 + t
        assert s.receive(headers(sid)) == [ev.ConnectRequest(sid, "10.0.0.1:80")]
        last = s.receive(rst(sid))
        sid += 2
    end = terminated(last)
    assert (end is not None) == closed
    if end is not None:
        assert (end.error_code, end.cause) == (CALM, "reset_flood")
        assert goaway_code(s) == CALM


def test_resets_after_the_answer_are_not_premature() -> None:
    s, _ = reset_server(max_premature_resets=2)
    for sid in range(1, 21, 2):
        s.receive(headers(sid))
        s.accept_stream(sid)
        assert s.receive(rst(sid)) == [ev.StreamReset(sid, 8)]
    assert not s.terminated and s.pending_streams == 0


def test_flood_of_headers_and_resets_in_one_read_is_cut() -> None:
    s, _ = reset_server()
    flood = b"".join(headers(sid) + rst(sid) for sid in range(1, 40_001, 2))
    events = s.receive(flood)
    assert [type(e) for e in events] == [ev.ConnectionTerminated]  # no tunnel at all
    assert events[0].cause == "reset_flood"  # type: ignore[union-attr]


def test_pending_streams_are_bounded() -> None:
    s, _ = reset_server(max_pending_streams=2)
    assert s.receive(headers(1) + headers(3)) == [ev.ConnectRequest(1, "10.0.0.1:80"),
                                                  ev.ConnectRequest(3, "10.0.0.1:80")]
    events = s.receive(headers(5))
    assert len(events) == 1 and isinstance(events[0], ev.RequestRejected)
    assert events[0].cause == "too_many_pending_streams"
    assert (RST, 5, b"\0\0\0\x07") in [(f[0], f[2], f[3]) for f in frames_of(s.data_to_send())]
    s.accept_stream(1)
    assert s.receive(headers(7)) == [ev.ConnectRequest(7, "10.0.0.1:80")]
    s.reject_stream(3, 503)
    s.reset(7)
    assert s.pending_streams == 0


async def test_the_adapter_cancels_the_dial_of_a_reset_stream() -> None:
    import asyncio

    from ztunnel.hbone.conn import HboneProtocol, HboneStream

    started, cancelled = asyncio.Event(), asyncio.Event()

    async def dial(stream: HboneStream) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)  # a backend that takes forever to answer
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def on_request(stream: HboneStream) -> None:
        stream.cancel_on_reset(asyncio.create_task(dial(stream)))

    class Transport:
        def write(self, data: bytes) -> None:
            pass

        def is_closing(self) -> bool:
            return False

    proto = HboneProtocol(False, on_request=on_request)
    proto.connection_made(Transport())  # type: ignore[arg-type]
    proto.data_received(START + headers(1))
    await asyncio.wait_for(started.wait(), 1)
    proto.data_received(rst(1))
    await asyncio.wait_for(cancelled.wait(), 1)


# -- bounded memory (issue 13 item 3) ----------------------------------------------------------

def test_buffers_are_accounted() -> None:
    s = server(HboneSettings(stream_window=65535, connection_window=65535))
    s.receive(START + headers(1) + frame(DATA, 0, 1, b"a" * 1000) + headers(3)
              + frame(DATA, 0, 3, b"b" * 500))
    assert (s.recv_buffered, s.send_buffered) == (1500, 0)
    s.ack(1, 1000)
    assert s.recv_buffered == 500
    s.accept_stream(1)
    s.accept_stream(3)
    # The client's window is 65535: the rest waits in the send buffer.
    s.send(1, b"x" * 100_000)
    assert s.send_buffered == 100_000 - 65535
    s.send(3, b"y" * 10)
    assert s.send_buffered == 100_000 - 65535 + 10
    s.reset(1)  # its queued bytes are gone with it
    assert s.send_buffered == 10
    s.receive(rst(3))
    assert s.send_buffered == 0


def ping(n: int = 1) -> bytes:
    return frame(PING, 0, 0, b"\0" * 8) * n


@pytest.mark.parametrize(("batches", "drained", "flood"), [
    ([999], False, False),  # plus the first SETTINGS: 1000
    ([1000], False, True),
    ([600, 600], False, True),
    ([600, 600], True, False),  # the peer read our output in between
    ([999, 999], True, False),
])
def test_unread_control_frames_are_capped(batches: list[int], drained: bool,
                                          flood: bool) -> None:
    s = server()
    s.receive(START)
    events: list[ev.Event] = []
    for n in batches:
        events = s.receive(ping(n))
        if terminated(events) is not None:
            break
        if drained:
            s.data_to_send()
            s.output_drained()
    end = terminated(events)
    assert (end is not None) == flood
    if end is not None:
        assert (end.error_code, end.cause) == (CALM, "control_frame_flood")


def test_a_stream_gets_a_share_of_the_budget() -> None:
    c = HboneConnection(True, HboneSettings(buffer_limit=1 << 30))
    assert c._stream_high == 1024 * 1024  # send_high_water
    c = HboneConnection(True, HboneSettings(buffer_limit=8 << 20))
    assert c._stream_high == 64 * 1024  # 4 MiB over 100 streams, at least 64 KiB


class FakeTransport:
    """Enough of a transport for HboneProtocol: records writes and reading pauses."""

    def __init__(self) -> None:
        self.buffer = 0
        self.reading = True
        self.written = 0
        self.chunks: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.chunks.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def window_update(sid: int, n: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, n.to_bytes(4, "big"))


async def test_writers_wait_while_the_connection_send_budget_is_spent() -> None:
    import asyncio

    from ztunnel.hbone.conn import HboneProtocol, HboneStream

    streams: list[HboneStream] = []
    proto = HboneProtocol(False, on_request=streams.append,
                          settings=HboneSettings(buffer_limit=512 * 1024))
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    # The peer's windows are the default 65535: almost everything stays queued here.
    proto.data_received(START + headers(1) + headers(3) + headers(5))
    for s in streams:
        s.accept()
    w1 = asyncio.create_task(streams[0].write(b"a" * 150_000))
    w2 = asyncio.create_task(streams[1].write(b"b" * 150_000))
    await asyncio.sleep(0.01)
    # Two streams queued 300 000 bytes: above half the budget, the third writer waits.
    w3 = asyncio.create_task(streams[2].write(b"c" * 150_000))
    await asyncio.sleep(0.01)
    assert not w3.done() and proto.core.send_buffered < 300_000
    assert proto.buffered < 512 * 1024
    # The peer grants credit: the queues drain, the budget frees up, the third goes on.
    proto.data_received(window_update(0, 2**30) + window_update(1, 2**30)
                        + window_update(3, 2**30) + window_update(5, 2**30))
    await asyncio.wait_for(asyncio.gather(w1, w2, w3), 1)
    assert proto.core.send_buffered == 0


async def test_reading_stops_while_unread_output_exceeds_the_budget() -> None:
    from ztunnel.hbone.conn import HboneProtocol

    proto = HboneProtocol(False, settings=HboneSettings(buffer_limit=1 << 20))
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(START)
    proto.pause_writing()  # the peer stopped reading
    transport.buffer = 900_000
    proto.data_received(ping(10))
    assert transport.reading  # below the budget: still reading
    transport.buffer = 1_100_000
    proto.data_received(ping(10))
    assert not transport.reading
    transport.buffer = 0
    proto.resume_writing()
    assert transport.reading


# -- timeouts (issue 13 item 4), on a fake clock ------------------------------------------------

def timed(client_side: bool = False, **kw: float) -> tuple[HboneConnection, FakeClock]:
    clock = FakeClock()
    c = HboneConnection(client_side, HboneSettings(**kw), clock=clock)  # type: ignore[arg-type]
    c.initiate()
    c.data_to_send()
    return c, clock


def run_until(c: HboneConnection, clock: FakeClock, until: float) -> list[ev.Event]:
    """Advance the fake clock from deadline to deadline, as the adapter's timer does."""
    out: list[ev.Event] = []
    for _ in range(1000):
        when = c.next_deadline()
        if when is None or when > 1000.0 + until:
            break
        clock.now = max(clock.now, when)
        out += c.tick(clock.now)
        if c.terminated:
            break
    return out


def test_no_preface_within_the_handshake_timeout() -> None:
    s, clock = timed(handshake_timeout=5.0)
    assert s.next_deadline() == 1005.0
    assert run_until(s, clock, 4.9) == []
    end = terminated(run_until(s, clock, 5.0))
    assert end is not None and end.cause == "handshake_timeout"
    assert clock.now == 1005.0 and goaway_code(s) == PROTOCOL


def test_preface_in_time_disarms_the_handshake_timeout() -> None:
    s, clock = timed(handshake_timeout=5.0, idle_timeout=0, keepalive_interval=0)
    clock.now = 1004.0
    s.receive(START)
    assert s.next_deadline() is None
    assert run_until(s, clock, 100) == []


def test_idle_connection_is_closed_with_goaway() -> None:
    s, clock = timed(idle_timeout=60.0, keepalive_interval=0)
    s.receive(START + headers(1))
    s.accept_stream(1)
    assert run_until(s, clock, 300) == []  # a tunnel is open: never idle
    s.receive(frame(DATA, END_STREAM, 1))
    s.end(1)  # both sides closed: no stream
    clock.now = 2000.0
    assert s.tick(clock.now) == []  # the idle clock starts here
    assert s.next_deadline() == 2060.0
    end = terminated(run_until(s, clock, 1100))
    assert end is not None and (end.cause, end.error_code, clock.now) == ("idle_timeout", 0, 2060.0)
    assert goaway_code(s) == 0


def test_keepalive_pings_a_silent_peer_and_closes_without_an_answer() -> None:
    s, clock = timed(keepalive_interval=30.0, keepalive_timeout=10.0, idle_timeout=0)
    s.receive(START)
    clock.now = 1030.0
    assert s.tick(clock.now) == []  # the frames above count as heard at the first tick
    assert run_until(s, clock, 60.0) == []
    pings = [f for f in frames_of(s.data_to_send()) if f[0] == PING and not f[1] & ACK]
    assert len(pings) == 1 and clock.now == 1060.0
    end = terminated(run_until(s, clock, 70.0))
    assert end is not None and end.cause == "keepalive_timeout" and clock.now == 1070.0


def test_keepalive_answered_keeps_the_connection() -> None:
    s, clock = timed(keepalive_interval=30.0, keepalive_timeout=10.0, idle_timeout=0)
    s.receive(START)
    for _ in range(5):
        run_until(s, clock, clock.now - 1000.0 + 31)
        out = frames_of(s.data_to_send())
        opaque = [f[3] for f in out if f[0] == PING and not f[1] & ACK]
        if opaque:
            s.receive(frame(PING, ACK, 0, opaque[0]))
    assert not s.terminated


def test_keepalive_runs_on_the_client_side_too() -> None:
    c, clock = timed(client_side=True, keepalive_interval=5.0, keepalive_timeout=1.0,
                     idle_timeout=0, handshake_timeout=0)
    c.receive(frame(SETTINGS))
    end = terminated(run_until(c, clock, 100))
    assert end is not None and end.cause == "keepalive_timeout"


async def test_the_adapter_arms_the_idle_timer_when_the_last_tunnel_ends() -> None:
    import asyncio

    from ztunnel.hbone.conn import HboneProtocol, HboneStream

    streams: list[HboneStream] = []
    proto = HboneProtocol(False, on_request=streams.append, settings=HboneSettings(
        keepalive_interval=0, handshake_timeout=0, idle_timeout=0.05))
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(START + headers(1))
    streams[0].accept()
    await asyncio.sleep(0.1)  # the idle timer armed at the start ticks and finds a tunnel
    assert proto._timer is None and not proto.core.terminated  # no timer while it is open
    proto.data_received(frame(DATA, END_STREAM, 1))
    streams[0].write_eof()
    await asyncio.sleep(0.3)
    assert proto.core.terminated  # closed for idleness
    assert goaway_code_of(transport) == 0


def goaway_code_of(transport: FakeTransport) -> int | None:
    for ftype, _, _, payload in frames_of(b"".join(transport.chunks)):
        if ftype == GOAWAY:
            return int.from_bytes(payload[4:8], "big")
    return None


def test_stream_idle_timeout_is_off_by_default_and_resets_quiet_tunnels_when_set() -> None:
    s, clock = timed(idle_timeout=0, keepalive_interval=0)
    s.receive(START + headers(1))
    s.accept_stream(1)
    assert s.next_deadline() is None  # a quiet tunnel stays, like TCP
    s, clock = timed(idle_timeout=0, keepalive_interval=0, stream_idle_timeout=20.0)
    s.receive(START + headers(1) + headers(3))
    s.accept_stream(1)
    s.accept_stream(3)
    events: list[ev.Event] = []
    for t in range(0, 41, 5):
        clock.now = 1000.0 + t
        s.send(3, b"x")  # stream 3 keeps talking
        events += s.tick(clock.now)
    assert events == [ev.StreamReset(1, 8)]
    assert s.has_stream(3) and not s.has_stream(1)


# -- answers after h2 closed the stream (fuzz/known/hbone_core/crash-reject-after-*) ---------

GET_BLOCK = _literal(b":method", b"GET") + _literal(b":authority", b"10.0.0.1:80")
GOAWAY_FRAME = frame(GOAWAY, 0, 0, b"\0\0\0\0\0\0\0\0")


@pytest.mark.parametrize(("name", "data"), [
    ("405 after an RST_STREAM in the same read", START + headers(1, END_HEADERS, GET_BLOCK)
     + rst(1)),
    ("405 after a GOAWAY in the same read", START + headers(1, END_HEADERS, GET_BLOCK)
     + GOAWAY_FRAME),
    ("400 after an RST_STREAM in the same read", START + headers(
        1, END_HEADERS, _literal(b":method", b"CONNECT") + _literal(b":authority", b"x"))
     + rst(1)),
])
def test_an_answer_h2_can_no_longer_send_is_dropped(name: str, data: bytes) -> None:
    s = server()
    events = s.receive(data)  # raised h2's ProtocolError out of receive() before
    assert [e.status for e in events if isinstance(e, ev.RequestRejected)] in ([405], [400])
    assert not s.has_stream(1)


def test_accepting_a_stream_closed_by_a_later_goaway_forgets_it() -> None:
    s = server()
    assert s.receive(START + headers(1)) == [ev.ConnectRequest(1, "10.0.0.1:80")]
    s.receive(GOAWAY_FRAME)
    s.accept_stream(1)  # h2 refuses to send on a closed connection: no exception
    assert not s.has_stream(1) and s.pending_streams == 0
    s.reset(1)
    s.reject_stream(1, 503)

"""The HBONE core's own DATA path (issue 14): DATA frames parsed and framed by the core, h2 kept
for everything else. Raw frames in, events and frames out; answers to misbehaving peers are
compared with what plain h2 answers to the same bytes."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from tests.unit.test_hbone_limits import (
    CONNECT_BLOCK,
    DATA,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    RST,
    SETTINGS,
    START,
    WINDOW_UPDATE,
    frame,
    frames_of,
    headers,
    rst,
    window_update,
)
from ztunnel.hbone import events as ev
from ztunnel.hbone.core import HboneConnection, HboneSettings

PADDED = 0x8
ACK = 0x1
FLOW = h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
PROTOCOL = h2.errors.ErrorCodes.PROTOCOL_ERROR
STREAM_CLOSED = h2.errors.ErrorCodes.STREAM_CLOSED
FRAME_SIZE = h2.errors.ErrorCodes.FRAME_SIZE_ERROR
SMALL = HboneSettings(stream_window=65535, connection_window=65535, max_frame_size=16384)


def data(sid: int, payload: bytes, flags: int = 0, pad: int | None = None) -> bytes:
    if pad is None:
        return frame(DATA, flags, sid, payload)
    return frame(DATA, flags | PADDED, sid, bytes([pad]) + payload + b"\0" * pad)


def server(settings: HboneSettings = SMALL) -> HboneConnection:
    s = HboneConnection(False, settings)
    s.initiate()
    s.data_to_send()
    return s


def answers(conn: HboneConnection) -> list[tuple[str, int, int]]:
    """The RST_STREAMs and GOAWAYs ``conn`` sends: (kind, stream, code)."""
    return _resets_and_goaways(conn.data_to_send())


def _resets_and_goaways(wire: bytes) -> list[tuple[str, int, int]]:
    out = []
    for ftype, _, sid, payload in frames_of(wire):
        if ftype == RST:
            out.append(("RST_STREAM", sid, int.from_bytes(payload[:4], "big")))
        elif ftype == GOAWAY:
            out.append(("GOAWAY", 0, int.from_bytes(payload[4:8], "big")))
    return out


def window_updates(conn: HboneConnection) -> list[tuple[int, int]]:
    return [(sid, int.from_bytes(p, "big")) for ftype, _, sid, p in frames_of(conn.data_to_send())
            if ftype == WINDOW_UPDATE]


def merged(events: list[ev.Event]) -> list[ev.Event]:
    """Consecutive DataReceived of one stream as one (feeding in pieces splits them)."""
    out: list[ev.Event] = []
    for e in events:
        last = out[-1] if out else None
        if (isinstance(e, ev.DataReceived) and isinstance(last, ev.DataReceived)
                and last.stream_id == e.stream_id):
            out[-1] = ev.DataReceived(e.stream_id, last.data + e.data,
                                      last.flow_length + e.flow_length)
        else:
            out.append(e)
    return out


def reference(wire: bytes) -> list[tuple[str, int, int]]:
    """What plain h2 (a server with our windows, content-length unchecked) answers to the
    same bytes, acknowledging the data it receives: its RST_STREAMs and GOAWAYs."""
    config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                       validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config)
    conn.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535,
        h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384,
        h2.settings.SettingCodes.ENABLE_PUSH: 0})
    conn.max_inbound_frame_size = 16384
    conn.initiate_connection()
    conn.data_to_send()
    try:
        for e in conn.receive_data(wire):
            if isinstance(e, h2.events.RequestReceived):
                conn.send_headers(e.stream_id, [(b":status", b"200")])
    except h2.exceptions.ProtocolError:
        pass
    return _resets_and_goaways(conn.data_to_send())


# -- receiving -------------------------------------------------------------------------------

OPEN1 = START + headers(1)
FORTY_K = data(1, b"x" * 16384) * 2 + data(1, b"x" * 7232)  # 40 000 bytes in 16 KiB frames
FIN1 = data(1, b"", END_STREAM)

# (name, bytes after the server accepted stream 1 from START + HEADERS, expected answers)
MISUSE = [
    ("DATA on stream 0", frame(DATA, 0, 0, b"x"), [("GOAWAY", 0, PROTOCOL)]),
    ("DATA on an idle stream", data(3, b"x"), [("GOAWAY", 0, PROTOCOL)]),
    ("DATA on an even (server) stream never opened", data(2, b"x"), [("GOAWAY", 0, PROTOCOL)]),
    ("DATA after END_STREAM (half-closed remote)", FIN1 + data(1, b"x"),
     [("RST_STREAM", 1, STREAM_CLOSED)]),
    ("DATA after the peer's RST_STREAM", rst(1) + data(1, b"x"),
     [("RST_STREAM", 1, STREAM_CLOSED)]),
    ("DATA after the peer's GOAWAY", frame(GOAWAY, 0, 0, b"\0" * 8) + data(1, b"x"),
     [("GOAWAY", 0, PROTOCOL)]),
    ("END_STREAM twice", FIN1 + FIN1, [("RST_STREAM", 1, STREAM_CLOSED)]),
]


@pytest.mark.parametrize(("name", "wire", "expected"), MISUSE, ids=[m[0] for m in MISUSE])
def test_data_on_a_stream_that_takes_none_gets_h2s_answer(
        name: str, wire: bytes, expected: list[tuple[str, int, int]]) -> None:
    s = server()
    s.receive(OPEN1)
    s.accept_stream(1)
    s.data_to_send()
    s.receive(wire)
    got = answers(s)
    # A GOAWAY for a protocol error may be preceded by h2's own; the codes are what matter.
    assert sorted(set(got)) == sorted(set(expected))
    assert sorted(set(reference(OPEN1 + wire))) == sorted(set(expected))


def test_data_on_a_stream_we_reset_is_refused_and_its_credit_returned() -> None:
    s = server()
    s.receive(OPEN1)
    s.accept_stream(1)
    s.reset(1)
    s.data_to_send()
    events = s.receive(FORTY_K)
    assert events == [] and not s.terminated
    out = frames_of(s.data_to_send())
    assert (RST, 1, STREAM_CLOSED.to_bytes(4, "big")) in [(f[0], f[2], f[3]) for f in out]
    # The connection window gets its credit back, in h2's steps (half a window at least).
    assert [(f[2], int.from_bytes(f[3], "big")) for f in out if f[0] == WINDOW_UPDATE] \
        == [(0, 32_768)]


def test_data_on_a_stream_we_rejected_is_dropped_without_an_error() -> None:
    s = server()
    s.receive(OPEN1)
    s.reject_stream(1, 403)
    s.data_to_send()  # the 403 with END_STREAM, then RST_STREAM(NO_ERROR): closed in h2
    assert s.receive(data(1, b"late", END_STREAM)) == []
    # As on any stream we reset: h2's stream error, never a connection error.
    assert answers(s) == [("RST_STREAM", 1, 5)] and s.recv_buffered == 0
    assert not s.terminated


def test_client_refuses_data_before_the_response() -> None:
    c = HboneConnection(True, SMALL)
    c.initiate()
    c.data_to_send()
    c.receive(frame(SETTINGS))
    sid = c.open_stream("10.0.0.1:80")
    c.data_to_send()
    events = c.receive(data(sid, b"early"))
    assert isinstance(events[-1], ev.ConnectionTerminated) and events[-1].error_code == PROTOCOL


@pytest.mark.parametrize(("name", "wire", "code"), [
    ("stream window exceeded", data(1, b"x" * 16384) * 4 + data(1, b"x" * 16384), FLOW),
    ("connection window exceeded over two streams",
     data(1, b"x" * 16384) * 3 + data(3, b"x" * 16384) + data(3, b"x" * 10), FLOW),
    ("padding counts against the window", data(1, b"x" * 16000) * 4 + data(1, b"x" * 1300, pad=255),
     FLOW),
    ("padded frame without its pad length", frame(DATA, PADDED, 1), FRAME_SIZE),
    ("pad length equal to the payload", frame(DATA, PADDED, 1, b"\x04abc"), PROTOCOL),
    ("pad length above the payload", frame(DATA, PADDED, 1, b"\xff"), PROTOCOL),
])
@pytest.mark.parametrize("step", [0, 1, 5])
def test_flow_control_and_padding_violations_end_the_connection(name: str, wire: bytes,
                                                                code: int, step: int) -> None:
    s = server()
    s.receive(START + headers(1) + headers(3))
    events: list[ev.Event] = []
    chunks = [wire] if not step else [wire[i:i + step] for i in range(0, len(wire), step)]
    for chunk in chunks:
        events = s.receive(chunk)
        if s.terminated:
            break
    end = events[-1]
    assert isinstance(end, ev.ConnectionTerminated) and end.fatal
    assert (end.error_code, end.cause) == (code, "protocol_error")
    assert ("GOAWAY", 0, code) in answers(s)
    if step == 0 and code != FLOW:  # h2 says the same (it sees the connection window itself)
        assert ("GOAWAY", 0, code) in reference(START + headers(1) + headers(3) + wire)


def test_exactly_the_window_is_accepted() -> None:
    s = server()
    events = s.receive(START + headers(1) + data(1, b"x" * 16384) * 3 + data(1, b"y" * 16383))
    assert not s.terminated
    assert sum(e.flow_length for e in events if isinstance(e, ev.DataReceived)) == 65535


# (name, frames after START + HEADERS(1), expected events after the request)
DELIVERY = [
    ("plain", data(1, b"hello"), [ev.DataReceived(1, b"hello", 5)]),
    ("padded", data(1, b"hello", pad=7), [ev.DataReceived(1, b"hello", 5)]),
    ("padded, pad length 0", data(1, b"hello", pad=0), [ev.DataReceived(1, b"hello", 5)]),
    ("only padding", data(1, b"", pad=9), []),
    ("END_STREAM with data", data(1, b"bye", END_STREAM),
     [ev.DataReceived(1, b"bye", 3), ev.StreamEnded(1)]),
    ("END_STREAM, padded", data(1, b"bye", END_STREAM, pad=3),
     [ev.DataReceived(1, b"bye", 3), ev.StreamEnded(1)]),
    ("empty END_STREAM", FIN1, [ev.StreamEnded(1)]),
    ("two streams interleaved", headers(3) + data(1, b"a") + data(3, b"b") + data(1, b"c"),
     [ev.ConnectRequest(3, "10.0.0.1:80"), ev.DataReceived(1, b"a", 1),
      ev.DataReceived(3, b"b", 1), ev.DataReceived(1, b"c", 1)]),
    ("control frames between DATA", data(1, b"a") + frame(PING, 0, 0, b"\0" * 8)
     + window_update(0, 100) + data(1, b"b", END_STREAM),
     [ev.DataReceived(1, b"ab", 2), ev.StreamEnded(1)]),  # merged: one per frame really
    ("unknown flags ignored", frame(DATA, 0xF0, 1, b"z"), [ev.DataReceived(1, b"z", 1)]),
]


@pytest.mark.parametrize(("name", "wire", "expected"), DELIVERY, ids=[d[0] for d in DELIVERY])
def test_data_is_delivered(name: str, wire: bytes, expected: list[ev.Event]) -> None:
    s = server()
    events = merged(s.receive(OPEN1 + wire))
    assert events == [ev.ConnectRequest(1, "10.0.0.1:80"), *expected]
    delivered = sum(e.flow_length for e in events if isinstance(e, ev.DataReceived))
    assert s.recv_buffered == delivered


def test_padding_credit_is_returned_without_the_application() -> None:
    s = server()
    s.receive(OPEN1)
    s.data_to_send()
    # 40 160 bytes of padding, never delivered: given back as soon as they reach half a
    # window (131 frames of 251 bytes), without the application acknowledging anything.
    s.receive(data(1, b"", pad=250) * 160)
    assert s.recv_buffered == 0
    assert window_updates(s) == [(0, 32_881), (1, 32_881)]


SPLIT_WIRE = (START + headers(1) + data(1, b"first", pad=4) + frame(PING, 0, 0, b"12345678")
              + headers(3) + data(3, b"x" * 300) + data(1, b"") + data(1, b"second")
              + window_update(1, 1000) + data(3, b"", pad=6) + data(1, b"end", END_STREAM))


def test_a_frame_split_at_every_byte_offset_gives_the_same_events() -> None:
    whole = server()
    expected = merged(whole.receive(SPLIT_WIRE))
    sent = frames_of(whole.data_to_send())
    assert [e for e in expected if isinstance(e, ev.DataReceived)] == [
        ev.DataReceived(1, b"first", 5), ev.DataReceived(3, b"x" * 300, 300),
        ev.DataReceived(1, b"secondend", 9)]  # merged: the padding-only frame between
    for cut in range(1, len(SPLIT_WIRE)):
        s = server()
        events = merged(s.receive(SPLIT_WIRE[:cut]) + s.receive(SPLIT_WIRE[cut:]))
        assert events == expected, cut
        assert frames_of(s.data_to_send()) == sent, cut
        assert s.recv_buffered == whole.recv_buffered


def test_three_way_splits_around_the_padded_header() -> None:
    start = len(START + headers(1))
    whole = server()
    expected = merged(whole.receive(SPLIT_WIRE))
    for a in range(start - 2, start + 14):
        for b in range(a + 1, start + 16):
            s = server()
            events = s.receive(SPLIT_WIRE[:a]) + s.receive(SPLIT_WIRE[a:b])
            events += s.receive(SPLIT_WIRE[b:])
            assert merged(events) == expected, (a, b)


def test_byte_at_a_time() -> None:
    s = server()
    events = [e for i in range(len(SPLIT_WIRE)) for e in s.receive(SPLIT_WIRE[i:i + 1])]
    assert merged(events) == merged(server().receive(SPLIT_WIRE))


def test_a_frame_in_flight_for_a_stream_reset_meanwhile_is_not_delivered() -> None:
    s = server()
    wire = data(1, b"y" * 1000)
    events = s.receive(OPEN1 + wire[:500])
    assert merged(events)[-1] == ev.DataReceived(1, b"y" * 491, 491)
    s.accept_stream(1)
    s.reset(1)
    s.ack(1, 491)  # what the adapter does for the chunks of a reset stream
    assert s.receive(wire[500:]) == []
    assert s.recv_buffered == 0 and not s.terminated


# -- window updates --------------------------------------------------------------------------

def test_credit_is_returned_like_h2_does_at_half_a_window() -> None:
    s = server()
    s.receive(OPEN1 + data(1, b"x" * 16384) * 2)
    s.data_to_send()
    s.ack(1, 30_000)
    assert window_updates(s) == []  # below half of 65535
    s.ack(1, 2767)  # 32 767 = 65535 // 2
    assert window_updates(s) == [(0, 32_767), (1, 32_767)]


def test_an_empty_window_is_reopened_after_a_little_credit() -> None:
    s = server()
    s.receive(OPEN1 + data(1, b"x" * 16384) * 3 + data(1, b"x" * 16383))
    s.data_to_send()
    s.ack(1, 1024)
    assert window_updates(s) == []
    s.ack(1, 1)  # more than 1024 processed while the window is empty
    assert window_updates(s) == [(0, 1025), (1, 1025)]


def test_a_finished_stream_credits_only_the_connection() -> None:
    s = server()
    s.receive(OPEN1 + FORTY_K + FIN1)
    s.data_to_send()
    s.ack(1, 40_000)
    assert window_updates(s) == [(0, 40_000)]


def test_the_connection_window_is_opened_at_the_start() -> None:
    s = HboneConnection(False, HboneSettings(connection_window=4 << 20))
    s.initiate()
    assert window_updates(s) == [(0, (4 << 20) - 65535)]
    s = HboneConnection(False, SMALL)
    s.initiate()
    assert window_updates(s) == []


# -- sending ---------------------------------------------------------------------------------

def client_and_server(settings: HboneSettings = SMALL) -> tuple[HboneConnection, HboneConnection]:
    c, s = HboneConnection(True, settings), HboneConnection(False, settings)
    c.initiate()
    s.initiate()
    s.receive(c.data_to_send())
    c.receive(s.data_to_send())
    s.receive(c.data_to_send())
    return c, s


def test_sent_frames_respect_the_peers_frame_size_and_windows() -> None:
    s = server()
    s.receive(OPEN1)
    s.accept_stream(1)
    s.data_to_send()
    s.send(1, b"a" * 10_000 + b"b" * 100_000)
    out = frames_of(s.data_to_send())
    sizes = [len(f[3]) for f in out if f[0] == DATA]
    assert max(sizes) == 16384 and sum(sizes) == 65535  # the stream's default window
    assert b"".join(f[3] for f in out if f[0] == DATA) == (b"a" * 10_000 + b"b" * 100_000)[:65535]
    assert s._h2.local_flow_control_window(1) == 0  # h2's own windows moved with ours
    s.receive(window_update(0, 10) + window_update(1, 1000))
    more = [f for f in frames_of(s.data_to_send()) if f[0] == DATA]
    assert sum(len(f[3]) for f in more) == 10  # the connection window is the smaller
    assert s.pending(1) == 110_000 - 65535 - 10


def test_a_smaller_initial_window_from_settings_stops_the_sender() -> None:
    s = server()
    s.receive(OPEN1)
    s.accept_stream(1)
    s.send(1, b"x" * 1000)
    s.data_to_send()
    # INITIAL_WINDOW_SIZE 500: the stream window is now 65535 - 1000 - 65035 = -500.
    s.receive(frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00\x01\xf4"))
    s.send(1, b"y" * 1000)
    assert [f for f in frames_of(s.data_to_send()) if f[0] == DATA] == []
    s.receive(window_update(1, 600))
    assert [len(f[3]) for f in frames_of(s.data_to_send()) if f[0] == DATA] == [100]


def test_headers_data_and_end_stream_leave_in_order() -> None:
    c, _ = client_and_server()
    sid = c.open_stream("10.0.0.1:80")
    c.send(sid, b"early")
    c.end(sid)
    kinds = [(f[0], f[1] & END_STREAM, f[3]) for f in frames_of(c.data_to_send())]
    assert kinds[0][0] == HEADERS
    assert kinds[1:] == [(DATA, 0, b"early"), (DATA, END_STREAM, b"")]


def test_a_transfer_between_two_cores_with_small_frames() -> None:
    c, s = client_and_server()
    sid = c.open_stream("10.0.0.1:80")
    s.receive(c.data_to_send())
    s.accept_stream(sid)
    c.receive(s.data_to_send())
    payload = bytes(range(256)) * 2000
    c.send(sid, payload[:100_000])
    c.send(sid, payload[100_000:])
    c.end(sid)
    got = bytearray()
    ended = False
    for _ in range(100):
        for e in s.receive(c.data_to_send()):
            if isinstance(e, ev.DataReceived):
                got += e.data
                s.ack(sid, e.flow_length)
            ended |= isinstance(e, ev.StreamEnded)
        c.receive(s.data_to_send())
        if ended:
            break
    assert bytes(got) == payload and ended
    assert c.send_buffered == 0 and s.recv_buffered == 0


def test_sending_after_goaway_does_not_raise() -> None:
    s = server()
    s.receive(OPEN1)
    s.accept_stream(1)
    s.data_to_send()
    events = s.receive(frame(GOAWAY, 0, 0, b"\0" * 8))
    assert [type(e) for e in events] == [ev.ConnectionTerminated]
    assert s.send(1, b"x") is True
    s.end(1)
    assert [f for f in frames_of(s.data_to_send()) if f[0] == DATA] == []
    assert s.send_buffered == 0


def test_h2_never_parses_a_data_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    s = server()
    seen: list[bytes] = []
    real = s._h2.receive_data

    def spy(chunk: bytes) -> list[h2.events.Event]:
        seen.append(bytes(chunk))
        return real(chunk)

    monkeypatch.setattr(s._h2, "receive_data", spy)
    s.receive(OPEN1 + data(1, b"secret" * 100, pad=5) + data(1, b"more", END_STREAM))
    assert not any(b"secret" in x or b"more" in x for x in seen)
    assert CONNECT_BLOCK in b"".join(seen)

"""HBONE core: frames in, events out; no sockets."""

from __future__ import annotations

import ipaddress

import h2.config
import h2.connection
import h2.events
import pytest

from ztunnel.hbone import events as ev
from ztunnel.hbone.core import (
    HboneConnection,
    HboneSettings,
    forwarded_for,
    parse_authority,
    parse_forwarded_for,
)


def pump(a: HboneConnection, b: HboneConnection) -> list[ev.Event]:
    data = a.data_to_send()
    return b.receive(data) if data else []


def pair() -> tuple[HboneConnection, HboneConnection]:
    c, s = HboneConnection(True), HboneConnection(False)
    c.initiate()
    s.initiate()
    assert pump(c, s) == []
    assert pump(s, c) == []
    pump(c, s)  # settings ack
    return c, s


def open_tunnel(c: HboneConnection, s: HboneConnection, authority: str = "10.0.0.1:80") -> int:
    sid = c.open_stream(authority, [("forwarded", "for=10.0.0.9")])
    events = pump(c, s)
    assert events == [ev.ConnectRequest(sid, authority, {"forwarded": "for=10.0.0.9"})]
    s.accept_stream(sid)
    assert pump(s, c) == [ev.StreamAccepted(sid)]
    return sid


def transfer(src: HboneConnection, dst: HboneConnection) -> tuple[bytes, list[ev.Event]]:
    """Move everything queued from src to dst, acking as an application would."""
    got, other = bytearray(), []
    for _ in range(1000):
        events = pump(src, dst)
        for e in events:
            if isinstance(e, ev.DataReceived):
                got += e.data
                dst.ack(e.stream_id, e.flow_length)
            else:
                other.append(e)
        back = pump(dst, src)
        other += [e for e in back if not isinstance(e, ev.StreamWritable)]
        if not events and not back:
            break
    return bytes(got), other


def test_connect_then_bytes_both_ways_with_half_close() -> None:
    c, s = pair()
    sid = open_tunnel(c, s)
    c.send(sid, b"ping")
    c.end(sid)
    got, other = transfer(c, s)
    assert got == b"ping"
    assert ev.StreamEnded(sid) in other
    s.send(sid, b"pong")
    s.end(sid)
    got, other = transfer(s, c)
    assert got == b"pong"
    assert ev.StreamEnded(sid) in other
    assert c.active_streams == 0 and s.active_streams == 0


def test_large_transfer_respects_flow_control_and_reports_backpressure() -> None:
    settings = HboneSettings(stream_window=65535, connection_window=65535,
                             max_frame_size=16384, send_high_water=100_000)
    c, s = HboneConnection(True, settings), HboneConnection(False, settings)
    c.initiate()
    s.initiate()
    pump(c, s)
    pump(s, c)
    pump(c, s)
    sid = c.open_stream("10.0.0.1:80")
    pump(c, s)
    s.accept_stream(sid)
    pump(s, c)
    payload = bytes(range(256)) * 4000  # 1 MB, far above the 64 KiB window
    assert c.send(sid, payload) is False  # over the high-water mark: writer must wait
    assert c.pending(sid) > 0
    got, _ = transfer(c, s)
    assert got == payload
    assert c.pending(sid) == 0


def test_unacked_data_stalls_the_sender() -> None:
    settings = HboneSettings(stream_window=65535, connection_window=65535, max_frame_size=16384)
    c, s = HboneConnection(True, settings), HboneConnection(False, settings)
    for x in (c, s):
        x.initiate()
    pump(c, s)
    pump(s, c)
    pump(c, s)
    sid = c.open_stream("10.0.0.1:80")
    pump(c, s)
    s.accept_stream(sid)
    pump(s, c)
    c.send(sid, b"x" * 200_000)
    received = sum(len(e.data) for e in pump(c, s) if isinstance(e, ev.DataReceived))
    assert received == 65535  # exactly one window, then nothing until the receiver acks
    assert pump(c, s) == []
    assert c.pending(sid) == 200_000 - 65535


def test_reset_maps_to_stream_reset() -> None:
    c, s = pair()
    sid = open_tunnel(c, s)
    c.reset(sid)
    events = pump(c, s)
    assert len(events) == 1 and isinstance(events[0], ev.StreamReset)


def test_refused_tunnel() -> None:
    c, s = pair()
    sid = c.open_stream("10.0.0.1:80")
    pump(c, s)
    s.reject_stream(sid, 403)
    assert pump(s, c) == [ev.StreamRefused(sid, 403)]


def raw_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


def test_non_connect_method_is_rejected_with_405() -> None:
    s = HboneConnection(False)
    s.initiate()
    client = raw_client()
    client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"),
                            (":authority", "10.0.0.1:80")], end_stream=True)
    events = s.receive(client.data_to_send())
    assert events == [ev.RequestRejected(1, 405, "method 'GET' is not CONNECT")]
    answers = client.receive_data(s.data_to_send())
    status = [dict(a.headers)[b":status"] for a in answers
              if isinstance(a, h2.events.ResponseReceived)]
    assert status == [b"405"]


@pytest.mark.parametrize("authority", ["example.com:80", "10.0.0.1", "10.0.0.1:99999", ":80",
                                       "127.0.0.20:\u0668\u0660\u0668\u0660"])
def test_bad_authority_is_rejected_with_400(authority: str) -> None:
    s = HboneConnection(False)
    s.initiate()
    client = raw_client()
    client.send_headers(1, [(":method", "CONNECT"), (":authority", authority)])
    events = s.receive(client.data_to_send())
    assert len(events) == 1 and isinstance(events[0], ev.RequestRejected)
    assert events[0].status == 400


def test_garbage_is_a_fatal_protocol_error() -> None:
    s = HboneConnection(False)
    s.initiate()
    events = s.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(events) == 1 and isinstance(events[0], ev.ConnectionTerminated)
    assert events[0].fatal
    assert s.data_to_send()  # a GOAWAY goes back


def test_oversized_headers_terminate_the_connection() -> None:
    s = HboneConnection(False, HboneSettings(max_header_list_size=4096))
    s.initiate()
    client = raw_client()
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80"),
                            ("x-big", "a" * 20000)])
    events = s.receive(client.data_to_send())
    assert any(isinstance(e, ev.ConnectionTerminated) and e.fatal for e in events)


def test_goaway_stops_new_streams() -> None:
    c, s = pair()
    s.close(0, "draining")
    events = pump(s, c)
    assert any(isinstance(e, ev.ConnectionTerminated) and not e.fatal for e in events)
    assert not c.can_open_stream()


@pytest.mark.parametrize(("text", "expected"), [
    ("10.1.2.3:8080", (ipaddress.ip_address("10.1.2.3"), 8080)),
    ("[fd00::1]:443", (ipaddress.ip_address("fd00::1"), 443)),
    ("10.1.2.3:1", (ipaddress.ip_address("10.1.2.3"), 1)),
    ("10.1.2.3:65535", (ipaddress.ip_address("10.1.2.3"), 65535)),
    ("10.1.2.3:00080", (ipaddress.ip_address("10.1.2.3"), 80)),  # 5 digits, still a port
    ("[::ffff:255.255.255.255]:65535", (ipaddress.ip_address("::ffff:ffff:ffff"), 65535)),
])
def test_parse_authority(text: str, expected: object) -> None:
    assert parse_authority(text) == expected


@pytest.mark.parametrize("text", [
    "127.0.0.20:\u0668\u0660\u0668\u0660",  # Arabic-Indic 8080: isdigit() says yes
    "127.0.0.20:\uff18\uff10",  # fullwidth 80
    "127.0.0.20:\u00b2",  # superscript two
    "10.0.0.1:+80",
    "10.0.0.1:-80",
    "10.0.0.1: 80",
    "10.0.0.1:80 ",
    " 10.0.0.1:80",
    "10.0.0.1:8_0",
    "10.0.0.1:",
    "10.0.0.1:0",
    "10.0.0.1:65536",
    "10.0.0.1:000080",  # more than 5 digits
    "10.0.0.1:" + "1" * 5000,  # int() would spend time (or raise) on this
    "1" * 100 + ":80",
    "",
    ":80",
    "10.0.0.1",
    "example.com:80",
    "fd00::1:80",  # IPv6 without brackets: which colon is the port?
    "[10.0.0.1]:80",
    "[fe80::1%eth0]:80",  # a zone names a local interface, never a pod
    "[fe80::1%25eth0]:80",
    "\u0661\u0660.0.0.1:80",
])
def test_parse_authority_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(text)


@pytest.mark.parametrize("ip", ["10.0.0.7", "fd00::7"])
def test_forwarded_round_trip(ip: str) -> None:
    addr = ipaddress.ip_address(ip)
    assert parse_forwarded_for(forwarded_for(addr)) == addr
    assert parse_forwarded_for("proto=https;for=" + ip if ":" not in ip else "") in (addr, None)
    assert parse_forwarded_for("by=x") is None


def test_draining_server_refuses_new_tunnels_but_keeps_open_ones() -> None:
    c, s = pair()
    sid = open_tunnel(c, s)
    s.draining = True
    new = c.open_stream("10.0.0.1:80")
    events = pump(c, s)
    assert events == [ev.RequestRejected(new, 503, "draining: new tunnels are refused")]
    back = pump(s, c)
    assert [type(e) for e in back] == [ev.StreamReset]
    assert not c.can_open_stream()  # the pool must open a new connection
    c.send(sid, b"still flowing")
    got, _ = transfer(c, s)
    assert got == b"still flowing"


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 5000])
def test_fast_frame_repr_is_identical(size: int) -> None:
    import binascii

    from ztunnel.hbone._h2fast import _raw_data_repr

    data = bytes(range(256)) * 20
    data = data[:size]
    if not data:
        expected = "None"
    else:
        r = binascii.hexlify(data).decode("ascii")
        expected = "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"
    assert _raw_data_repr(data) == expected


def raw_server() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, validate_outbound_headers=False))
    conn.initiate_connection()
    return conn


@pytest.mark.parametrize(("status", "accepted", "refused_status"), [
    ("200", True, 0),
    ("204", True, 0),
    ("403", False, 403),
    ("\u0662\u0660\u0660", False, 0),  # Arabic-Indic 200 is not a status
    ("+200", False, 0),
    ("2000", False, 0),
    ("20", False, 0),
])
def test_response_status_is_three_ascii_digits(status: str, accepted: bool,
                                               refused_status: int) -> None:
    c = HboneConnection(True)
    c.initiate()
    server = raw_server()
    server.receive_data(c.data_to_send())
    sid = c.open_stream("10.0.0.1:80")
    server.receive_data(c.data_to_send())
    server.send_headers(sid, [(":status", status)])
    events = [e for e in c.receive(server.data_to_send())
              if isinstance(e, ev.StreamAccepted | ev.StreamRefused)]
    assert events == ([ev.StreamAccepted(sid)] if accepted
                      else [ev.StreamRefused(sid, refused_status)])


def lax_client() -> h2.connection.H2Connection:
    """A client that sends whatever header bytes it is given."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    return conn


@pytest.mark.parametrize(("bad", "reason"), [
    ((b"x-probe", b"\xff\xfe"), "not UTF-8"),
    ((b"forwarded", b"for=10.0.0.9\x80"), "not UTF-8"),
    ((b":authority", b"10.0.0.1:8\xc0\xb0"), "not UTF-8"),  # overlong '0'
    ((b"x-probe", b"\xed\xa0\x80"), "not UTF-8"),  # an encoded surrogate
    # h2's own header checks, made per stream: each used to end the whole connection.
    ((b"x-\xc3", b"v"), "Illegal character"),
    ((b"x-probe", b"a\x00b"), "Illegal character"),
    ((b"x-probe", b"a\r\nx-injected: 1"), "Illegal character"),
    ((b"x-probe", b" padded"), "whitespace"),
    ((b"X-Probe", b"v"), "uppercase"),
    ((b"connection", b"close"), "Connection-specific"),
    ((b":path", b"/"), "MUST NOT include :scheme or :path"),
    # h2 parsed content-length itself and failed the connection on a bad one.
    ((b"content-length", b"x"), "content-length"),
    ((b"content-length", "\u0668".encode()), "content-length"),
])
def test_bad_header_bytes_reject_that_stream_only(bad: tuple[bytes, bytes], reason: str) -> None:
    s = HboneConnection(False)
    s.initiate()
    client = lax_client()
    good = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")]
    request = [h for h in good if h[0] != bad[0]] + [bad]
    client.send_headers(1, request)
    client.send_headers(3, good)
    events = s.receive(client.data_to_send())
    assert len(events) == 2
    assert isinstance(events[0], ev.RequestRejected) and events[0].stream_id == 1
    assert events[0].status == 400 and reason in events[0].reason
    assert events[1] == ev.ConnectRequest(3, "10.0.0.1:80", {})
    s.accept_stream(3)
    answers = client.receive_data(s.data_to_send())
    status = {a.stream_id: dict(a.headers)[b":status"] for a in answers
              if isinstance(a, h2.events.ResponseReceived)}
    assert status == {1: b"400", 3: b"200"}
    # The connection is intact: the second tunnel carries bytes both ways.
    client.send_data(3, b"still here")
    events = s.receive(client.data_to_send())
    assert [e.data for e in events if isinstance(e, ev.DataReceived)] == [b"still here"]
    s.send(3, b"and back")
    answers = client.receive_data(s.data_to_send())
    assert [a.data for a in answers if isinstance(a, h2.events.DataReceived)] == [b"and back"]
    assert not s.closed and s.active_streams == 1


def test_content_length_does_not_limit_a_tunnel() -> None:
    # Tunnel bytes are not content: a content-length (here 1) must not make h2 fail the
    # connection when more DATA arrives, nor limit the tunnel.
    s = HboneConnection(False)
    s.initiate()
    client = lax_client()
    client.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"),
                            (b"content-length", b"1")])
    events = s.receive(client.data_to_send())
    assert [type(e) for e in events] == [ev.ConnectRequest]
    s.accept_stream(1)
    client.receive_data(s.data_to_send())
    client.send_data(1, b"more than one byte", end_stream=True)
    events = s.receive(client.data_to_send())
    assert [e.data for e in events if isinstance(e, ev.DataReceived)] == [b"more than one byte"]
    assert ev.StreamEnded(1) in events and not s.closed


def test_window_update_then_reset_in_one_read_does_not_raise() -> None:
    """A receiver that acks (WINDOW_UPDATE) and then resets a stream (its destination failed)
    sends both in one write; the sender's h2 closes the stream while parsing the read, before
    the core sees the WindowUpdated event that flushes the stream's queue. That flush raised
    StreamClosedError out of receive() and took every tunnel of the connection down (found by
    make bench: iperf3's control tunnel died with its data tunnel)."""
    settings = HboneSettings(stream_window=65535, connection_window=65535, max_frame_size=16384)
    c, s = HboneConnection(True, settings), HboneConnection(False, settings)
    for x in (c, s):
        x.initiate()
    pump(c, s)
    pump(s, c)
    pump(c, s)
    sid = open_tunnel(c, s)
    other = open_tunnel(c, s, "10.0.0.2:80")
    c.send(sid, b"x" * 200_000)  # one window goes out, the rest waits in c's queue
    for e in pump(c, s):
        if isinstance(e, ev.DataReceived):
            s.ack(e.stream_id, e.flow_length)  # WINDOW_UPDATE ...
    s.reset(sid)  # ... then RST_STREAM, in the same bytes
    events = pump(s, c)
    assert [e for e in events if isinstance(e, ev.StreamReset)] == [ev.StreamReset(sid, 8)]
    assert c.pending(sid) == 0 and c.send_buffered == 0
    # The connection and its other tunnel are fine.
    c.send(other, b"still here")
    got, _ = transfer(c, s)
    assert got == b"still here"

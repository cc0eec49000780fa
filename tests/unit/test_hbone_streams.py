"""HBONE concurrent-stream accounting, sans I/O: two cores wired back to back.

The client must never open more streams than its peer counts as allowed (h2 counts half-closed
streams as open), and a peer that does anyway costs one stream, not the connection: thousands
of tunnels in every way they end, bursts before the peer's SETTINGS, and a raw peer above the
limit.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from tests.unit.test_hbone_limits import (
    CALM,
    RST,
    START,
    FakeClock,
    frames_of,
    goaway_code,
    headers,
    terminated,
)
from ztunnel.hbone import events as ev
from ztunnel.hbone.core import HboneConnection, HboneSettings

REFUSED = h2.errors.ErrorCodes.REFUSED_STREAM
LIMIT = 100


class Wire:
    """A client and a server core and the bytes in flight between them (each direction in
    order, as TCP delivers them)."""

    def __init__(self, settings: HboneSettings | None = None) -> None:
        settings = settings or HboneSettings(max_premature_resets=10**9)
        self.c = HboneConnection(True, settings)
        self.s = HboneConnection(False, settings)
        self.c.initiate()
        self.s.initiate()
        self.to_s = bytearray()
        self.to_c = bytearray()
        self.requests: list[int] = []  # ConnectRequests the server has not answered
        self.refused: list[int] = []  # streams the client saw refused or reset
        self.events: list[ev.Event] = []

    def collect(self) -> None:
        self.to_s += self.c.data_to_send()
        self.to_c += self.s.data_to_send()

    def deliver(self, to_server: bool, amount: int | None = None) -> None:
        self.collect()
        buf = self.to_s if to_server else self.to_c
        n = len(buf) if amount is None else min(amount, len(buf))
        data = bytes(buf[:n])
        del buf[:n]
        if not data:
            return
        dst = self.s if to_server else self.c
        for e in dst.receive(data):
            self.events.append(e)
            assert not isinstance(e, ev.ConnectionTerminated), (to_server, e, self.counts())
            if isinstance(e, ev.ConnectRequest):
                self.requests.append(e.stream_id)
            elif isinstance(e, ev.DataReceived):
                dst.ack(e.stream_id, e.flow_length)
            elif isinstance(e, ev.StreamRefused | ev.StreamReset) and not to_server:
                self.refused.append(e.stream_id)

    def settle(self) -> None:
        for _ in range(50):
            self.collect()
            if not self.to_s and not self.to_c:
                return
            self.deliver(True)
            self.deliver(False)
        raise AssertionError("the two sides keep talking")

    def counts(self) -> tuple[int, int]:
        """(streams the client's h2 counts as open, streams the server's h2 counts)."""
        return self.c._h2.open_outbound_streams, self.s._h2.open_inbound_streams

    def open(self) -> int:
        assert self.c.can_open_stream()
        return self.c.open_stream("10.0.0.1:80")


Pattern = Callable[[Wire, int], None]


def _answer(w: Wire, sid: int) -> None:
    w.deliver(True)
    assert w.requests == [sid]
    w.requests.clear()


def finished(w: Wire, sid: int) -> None:  # bytes both ways, client FIN first
    _answer(w, sid)
    w.s.accept_stream(sid)
    w.deliver(False)
    w.c.send(sid, b"q" * 1024)
    w.c.end(sid)
    w.deliver(True)
    w.s.send(sid, b"a" * 1024)
    w.s.end(sid)


def server_fin_first(w: Wire, sid: int) -> None:
    _answer(w, sid)
    w.s.accept_stream(sid)
    w.s.send(sid, b"a" * 100)
    w.s.end(sid)
    w.deliver(False)
    w.c.end(sid)


def fins_cross(w: Wire, sid: int) -> None:
    _answer(w, sid)
    w.s.accept_stream(sid)
    w.deliver(False)
    w.s.end(sid)
    w.c.send(sid, b"q" * 70_000)  # more than one frame, some of it after the server's FIN
    w.c.end(sid)


def rejected(w: Wire, sid: int) -> None:
    _answer(w, sid)
    w.s.reject_stream(sid, (400, 403, 503)[sid % 3])


def rejected_after_client_fin(w: Wire, sid: int) -> None:
    w.c.end(sid)
    _answer(w, sid)
    w.s.reject_stream(sid, 503)


def client_resets_open(w: Wire, sid: int) -> None:
    _answer(w, sid)
    w.s.accept_stream(sid)
    w.deliver(False)
    w.c.send(sid, b"q" * 300_000)  # in flight when the reset is
    w.c.reset(sid)


def server_resets_open(w: Wire, sid: int) -> None:
    _answer(w, sid)
    w.s.accept_stream(sid)
    w.deliver(False)
    w.c.send(sid, b"q" * 300_000)
    w.s.reset(sid)  # crosses the client's DATA


def resets_cross(w: Wire, sid: int) -> None:
    _answer(w, sid)
    w.s.accept_stream(sid)
    w.deliver(False)
    w.c.reset(sid)
    w.s.reset(sid)


def reset_after_own_fin(w: Wire, sid: int) -> None:
    _answer(w, sid)
    w.s.accept_stream(sid)
    w.deliver(False)
    w.c.end(sid)
    w.s.end(sid)
    w.s.reset(sid)  # the client's FIN is still in flight


PATTERNS: list[Pattern] = [finished, server_fin_first, fins_cross, rejected,
                           rejected_after_client_fin, client_resets_open, server_resets_open,
                           resets_cross, reset_after_own_fin]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.__name__)
def test_thousands_of_tunnels_leave_no_stream_counted(pattern: Pattern) -> None:
    """Each way a tunnel ends, 1000 times on one connection: both h2s are back to zero open
    streams every time, the client can always open the next one, and there is no GOAWAY.
    (A rejected tunnel stayed half-closed in both h2s: after 100 the client's h2 refused to
    open any stream and the server counted them for the life of the connection.)"""
    w = Wire()
    w.settle()
    for _ in range(1000):
        sid = w.open()
        pattern(w, sid)
        w.settle()
        assert w.counts() == (0, 0)
        assert w.c.active_streams == 0 and w.s.active_streams == 0
    assert not w.c.closed and not w.s.closed
    assert w.c.can_open_stream()


def test_held_tunnels_and_short_ones_mixed_never_exceed_the_limit() -> None:
    """99 long tunnels held while 2000 short ones come and go (each way of ending), then a
    full wave: the client fills the connection to exactly 100 and stops."""
    w = Wire()
    w.settle()
    held = []
    for _ in range(LIMIT - 1):
        sid = w.open()
        _answer(w, sid)
        w.s.accept_stream(sid)
        held.append(sid)
    w.settle()
    rnd = random.Random(7)
    for _ in range(2000):
        sid = w.open()
        rnd.choice(PATTERNS)(w, sid)
        w.settle()
        assert w.counts() == (LIMIT - 1, LIMIT - 1)
    w.open()
    assert not w.c.can_open_stream()
    w.settle()
    assert w.counts() == (LIMIT, LIMIT)


@pytest.mark.parametrize("seed", range(6))
def test_random_interleavings_agree_with_the_peer(seed: int) -> None:
    """Random opens, answers, bytes, FINs and resets from both sides, bytes delivered in
    random pieces: the client opens whenever it says it can, and the server never sees a
    stream beyond its limit (nor any other GOAWAY)."""
    rnd = random.Random(seed)
    w = Wire()
    for _ in range(6000):
        r = rnd.random()
        if r < 0.1:
            if w.c.can_open_stream():
                w.open()
        elif r < 0.2 and w.requests:
            sid = w.requests.pop(rnd.randrange(len(w.requests)))
            x = rnd.random()
            if x < 0.7:
                w.s.accept_stream(sid)
            elif x < 0.9:
                w.s.reject_stream(sid, 503)
            else:
                w.s.reset(sid)
        elif r < 0.5:
            side = rnd.choice([w.c, w.s])
            # The server writes only on tunnels it accepted (as the adapter does).
            sids = [k for k, v in side._streams.items() if side is w.c or v.open]
            if sids:
                sid = rnd.choice(sids)
                y = rnd.random()
                if y < 0.5:
                    side.send(sid, b"x" * rnd.choice([1, 1000, 70_000, 300_000]))
                elif y < 0.85:
                    side.end(sid)
                else:
                    side.reset(sid)
        else:
            w.deliver(rnd.random() < 0.5, rnd.choice([None, rnd.randint(1, 4096)]))
        c_open, s_open = w.counts()
        assert s_open <= LIMIT and c_open <= LIMIT
    w.settle()
    assert not [e for e in w.events if isinstance(e, ev.RequestRejected) and e.cause]


def test_a_burst_before_the_peers_settings_stops_at_100() -> None:
    """A pool that has just connected opens its waiting tunnels before the server's SETTINGS
    arrive. h2 takes the peer's limit as unlimited until then: the client sent a 101st
    HEADERS and the server ended the whole connection (Max inbound streams is 100)."""
    c = HboneConnection(True)
    c.initiate()
    opened = 0
    while c.can_open_stream() and opened < 1000:
        c.open_stream("10.0.0.1:80")
        opened += 1
    assert opened == LIMIT
    s = HboneConnection(False)
    s.initiate()
    events = s.receive(c.data_to_send())
    assert [type(e) for e in events] == [ev.ConnectRequest] * LIMIT
    assert not s.terminated
    c.receive(s.data_to_send())
    assert not c.can_open_stream()  # the peer's own 100 now, and 100 are open


def test_a_peer_allowing_more_is_used_once_its_settings_arrive() -> None:
    c = HboneConnection(True)
    c.initiate()
    s = HboneConnection(False, HboneSettings(max_concurrent_streams=300))
    s.initiate()
    s.receive(c.data_to_send())
    c.receive(s.data_to_send())
    opened = 0
    while c.can_open_stream():
        c.open_stream("10.0.0.1:80")
        opened += 1
    assert opened == 300
    assert len(s.receive(c.data_to_send())) == 300 and not s.terminated


def test_a_client_closes_a_refusal_its_peer_left_half_closed() -> None:
    """A peer that answers a refusal with END_STREAM and nothing more (no RST_STREAM): the
    client resets the stream itself, so neither side keeps counting it."""
    c = HboneConnection(True)
    c.initiate()
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    raw.initiate_connection()
    raw.receive_data(c.data_to_send())
    c.receive(raw.data_to_send())
    for _ in range(150):
        sid = c.open_stream("10.0.0.1:80")
        raw.receive_data(c.data_to_send())
        raw.send_headers(sid, [(":status", "503")], end_stream=True)
        assert c.receive(raw.data_to_send()) == [ev.StreamRefused(sid, 503)]
        answer = raw.receive_data(c.data_to_send())
        assert [type(e) for e in answer] == [h2.events.StreamReset]
        assert raw.open_inbound_streams == 0 and c._h2.open_outbound_streams == 0
    assert c.can_open_stream()


# -- a peer that opens more than we allow ------------------------------------------------


def connect(raw: h2.connection.H2Connection, sid: int, forwarded: str) -> None:
    # h2 adds each new field to the HPACK dynamic table and sends it indexed the next time.
    raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.1:80"),
                           ("forwarded", forwarded)])


def over_limit_server(**kw: float) -> tuple[HboneConnection, FakeClock]:
    clock = FakeClock()
    s = HboneConnection(False, HboneSettings(**kw), clock=clock)  # type: ignore[arg-type]
    s.initiate()
    s.data_to_send()
    return s, clock


def test_a_stream_beyond_the_limit_is_refused_alone() -> None:
    """RFC 9113 5.1.2: a stream error. The 101st HEADERS gets RST_STREAM(REFUSED_STREAM); its
    header block is decoded all the same, so the next request (encoded against the peer's
    HPACK table, which that block changed) is understood; the open tunnels carry on."""
    s, _ = over_limit_server(max_concurrent_streams=3)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    s.receive(raw.data_to_send())
    raw.receive_data(s.data_to_send())
    # This peer ignores the server's limit.
    raw.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
    raw.remote_settings.acknowledge()
    for sid in (1, 3, 5):
        connect(raw, sid, f"for=10.0.0.{sid}")
    assert [e.stream_id for e in s.receive(raw.data_to_send())
            if isinstance(e, ev.ConnectRequest)] == [1, 3, 5]
    connect(raw, 7, "for=10.0.0.77")  # a new table entry, in the block to be refused
    events = s.receive(raw.data_to_send())
    assert events == [ev.RequestRejected(7, 503, "more than 3 concurrent streams on this "
                                         "connection", cause="too_many_streams")]
    out = frames_of(s.data_to_send())
    assert [(f[0], f[2], int.from_bytes(f[3], "big")) for f in out] == [(RST, 7, REFUSED)]
    assert not s.terminated and s._h2.open_inbound_streams == 3
    s.accept_stream(1)
    s.reset(3)
    raw.receive_data(s.data_to_send())
    # One stream is free again. Its forwarded field is sent as an index to the entry the
    # refused block made: understood only because that block was decoded all the same.
    connect(raw, 9, "for=10.0.0.77")
    assert s.receive(raw.data_to_send()) == [
        ev.ConnectRequest(9, "10.0.0.1:80", {"forwarded": "for=10.0.0.77"})]
    assert not s.terminated


def test_a_burst_far_beyond_the_limit_ends_the_connection() -> None:
    """Refusals come after the read is decoded, so one read may hold many streams: up to
    twice the limit open at once each is refused; beyond that, ENHANCE_YOUR_CALM."""
    s, _ = over_limit_server(max_concurrent_streams=10)
    events = s.receive(START + b"".join(headers(sid) for sid in range(1, 40, 2)))  # 20
    assert sum(isinstance(e, ev.ConnectRequest) for e in events) == 10
    assert sum(isinstance(e, ev.RequestRejected) for e in events) == 10
    assert not s.terminated
    s.data_to_send()
    events = s.receive(b"".join(headers(sid) for sid in range(41, 81, 2)))  # 20 more
    end = terminated(events)
    assert end is not None and (end.error_code, end.cause) == (CALM, "stream_flood")
    assert goaway_code(s) == CALM


@pytest.mark.parametrize(("refusals", "closed"), [(5, False), (6, True)])
def test_repeated_refusals_are_bounded_like_rapid_resets(refusals: int, closed: bool) -> None:
    s, clock = over_limit_server(max_concurrent_streams=2, max_premature_resets=5)
    s.receive(START + headers(1) + headers(3))
    end = None
    for k in range(refusals):
        clock.now += 1
        events = s.receive(headers(5 + 2 * k))
        end = terminated(events)
    assert (end is not None) == closed
    if end is not None:
        assert (end.error_code, end.cause) == (CALM, "stream_flood")
    # Spread out beyond the window, refusals are only refusals.
    s, clock = over_limit_server(max_concurrent_streams=2, max_premature_resets=5)
    s.receive(START + headers(1) + headers(3))
    for k in range(50):
        clock.now += 11
        assert terminated(s.receive(headers(5 + 2 * k))) is None


def test_the_client_does_not_count_refusals_as_rapid_resets() -> None:
    """A refusal reaches the client as a response and RST_STREAM in one read; that pattern is
    a rapid reset only when a server sees it (HEADERS that open streams)."""
    settings = HboneSettings(max_premature_resets=3)
    c, s = HboneConnection(True, settings), HboneConnection(False, settings)
    c.initiate()
    s.initiate()
    s.receive(c.data_to_send())
    c.receive(s.data_to_send())
    for _ in range(20):
        sid = c.open_stream("10.0.0.1:80")
        assert isinstance(s.receive(c.data_to_send())[0], ev.ConnectRequest)
        s.reject_stream(sid, 403)
        assert c.receive(s.data_to_send()) == [ev.StreamRefused(sid, 403)]
    assert not c.terminated and c.can_open_stream()

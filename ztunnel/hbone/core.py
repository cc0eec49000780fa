"""The HBONE protocol core, sans I/O: feed it bytes, get events and bytes to send back.

It wraps ``h2`` and adds what a TCP tunnel needs on top of HTTP/2: CONNECT-only semantics and
authority validation on the server, per-stream send buffers that respect flow control (with a
high-water mark so adapters can apply backpressure), and half-close mapping (END_STREAM is FIN,
RST_STREAM is RST). Windows and frame sizes are large because tunnels carry bulk data: small
HTTP/2 windows cap single-stream throughput at window/RTT.

DATA frames, the tunnels' bytes, never pass through h2 (issue 14: h2's frame buffer, its
DATA parser and serializer copied each payload byte about seven times and cost a third of a
ztunnel's CPU). h2 keeps HEADERS, SETTINGS, PING, RST_STREAM, WINDOW_UPDATE, GOAWAY, the
connection's and the streams' states, and the *outbound* flow-control windows; the core keeps
the inbound windows and frames and parses DATA itself:

- Receiving. ``receive`` splits the bytes into frames (after the frame guard has checked
  every header of the read). Runs of other frames go to h2 unchanged. A DATA frame is taken
  by the core when h2 would take it: the connection is not closed, the stream is one of ours
  and h2's stream state accepts DATA (open or half-closed local, headers received). Its
  payload is delivered as it arrives, one ``DataReceived`` per frame per read, sliced from
  the read (the one copy a ``bytes`` event needs; no reassembly), padding stripped and its
  credit returned at once, the frame's length checked against and taken from the windows we
  advertised (FLOW_CONTROL_ERROR otherwise, a connection error as in h2). END_STREAM is
  passed to h2 as an empty DATA frame with END_STREAM, so h2's stream state (half-closed,
  closed, and what it answers to frames after it) stays exactly what it would be had it
  parsed the frame itself. A DATA frame on any other stream (unknown, idle, closed, reset,
  half-closed remote, a client stream before its response, or any stream after GOAWAY) is
  replaced by that same empty frame with its stream id and END_STREAM flag, so h2 gives the
  answer it always gave (RST_STREAM STREAM_CLOSED, or GOAWAY PROTOCOL_ERROR/STREAM_CLOSED);
  its payload is dropped unread and its credit returned to the connection. h2 therefore only
  ever sees DATA of length 0: its inbound windows never move, and it never sends a
  WINDOW_UPDATE. The core sends them instead, with h2's algorithm (an update once half a
  window was consumed by the application, or the window is empty).
- Sending. ``_flush`` frames DATA itself into the output list (a 9-byte header from
  ``struct`` and the queued chunk or a memoryview of it: no copy until ``data_to_send``
  joins the list once). The windows and the frame size are h2's own numbers, read and
  decremented in place exactly as ``H2Connection.send_data`` does, so they cannot diverge:
  h2 still applies the peer's WINDOW_UPDATEs (including overflow errors) and SETTINGS
  (INITIAL_WINDOW_SIZE deltas, MAX_FRAME_SIZE). END_STREAM goes through ``h2.end_stream`` (an
  empty DATA frame) so h2's stream state moves. h2's own frames are written into the same
  output list (``_TunnelH2._prepare_for_sending``), so frames leave in the order they were
  made.

The connection window stays 4 MiB, not Istio's 16 MiB: it bounds the DATA a peer can make us
hold undelivered, and that must stay within half the connection's 8 MiB buffer budget. Frames
stay at most 256 KiB (``--hbone-max-frame-size``, a hardening limit): with DATA parsed as it
arrives, a larger frame would only save a 9-byte header per 256 KiB.
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import h2.utilities
import hyperframe.frame

from mesh.ports import parse_port
from ztunnel.hbone import _h2fast
from ztunnel.hbone.events import (
    ConnectionTerminated,
    ConnectRequest,
    DataReceived,
    Event,
    RequestRejected,
    StreamAccepted,
    StreamEnded,
    StreamRefused,
    StreamReset,
    StreamWritable,
)

_h2fast.install()


@dataclass(frozen=True)
class HboneSettings:
    """HTTP/2 parameters (a 4 MiB stream window, like Istio's ztunnel) and the limits on what
    one peer may make a connection cost."""

    stream_window: int = 4 * 1024 * 1024
    # Half the buffer budget: the peer can never have more unacknowledged DATA in flight.
    connection_window: int = 4 * 1024 * 1024
    max_frame_size: int = 256 * 1024
    max_concurrent_streams: int = 100
    max_header_list_size: int = 16 * 1024
    # Above this many unsent bytes, a stream reports itself blocked to its writer (capped by
    # its share of the buffer budget, see _stream_high).
    send_high_water: int = 1024 * 1024
    # The buffer budget of one connection: DATA received and not yet delivered (at most the
    # connection window, half the budget), DATA from backends not yet sent (writers wait above
    # half the budget), and output the peer does not read (reading stops above the budget).
    buffer_limit: int = 8 * 1024 * 1024
    # PING and SETTINGS acknowledgements (and refusals) queued while the peer does not read
    # our output; more is a flood (Envoy's max_outbound_control_frames).
    max_control_frames: int = 1000
    # Timeouts, in seconds (0 disables one). The client preface and SETTINGS must arrive within
    # handshake_timeout of the connection; a connection without streams is closed after
    # idle_timeout (twice the pool's 60 s, so a server never closes first); after
    # keepalive_interval without a frame from the peer it gets a PING, and the connection is
    # closed if no acknowledgement comes within keepalive_timeout (a dead or half-open peer).
    # A tunnel itself may stay idle like TCP unless stream_idle_timeout is set.
    handshake_timeout: float = 5.0
    idle_timeout: float = 120.0
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 10.0
    stream_idle_timeout: float = 0.0
    # Frame-level limits, checked on each 9-byte frame header before h2 buffers the payload
    # (_FrameGuard). A header block (HEADERS + CONTINUATIONs) may carry at most
    # max_header_list_size compressed bytes in at most 1 + max_continuations frames (nghttp2's
    # default is 8 CONTINUATIONs). The others follow Envoy's http2_protocol_options defaults:
    # max_consecutive_inbound_frames_with_empty_payload, max_inbound_priority_frames_per_stream,
    # max_inbound_window_update_frames_per_data_frame_sent.
    max_continuations: int = 8
    max_empty_frames: int = 1
    max_priority_frames_per_stream: int = 100
    max_window_updates_per_data_frame: int = 10
    # Rapid reset (CVE-2023-44487): a peer that resets more than max_premature_resets streams
    # before we answered them, within reset_window seconds, gets GOAWAY(ENHANCE_YOUR_CALM).
    # Such a stream never costs a backend connection (see HboneStream.cancel_on_reset).
    max_premature_resets: int = 100
    reset_window: float = 10.0
    # Tunnels asked for and not yet answered (their backend is being dialled); more are
    # refused with REFUSED_STREAM.
    max_pending_streams: int = 100


DEFAULT_SETTINGS = HboneSettings()
# The longest valid authority, "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535", is 53.
_MAX_AUTHORITY = 64


def parse_authority(authority: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``10.0.0.1:80`` or ``[fd00::1]:80`` to (address, port); ``ValueError`` otherwise.

    Strict, because the authority is attacker-chosen: ASCII-digit port 1..65535 (see
    ``parse_port``), IPv6 only in brackets and IPv4 never (``fd00::1:80`` is ambiguous), and no
    IPv6 zone (``%eth0``): a tunnel names a pod address, never a local interface.
    """
    if len(authority) > _MAX_AUTHORITY:
        raise ValueError(f"authority {authority[:_MAX_AUTHORITY]!r}... is too long")
    host, sep, port_text = authority.rpartition(":")
    if not sep:
        raise ValueError(f"authority {authority!r} is not ip:port")
    try:
        port = parse_port(port_text)
    except ValueError as e:
        raise ValueError(f"authority {authority!r}: {e}") from None
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if "%" in host:
        raise ValueError(f"authority {authority!r} has an IPv6 zone")
    addr = ipaddress.ip_address(host)
    if bracketed != (addr.version == 6):
        raise ValueError(f"authority {authority!r}: IPv6 needs brackets, IPv4 takes none")
    return addr, port


def format_authority(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def forwarded_for(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """RFC 7239 ``Forwarded`` value naming the original client address."""
    return f'for="[{addr}]"' if addr.version == 6 else f"for={addr}"


def parse_forwarded_for(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The first ``for=`` address of a ``Forwarded`` header, or None if absent/unparsable."""
    for element in value.split(","):
        for pair in element.split(";"):
            key, _, v = pair.strip().partition("=")
            if key.lower() == "for":
                v = v.strip('"')
                if v.startswith("["):
                    v = v[1:].partition("]")[0]
                try:
                    return ipaddress.ip_address(v)
                except ValueError:
                    return None
    return None


def _status(headers: object) -> int:
    """The response's ``:status`` if it is exactly three ASCII digits, else 0 (a refusal)."""
    for k, v in headers or []:  # type: ignore[attr-defined]
        if k == b":status":
            # bytes.isdigit() is ASCII-only, unlike str.isdigit().
            return int(v) if len(v) == 3 and v.isdigit() else 0
    return 0


# Frame types and flags the guard looks at (RFC 9113 section 6).
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _WINDOW_UPDATE, \
    _CONTINUATION = 0x0, 0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x8, 0x9
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
# A frame header as (length << 8 | type, flags, stream id); WINDOW_UPDATE adds its increment.
_HEADER = struct.Struct(">IBI")
_WINDOW_UPDATE_FRAME = struct.Struct(">IBII")
_WINDOW_UPDATE_HEAD = (4 << 8) | _WINDOW_UPDATE
_CLOSED = h2.connection.ConnectionState.CLOSED
# The concurrent streams a client assumes its peer allows until the peer's SETTINGS arrive.
_ASSUMED_PEER_STREAMS = 100
# h2 stream states in which it accepts DATA from the peer, and in which it sends DATA.
_RECEIVING = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})
_SENDING = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE})
# What a DATA frame being received is: none (a frame header comes next), another frame type
# (its bytes go to h2), DATA for one of our streams, DATA to drop.
_RX_HEADER, _RX_H2, _RX_DATA, _RX_DROP = 0, 1, 2, 3


class FrameRefused(Exception):
    """The peer's byte stream broke a frame-level limit: GOAWAY with ``code`` and close."""

    def __init__(self, code: int, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.cause = cause


class _FrameGuard:
    """Follows the frame boundaries of the peer's byte stream and checks each frame header
    as soon as its 9 bytes are in, before h2 has buffered (or waited for) the payload.

    Per chunk the work is a few integer operations per frame *header*; a DATA payload is
    skipped by arithmetic, never copied or scanned. Raises ``FrameRefused``.

    It also keeps the count of premature resets (streams the peer reset before we answered
    them) in a sliding window. A HEADERS and a RST_STREAM of the same stream in one read are
    premature by construction and counted here, before h2 parses the read, so a rapid-reset
    flood is cut after the limit instead of after h2 has decoded every request in the read;
    resets arriving in a later read are counted by the connection (``premature_reset``).
    """

    __slots__ = (
        "block_bytes",
        "block_frames",
        "block_stream",
        "clock",
        "control_frames",
        "data_frames_sent",
        "empty_run",
        "headers_frames",
        "partial",
        "payload_left",
        "preface_left",
        "priority_frames",
        "read_headers",
        "refusals",
        "resets",
        "server",
        "settings",
        "settings_seen",
        "window_updates",
    )

    def __init__(self, settings: HboneSettings, expect_preface: bool,
                 clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.resets: deque[float] = deque()  # times of premature resets within the window
        self.refusals: deque[float] = deque()  # times of streams refused over the limit
        self.read_headers: set[int] = set()  # streams whose HEADERS came in the current read
        self.preface_left = len(_PREFACE) if expect_preface else 0
        # Only a server counts premature resets: on a client, a HEADERS is a response, and
        # a response followed by RST_STREAM in one read is a refusal (reject_stream).
        self.server = expect_preface
        self.settings_seen = False
        self.payload_left = 0
        self.partial = b""
        self.block_stream = 0  # stream id of an unfinished header block, else 0
        self.block_frames = 0
        self.block_bytes = 0
        self.empty_run = 0
        self.priority_frames = 0
        self.window_updates = 0
        self.headers_frames = 0
        self.data_frames_sent = 0  # counted by the connection as it sends DATA
        self.control_frames = 0  # PING/SETTINGS the peer asked us to acknowledge

    def premature_reset(self) -> None:
        if self._count(self.resets):
            raise FrameRefused(
                _CALM, "reset_flood",
                f"more than {self.settings.max_premature_resets} streams reset before they "
                f"were answered within {self.settings.reset_window:g}s")

    def stream_refused(self) -> None:
        """A stream opened beyond our concurrent-stream limit was refused: as costly as a
        premature reset (decoded, never answered), so bounded the same way."""
        if self._count(self.refusals):
            raise FrameRefused(
                _CALM, "stream_flood",
                f"more than {self.settings.max_premature_resets} streams opened beyond the "
                f"concurrent-stream limit within {self.settings.reset_window:g}s")

    def _count(self, times: deque[float]) -> bool:
        """Note one more event now; True when the sliding window holds too many."""
        now = self.clock()
        times.append(now)
        window = self.settings.reset_window
        while now - times[0] > window:
            times.popleft()
        return len(times) > self.settings.max_premature_resets

    def feed(self, data: bytes) -> None:
        n = len(data)
        pos = 0
        if self.read_headers:
            self.read_headers.clear()
        if self.preface_left:
            k = min(self.preface_left, n)
            start = len(_PREFACE) - self.preface_left
            if data[:k] != _PREFACE[start:start + k]:
                raise FrameRefused(h2.errors.ErrorCodes.PROTOCOL_ERROR, "bad_preface",
                                   "the connection does not start with the HTTP/2 preface")
            self.preface_left -= k
            pos = k
        while pos < n:
            left = self.payload_left
            if left:
                if n - pos <= left:
                    self.payload_left = left - (n - pos)
                    return
                pos += left
                self.payload_left = 0
            if self.partial:
                need = 9 - len(self.partial)
                self.partial += data[pos:pos + need]
                pos += need
                if len(self.partial) < 9:
                    return
                header, self.partial = self.partial, b""
                self._frame(header, 0)
            elif n - pos >= 9:
                self._frame(data, pos)
                pos += 9
            else:
                self.partial = data[pos:]
                return

    def _frame(self, b: bytes, i: int) -> None:
        length = (b[i] << 16) | (b[i + 1] << 8) | b[i + 2]
        ftype = b[i + 3]
        flags = b[i + 4]
        s = self.settings
        if length > s.max_frame_size:
            raise FrameRefused(h2.errors.ErrorCodes.FRAME_SIZE_ERROR, "frame_too_large",
                               f"frame of {length} bytes declared, the limit is "
                               f"{s.max_frame_size}")
        self.payload_left = length
        if not self.settings_seen:
            if ftype != _SETTINGS or flags & _ACK:
                raise FrameRefused(h2.errors.ErrorCodes.PROTOCOL_ERROR, "bad_preface",
                                   f"first frame is type {ftype}, not SETTINGS")
            self.settings_seen = True
        if self.block_stream:
            sid = int.from_bytes(b[i + 5:i + 9], "big") & 0x7FFFFFFF
            if ftype != _CONTINUATION or sid != self.block_stream:
                raise FrameRefused(h2.errors.ErrorCodes.PROTOCOL_ERROR, "protocol_error",
                                   "a header block is interrupted by another frame")
            self.block_frames += 1
            self.block_bytes += length
            if self.block_frames > s.max_continuations:
                raise FrameRefused(_CALM, "continuation_flood",
                                   f"header block in more than {s.max_continuations} "
                                   "CONTINUATION frames")
            self._check_block()
            if flags & _END_HEADERS:
                self.block_stream = 0
        elif ftype in (_HEADERS, _PUSH_PROMISE):
            if self.server:
                self.read_headers.add(int.from_bytes(b[i + 5:i + 9], "big") & 0x7FFFFFFF)
            self.headers_frames += 1
            self.block_bytes = length
            self._check_block()
            if not flags & _END_HEADERS:
                self.block_stream = int.from_bytes(b[i + 5:i + 9], "big") & 0x7FFFFFFF
                self.block_frames = 0
        if ftype in (_DATA, _HEADERS, _CONTINUATION):
            # Envoy's max_consecutive_inbound_frames_with_empty_payload: an empty frame that
            # does not end its stream is only work for us.
            if length == 0 and not (ftype != _CONTINUATION and flags & _END_STREAM):
                self.empty_run += 1
                if self.empty_run > s.max_empty_frames:
                    raise FrameRefused(_CALM, "empty_frame_flood",
                                       f"more than {s.max_empty_frames} consecutive frames "
                                       "with an empty payload")
            else:
                self.empty_run = 0
        elif ftype in (_PING, _SETTINGS):
            if not flags & _ACK:
                # Each asks for an acknowledgement: output the peer may never read.
                self.control_frames += 1
                if self.control_frames > s.max_control_frames:
                    raise FrameRefused(_CALM, "control_frame_flood",
                                       f"more than {s.max_control_frames} PING/SETTINGS "
                                       "acknowledgements queued unread")
        elif ftype == _RST_STREAM:
            if int.from_bytes(b[i + 5:i + 9], "big") & 0x7FFFFFFF in self.read_headers:
                self.premature_reset()
        elif ftype == _PRIORITY:
            self.priority_frames += 1
            if self.priority_frames > s.max_priority_frames_per_stream * (
                    1 + self.headers_frames):
                raise FrameRefused(_CALM, "priority_flood", "too many PRIORITY frames")
        elif ftype == _WINDOW_UPDATE:
            self.window_updates += 1
            if self.window_updates > 5 + 2 * (self.headers_frames + (
                    s.max_window_updates_per_data_frame * self.data_frames_sent)):
                raise FrameRefused(_CALM, "window_update_flood",
                                   "too many WINDOW_UPDATE frames for the DATA sent")

    def _check_block(self) -> None:
        # Compressed bytes: HPACK never makes a field larger than its header-list entry
        # (name + value + 32), so a block above the list limit cannot decode under it.
        if self.block_bytes > self.settings.max_header_list_size:
            raise FrameRefused(_CALM, "header_block_too_large",
                               f"header block above {self.settings.max_header_list_size} bytes")


_REQUEST_FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False)


def _request_headers(headers: object) -> dict[str, str]:
    """A request's header block as text, checked with h2's own rules (legal characters,
    lowercase names, no connection-specific headers, pseudo-headers) and as UTF-8; raises
    ``ValueError`` (``UnicodeDecodeError`` is one) with the reason otherwise."""
    try:
        checked = list(h2.utilities.validate_headers(headers, _REQUEST_FLAGS))  # type: ignore[arg-type]
    except h2.exceptions.ProtocolError as e:
        raise ValueError(str(e)) from None
    out = {k.decode(): v.decode() for k, v in checked}
    # Ignored on a tunnel (see _TunnelH2), but still a number from the wire: ASCII digits only.
    length = out.get("content-length")
    if length is not None and not (length.isascii() and length.isdigit()):
        raise ValueError(f"content-length {length[:20]!r} is not ASCII digits")
    return out


class _TunnelH2(h2.connection.H2Connection):
    """h2 with ``content-length`` ignored: h2 checks it per stream but fails the whole
    connection (a value like ``x``, or more DATA than it says), and a CONNECT tunnel's bytes
    are not content it could describe (RFC 9110 9.3.6). Its frames go into the connection's
    output list, in order with the DATA frames the core makes itself."""

    def __init__(self, config: h2.config.H2Configuration,
                 out: list[bytes | memoryview]) -> None:
        super().__init__(config=config)
        self.out = out
        # Server side: streams the peer opened beyond our SETTINGS_MAX_CONCURRENT_STREAMS,
        # created and decoded as usual, to be refused (see _receive_headers_frame), and the
        # count of open inbound streams at which the connection ends instead (0: none).
        self.over_limit: set[int] = set()
        self.stream_bound = 0
        self._counted = False

    def _prepare_for_sending(self, frames: list[hyperframe.frame.Frame]) -> None:
        if frames:
            self.out.append(b"".join(f.serialize() for f in frames))

    def _receive_headers_frame(self, frame: hyperframe.frame.HeadersFrame) \
            -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        """h2 answers a HEADERS beyond our concurrent-stream limit with TooManyStreamsError,
        a connection error (GOAWAY and every tunnel with it), and before the header block is
        decoded. RFC 9113 5.1.2 makes it a stream error: the stream is created and its block
        decoded as usual (HPACK state stays in step with the peer's), and noted in
        ``over_limit`` so the core refuses it with REFUSED_STREAM. Only far beyond the limit
        (``stream_bound`` open at once, all within one read since each refusal closes its
        stream) is the connection ended."""
        if self.config.client_side or frame.stream_id in self.streams:
            return super()._receive_headers_frame(frame)
        limit = self.local_settings.max_concurrent_streams
        n = self._open_streams(int(not self.config.client_side))
        if n >= limit:
            if self.stream_bound and n >= self.stream_bound:
                raise FrameRefused(
                    _CALM, "stream_flood",
                    f"{n} streams open at once, the limit is {limit}")
            self.over_limit.add(frame.stream_id)
        self._counted = True  # h2's own check (open_inbound_streams) is done above
        try:
            return super()._receive_headers_frame(frame)
        finally:
            self._counted = False

    @property
    def open_inbound_streams(self) -> int:
        if self._counted:
            return 0
        return super().open_inbound_streams

    def _begin_new_stream(self, stream_id: int,
                          allowed_ids: h2.connection.AllowedStreamIDs) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream._initialize_content_length = _no_content_length  # type: ignore[method-assign]
        return stream


def _no_content_length(headers: object) -> None:
    return None


@dataclass(slots=True)
class _Stream:
    # Inbound flow control: what the peer may still send, and what the application consumed
    # and we have not advertised again (h2's WindowManager, see _return_credit).
    rx_window: int
    rx_credit: int = 0
    pending: deque[bytes | memoryview] = field(default_factory=deque)
    pending_bytes: int = 0
    end_requested: bool = False
    local_ended: bool = False
    remote_ended: bool = False
    blocked: bool = False
    open: bool = False  # 2xx sent or received
    waiting: bool = False  # server side: asked for, not answered yet
    activity: int = 0  # DATA frames in either direction (stream_idle_timeout)
    seen: int = -1  # activity at the last tick
    quiet_since: float = 0.0


class HboneConnection:
    """One HBONE (HTTP/2) connection, client or server side, with no I/O."""

    def __init__(self, client_side: bool, settings: HboneSettings = DEFAULT_SETTINGS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client_side = client_side
        self.settings = settings
        # Read only when a stream is reset early, never per chunk.
        self.clock = clock
        # h2 decodes and validates header blocks inside receive_data, where one stream's bad
        # header is fatal to the connection (a non-UTF-8 value even raised out of it). The
        # server does both per request instead (_request_headers) and answers a bad one with
        # 400 on that stream alone. The client keeps h2's checks: responses come from peers.
        config = h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=client_side
        )
        # Everything to send, in order: h2's frames and the core's DATA and WINDOW_UPDATEs.
        self._out: list[bytes | memoryview] = []
        self._h2 = _TunnelH2(config, self._out)
        self._h2.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Settings given up front are never "acknowledged", so h2 does not copy them into its
        # enforcement state: do it here (frame size check, HPACK header-list limit).
        self._h2.max_inbound_frame_size = settings.max_frame_size
        self._h2.decoder.max_header_list_size = settings.max_header_list_size
        # Streams beyond max_concurrent_streams are refused one by one (REFUSED_STREAM); twice
        # that many open at once (HEADERS in one read, before any refusal) ends the connection.
        self._h2.stream_bound = 2 * settings.max_concurrent_streams
        self._streams: dict[int, _Stream] = {}
        self._guard = _FrameGuard(settings, expect_preface=not client_side, clock=clock)
        # Inbound flow control of the connection (h2's WindowManager: window, its maximum,
        # bytes consumed and not advertised again); the initial 65535 until initiate().
        self._rx_window = self._rx_max = 65535
        self._rx_credit = 0
        # The frame being received (see _read): what it is, payload bytes left, of which the
        # first _rx_data are tunnel bytes (the rest padding), its stream, END_STREAM, and the
        # bytes of a frame header cut by the end of a read.
        self._rx_preface = 0 if client_side else len(_PREFACE)
        self._rx_kind = _RX_HEADER
        self._rx_left = 0
        self._rx_data = 0
        self._rx_sid = 0
        self._rx_stream: _Stream | None = None
        self._rx_end = False
        self._rx_head = b""
        self.goaway_received = False
        self.closed = False
        self.terminated = False  # a fatal error: nothing more is read
        self._dropped: set[int] = set()  # times of premature resets, within the window
        self.pending_streams = 0  # server side: tunnels not answered yet
        # Buffer accounting (integer adds on the byte path): DATA handed to the application
        # and not acknowledged yet, and DATA queued by the application and not framed yet.
        self.recv_buffered = 0
        self.send_buffered = 0
        # A stream's share of the send budget: stuck streams cannot use it all up.
        self._stream_high = max(64 * 1024, min(
            settings.send_high_water,
            settings.buffer_limit // 2 // max(1, settings.max_concurrent_streams)))
        self._batch: set[int] = set()  # streams requested in the bytes being received
        # Timers (tick): the time is read from the clock only here and in tick(now), never
        # per chunk; receive() only raises a flag the next tick turns into a time.
        self._started = clock()
        self._heard = False  # a frame arrived since the last tick
        self._last_heard = self._started
        self._ping_sent: float | None = None
        self._idle_since: float | None = self._started
        self._last_tick = self._started
        # Draining: refuse new tunnels with REFUSED_STREAM (safe for the client to retry
        # elsewhere) while open ones continue. h2 treats GOAWAY as the end of the whole
        # connection, so GOAWAY is only sent once the open tunnels are done.
        self.draining = False
        self.refused_by_peer = False

    # -- lifecycle -------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface and our settings; call once, first."""
        self._h2.initiate_connection()
        # The preface and SETTINGS bypass _prepare_for_sending: take them from h2's buffer.
        self._out.append(self._h2.data_to_send())
        extra = self.settings.connection_window - 65535
        if extra > 0:
            self._rx_window = self._rx_max = self.settings.connection_window
            self._out.append(_WINDOW_UPDATE_FRAME.pack(_WINDOW_UPDATE_HEAD, 0, 0, extra))

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Queue GOAWAY: the peer must open no new streams; open ones may finish."""
        if not self.closed:
            self._h2.close_connection(error_code=error_code,
                                      additional_data=reason.encode()[:256] or None)
            self.closed = True

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        first = out[0]
        # The only copy of sent tunnel bytes in the core: the join (a lone item is h2's bytes).
        data = first if len(out) == 1 and isinstance(first, bytes) else b"".join(out)
        out.clear()
        return data

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def can_open_stream(self) -> bool:
        """Whether the peer will take one more stream: counted as the peer counts them (h2's
        open streams, half-closed ones included, which is also what h2 enforces on send), not
        as tunnels we still hold, against the limit the peer advertised. Until its SETTINGS
        arrive the limit is not "unlimited", as h2 assumes, but at most 100 (what RFC 9113
        5.1.2 recommends as the least a peer allows): a pool that has just connected must not
        put a burst of tunnels on a connection that will refuse all beyond 100."""
        if self.closed or self.goaway_received or self.refused_by_peer:
            return False
        if self._guard.settings_seen:
            limit: int = self._h2.remote_settings.max_concurrent_streams
        else:
            limit = min(self.settings.max_concurrent_streams, _ASSUMED_PEER_STREAMS)
        return max(len(self._streams), self._h2.open_outbound_streams) < limit

    # -- client ----------------------------------------------------------------------------

    def open_stream(self, authority: str, headers: list[tuple[str, str]] | None = None) -> int:
        """Send a CONNECT for ``authority``; the answer arrives as StreamAccepted/Refused."""
        stream_id: int = self._h2.get_next_available_stream_id()
        self._h2.send_headers(
            stream_id, [(":method", "CONNECT"), (":authority", authority), *(headers or [])]
        )
        self._streams[stream_id] = _Stream(self.settings.stream_window)
        return stream_id

    # -- server ----------------------------------------------------------------------------

    def accept_stream(self, stream_id: int) -> None:
        st = self._streams.get(stream_id)
        if st is None:
            return
        try:
            self._h2.send_headers(stream_id, [(":status", "200")])
        except h2.exceptions.ProtocolError:
            # h2 processed the rest of the read before this answer and closed the stream (an
            # RST_STREAM, a GOAWAY, or it dropped it for a higher one): it is gone.
            self._forget(stream_id)
            return
        st.open = True
        if st.waiting:
            st.waiting = False
            self.pending_streams -= 1

    def reject_stream(self, stream_id: int, status: int) -> None:
        """Answer ``status`` with END_STREAM, then RST_STREAM(NO_ERROR) (RFC 9113 8.1: a
        complete response may be followed by it): the client never half-closes a refused
        tunnel, and without the reset the stream stayed half-closed in h2 on both sides,
        counted against the concurrent-stream limit for the life of the connection."""
        if stream_id in self._streams:
            with contextlib.suppress(h2.exceptions.ProtocolError):  # closed already (above)
                self._h2.send_headers(stream_id, [(":status", str(status))], end_stream=True)
            self._close_h2_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
            self._forget(stream_id)

    def _close_h2_stream(self, stream_id: int, error_code: int) -> None:
        """Reset ``stream_id`` in h2 unless it is closed there already (the core has done
        with it: h2 must not keep counting it as open)."""
        h2s = self._h2.streams.get(stream_id)
        if h2s is not None and not h2s.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.reset_stream(stream_id, error_code)

    # -- both sides ------------------------------------------------------------------------

    def send(self, stream_id: int, data: bytes) -> bool:
        """Queue tunnel bytes; returns False when the stream is over its high-water mark."""
        st = self._streams.get(stream_id)
        if st is None or st.end_requested:
            return True
        if data:
            st.activity += 1
            st.pending.append(data)
            st.pending_bytes += len(data)
            self.send_buffered += len(data)
            self._flush(stream_id, st)
        if st.pending_bytes > self._stream_high:
            st.blocked = True
            return False
        return True

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def pending(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        return st.pending_bytes if st else 0

    def end(self, stream_id: int) -> None:
        """Half-close our side once queued bytes are sent (the tunnel's FIN)."""
        st = self._streams.get(stream_id)
        if st is None or st.end_requested:
            return
        st.end_requested = True
        self._flush(stream_id, st)

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        if stream_id in self._streams:
            with contextlib.suppress(h2.exceptions.ProtocolError):  # StreamClosedError & co.
                self._h2.reset_stream(stream_id, error_code)
            self._forget(stream_id)

    def ack(self, stream_id: int, flow_length: int) -> None:
        """Return flow-control credit for bytes the application has consumed."""
        if flow_length <= 0:
            return
        self.recv_buffered -= flow_length
        self._return_credit(stream_id, flow_length)

    def next_deadline(self) -> float | None:
        """When ``tick`` should run next (the clock's time), or None for no timer."""
        st = self.settings
        times: list[float] = []
        if self.terminated:
            return None
        if st.handshake_timeout and not self._guard.settings_seen:
            times.append(self._started + st.handshake_timeout)
        if st.keepalive_interval:
            if self._ping_sent is not None:
                times.append(self._ping_sent + st.keepalive_timeout)
            else:
                times.append(self._last_heard + st.keepalive_interval)
        if st.idle_timeout and not self._streams and not self.closed:
            since = self._idle_since
            times.append((since + st.idle_timeout) if since is not None else self.clock())
        if st.stream_idle_timeout and self._streams:
            times.append(self._last_tick + st.stream_idle_timeout / 2)
        return min(times) if times else None

    def tick(self, now: float) -> list[Event]:
        """Run the timers due at ``now``: may queue a PING or GOAWAY, reset idle tunnels, and
        end the connection (a ConnectionTerminated with the cause)."""
        if self.terminated:
            return []
        st = self.settings
        out: list[Event] = []
        self._last_tick = now
        if self._heard:
            self._heard = False
            self._last_heard = now
        if st.handshake_timeout and not self._guard.settings_seen \
                and now - self._started >= st.handshake_timeout:
            return [self._terminate(h2.errors.ErrorCodes.PROTOCOL_ERROR, "handshake_timeout",
                                    f"no HTTP/2 preface and SETTINGS within "
                                    f"{st.handshake_timeout:g}s")]
        if st.keepalive_interval:
            if self._ping_sent is not None:
                if now - self._ping_sent >= st.keepalive_timeout:
                    return [self._terminate(
                        h2.errors.ErrorCodes.NO_ERROR, "keepalive_timeout",
                        f"no answer to a PING within {st.keepalive_timeout:g}s")]
            elif now - self._last_heard >= st.keepalive_interval:
                self._h2.ping(b"ambitka\0")
                self._ping_sent = now
        if self._streams:
            self._idle_since = None
            if st.stream_idle_timeout:
                self._idle_streams(now, out)
        elif self._idle_since is None:
            self._idle_since = now
        elif st.idle_timeout and not self.closed and now - self._idle_since >= st.idle_timeout:
            self.close(0, "idle")
            self.terminated = True
            out.append(ConnectionTerminated(0, f"idle for {st.idle_timeout:g}s", fatal=True,
                                            cause="idle_timeout"))
        return out

    def _idle_streams(self, now: float, out: list[Event]) -> None:
        limit = self.settings.stream_idle_timeout
        for sid, stream in list(self._streams.items()):
            if stream.activity != stream.seen:
                stream.seen = stream.activity
                stream.quiet_since = now
            elif now - stream.quiet_since >= limit:
                self.reset(sid, h2.errors.ErrorCodes.CANCEL)
                out.append(StreamReset(sid, int(h2.errors.ErrorCodes.CANCEL)))

    def output_drained(self) -> None:
        """The adapter's output reached the socket (the peer reads): acknowledgements queued
        so far are no longer piling up."""
        self._guard.control_frames = 0

    def _return_credit(self, stream_id: int, flow_length: int) -> None:
        """The application consumed ``flow_length`` bytes of ``stream_id`` (or they were
        dropped): give the credit back to the connection and, while the peer may still send
        on it, to the stream. A stream that is gone still returns its connection credit, or
        the other streams on this connection would stall."""
        if self._h2.state_machine.state is _CLOSED:
            return  # GOAWAY sent or received: h2 would refuse to send a WINDOW_UPDATE
        c = self._rx_credit + flow_length
        w = self._rx_window
        m = self._rx_max
        # h2's WindowManager._maybe_update_window, for the connection then the stream.
        if (w == 0 and c > min(1024, m // 4)) or c >= m // 2:
            inc = min(c, m - w)
            c = 0
            if inc:
                self._rx_window = w + inc
                self._out.append(_WINDOW_UPDATE_FRAME.pack(_WINDOW_UPDATE_HEAD, 0, 0, inc))
        self._rx_credit = c
        st = self._streams.get(stream_id)
        if st is None or st.remote_ended:
            return  # no point crediting a stream the peer can no longer send on
        c = st.rx_credit + flow_length
        w = st.rx_window
        m = self.settings.stream_window
        if (w == 0 and c > min(1024, m // 4)) or c >= m // 2:
            inc = min(c, m - w)
            c = 0
            if inc:
                st.rx_window = w + inc
                self._out.append(_WINDOW_UPDATE_FRAME.pack(_WINDOW_UPDATE_HEAD, 0, stream_id,
                                                           inc))
        st.rx_credit = c

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns what happened."""
        if self.terminated:
            return []
        self._heard = True
        out: list[Event] = []
        try:
            self._guard.feed(data)
            self._read(data if type(data) is bytes else bytes(data), out)
        except FrameRefused as e:
            return [self._terminate(e.code, e.cause, str(e))]
        except h2.exceptions.ProtocolError as e:
            code = getattr(e, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return [self._terminate(code, "protocol_error", f"protocol error: {e}")]
        if self._batch:
            self._batch.clear()
            if self._dropped:
                out = self._without_dropped(out)
        return out

    def _without_dropped(self, out: list[Event]) -> list[Event]:
        """Streams requested and reset within the same bytes never reach the application:
        no tunnel task, no backend dial, no log line (the rapid-reset pattern)."""
        dropped, self._dropped = self._dropped, set()
        kept: list[Event] = []
        for e in out:
            sid = getattr(e, "stream_id", None)
            if sid in dropped:
                if isinstance(e, DataReceived):
                    self.recv_buffered -= e.flow_length
                    self._return_credit(e.stream_id, e.flow_length)
                continue
            kept.append(e)
        return kept

    # -- receiving: frames split here, DATA handled here, everything else in h2 ----------

    def _read(self, data: bytes, out: list[Event]) -> None:
        """Split ``data`` into frames: runs of non-DATA frames go to h2 as they are, DATA
        frames are handled by ``_data_header`` and delivered here. h2 is fed whatever precedes
        a DATA frame before that frame is looked at, so its state is current for the decision.
        Raises ``FrameRefused`` or h2's ``ProtocolError``; stops once the connection ends."""
        n = len(data)
        pos = 0
        view = memoryview(data)
        to_h2: list[bytes | memoryview] = []  # bytes for h2, in order
        run = -1  # start of a run of ``data`` that goes to h2
        if self._rx_preface:
            k = min(self._rx_preface, n)
            self._rx_preface -= k
            run, pos = 0, k
        while pos < n:
            left = self._rx_left
            if left:
                take = min(left, n - pos)
                kind = self._rx_kind
                if kind == _RX_H2:
                    if run < 0:
                        run = pos
                elif self._rx_data:
                    k = min(self._rx_data, take)
                    self._rx_data -= k
                    st = self._rx_stream
                    sid = self._rx_sid
                    if st is not None and self._streams.get(sid) is st:
                        self.recv_buffered += k
                        out.append(DataReceived(sid, data[pos:pos + k], k))
                    else:  # dropped, or reset since the frame began: nobody reads it
                        self._return_credit(sid, k)
                pos += take
                self._rx_left = left = left - take
                if not left and kind != _RX_H2:
                    self._data_done(to_h2)
                continue
            # A frame header: 9 bytes, 10 for a padded DATA frame (with its pad length).
            head = self._rx_head
            if head or n - pos < 10:
                cut = head + data[pos:pos + 10 - len(head)]
                need = 9
                if len(cut) >= 9 and cut[3] == _DATA and cut[4] & _PADDED and (
                        cut[0] | cut[1] | cut[2]):
                    need = 10
                if len(cut) < need:  # the rest of the header comes in the next read
                    self._rx_head = cut
                    if run >= 0:
                        to_h2.append(view[run:pos])
                        run = -1
                    pos = n
                    break
                self._rx_head = b""
                start = pos - len(head)  # negative when it began in an earlier read
                pos += need - len(head)
                buf, i = cut, 0
            else:
                start = pos
                buf, i = data, pos
                need = 10 if data[pos + 3] == _DATA and data[pos + 4] & _PADDED and (
                    data[pos] | data[pos + 1] | data[pos + 2]) else 9
                pos += need
            length = (buf[i] << 16) | (buf[i + 1] << 8) | buf[i + 2]
            if buf[i + 3] != _DATA:
                if start < 0:  # the header began in the last read: h2 has not seen it
                    to_h2.append(head)
                    start = 0
                if run < 0:
                    run = start
                self._rx_kind = _RX_H2
                self._rx_left = length
                continue
            if run >= 0:
                to_h2.append(view[run:start])
                run = -1
            if to_h2:
                self._feed_h2(to_h2, out)
                if self.terminated:
                    return
            flags = buf[i + 4]
            sid = int.from_bytes(buf[i + 5:i + 9], "big") & 0x7FFFFFFF
            pad = buf[i + 9] if need == 10 else -1
            self._data_header(length, flags, sid, pad, out)
            if self.terminated:
                return
            if not self._rx_left:
                self._data_done(to_h2)
        if run >= 0:
            to_h2.append(view[run:n])
        if to_h2:
            self._feed_h2(to_h2, out)

    def _feed_h2(self, to_h2: list[bytes | memoryview], out: list[Event]) -> None:
        data = to_h2[0] if len(to_h2) == 1 else b"".join(to_h2)
        to_h2.clear()
        for ev in self._h2.receive_data(data):
            self._handle(ev, out)
            if self.terminated:
                return

    def _data_header(self, length: int, flags: int, sid: int, pad: int,
                     out: list[Event]) -> None:
        """A DATA frame begins (``pad`` is its pad length, -1 when not padded): check it as
        hyperframe and h2 would, account it against our windows, and set up its delivery."""
        if not sid:
            raise FrameRefused(h2.errors.ErrorCodes.PROTOCOL_ERROR, "protocol_error",
                               "protocol error: DATA frame on stream 0")
        if flags & _PADDED:
            if not length:
                raise FrameRefused(h2.errors.ErrorCodes.FRAME_SIZE_ERROR, "protocol_error",
                                   "protocol error: padded DATA frame without a pad length")
            if pad >= length:
                raise FrameRefused(h2.errors.ErrorCodes.PROTOCOL_ERROR, "protocol_error",
                                   "protocol error: DATA frame with invalid padding")
            self._rx_left = length - 1
            self._rx_data = length - 1 - pad
        else:
            self._rx_left = self._rx_data = length
        self._rx_sid = sid
        h2c = self._h2
        st = self._streams.get(sid)
        if st is not None and (h2s := h2c.streams.get(sid)) is not None \
                and h2c.state_machine.state is not _CLOSED \
                and h2s.state_machine.state in _RECEIVING and h2s.state_machine.headers_received:
            if length > self._rx_window or length > st.rx_window:
                raise FrameRefused(
                    h2.errors.ErrorCodes.FLOW_CONTROL_ERROR, "protocol_error",
                    f"protocol error: DATA frame of {length} bytes above the flow-control "
                    "window")
            self._rx_window -= length
            st.rx_window -= length
            st.activity += 1
            self._rx_kind = _RX_DATA
            self._rx_stream = st
            self._rx_end = bool(flags & _END_STREAM)
            if length - self._rx_data:  # padding: nobody reads it, its credit goes back now
                self._return_credit(sid, length - self._rx_data)
            return
        # Not a stream that takes DATA now: h2 answers an empty frame exactly as it would
        # answer this one (an error, or, for a stream it keeps half-closed, nothing).
        self._rx_kind = _RX_DROP
        self._rx_stream = None
        self._rx_end = False
        self._rx_data = 0
        self._feed_h2([_HEADER.pack(_DATA, flags & _END_STREAM, sid)], out)
        if self.terminated:
            return
        if length > self._rx_window:
            raise FrameRefused(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR, "protocol_error",
                               f"protocol error: DATA frame of {length} bytes above the "
                               "connection's flow-control window")
        self._rx_window -= length
        if length:
            self._return_credit(sid, length)

    def _data_done(self, to_h2: list[bytes | memoryview]) -> None:
        """The DATA frame being received is complete: its END_STREAM goes to h2."""
        self._rx_kind = _RX_HEADER
        self._rx_stream = None
        if self._rx_end:
            self._rx_end = False
            to_h2.append(_HEADER.pack(_DATA, _END_STREAM, self._rx_sid))

    # -- internals -------------------------------------------------------------------------

    def _terminate(self, code: int, cause: str, detail: str) -> ConnectionTerminated:
        """GOAWAY(code) and stop: the adapter flushes it and closes the transport."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection(error_code=code,
                                      additional_data=detail.encode()[:256] or None)
        self.closed = True
        self.terminated = True
        return ConnectionTerminated(int(code), detail, fatal=True, cause=cause)

    def _forget(self, stream_id: int) -> None:
        st = self._streams.pop(stream_id, None)
        if not self._streams:
            self._idle_since = None  # the next tick starts the idle clock
        if st is not None:
            if st.waiting:
                self.pending_streams -= 1
            if st.pending_bytes:
                self.send_buffered -= st.pending_bytes

    def _premature_reset(self, stream_id: int, out: list[Event]) -> None:
        """The peer reset a stream we had not answered: count it in the sliding window."""
        if stream_id in self._batch:
            # Requested in the same read: the guard counted it already; drop the request.
            self._dropped.add(stream_id)
            return
        try:
            self._guard.premature_reset()
        except FrameRefused as e:
            out.append(self._terminate(e.code, e.cause, str(e)))

    def _maybe_done(self, stream_id: int, st: _Stream) -> None:
        if st.local_ended and st.remote_ended:
            self._forget(stream_id)

    def _flush(self, stream_id: int, st: _Stream, out: list[Event] | None = None) -> None:
        """Frame what ``stream_id`` has queued, as far as the peer's windows allow, then its
        END_STREAM once asked for. The windows and the frame size are h2's: read here and
        decremented as ``H2Connection.send_data`` would."""
        h2c = self._h2
        pending = st.pending
        if pending:
            h2s = h2c.streams.get(stream_id)
            if h2s is None or h2s.state_machine.state not in _SENDING \
                    or h2c.state_machine.state is _CLOSED:
                # h2 closed the stream (a reset earlier in the same read; its StreamReset
                # event is still to come) or the connection (GOAWAY): never to be sent.
                self._drop_pending(st)
                return
            window = min(h2c.outbound_flow_control_window, h2s.outbound_flow_control_window)
            if window > 0:
                size = h2c.max_outbound_frame_size
                out_ = self._out
                pack = _HEADER.pack
                sent = frames = 0
                while pending and window > 0:
                    chunk = pending[0]
                    n = len(chunk)
                    if n > window or n > size:
                        n = min(window, size)
                        view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                        pending[0] = view[n:]
                        chunk = view[:n]
                    else:
                        pending.popleft()
                    out_.append(pack(n << 8, 0, stream_id))
                    out_.append(chunk)
                    window -= n
                    sent += n
                    frames += 1
                h2c.outbound_flow_control_window -= sent
                h2s.outbound_flow_control_window -= sent
                st.pending_bytes -= sent
                self.send_buffered -= sent
                self._guard.data_frames_sent += frames
        if not pending and st.end_requested and not st.local_ended:
            try:
                h2c.end_stream(stream_id)
            except h2.exceptions.ProtocolError:  # the stream or the connection is closed
                return
            st.local_ended = True
            self._maybe_done(stream_id, st)
        if st.blocked and st.pending_bytes <= self._stream_high // 2:
            st.blocked = False
            if out is not None:
                out.append(StreamWritable(stream_id))

    def _drop_pending(self, st: _Stream) -> None:
        """The peer reset the stream in the same read (h2 has closed it; its StreamReset event
        is still to come): what it had queued will never be sent. Flushing it on, say, a
        WINDOW_UPDATE that came first raised StreamClosedError out of ``receive()`` and took
        every tunnel of the connection down."""
        self.send_buffered -= st.pending_bytes
        st.pending.clear()
        st.pending_bytes = 0

    def _flush_all(self, out: list[Event]) -> None:
        for sid, st in list(self._streams.items()):
            if st.pending or st.end_requested or st.blocked:
                self._flush(sid, st, out)

    def _handle(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev, out)
        elif isinstance(ev, h2.events.ResponseReceived):
            st = self._streams.get(ev.stream_id)
            if st is None:
                return
            status = _status(ev.headers)
            if 200 <= status < 300:
                st.open = True
                out.append(StreamAccepted(ev.stream_id))
                self._flush(ev.stream_id, st, out)
            else:
                # A refusal ends the tunnel: if the peer did not close the stream as well
                # (END_STREAM and RST_STREAM, as we do), close it, or it stays half-closed
                # and counted by both sides.
                self._close_h2_stream(ev.stream_id, h2.errors.ErrorCodes.CANCEL)
                self._forget(ev.stream_id)
                out.append(StreamRefused(ev.stream_id, status))
        elif isinstance(ev, h2.events.DataReceived):
            # Only ever the empty frames of _data_header/_data_done (h2 never sees a DATA
            # payload): the bytes were delivered by _read, StreamEnded follows.
            pass
        elif isinstance(ev, h2.events.StreamEnded):
            st = self._streams.get(ev.stream_id)
            if st is not None:
                st.remote_ended = True
                out.append(StreamEnded(ev.stream_id))
                self._maybe_done(ev.stream_id, st)
        elif isinstance(ev, h2.events.StreamReset):
            if ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM and self.client_side:
                self.refused_by_peer = True  # the peer is draining: open no more streams here
            st = self._streams.get(ev.stream_id)
            if st is not None:
                self._forget(ev.stream_id)
                out.append(StreamReset(ev.stream_id, int(ev.error_code or 0)))
                if st.waiting:
                    self._premature_reset(ev.stream_id, out)
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._flush_all(out)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway_received = True
            code = int(ev.error_code or 0)
            out.append(ConnectionTerminated(
                code, (ev.additional_data or b"").decode(errors="replace") or "GOAWAY",
                fatal=code != 0, last_stream_id=ev.last_stream_id or 0))
        elif isinstance(ev, h2.events.PingAckReceived):
            self._ping_sent = None
        elif isinstance(ev, h2.events.TrailersReceived):
            # Trailers end a stream like END_STREAM; tunnels never carry them.
            pass

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        self._streams[sid] = _Stream(self.settings.stream_window)
        if self.client_side:
            self.reset(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        if self._h2.over_limit and sid in self._h2.over_limit:
            # Opened beyond our SETTINGS_MAX_CONCURRENT_STREAMS (see _TunnelH2): a stream
            # error, the client may retry on another connection.
            self._h2.over_limit.discard(sid)
            self._guard.control_frames += 1
            self.reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            limit = self.settings.max_concurrent_streams
            out.append(RequestRejected(
                sid, 503, f"more than {limit} concurrent streams on this connection",
                cause="too_many_streams"))
            try:
                self._guard.stream_refused()
            except FrameRefused as e:
                out.append(self._terminate(e.code, e.cause, str(e)))
            return
        if self.draining:
            self._guard.control_frames += 1
            self.reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            out.append(RequestRejected(sid, 503, "draining: new tunnels are refused"))
            return
        if self.pending_streams >= self.settings.max_pending_streams:
            self._guard.control_frames += 1
            self.reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            out.append(RequestRejected(
                sid, 503, f"more than {self.settings.max_pending_streams} tunnels waiting for "
                "their backend on this connection", cause="too_many_pending_streams"))
            return
        try:
            headers = _request_headers(ev.headers)
        except UnicodeDecodeError as e:
            self.reject_stream(sid, 400)
            out.append(RequestRejected(sid, 400, f"header bytes are not UTF-8: {e.reason}"))
            return
        except ValueError as e:
            self.reject_stream(sid, 400)
            out.append(RequestRejected(sid, 400, f"malformed header: {str(e)[:200]}"))
            return
        method = headers.get(":method", "")
        if method != "CONNECT" or ":protocol" in headers:
            self.reject_stream(sid, 405)
            out.append(RequestRejected(sid, 405, f"method {method!r} is not CONNECT"))
            return
        authority = headers.get(":authority", "")
        try:
            parse_authority(authority)
        except ValueError as e:
            self.reject_stream(sid, 400)
            out.append(RequestRejected(sid, 400, str(e)))
            return
        st = self._streams[sid]
        if ev.stream_ended:
            # A CONNECT that half-closes before it starts still opens a tunnel (FIN first).
            st.remote_ended = True
        st.waiting = True
        self.pending_streams += 1
        self._batch.add(sid)
        out.append(ConnectRequest(sid, authority,
                                  {k: v for k, v in headers.items() if not k.startswith(":")}))
        if ev.stream_ended:
            out.append(StreamEnded(sid))

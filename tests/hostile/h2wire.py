"""Hand-made HTTP/2 for the hostile tier: frames packed byte by byte, a frame reader, and the
mutual-TLS connection a mesh peer opens to a ztunnel's HBONE port.

Why not an HTTP/2 library: an attacker sends what a library refuses to send (a header that
declares 16 MiB, CONTINUATION without end, a stream reset as soon as it opens, pings never
read). Frames here are the RFC 9113 layout (a 9-byte header: 24-bit length, type, flags,
31-bit stream id) packed with ``struct``; header blocks are HPACK from ``hpack``, which encodes
bytes as given (so a value need not be UTF-8). Only the reader decodes HPACK, to learn each
stream's ``:status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
FRAME_NAMES = ("DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING",
               "GOAWAY", "WINDOW_UPDATE", "CONTINUATION")
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
# SETTINGS identifiers (RFC 9113 6.5.2).
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
# Error codes (RFC 9113 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, \
    FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, \
    ENHANCE_YOUR_CALM = range(12)
ERROR_NAMES = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR",
               "SETTINGS_TIMEOUT", "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM",
               "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM")
DEFAULT_WINDOW = 65535


def error_name(code: int) -> str:
    return ERROR_NAMES[code] if 0 <= code < len(ERROR_NAMES) else f"0x{code:x}"


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """The 9 header bytes; ``length`` is whatever the caller declares (it may lie)."""
    return struct.pack(">I", length)[1:] + struct.pack(">BBI", kind, flags,
                                                        stream_id & 0x7FFFFFFF)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), kind, flags, stream_id) + payload


def settings(pairs: Sequence[tuple[int, int]] = ()) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def settings_ack() -> bytes:
    return frame(SETTINGS, FLAG_ACK, 0)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def rst_stream(stream_id: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def ping(opaque: bytes = b"\0" * 8, ack: bool = False) -> bytes:
    return frame(PING, FLAG_ACK if ack else 0, 0, opaque)


def data(stream_id: int, payload: bytes, end_stream: bool = False) -> bytes:
    return frame(DATA, FLAG_END_STREAM if end_stream else 0, stream_id, payload)


def connect_block(encoder: hpack.Encoder, authority: str | bytes,
                  extra: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """The HPACK block of a CONNECT for ``authority`` (plus raw ``extra`` headers)."""
    auth = authority.encode() if isinstance(authority, str) else authority
    headers = [(b":method", b"CONNECT"), (b":authority", auth), *extra]
    block: bytes = encoder.encode(headers, huffman=False)
    return block


def headers(stream_id: int, block: bytes, end_headers: bool = True,
            end_stream: bool = False) -> bytes:
    flags = (FLAG_END_HEADERS if end_headers else 0) | (FLAG_END_STREAM if end_stream else 0)
    return frame(HEADERS, flags, stream_id, block)


def continuation(stream_id: int, fragment: bytes, end_headers: bool = False) -> bytes:
    return frame(CONTINUATION, FLAG_END_HEADERS if end_headers else 0, stream_id, fragment)


# --- frames in -----------------------------------------------------------------------------


@dataclass
class Frame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def name(self) -> str:
        return FRAME_NAMES[self.kind] if self.kind < len(FRAME_NAMES) else f"0x{self.kind:x}"

    def error_code(self) -> int:
        """RST_STREAM's code, or GOAWAY's."""
        if self.kind == RST_STREAM:
            return int(struct.unpack(">I", self.payload[:4])[0])
        if self.kind == GOAWAY:
            return int(struct.unpack(">I", self.payload[4:8])[0])
        raise ValueError(f"{self.name} has no error code")

    def goaway_last_stream(self) -> int:
        return int(struct.unpack(">I", self.payload[:4])[0]) & 0x7FFFFFFF

    def goaway_reason(self) -> str:
        return self.payload[8:].decode(errors="replace")


class FrameStream:
    """Frames from an asyncio stream, read in large chunks and split here."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()
        self.eof = False
        self.error = ""

    async def next(self) -> Frame | None:
        """The next frame, None at EOF (or a reset: ``error`` says which)."""
        while True:
            if len(self.buf) >= 9:
                length = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) >= 9 + length:
                    kind, flags, sid = struct.unpack(">BBI", self.buf[3:9])
                    payload = bytes(self.buf[9:9 + length])
                    del self.buf[:9 + length]
                    return Frame(kind, flags, sid & 0x7FFFFFFF, payload)
            if self.eof:
                return None
            try:
                chunk = await self.reader.read(1 << 18)
            except (ConnectionError, OSError, ssl.SSLError) as e:
                chunk, self.error = b"", f"{type(e).__name__}: {e}"
            if not chunk:
                self.eof = True
            self.buf += chunk


def status_of(decoder: hpack.Decoder, f: Frame) -> int:
    """``:status`` of a HEADERS frame (0 if absent); keeps ``decoder`` in step."""
    block = f.payload
    if f.flags & 0x8:  # PADDED
        block = block[1:len(block) - block[0]]
    if f.flags & 0x20:  # PRIORITY
        block = block[5:]
    for k, v in decoder.decode(block, raw=True):
        if k == b":status":
            return int(v) if v.isdigit() else 0
    return 0


# --- a mesh peer's connection ----------------------------------------------------------------


def tls_context(identity_dir: Path, namespace: str, service_account: str) -> ssl.SSLContext:
    """What a mesh peer presents: its workload certificate, the mesh root, TLS 1.3, ALPN h2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the server's name is a SPIFFE ID, not a DNS name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(identity_dir / "trust-bundle.pem"))
    leaf = identity_dir / namespace / service_account
    ctx.load_cert_chain(str(leaf / "cert-chain.pem"), str(leaf / "key.pem"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


class Peer:
    """One HBONE connection seen from the client: what we send is up to the caller; what the
    server sends is recorded by ``pump`` (statuses, resets, GOAWAY, windows, echoed bytes, the
    moment the connection closed). Flow-control credit is given back only if ``grant``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.frames = FrameStream(reader)
        self.writer = writer
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 20
        self.encoder = hpack.Encoder()
        self.statuses: dict[int, int] = {}
        self.resets: dict[int, int] = {}
        self.goaway: Frame | None = None
        self.goaway_at: float | None = None
        self.closed_at: float | None = None
        self.close_error = ""
        self.counts: dict[str, int] = {}
        self.received: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.server_settings = asyncio.Event()
        self.changed = asyncio.Event()
        self.initial_window = DEFAULT_WINDOW
        self.conn_window = DEFAULT_WINDOW
        self.stream_windows: dict[int, int] = {}
        self.grant = False  # give back flow-control credit for DATA received
        self.auto_reply = True  # acknowledge the server's SETTINGS and PINGs, as a client must
        self.keep_bytes = 1 << 16
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, ctx: ssl.SSLContext, host: str, port: int,
                   within: float = 10.0) -> Peer:
        """TCP, then the mutual-TLS handshake; nothing of HTTP/2 sent yet."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=None,
                                    ssl_handshake_timeout=within), within)
        ssl_obj = writer.get_extra_info("ssl_object")
        alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        if alpn != "h2":
            writer.close()
            raise ConnectionError(f"ALPN {alpn!r}, not h2")
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    async def send(self, data: bytes, within: float | None = None) -> bool:
        """Write and wait for the transport to take it; False once the connection is gone
        (or, with ``within``, when the peer stopped reading for that long)."""
        if self.closed or self.writer.is_closing():
            return False
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), within)
        except TimeoutError:
            return False
        except (ConnectionError, OSError, ssl.SSLError, RuntimeError) as e:
            self._closed(f"write: {type(e).__name__}: {e}")
            return False
        return True

    async def handshake(self, pairs: Sequence[tuple[int, int]] = (), pump: bool = True,
                        within: float = 10.0) -> None:
        """Preface and SETTINGS; wait for the server's SETTINGS and acknowledge them. With
        ``pump`` the connection keeps being read (``pump``) afterwards; else nothing more is
        read until the caller does."""
        await self.send(PREFACE + settings(pairs))
        if pump:
            self.start_pump()
            await asyncio.wait_for(self.server_settings.wait(), within)
            return
        async with asyncio.timeout(within):
            while not self.server_settings.is_set():
                f = await self.frames.next()
                if f is None:
                    raise ConnectionError(f"closed before SETTINGS {self.frames.error}")
                await self._on_frame(f)

    def start_pump(self) -> None:
        if self._pump is None:
            self._pump = asyncio.create_task(self.pump())

    async def pump(self) -> None:
        while True:
            f = await self.frames.next()
            if f is None:
                self._closed(self.frames.error or "EOF")
                return
            await self._on_frame(f)

    def _closed(self, why: str) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()
            self.close_error = why
        self.changed.set()

    async def _on_frame(self, f: Frame) -> None:
        self.counts[f.name] = self.counts.get(f.name, 0) + 1
        if f.kind == SETTINGS and not f.flags & FLAG_ACK:
            for i in range(0, len(f.payload) - 5, 6):
                key, value = struct.unpack(">HI", f.payload[i:i + 6])
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    delta = value - self.initial_window
                    self.initial_window = value
                    for sid in self.stream_windows:
                        self.stream_windows[sid] += delta
            self.server_settings.set()
            if self.auto_reply:
                await self.send(settings_ack())
        elif f.kind == PING and not f.flags & FLAG_ACK:
            if self.auto_reply:
                await self.send(ping(f.payload, ack=True))
        elif f.kind == WINDOW_UPDATE:
            inc = int(struct.unpack(">I", f.payload[:4])[0]) & 0x7FFFFFFF
            if f.stream_id == 0:
                self.conn_window += inc
            elif f.stream_id in self.stream_windows:
                self.stream_windows[f.stream_id] += inc
        elif f.kind == HEADERS:
            self.statuses[f.stream_id] = status_of(self.decoder, f)
            if f.flags & FLAG_END_STREAM:
                self.ended.add(f.stream_id)
        elif f.kind == DATA:
            kept = self.received.setdefault(f.stream_id, bytearray())
            if len(kept) < self.keep_bytes:
                kept += f.payload[:self.keep_bytes - len(kept)]
            if f.flags & FLAG_END_STREAM:
                self.ended.add(f.stream_id)
            if self.grant and f.payload:
                await self.send(window_update(0, len(f.payload))
                                + window_update(f.stream_id, len(f.payload)))
        elif f.kind == RST_STREAM:
            self.resets[f.stream_id] = f.error_code()
        elif f.kind == GOAWAY and self.goaway is None:
            self.goaway, self.goaway_at = f, time.monotonic()
        self.changed.set()

    async def wait_for(self, check: Callable[[], bool], within: float) -> bool:
        """Until ``check()`` holds (True) or ``within`` seconds pass (False)."""
        deadline = time.monotonic() + within
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True

    async def wait_closed(self, within: float) -> bool:
        return await self.wait_for(lambda: self.closed, within)

    def tcp_state(self) -> int:
        """The kernel's TCP state of the connection (1 established, 7 closed, 8 close-wait),
        read without reading any of its data; 0 if there is no socket any more."""
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return 0
        try:
            return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0])
        except OSError:
            return 0

    def open_stream(self, stream_id: int, authority: str | bytes,
                    extra: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """The HEADERS of a CONNECT on ``stream_id`` (its send window starts here)."""
        self.stream_windows[stream_id] = self.initial_window
        return headers(stream_id, connect_block(self.encoder, authority, extra))

    def summary(self, since: float) -> dict[str, Any]:
        """What the server did, for the test's report (times in seconds after ``since``)."""
        return {
            "closed_after_s": None if self.closed_at is None else
            round(self.closed_at - since, 3),
            "close_error": self.close_error,
            "goaway": None if self.goaway is None else {
                "code": error_name(self.goaway.error_code()),
                "last_stream": self.goaway.goaway_last_stream(),
                "reason": self.goaway.goaway_reason()[:200],
                "after_s": None if self.goaway_at is None else round(self.goaway_at - since, 3)},
            "frames": dict(self.counts),
        }

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)

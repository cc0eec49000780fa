"""Copy bytes both ways between a TCP connection and a peer (TCP or HBONE stream).

Half-close is preserved in both directions (a FIN on one side becomes a FIN on the other), so
protocols that shut down their sending side early keep working. The byte counts feed metrics
as they flow. Reads grow to 256 KiB, as in Istio's ztunnel: big reads mean fewer, larger
HTTP/2 frames and TLS records.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import cast

from ztunnel.hbone.conn import HboneStream, ReadSource

READ_SIZE = 256 * 1024

Counter = Callable[[int], None]


async def _tcp_to_stream(reader: asyncio.StreamReader, stream: HboneStream,
                         count: Counter, source: ReadSource | None = None) -> None:
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            stream.write_eof()
            return
        count(len(data))
        # While the tunnel cannot take more, ``source`` is not read: its bytes wait in the
        # kernel, not in the reader's buffer (which would sit outside the HBONE budget).
        await stream.write(data, source)


async def _stream_to_tcp(stream: HboneStream, writer: asyncio.StreamWriter,
                         count: Counter) -> None:
    while True:
        data, flow = await stream.read()
        if not data:
            if flow:
                stream.consumed(flow)
            if writer.can_write_eof():
                writer.write_eof()
            return
        try:
            writer.write(data)
            await writer.drain()
        finally:
            # The credit goes back whether or not the destination took the bytes: a chunk
            # lost with a failing destination must not shrink the connection's window for
            # the other tunnels on it (after enough resets, they stalled).
            stream.consumed(flow)
        count(len(data))


async def _tcp_to_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      count: Counter) -> None:
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            if writer.can_write_eof():
                writer.write_eof()
            return
        writer.write(data)
        await writer.drain()
        count(len(data))


async def _both(a: asyncio.Task[None], b: asyncio.Task[None]) -> None:
    """Wait for both directions; if one fails, abort the other (an RST, not a hang)."""
    try:
        done, pending = await asyncio.wait({a, b}, return_when=asyncio.FIRST_EXCEPTION)
        # Read every finished task's exception before raising one: when both directions fail
        # in the same iteration, an unread second one is reported by asyncio as "Task exception
        # was never retrieved" on stderr, once per tunnel (a log flood under attack).
        errors = [e for e in (t.exception() for t in done) if e is not None]
        if errors:
            raise errors[0]
        if pending:
            await asyncio.gather(*pending)
    finally:
        for t in (a, b):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


async def relay_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       stream: HboneStream, sent: Counter, received: Counter) -> None:
    """TCP ``reader/writer`` <-> HBONE ``stream``. ``sent`` counts TCP->stream bytes."""
    try:
        # One TCP transport reads and writes; typed as a WriteTransport by asyncio.
        source = cast(ReadSource, writer.transport) \
            if hasattr(writer.transport, "pause_reading") else None
        await _both(asyncio.create_task(_tcp_to_stream(reader, stream, sent, source)),
                    asyncio.create_task(_stream_to_tcp(stream, writer, received)))
    except Exception:  # whatever failed, the peer must learn the tunnel is gone
        stream.reset()
        writer.transport.abort()
        raise


async def relay_tcp(a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
                    b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter,
                    sent: Counter, received: Counter) -> None:
    """TCP a <-> TCP b. ``sent`` counts a->b bytes."""
    try:
        await _both(asyncio.create_task(_tcp_to_tcp(a_reader, b_writer, sent)),
                    asyncio.create_task(_tcp_to_tcp(b_reader, a_writer, received)))
    except (ConnectionError, OSError):
        a_writer.transport.abort()
        b_writer.transport.abort()
        raise

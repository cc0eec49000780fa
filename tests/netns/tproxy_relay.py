"""A minimal transparent proxy, the stand-in for the ztunnel in capture tests.

Why it exists: to test the TPROXY rules and the topology on their own, independent of the
ztunnel's correctness. It listens like the ztunnel in shared mode (0.0.0.0 on the capture
ports, IP_TRANSPARENT), logs one JSON line per accepted connection with the listener port, the
original destination (the accepted socket's local address, which TPROXY preserves) and the
peer, then relays to the original destination from a socket carrying the ztunnel's mark 0x539,
exactly what the real proxy does for a passthrough connection.

Usage (inside a node namespace): python tproxy_relay.py LOG READY_FILE PORT...
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from pathlib import Path

IP_TRANSPARENT = 19
SO_MARK = 36
ZTUNNEL_MARK = 0x539


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        writer.close()


async def _handle(
    port: int, log: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    orig = writer.get_extra_info("sockname")
    peer = writer.get_extra_info("peername")
    entry = {"listener": port, "orig_dst": f"{orig[0]}:{orig[1]}", "peer": f"{peer[0]}:{peer[1]}"}
    with log.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    up.setsockopt(socket.SOL_SOCKET, SO_MARK, ZTUNNEL_MARK)
    up.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(up, orig[:2]), 3.0)
    except (OSError, TimeoutError):
        up.close()
        writer.close()
        return
    up_reader, up_writer = await asyncio.open_connection(sock=up)
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    for w in (writer, up_writer):
        w.close()
        with contextlib.suppress(ConnectionError):
            await w.wait_closed()


async def main(log: Path, ready: Path, ports: list[int]) -> None:
    servers = []
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind(("0.0.0.0", port))

        async def handler(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port
        ) -> None:
            await _handle(port, log, r, w)

        servers.append(await asyncio.start_server(handler, sock=s))
    await asyncio.to_thread(ready.write_text, "ready\n")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), [int(p) for p in sys.argv[3:]]))

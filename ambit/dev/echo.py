"""A tiny TCP server for pods in test topologies: answers each line with who it saw.

Why it exists: to prove where a connection came from and where it landed, the server itself
must report the peer and local addresses of the socket it accepted. Each received line is
answered with one JSON line ``{"peer": "IP:PORT", "local": "IP:PORT", "data": LINE}``. A
connection that ends without an answer (a refused or reset connection, a policy denial) is
easy to tell apart from one that reached the server.

Run inside a pod namespace: ``python -m ambit.dev.echo --host 10.244.2.2 --port 8080``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

MAX_LINE = 64 * 1024


def _addr(sockname: object) -> str:
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return f"{sockname[0]}:{sockname[1]}"
    return str(sockname)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = _addr(writer.get_extra_info("peername"))
    local = _addr(writer.get_extra_info("sockname"))
    try:
        while line := await reader.readline():
            data = line.decode("utf-8", "replace").rstrip("\r\n")
            reply = {"peer": peer, "local": local, "data": data}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass  # a client going away mid-line is normal in tests of denials
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(host: str, port: int, ready_file: Path | None) -> None:
    server = await asyncio.start_server(_handle, host, port, reuse_address=True, limit=MAX_LINE)
    if ready_file is not None:
        # Written after listen(), so a waiter that sees the file can connect at once.
        await asyncio.to_thread(ready_file.write_text, f"{host}:{port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ambit.dev.echo", description=__doc__)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--ready-file", type=Path, help="written once the socket listens")
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, args.ready_file))
    except OSError as e:
        print(f"echo: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

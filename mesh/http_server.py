"""A minimal HTTP/1.1 server (on h11) for the admin, metrics and readiness ports.

These endpoints answer operators and Prometheus, a few requests a second: one request per
connection is plenty, and a tiny route table keeps them easy to test.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11

MAX_REQUEST = 64 * 1024
log = logging.getLogger("mesh.http")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


# (method, target) -> response; a route may also be a coroutine (the node agent's endpoint
# fetches the ztunnel's metrics while answering).
Route = Callable[[str, str], Response | Awaitable[Response]]


def serve_http(route: Route) -> Callable[[socket.socket], asyncio.Future[None]]:
    async def handle(sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            request: h11.Request | None = None
            async with asyncio.timeout(10):
                while request is None:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data:
                            return
                    elif isinstance(event, h11.Request):
                        request = event
            try:
                answer = route(request.method.decode(), request.target.decode())
                resp = await answer if inspect.isawaitable(answer) else answer
            except Exception as e:  # an admin bug must not look like a hung socket
                log.exception("%s %r failed", request.method, request.target)
                resp = Response(500, f"internal error: {e}\n".encode())
            writer.write(conn.send(h11.Response(status_code=resp.status, headers=[
                ("content-type", resp.content_type), ("content-length", str(len(resp.body))),
                ("connection", "close")])) or b"")
            writer.write(conn.send(h11.Data(data=resp.body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
        except h11.RemoteProtocolError:
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n")
        finally:
            writer.close()

    def start(sock: socket.socket) -> asyncio.Future[None]:
        return asyncio.ensure_future(handle(sock))

    return start

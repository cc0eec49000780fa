"""A listener is a listening socket plus an accept loop; it can be opened anywhere.

Sockets are created by ``bind_socket`` (optionally IP_TRANSPARENT, for TPROXY and eBPF
``sk_assign`` capture) or handed in ready-made, e.g. opened inside a pod's network namespace by
a later in-pod capture mode. Each accepted connection runs in its own task: an exception there
is logged, counted and closes that one connection, never the listener. ``close`` stops
accepting; ``drain`` waits for open connections up to a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger("mesh.listener")

IP_TRANSPARENT = 19  # from linux/in.h; not exported by the socket module

Handler = Callable[[socket.socket], Awaitable[None]]
ErrorHook = Callable[[str, BaseException], None]


class BindError(Exception):
    """A listener could not be opened; the message says why and what to do."""


def bind_socket(host: str, port: int, transparent: bool = False, backlog: int = 1024,
                reuseport: bool = False) -> socket.socket:
    """A listening socket on ``host:port``; ``reuseport`` sets SO_REUSEPORT (a member of a
    group that shares the port, see ``bind_group``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            try:
                level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.SOL_IP
                opt = 75 if family == socket.AF_INET6 else IP_TRANSPARENT  # IPV6_TRANSPARENT
                sock.setsockopt(level, opt, 1)
            except PermissionError:
                raise BindError(
                    f"cannot set IP_TRANSPARENT on {host}:{port}: needs CAP_NET_ADMIN "
                    "(run as root, or pass --no-transparent when nothing captures traffic)"
                ) from None
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if isinstance(e, BindError):
            raise
        hint = " (another process holds it?)" if e.errno == errno.EADDRINUSE else ""
        raise BindError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return sock


def bind_group(host: str, port: int, count: int, transparent: bool = False,
               backlog: int = 1024) -> list[socket.socket]:
    """``count`` listening sockets sharing ``host:port`` through SO_REUSEPORT: the kernel
    spreads new connections over them by a hash of the 4-tuple, one socket per worker process.

    SO_REUSEPORT would also let any other process of the same user join the group silently
    (a second ztunnel started by mistake would take a share of the node's connections instead
    of failing to bind), so the port is first probed with a plain socket: if anything listens
    there, this fails like ``bind_socket`` does.
    """
    probe = bind_socket(host, port, transparent, backlog=1)  # BindError if the port is taken
    probe.close()
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            group.append(bind_socket(host, port, transparent, backlog, reuseport=True))
    except BindError:
        for sock in group:
            sock.close()
        raise
    return group


class Listener:
    def __init__(self, name: str, sock: socket.socket, handler: Handler,
                 on_error: ErrorHook | None = None) -> None:
        self.name = name
        self.sock = sock
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self._handler = handler
        self._on_error = on_error
        self._accept_task: asyncio.Task[None] | None = None
        self.connections: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"accept-{self.name}")

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                # EMFILE and friends: back off instead of spinning; the listener stays up.
                log.warning("%s: accept failed: %s", self.name, e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._run(conn))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)

    async def _run(self, conn: socket.socket) -> None:
        try:
            await self._handler(conn)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one bad connection never takes the listener down
            log.info("%s: connection failed: %s: %s", self.name, type(e).__name__, e)
            if self._on_error is not None:
                self._on_error(self.name, e)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        """Stop accepting; open connections continue."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            self._accept_task = None
        with contextlib.suppress(OSError):
            self.sock.close()

    async def drain(self, deadline: float) -> int:
        """Wait up to ``deadline`` seconds for open connections; cancel the rest. Returns how
        many had to be cancelled."""
        return await finish_or_cancel(self.connections, deadline)


async def finish_or_cancel(tasks: Iterable[asyncio.Task[None]], deadline: float) -> int:
    """Let ``tasks`` finish for up to ``deadline`` seconds, then cancel (and await) the rest.
    Returns how many had to be cancelled."""
    pending = set(tasks)
    if pending:
        _, pending = await asyncio.wait(pending, timeout=deadline)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)

"""The agent's end of the ztunnel link: the node's ztunnel hands over its listening sockets.

Why it exists: in eBPF mode the tc programs steer packets into the ztunnel's listeners with
``bpf_sk_assign``, which needs those sockets in a SOCKMAP, and only a process holding the
sockets can put them there. The ztunnel connects to ``<run dir>/ztunnel.sock`` after binding
and sends one JSON line naming its capture listeners, with their descriptors attached
(SCM_RIGHTS); the agent stores them in the pinned SOCKMAP and answers ``{"ok": true}``. The
connection stays open: the ztunnel re-sends after a restart of either side, and the agent
learns the ztunnel's pid (SO_PEERCRED) for the node metrics. The SOCKMAP holds its own
reference, so the agent closes its copies right away; when the ztunnel exits, the kernel
drops its sockets from the map and new captured connections fail closed until it is back.

Wire format (both sides): ``ztunnel/agent_link.py`` is the client.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from mesh.unix import bind_unix

log = logging.getLogger("agent.ztunnel_link")

MAX_MESSAGE = 4096
MAX_FDS = 8
SOCKET_MODE = 0o600

OnListeners = Callable[[Mapping[str, int], int], Awaitable[None]]  # (name -> fd, pid)


def _recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - (len(data) % fds.itemsize)
            fds.frombytes(data[:usable])
    return msg, list(fds)


def peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


class ZtunnelLinkServer:
    def __init__(self, path: Path, on_listeners: OnListeners) -> None:
        self.path = path
        self.on_listeners = on_listeners
        self.ztunnel_pid: int | None = None
        self.registrations = 0
        self._server: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # 0600 from creation (mesh/unix.py): the ztunnel runs as root, like the agent.
        self._server = bind_unix(self.path, SOCKET_MODE, backlog=8)
        self._task = asyncio.create_task(self._accept())

    async def _accept(self) -> None:
        assert self._server is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._server)
            task = asyncio.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        pid = 0
        registered = False
        try:
            pid = peer_pid(conn)
            conn.setblocking(False)
            await asyncio.wait_for(_readable(conn), 10)
            msg, fds = _recv_with_fds(conn)
            request = json.loads(msg.decode().strip() or "null")
            names = request.get("listeners") if isinstance(request, dict) else None
            if not isinstance(names, list) or len(names) != len(fds) or \
                    not all(isinstance(n, str) for n in names):
                raise ValueError(f"expected {{\"listeners\": [names]}} with one descriptor "
                                 f"each; got {msg[:200]!r} with {len(fds)} descriptor(s)")
            await self.on_listeners(dict(zip(names, fds, strict=True)), pid)
            self.ztunnel_pid = pid
            registered = True
            self.registrations += 1
            log.info("ztunnel pid %d registered its listeners: %s", pid, ", ".join(names))
            await loop.sock_sendall(conn, b'{"ok": true}\n')
            # Keep the link open until the ztunnel goes away, so its pid stays current.
            while await loop.sock_recv(conn, 1024):
                pass
            log.info("ztunnel pid %d closed the link", pid)
        except Exception as e:  # a bad message, or the SOCKMAP update failed: keep serving
            bad_input = isinstance(e, TimeoutError | OSError | ValueError)
            log.log(logging.WARNING if bad_input else logging.ERROR,
                    "ztunnel link: %s%s", "" if bad_input else "cannot use the listeners: ", e)
            with contextlib.suppress(OSError):
                await loop.sock_sendall(conn, json.dumps({"ok": False, "error": str(e)})
                                        .encode() + b"\n")
        finally:
            if registered and self.ztunnel_pid == pid:  # its link is gone, so is it
                self.ztunnel_pid = None
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for t in list(self._conns):
            t.cancel()
        if self._server is not None:
            self._server.close()
        self.path.unlink(missing_ok=True)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())

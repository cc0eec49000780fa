"""Unix sockets one node process serves to another: created with their final mode.

Why it exists: the node agent's ``cni.sock`` and ``ztunnel.sock`` and the waypoint agent's
SDS/ALS socket let whoever connects change what the node captures or obtain a workload's
certificates. The socket file has its final mode from the moment it exists: ``bind`` creates
it with ``0777 & ~umask``, and a ``chmod`` afterwards leaves a window in which any local user
can connect (and keep the connection). So the bind runs under a umask that leaves only the
wanted bits (``file_mode``, ``bind_unix``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

# Serialises our own umask changes (two binds at once would restore each other's umask).
_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def file_mode(mode: int) -> Iterator[None]:
    """Files and sockets created inside get at most ``mode`` (the umask is its complement).

    The umask is process-wide: keep the block to one synchronous call (no ``await`` inside).
    Another thread creating a file meanwhile gets a narrower mode than it asked for, never a
    wider one, for the microseconds a ``bind`` takes.
    """
    with _UMASK_LOCK:
        old = os.umask(0o777 & ~mode)
        try:
            yield
        finally:
            os.umask(old)


def bind_unix(path: Path, mode: int = 0o600, backlog: int = 128) -> socket.socket:
    """A listening, non-blocking ``AF_UNIX`` stream socket at ``path`` whose file has ``mode``
    from its creation (a stale socket file at ``path`` is replaced). Hand it to asyncio
    (``loop.sock_accept``, ``asyncio.start_unix_server(sock=...)``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with file_mode(mode):
            sock.bind(str(path))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock

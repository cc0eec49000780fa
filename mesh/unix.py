"""Unix sockets one node process serves to another: created with their mode, peers checked.

Why it exists: the node agent's ``cni.sock`` and ``ztunnel.sock`` and the waypoint agent's
SDS/ALS socket let whoever connects change what the node captures or obtain a workload's
certificates. Two things keep strangers off them, both here so every server does them alike:

* the socket file has its final mode from the moment it exists. ``bind`` creates it with
  ``0777 & ~umask``; a ``chmod`` afterwards leaves a window in which any local user can
  connect (and keep the connection). So the bind runs under a umask that leaves only the
  wanted bits (``file_mode``, ``bind_unix``);
* the server asks the kernel who is on the other end (``SO_PEERCRED``: pid, uid, gid as of
  ``connect``, which the peer cannot forge) and serves only the uids it allows
  (``uid_problem``): root and its own user unless configured otherwise. Refusals are logged
  at most once per interval (``RefusalLog``), so a peer that keeps trying cannot flood the log,
  and counted.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

from mesh.ratelimit import RateLimitedLog

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


@dataclass(frozen=True)
class PeerCred:
    """The peer of a Unix socket as the kernel recorded it at ``connect``. ``pid`` is 0 when
    the peer lives in a PID namespace this process cannot see."""

    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(int(pid), int(uid), int(gid))


def allowed_uids(extra: Iterable[int] = ()) -> frozenset[int]:
    """Who may talk on a node socket: root, this process's own user, and ``extra``."""
    return frozenset({0, os.geteuid(), *extra})


def uid_problem(peer: PeerCred, allowed: Set[int], what: str, flag: str) -> str | None:
    """Why ``peer`` may not use ``what`` (None: it may). ``flag`` is the setting that allows
    more uids, named in the message so the operator knows the fix."""
    if peer.uid in allowed:
        return None
    uids = ", ".join(str(u) for u in sorted(allowed))
    return (f"{what}: refused a peer with uid {peer.uid} (pid {peer.pid}); only uid(s) {uids} "
            f"(root and the server's own user) may connect. If that process should, add its "
            f"uid with {flag}")


class RefusalLog(RateLimitedLog):
    """Counts refused peers and logs them, at most once per ``interval`` seconds.

    The first refusal is logged at once; later ones within the interval are only counted, and
    the next line logged says how many were left out (``mesh.ratelimit.RateLimitedLog`` with a
    single key).
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(logger, interval, clock, what="refused")

    def refused(self, message: str) -> bool:
        """Count one refusal; True if it was logged."""
        return self.log(None, "%s", message)


# --- JSON lines with descriptors (the agent's ztunnel link) ------------------------------------

MAX_LINE_FDS = 253  # SCM_MAX_FD: the most descriptors one message can carry


async def send_line(sock: socket.socket, line: bytes, fds: Sequence[int] = ()) -> None:
    """Send one line on a non-blocking stream socket, ``fds`` attached to its first byte
    (SCM_RIGHTS). The receiver (``LineReader``) hands them out in order: a line that says how
    many descriptors it carries takes that many."""
    view = memoryview(line)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
        if fds else []
    while view:
        try:
            sent = sock.sendmsg([view], ancillary)
        except (BlockingIOError, InterruptedError):
            loop = asyncio.get_running_loop()
            await _ready(sock, loop.add_writer, loop.remove_writer)
            continue
        view, ancillary = view[sent:], []  # the descriptors went with the first byte


async def _ready(sock: socket.socket, add: Callable[..., object],
                 remove: Callable[[int], object]) -> None:
    """Until ``sock`` is readable (``loop.add_reader``) or writable (``loop.add_writer``)."""
    event = asyncio.Event()
    add(sock.fileno(), event.set)
    try:
        await event.wait()
    finally:
        remove(sock.fileno())


class LineReader:
    """Lines from a non-blocking Unix stream socket, each with the descriptors sent with it
    (SCM_RIGHTS). A read may gather several messages but ends with the first one that carries
    descriptors (Linux's unix_stream_read_generic), and ``send_line`` sends each line as one
    message with its descriptors on its first byte: so descriptors read with a chunk belong to
    the last line that begins in that chunk. Lines longer than ``limit`` raise ``ValueError``;
    ``close`` closes descriptors no line was given."""

    def __init__(self, sock: socket.socket, limit: int, max_fds: int = MAX_LINE_FDS) -> None:
        self.sock = sock
        self.limit = limit
        self.max_fds = max_fds
        self._buffer = b""
        self._offset = 0  # stream offset of the buffer's first byte
        self._fds: collections.deque[tuple[int, int]] = collections.deque()  # (offset, fd)

    async def readline(self) -> tuple[bytes, list[int]] | None:
        """The next line (without its newline) and its descriptors (the caller owns them);
        None at the end of the stream."""
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buffer:
            if len(self._buffer) > self.limit:
                raise ValueError(f"a line over {self.limit} bytes")
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(self.max_fds * 4))
            except (BlockingIOError, InterruptedError):
                await _ready(self.sock, loop.add_reader, loop.remove_reader)
                continue
            at = self._offset + len(self._buffer) + _last_line_start(data)
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(raw[:len(raw) - len(raw) % got.itemsize])
                    self._fds.extend((at, fd) for fd in got)
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        end = self._offset + len(line)
        self._offset = end + 1
        fds = []
        while self._fds and self._fds[0][0] <= end:
            fds.append(self._fds.popleft()[1])
        if len(line) > self.limit:
            _close_all(fds)
            raise ValueError(f"a line over {self.limit} bytes")
        return line, fds

    def close(self) -> None:
        _close_all(fd for _, fd in self._fds)
        self._fds.clear()


def _last_line_start(chunk: bytes) -> int:
    """Where in ``chunk`` the last line that begins in it begins (0: at its start, or none
    does and the chunk continues the line in progress, which is then the one)."""
    last = chunk.rfind(b"\n", 0, len(chunk) - 1)
    return last + 1 if last >= 0 else 0


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

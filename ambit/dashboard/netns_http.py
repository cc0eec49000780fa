"""One bounded HTTP GET, optionally from inside a network namespace, without a subprocess.

Why it exists: in the dev cluster, the controller's, agents', ztunnels' and waypoints' HTTP
endpoints listen on 127.0.0.1 *inside* their own network namespaces (nothing of the cluster is
connected to the machine's network), so the dashboard, which serves the browser on the root
namespace's loopback, cannot dial them. ``ambit dev`` reaches them by running a probe process
in the namespace (``ip netns exec``), which costs a Python start per request; the dashboard asks
every node every second. A socket keeps the network namespace it was created in, so a worker
thread enters the namespace (``setns``, which affects only the calling thread), creates the
socket, and returns to its own namespace before anything else runs on it; the request then
goes over that socket. Every fetch is bounded: connect and each read by ``timeout``, the body
by ``limit`` bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import logging
import os
import socket

log = logging.getLogger("ambit.dashboard")

CLONE_NEWNET = 0x40000000
DEFAULT_LIMIT = 8 << 20  # a busy waypoint's /metrics is a few hundred KiB

_libc = ctypes.CDLL(None, use_errno=True)


class FetchError(Exception):
    """The GET failed; the message says how (no connection, status, too large)."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def socket_in(netns_path: str | None) -> socket.socket:
    """A TCP socket created in ``netns_path`` (None: this thread's namespace). Call from a
    thread of its own (``asyncio.to_thread``): the thread is in the other namespace while the
    socket is created."""
    if netns_path is None:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(target)
        raise
    try:
        _setns(target)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            try:
                _setns(own)
            except OSError:
                # A pooled thread left in a pod's namespace would make later fetches (and
                # anything else run on it) silently reach the wrong network: stop instead.
                log.critical("cannot return to the dashboard's network namespace; exiting")
                os._exit(70)
    finally:
        os.close(target)
        os.close(own)


def get(netns_path: str | None, host: str, port: int, path: str, *, timeout: float = 3.0,
        limit: int = DEFAULT_LIMIT) -> bytes:
    """GET ``http://host:port/path`` from ``netns_path`` (blocking; run it in a thread).
    Raises ``FetchError`` unless the answer is a 200 of at most ``limit`` bytes."""
    try:
        sock = socket_in(netns_path)
    except OSError as e:
        raise FetchError(f"cannot enter network namespace {netns_path}: {e}") from None
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        conn.sock = sock
        conn.request("GET", path, headers={"Accept": "*/*"})
        resp = conn.getresponse()
        body = resp.read(limit + 1)
    except (OSError, http.client.HTTPException) as e:
        with contextlib.suppress(OSError):
            sock.close()
        raise FetchError(f"GET {host}:{port}{path}: {e or type(e).__name__}") from None
    finally:
        conn.close()
    if len(body) > limit:
        raise FetchError(f"GET {host}:{port}{path}: answer larger than {limit} bytes")
    if resp.status != 200:
        raise FetchError(f"GET {host}:{port}{path}: {resp.status} {body[:200]!r}")
    return body

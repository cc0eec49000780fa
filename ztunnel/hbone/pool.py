"""Outbound HBONE connection pool.

Opening mutual TLS costs a handshake and two certificate checks, so tunnels are multiplexed:
connections are keyed by (source identity, destination identity, destination address), as in
Istio's ztunnel, because a connection proves exactly one identity on each end. A key gets a
new connection when every existing one is at the peer's stream limit or going away. Idle
connections are closed after ``idle_timeout``. The client TLS context is asked for at each new
connection (it may be fetched from the CA, and changes when the certificate is renewed), so
pooled connections keep the certificate they were opened with.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mesh.spiffe import SpiffeId
from ztunnel.hbone.conn import HboneProtocol, HboneStream
from ztunnel.hbone.core import DEFAULT_SETTINGS, HboneSettings
from ztunnel.identity import IdentityError, peer_identity

log = logging.getLogger("ztunnel.pool")


@dataclass(frozen=True)
class PoolKey:
    source: SpiffeId
    destination: SpiffeId
    address: tuple[str, int]
    # In-pod mode: the pod whose network namespace the connection leaves from (it carries
    # that pod's address, so it is not shared with another pod of the same identity).
    via: str = ""


class UpstreamConnectError(Exception):
    """The HBONE peer could not be reached or proved the wrong identity."""

    def __init__(self, reason: str, flag: str = "CONNECT") -> None:
        super().__init__(reason)
        self.flag = flag


# (address family, ``PoolKey.via``) -> a socket to connect; called with the family alone when
# the key has no ``via``.
SocketFactory = Callable[..., socket.socket]


class HbonePool:
    def __init__(
        self,
        client_context: Callable[[SpiffeId], Awaitable[ssl.SSLContext]],
        make_socket: SocketFactory,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        settings: HboneSettings = DEFAULT_SETTINGS,
    ) -> None:
        self._client_context = client_context
        self._make_socket = make_socket
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._settings = settings
        self._conns: dict[PoolKey, list[HboneProtocol]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.connections_opened = 0

    def _usable(self, key: PoolKey) -> HboneProtocol | None:
        for conn in self._conns.get(key, ()):
            if conn.usable:
                return conn
        return None

    async def open_stream(self, key: PoolKey, authority: str,
                          headers: list[tuple[str, str]] | None = None) -> HboneStream:
        conn = self._usable(key)
        if conn is None:
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:
                conn = self._usable(key) or await self._connect(key)
        return conn.open_stream(authority, headers)

    async def _connect(self, key: PoolKey) -> HboneProtocol:
        loop = asyncio.get_running_loop()
        host, port = key.address
        try:
            ctx = await self._client_context(key.source)
        except IdentityError as e:
            raise UpstreamConnectError(str(e), "NO_IDENTITY") from None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self._make_socket(family, key.via) if key.via else self._make_socket(family)

        def closed(proto: HboneProtocol) -> None:
            # The connection knows nothing of pooling; its key is kept here, by the closure.
            self._forget(key, proto)

        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.sock_connect(sock, (host, port))
                _, proto = await loop.create_connection(
                    lambda: HboneProtocol(True, settings=self._settings, on_close=closed),
                    sock=sock, ssl=ctx, server_hostname=host,
                    ssl_handshake_timeout=self._connect_timeout,
                )
        except TimeoutError:
            sock.close()
            raise UpstreamConnectError(f"timed out connecting to HBONE {host}:{port}") from None
        except ssl.SSLError as e:
            sock.close()
            raise UpstreamConnectError(f"TLS with {host}:{port} failed: {e.reason or e}",
                                       "TLS") from None
        except OSError as e:
            sock.close()
            raise UpstreamConnectError(
                f"cannot connect to HBONE {host}:{port}: {e.strerror or e}") from None
        assert proto.transport is not None
        try:
            # Checked against the expected identity's trust domain first, so a peer of another
            # domain is refused naming both domains; then the whole identity below.
            got = peer_identity(proto.transport.get_extra_info("peercert"),
                                key.destination.trust_domain)
        except IdentityError as e:
            proto.abort()
            raise UpstreamConnectError(f"{host}:{port}: {e}", "IDENTITY") from None
        if got != key.destination:
            proto.abort()
            raise UpstreamConnectError(
                f"{host}:{port} presented identity {got}, expected {key.destination}",
                "IDENTITY",
            )
        self.connections_opened += 1
        self._conns.setdefault(key, []).append(proto)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap())
        return proto

    def _forget(self, key: PoolKey, proto: HboneProtocol) -> None:
        """``proto``, opened for ``key``, has closed: drop it, and the key with its lock once
        no connection is left."""
        conns = self._conns.get(key)
        if conns is None or proto not in conns:
            return  # never pooled: it failed the identity check (or the TLS handshake)
        conns.remove(proto)
        if not conns:
            del self._conns[key]
            self._locks.pop(key, None)

    async def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(self._idle_timeout / 4, 0.05))
            now = loop.time()
            for conns in list(self._conns.values()):
                for c in list(conns):
                    if not c.streams and now - c.last_idle > self._idle_timeout:
                        c.goaway("idle")
                        if c.transport is not None:
                            c.transport.close()

    @property
    def size(self) -> int:
        return sum(len(v) for v in self._conns.values())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for conns in list(self._conns.values()):
            for c in list(conns):
                c.goaway("shutdown")
                if c.transport is not None:
                    c.transport.close()

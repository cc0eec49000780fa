"""Workload certificates from the controller's CA (``CaSecretManager``, a ``Secrets``).

Why it exists: in a mesh with a controller, nothing writes identity directories; the ztunnel
asks the CA for a short-lived certificate per identity of its node's workloads, and must keep
the mesh running through CA restarts. The request, the check of the answer, the renewal time
and the retry schedule are the CA client core every component shares (``mesh/ca_client.py``:
local P-256 key and CSR, the node credential as ``authorization: Bearer <token>`` re-read from
``node_token_file`` per request, renewal at half life, jittered exponential backoff). What is
the ztunnel's own:

* fetches are on demand, single-flight per identity (a burst of first connections makes one
  request), and cached;
* a background task per identity renews its certificate; the new TLS contexts serve new
  connections, open connections keep the ones they were made with;
* a failed request is counted (``ambit_ca_fetch_errors_total{code}``), logged and retried; the
  cached certificate keeps serving while it is valid, so a CA outage shorter than half a
  lifetime is invisible, and while backing off, connections needing a certificate the ztunnel
  does not have fail at once with the CA's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import ssl
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.api.ambit.v1 import ca_pb2, ca_pb2_grpc
from mesh.ca_client import (
    CaError,
    Lifetime,
    TokenFile,
    accept_issued,
    open_channel,
    request_certificate,
    retry_delay,
    unusable,
)
from mesh.spiffe import SpiffeId
from ztunnel.identity import CertInfo, IdentityError, context_from_pem
from ztunnel.metrics import Metrics

log = logging.getLogger("ztunnel.ca")


@dataclass
class _Held(Lifetime):
    """A certificate in use, with the TLS contexts built from it."""

    info: CertInfo
    client: ssl.SSLContext
    server: ssl.SSLContext
    fetched_at: float  # wall-clock seconds
    not_after: float


@dataclass
class _Identity:
    """Everything the manager tracks for one SPIFFE ID."""

    held: _Held | None = None
    inflight: asyncio.Task[_Held] | None = None
    rotator: asyncio.Task[None] | None = None
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class CaSecretManager:
    """Obtains, caches and renews workload certificates from the mesh CA over gRPC."""

    def __init__(
        self,
        ca_address: str,
        token_file: Path,
        metrics: Metrics,
        credentials: grpc.ChannelCredentials | None = None,
        ttl: dt.timedelta | None = None,
        # Shorter than the waypoint agent's 10 s: a connection may be waiting on this request
        # (on-demand fetch), and it should fail with the reason within the ztunnel's own 5 s
        # connect timeout rather than after it.
        request_timeout: float = 5.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca_address = ca_address
        self.token_file = token_file
        self._token = TokenFile(token_file, "node token",
                                "join the node (`ambit node join`) or mount the ztunnel's "
                                "service-account token there")
        self.metrics = metrics
        self.credentials = credentials
        self.ttl = ttl
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self._clock = clock
        self._ids: dict[SpiffeId, _Identity] = {}
        self._channel: grpc.aio.Channel | None = None
        self._stub: ca_pb2_grpc.CertificateServiceAsyncStub | None = None
        self._closed = False
        if credentials is None:
            log.info("CA %s: plaintext gRPC (no CA channel credentials); use TLS outside "
                     "loopback development", ca_address)

    # -- Secrets --------------------------------------------------------------------------

    async def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return (await self._get(identity)).client

    async def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return (await self._get(identity)).server

    def certificates(self) -> list[CertInfo]:
        return [s.held.info for s in self._ids.values() if s.held is not None]

    def prefetch(self, identities: Collection[SpiffeId]) -> None:
        """Fetch and keep renewing certificates for ``identities`` (the node's workloads) in
        the background; identities no longer listed stop being renewed and are dropped (open
        connections keep working with the contexts they hold)."""
        if self._closed:
            return
        wanted = set(identities)
        for identity in set(self._ids) - wanted:
            self._retire(identity)
        for identity in wanted:
            self._ensure_rotator(identity)

    async def close(self) -> None:
        self._closed = True
        tasks = [t for s in self._ids.values() for t in (s.rotator, s.inflight) if t]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    # -- cache ----------------------------------------------------------------------------

    def _state(self, identity: SpiffeId) -> _Identity:
        st = self._ids.get(identity)
        if st is None:
            st = self._ids[identity] = _Identity()
        return st

    async def _get(self, identity: SpiffeId) -> _Held:
        st = self._state(identity)
        now = self._clock()
        if st.held is not None and st.held.valid(now):
            return st.held
        expired = "" if st.held is None else \
            f"the certificate for {identity} expired at {st.held.info.not_after:%H:%M:%S}Z; "
        if st.inflight is None and now < st.retry_at:
            # Fail fast while backing off, instead of one CA request per connection.
            raise IdentityError(f"{expired}{st.last_error} "
                                f"(next attempt in {st.retry_at - now:.1f}s)")
        try:
            return await self._fetch(identity)
        except CaError as e:
            raise IdentityError(f"{expired}{e}") from None

    async def _fetch(self, identity: SpiffeId) -> _Held:
        """Join the request in flight for ``identity``, or start one."""
        if self._closed:
            raise CaError("closed", "the ztunnel is shutting down")
        st = self._state(identity)
        if st.inflight is None:
            task = asyncio.create_task(self._fetch_once(identity, st))
            # The result is consumed by whoever awaits; never warn about an unread exception.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            st.inflight = task
        # Shielded: one caller giving up (its connection closed) does not cancel the request
        # others are waiting for.
        return await asyncio.shield(st.inflight)

    async def _fetch_once(self, identity: SpiffeId, st: _Identity) -> _Held:
        try:
            held = await self._request(identity)
        except CaError as e:
            st.failures += 1
            now = self._clock()
            st.retry_at = now + retry_delay(st.failures, now, st.held, self.backoff_initial,
                                            self.backoff_max, self._rng)
            st.last_error = str(e)
            self.metrics.ca_fetch_errors.labels(e.code).inc()
            log.warning("%s; retrying in %.1fs%s", e, st.retry_at - now,
                        "" if st.held is None or not st.held.valid(now) else
                        f", the current certificate is valid until "
                        f"{st.held.info.not_after.isoformat(timespec='seconds')}")
            raise
        finally:
            st.inflight = None
            st.changed.set()
        renewed = st.held is not None
        st.held, st.failures, st.last_error = held, 0, ""
        if self._ids.get(identity) is not st:  # retired while the request was in flight
            return held
        self.metrics.cert_expiry.labels(str(identity)).set(held.not_after)
        self._ensure_rotator(identity)
        log.info("%s certificate for %s from the CA (serial %s, expires %s)",
                 "renewed" if renewed else "obtained", identity, held.info.serial,
                 held.info.not_after.isoformat(timespec="seconds"))
        return held

    # -- renewal --------------------------------------------------------------------------

    def _ensure_rotator(self, identity: SpiffeId) -> None:
        if self._closed:
            return
        st = self._state(identity)
        if st.rotator is None or st.rotator.done():
            st.rotator = asyncio.create_task(self._rotate(identity, st))

    def _retire(self, identity: SpiffeId) -> None:
        st = self._ids.pop(identity)
        for t in (st.rotator, st.inflight):
            if t is not None:
                t.cancel()
        with contextlib.suppress(KeyError):
            self.metrics.cert_expiry.remove(str(identity))
        log.info("dropped the certificate for %s (no workload with it on this node)", identity)

    def _due(self, st: _Identity, now: float) -> float:
        if st.failures:
            return st.retry_at
        if st.held is not None:
            return st.held.refresh_at
        return now

    async def _rotate(self, identity: SpiffeId, st: _Identity) -> None:
        """Fetch when there is no certificate, renew at half-life, retry after failures."""
        while True:
            now = self._clock()
            due = self._due(st, now)
            if now < due:
                st.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(st.changed.wait(), due - now)
                continue
            with contextlib.suppress(CaError):  # counted, logged, scheduled for retry
                await self._fetch(identity)

    # -- the request ----------------------------------------------------------------------

    async def _connect(self) -> ca_pb2_grpc.CertificateServiceAsyncStub:
        if self._stub is None:
            self._channel = open_channel(self.ca_address, self.credentials)
            self._stub = ca_pb2_grpc.CertificateServiceStub(self._channel)
        return self._stub

    async def _request(self, identity: SpiffeId) -> _Held:
        ttl = int(self.ttl.total_seconds()) if self.ttl else 0
        key, resp = await request_certificate(
            self._connect, identity, self._token, ca_address=self.ca_address,
            ttl_seconds=ttl, request_timeout=self.request_timeout)
        return self._accept(identity, key, resp, self._clock())

    def _accept(self, identity: SpiffeId, key: ec.EllipticCurvePrivateKey,
                resp: ca_pb2.CreateCertificateResponse, fetched_at: float) -> _Held:
        """The CA's answer, checked (``accept_issued``), as the TLS contexts that serve it."""
        issued = accept_issued(identity, key, resp, fetched_at, self.ca_address)
        try:
            client = context_from_pem(False, issued.chain_pem, issued.key_pem,
                                      issued.bundle_pem)
            server = context_from_pem(True, issued.chain_pem, issued.key_pem,
                                      issued.bundle_pem)
        except (ssl.SSLError, ValueError) as e:
            raise unusable(self.ca_address, identity, f"TLS cannot use it: {e}") from None
        info = CertInfo(identity, issued.leaf.not_valid_after_utc, issued.serial)
        return _Held(info, client, server, fetched_at, issued.not_after)

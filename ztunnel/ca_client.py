"""Workload certificates from the controller's CA (``CaSecretManager``, a ``Secrets``).

Why it exists: in a mesh with a controller, nothing writes identity directories; the ztunnel
asks the CA for a short-lived certificate per identity of its node's workloads, and must keep
the mesh running through CA restarts. So:

* the key pair is generated here (EC P-256) and only a CSR leaves the node; the request carries
  the node credential as ``authorization: Bearer <token>``, read from ``node_token_file`` on
  every request (projected service-account tokens rotate);
* fetches are on demand, single-flight per identity (a burst of first connections makes one
  request), and cached;
* a background task per identity renews its certificate at half its lifetime; the new TLS
  contexts serve new connections, open connections keep the ones they were made with;
* a failed request is counted (``ambit_ca_fetch_errors_total{code}``), logged and retried with
  jittered exponential backoff (sooner as expiry nears); the cached certificate keeps serving
  while it is valid, so a CA outage shorter than half a lifetime is invisible.
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
from mesh.ca_client import CHANNEL_OPTIONS, check_issued, make_csr
from mesh.spiffe import SpiffeId
from ztunnel.identity import CertInfo, IdentityError, context_from_pem
from ztunnel.metrics import Metrics

log = logging.getLogger("ztunnel.ca")



class CaFetchError(Exception):
    """One failed certificate request; ``code`` is the gRPC status name or a local reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Held:
    """A certificate in use, with the TLS contexts built from it."""

    info: CertInfo
    client: ssl.SSLContext
    server: ssl.SSLContext
    fetched_at: float  # wall-clock seconds
    not_after: float

    @property
    def refresh_at(self) -> float:
        # Half of the lifetime as seen from here: the CA backdates notBefore for clock skew,
        # so the certificate's own notBefore would put half-life too late.
        return self.fetched_at + (self.not_after - self.fetched_at) / 2

    def valid(self, now: float) -> bool:
        return now < self.not_after


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
        request_timeout: float = 5.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca_address = ca_address
        self.token_file = token_file
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
        except CaFetchError as e:
            raise IdentityError(f"{expired}{e}") from None

    async def _fetch(self, identity: SpiffeId) -> _Held:
        """Join the request in flight for ``identity``, or start one."""
        if self._closed:
            raise CaFetchError("closed", "the ztunnel is shutting down")
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
        except CaFetchError as e:
            st.failures += 1
            now = self._clock()
            st.retry_at = now + self._backoff(st, now)
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

    def _backoff(self, st: _Identity, now: float) -> float:
        delay = min(self.backoff_max, self.backoff_initial * 2.0 ** min(st.failures - 1, 30))
        if st.held is not None and st.held.valid(now):
            # Several attempts must fit before the certificate in use expires.
            delay = min(delay, max((st.held.not_after - now) / 4, self.backoff_initial))
        return delay * self._rng.uniform(0.5, 1.0)

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
            with contextlib.suppress(CaFetchError):  # counted, logged, scheduled for retry
                await self._fetch(identity)

    # -- the request ----------------------------------------------------------------------

    def _connect(self) -> ca_pb2_grpc.CertificateServiceAsyncStub:
        if self._stub is None:
            if self.credentials is None:
                self._channel = grpc.aio.insecure_channel(self.ca_address,
                                                          options=CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(self.ca_address, self.credentials,
                                                        options=CHANNEL_OPTIONS)
            self._stub = ca_pb2_grpc.CertificateServiceStub(self._channel)
        return self._stub

    def _token(self) -> str:
        try:
            token = self.token_file.read_text().strip()
        except OSError as e:
            raise CaFetchError("token", f"cannot read the node token {self.token_file}: "
                               f"{e.strerror}; join the node (`ambit node join`) or mount "
                               "the ztunnel's service-account token there") from None
        if not token:
            raise CaFetchError("token", f"the node token file {self.token_file} is empty")
        return token

    async def _request(self, identity: SpiffeId) -> _Held:
        token = self._token()
        key, csr_pem = make_csr(identity)
        ttl = int(self.ttl.total_seconds()) if self.ttl else 0
        try:
            resp = await self._connect().CreateCertificate(
                ca_pb2.CreateCertificateRequest(csr_pem=csr_pem, ttl_seconds=ttl),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=self.request_timeout,
            )
        except grpc.aio.AioRpcError as e:
            code = e.code()
            raise CaFetchError(code.name, f"CA {self.ca_address} did not issue a certificate "
                               f"for {identity}: {code.name}: {e.details()}") from None
        fetched_at = self._clock()
        return self._accept(identity, key, resp, fetched_at)

    def _accept(self, identity: SpiffeId, key: ec.EllipticCurvePrivateKey,
                resp: ca_pb2.CreateCertificateResponse, fetched_at: float) -> _Held:
        """Check the CA's answer is a certificate for our key and identity; build contexts."""
        def bad(why: str) -> CaFetchError:
            return CaFetchError("bad_response", f"CA {self.ca_address} answered for {identity} "
                                f"with an unusable certificate: {why}")

        try:
            issued = check_issued(identity, key, resp)
        except ValueError as e:
            raise bad(str(e)) from None
        chain_pem, key_pem, bundle_pem, leaf = (issued.chain_pem, issued.key_pem,
                                                issued.bundle_pem, issued.leaf)
        try:
            client = context_from_pem(False, chain_pem, key_pem, bundle_pem)
            server = context_from_pem(True, chain_pem, key_pem, bundle_pem)
        except (ssl.SSLError, ValueError) as e:
            raise bad(f"TLS cannot use it: {e}") from None
        not_after = leaf.not_valid_after_utc
        info = CertInfo(identity, not_after, format(leaf.serial_number, "x"))
        return _Held(info, client, server, fetched_at, not_after.timestamp())

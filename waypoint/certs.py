"""The waypoint's own certificate from the mesh CA, renewed at half life.

Why it exists: Envoy needs a certificate for the waypoint identity
(``spiffe://<td>/ns/<namespace>/sa/<service account>``) for its mutual-TLS xDS connection and
for HBONE; the mesh CA issues it to a caller that proves itself with a bearer token (the node
token in embedded mode, the pod's service-account token in Kubernetes). The request, the check
of the answer, the renewal time and the retry schedule are the CA client core the ztunnel uses
too (``mesh/ca_client.py``: local P-256 key and CSR, the token re-read per request, renewal at
half life measured from arrival, jittered exponential backoff at most a quarter of the
remaining lifetime apart). What is the waypoint agent's own:

* the trust bundle file that verifies the CA's TLS is re-checked per request, and the channel
  is rebuilt when it changes;
* a failed request is counted, logged with what to fix (hints per gRPC status), and retried
  while the current certificate keeps serving;
* every new certificate is handed to the subscribers (the SDS server pushes it to Envoy).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.api.ambit.v1 import ca_pb2, ca_pb2_grpc
from mesh.ca_client import (
    CaError,
    Lifetime,
    TokenFile,
    accept_issued,
    open_channel,
    request_certificate,
    retry_delay,
)
from mesh.spiffe import SpiffeId

log = logging.getLogger("waypoint.certs")

# What a refusal most likely means for the operator, by gRPC status. The waypoint agent's own
# (the ztunnel has none): they name its flags and its pod's setup, and its readiness endpoint
# repeats the last error, so that is where an operator looks.
_HINTS = {
    "UNAUTHENTICATED": "the CA does not accept the token in {token_file}; mount the pod's "
                       "service-account token (Kubernetes) or the node token from "
                       "`ambit node join` (embedded mode) there",
    "PERMISSION_DENIED": "the CA will not issue {identity} to the token's node; is this pod "
                         "in the registry, on that node, with service account {sa}?",
    "INVALID_ARGUMENT": "the CA rejected the request itself (trust domain, TTL?)",
    "UNAVAILABLE": "cannot reach the CA at {address} ({tls}); is the controller running and "
                   "the address right?",
    "DEADLINE_EXCEEDED": "the CA at {address} did not answer in time",
}


@dataclass(frozen=True)
class WaypointCertificate(Lifetime):
    """A certificate in use: chain (leaf first) and key in PEM, the CA's trust bundle."""

    identity: SpiffeId
    chain_pem: bytes
    key_pem: bytes
    trust_bundle_pem: bytes
    serial: str
    not_after: float  # Unix seconds
    fetched_at: float  # Unix seconds, when it arrived

    @property
    def expires(self) -> str:
        return datetime.fromtimestamp(self.not_after, UTC).isoformat(timespec="seconds")


def accept_response(identity: SpiffeId, key: ec.EllipticCurvePrivateKey,
                    resp: ca_pb2.CreateCertificateResponse, fetched_at: float,
                    ca_address: str) -> WaypointCertificate:
    """The CA's answer, checked (``accept_issued``: for our key and identity, not expired), as
    the certificate to serve; ``CaError`` (code ``bad_response``) saying what is wrong
    otherwise."""
    issued = accept_issued(identity, key, resp, fetched_at, ca_address)
    return WaypointCertificate(identity, issued.chain_pem, issued.key_pem, issued.bundle_pem,
                               issued.serial, issued.not_after, fetched_at)


class CertificateManager:
    """Obtains and renews the waypoint's certificate; ``current`` is the one to serve."""

    def __init__(
        self,
        identity: SpiffeId,
        ca_address: str,
        token_file: Path,
        ca_root_cert: Path | None,
        registry: CollectorRegistry,
        ttl_seconds: int = 0,
        # Longer than the ztunnel's 5 s: no connection waits on this request (only Envoy's
        # start, which waits anyway), and in Kubernetes the CA reviews the pod's token with
        # the API server before it answers.
        request_timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.ca_address = ca_address
        self.token_file = token_file
        self._token = TokenFile(token_file, "CA token",
                                "mount the pod's service-account token there (Kubernetes) or "
                                "write the node token from `ambit node join` (embedded mode)")
        self.ca_root_cert = ca_root_cert  # None = plaintext gRPC (loopback development)
        self.ttl_seconds = ttl_seconds
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self._clock = clock
        self.current: WaypointCertificate | None = None
        self.failures = 0
        self.last_error = ""
        self.obtained = asyncio.Event()
        self._subscribers: list[Callable[[WaypointCertificate], None]] = []
        self._channel: grpc.aio.Channel | None = None
        self._stub: ca_pb2_grpc.CertificateServiceAsyncStub | None = None
        self._root_stamp: tuple[float, int] | None = None
        self.expiry = Gauge("ambit_waypoint_certificate_expiry_seconds",
                            "Expiry (Unix time) of the waypoint's certificate",
                            registry=registry)
        self.errors = Counter("ambit_waypoint_ca_fetch_errors",
                              "Failed certificate requests by gRPC status or local reason "
                              "(token, trust_bundle, bad_response)", ("code",),
                              registry=registry)
        self.renewals = Counter("ambit_waypoint_certificates",
                                "Certificates obtained from the CA (first one and renewals)",
                                registry=registry)

    def subscribe(self, callback: Callable[[WaypointCertificate], None]) -> None:
        """Call ``callback`` with every new certificate (on the event loop)."""
        self._subscribers.append(callback)

    @property
    def transport(self) -> str:
        if self.ca_root_cert is None:
            return "plaintext gRPC"
        return f"TLS verified with {self.ca_root_cert}"

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Obtain the certificate, then renew it at half life, forever (until cancelled)."""
        retry_at = 0.0
        while True:
            now = self._clock()
            if self.failures:
                due = retry_at
            elif self.current is not None:
                due = self.current.refresh_at
            else:
                due = now
            if due > now:
                await asyncio.sleep(due - now)
                continue
            try:
                try:
                    cert = await self.request()
                except CaError:
                    raise
                except Exception as e:  # a bug or an odd library error must not end renewal
                    log.exception("certificate request failed unexpectedly")
                    raise CaError("internal", f"certificate request to CA {self.ca_address} "
                                  f"failed: {type(e).__name__}: {e}") from e
            except CaError as e:
                self.failures += 1
                self.last_error = str(e)
                self.errors.labels(e.code).inc()
                now = self._clock()
                delay = retry_delay(self.failures, now, self.current, self.backoff_initial,
                                    self.backoff_max, self._rng)
                retry_at = now + delay
                held = self.current
                if held is not None and held.valid(now):
                    log.warning("%s; retrying in %.1fs, the current certificate is valid "
                                "until %s", e, delay, held.expires)
                elif held is not None:
                    log.error("%s; retrying in %.1fs; the certificate EXPIRED at %s: Envoy's "
                              "xDS and mTLS connections fail until a new one arrives", e, delay,
                              held.expires)
                else:
                    log.error("%s; retrying in %.1fs (Envoy starts once a certificate is "
                              "issued)", e, delay)
                continue
            self._install(cert)

    def _install(self, cert: WaypointCertificate) -> None:
        renewed = self.current is not None
        self.current, self.failures, self.last_error = cert, 0, ""
        self.expiry.set(cert.not_after)
        self.renewals.inc()
        self.obtained.set()
        log.info("%s certificate for %s from CA %s (serial %s, expires %s, renewal at %s)",
                 "renewed" if renewed else "obtained", self.identity, self.ca_address,
                 cert.serial, cert.expires,
                 datetime.fromtimestamp(cert.refresh_at, UTC).isoformat(timespec="seconds"))
        for callback in self._subscribers:
            try:
                callback(cert)
            except Exception:
                log.exception("certificate subscriber failed")

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    # -- one request ----------------------------------------------------------------------

    async def _connect(self) -> ca_pb2_grpc.CertificateServiceAsyncStub:
        stamp: tuple[float, int] | None = None
        if self.ca_root_cert is not None:
            try:
                st = self.ca_root_cert.stat()
            except OSError as e:
                raise CaError("trust_bundle", f"cannot read the trust bundle "
                              f"{self.ca_root_cert} (--ca-root-cert): {e.strerror}") from None
            stamp = (st.st_mtime, st.st_size)
        if self._stub is not None and stamp == self._root_stamp:
            return self._stub
        old = self._channel
        if old is not None:
            await old.close()
        if self.ca_root_cert is None:
            self._channel = open_channel(self.ca_address, None)
        else:
            try:
                root = self.ca_root_cert.read_bytes()
                x509.load_pem_x509_certificates(root)
            except (OSError, ValueError) as e:
                raise CaError("trust_bundle", f"the trust bundle {self.ca_root_cert} "
                              f"(--ca-root-cert) is unusable: {e}") from None
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = open_channel(self.ca_address, creds)
            if old is not None:
                log.info("trust bundle %s changed; reconnecting to the CA", self.ca_root_cert)
        self._root_stamp = stamp
        self._stub = ca_pb2_grpc.CertificateServiceStub(self._channel)
        return self._stub

    async def request(self) -> WaypointCertificate:
        """One CreateCertificate call; the verified certificate, or ``CaError``."""
        hints = {code: text.format(token_file=self.token_file, identity=self.identity,
                                   sa=self.identity.service_account, address=self.ca_address,
                                   tls=self.transport)
                 for code, text in _HINTS.items()}
        key, resp = await request_certificate(
            self._connect, self.identity, self._token, ca_address=self.ca_address,
            ttl_seconds=self.ttl_seconds, request_timeout=self.request_timeout, hints=hints)
        return accept_response(self.identity, key, resp, self._clock(), self.ca_address)

"""The CA client core every component shares: the request, the check of the CA's answer, when
to renew, how to back off, and the one error type.

Why here: the ztunnel (a certificate per local workload identity, ``ztunnel/ca_client.py``)
and the waypoint agent (its one gateway identity, ``waypoint/certs.py``) both ask the
controller's CA for certificates. What they send, what they accept, when they renew and how
they retry is one contract with the CA, so it lives once, in the base layer; each client keeps
only what is its own (the ztunnel: the per-identity cache, single-flight, TLS contexts and
metrics; the waypoint agent: the trust-bundle channel, subscribers and its metrics).

* The EC P-256 key is generated here; only a CSR naming the one identity leaves the process.
* The bearer token is re-read from its file on every request: projected service-account tokens
  rotate under a running process.
* An answer is used only if it is a certificate for our key and identity that has not already
  expired.
* Renewal is at half the lifetime measured from when the certificate arrived, and retries back
  off exponentially with jitter, never so far apart that the certificate in use expires first.
  The schedule takes time and randomness as arguments, so it is a pure function.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.api.ambit.v1 import ca_pb2, ca_pb2_grpc
from mesh.spiffe import SpiffeId

# gRPC's own reconnect backoff grows to 120 s by default; a CA that comes back should be used
# within seconds.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


class CaError(Exception):
    """One failed certificate request. ``code`` is the gRPC status name (``UNAVAILABLE``,
    ``PERMISSION_DENIED``...) or a local reason: ``token`` and ``bad_response`` from here, and
    the clients' own (the ztunnel's ``closed``, the waypoint agent's ``trust_bundle`` and
    ``internal``); both clients count failures by it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- the request --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenFile:
    """Where a client's bearer token is, and what to tell the operator when it is not there
    (``name``: what the token is, e.g. ``node token``; ``fix``: how to put one there)."""

    path: Path
    name: str
    fix: str

    def read(self) -> str:
        """The token, read now (it may have rotated since the last request)."""
        try:
            token = self.path.read_text().strip()
        except OSError as e:
            raise CaError("token", f"cannot read the {self.name} file {self.path}: "
                          f"{e.strerror}; {self.fix}") from None
        if not token:
            raise CaError("token", f"the {self.name} file {self.path} is empty")
        return token


def open_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    """A channel to the CA: TLS with ``credentials``, plaintext without (loopback development)."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def make_csr(identity: SpiffeId) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key and a CSR whose only SAN is ``identity``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(str(identity))]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


async def request_certificate(
    connect: Callable[[], Awaitable[ca_pb2_grpc.CertificateServiceAsyncStub]],
    identity: SpiffeId,
    token_file: TokenFile,
    *,
    ca_address: str,
    ttl_seconds: int,
    request_timeout: float,
    hints: Mapping[str, str] | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, ca_pb2.CreateCertificateResponse]:
    """One CreateCertificate call for ``identity``: our new key and the CA's answer, unchecked
    (``accept_issued`` checks it), or ``CaError``.

    The token is read first: without one, asking the CA is pointless and the error says what
    to fix. ``connect`` then gives the stub (the waypoint agent's checks its trust bundle on
    the way). A refusal's message gets ``hints[code]`` appended when the caller has advice for
    that status. ``ttl_seconds`` 0 leaves the lifetime to the CA."""
    token = token_file.read()
    stub = await connect()
    key, csr_pem = make_csr(identity)
    try:
        resp = await stub.CreateCertificate(
            ca_pb2.CreateCertificateRequest(csr_pem=csr_pem, ttl_seconds=ttl_seconds),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=request_timeout,
        )
    except grpc.aio.AioRpcError as e:
        code = e.code().name
        hint = (hints or {}).get(code, "")
        raise CaError(code, f"CA {ca_address} did not issue a certificate for {identity}: "
                      f"{code}: {e.details()}" + (f" ({hint})" if hint else "")) from None
    return key, resp


# -- the answer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A CA answer that passed ``check_issued``, with our key in PEM."""

    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    leaf: x509.Certificate

    @property
    def not_after(self) -> float:
        """The leaf's expiry, Unix seconds."""
        return self.leaf.not_valid_after_utc.timestamp()

    @property
    def serial(self) -> str:
        return format(self.leaf.serial_number, "x")


def check_issued(identity: SpiffeId, key: ec.EllipticCurvePrivateKey,
                 resp: ca_pb2.CreateCertificateResponse) -> Issued:
    """Check the CA's answer is a certificate for ``key`` and ``identity`` (the ztunnel's and
    the waypoint agent's one rule); ``ValueError`` says what is wrong otherwise."""
    chain_pem = "".join(resp.cert_chain_pem).encode()
    bundle_pem = "".join(resp.trust_bundle_pem).encode()
    if not chain_pem or not bundle_pem:
        raise ValueError("empty certificate chain or trust bundle")
    try:
        leaf = x509.load_pem_x509_certificate(resp.cert_chain_pem[0].encode())
        x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as e:
        raise ValueError(f"cannot parse it: {e}") from None
    leaf_key = leaf.public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or \
            leaf_key.public_numbers() != key.public_key().public_numbers():
        raise ValueError("the leaf certificate is not for the key in our CSR")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [str(identity)]:
        raise ValueError(f"the leaf certificate names {uris}")
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Issued(chain_pem, key_pem, bundle_pem, leaf)


def unusable(ca_address: str, identity: SpiffeId, why: str) -> CaError:
    """The error for an answer that cannot be used (``bad_response``), also for the clients'
    own checks after ``accept_issued`` (the ztunnel's TLS contexts)."""
    return CaError("bad_response", f"CA {ca_address} answered for {identity} with an unusable "
                   f"certificate: {why}")


def accept_issued(identity: SpiffeId, key: ec.EllipticCurvePrivateKey,
                  resp: ca_pb2.CreateCertificateResponse, received_at: float,
                  ca_address: str) -> Issued:
    """``check_issued``, and the certificate must still be valid when it arrived
    (``received_at``, Unix seconds): an expired one would be due for renewal at once, so the
    client would ask again without backing off. ``CaError`` (``bad_response``) otherwise."""
    try:
        issued = check_issued(identity, key, resp)
    except ValueError as e:
        raise unusable(ca_address, identity, str(e)) from None
    if issued.not_after <= received_at:
        raise unusable(ca_address, identity,
                       f"it expired at {issued.leaf.not_valid_after_utc.isoformat()}")
    return issued


# -- the schedule -------------------------------------------------------------------------


def refresh_at(received_at: float, not_after: float) -> float:
    """When to renew a certificate: half its lifetime as seen from here. The CA backdates
    ``notBefore`` for clock skew, so half-life from the certificate's own ``notBefore`` would
    come too late."""
    return received_at + (not_after - received_at) / 2


class Lifetime:
    """What both holders of a certificate in use (the ztunnel's per identity, the waypoint's)
    derive from when it arrived and when it expires; the subclass declares both fields."""

    fetched_at: float  # Unix seconds, when it arrived
    not_after: float  # Unix seconds

    @property
    def refresh_at(self) -> float:
        return refresh_at(self.fetched_at, self.not_after)

    def valid(self, now: float) -> bool:
        return now < self.not_after


class Expiring(Protocol):
    """A certificate in use, as far as the retry schedule cares."""

    @property
    def not_after(self) -> float: ...  # Unix seconds


class Jitter(Protocol):
    """The randomness the retry schedule needs (``random.Random`` has it)."""

    def uniform(self, a: float, b: float) -> float: ...


def retry_delay(failures: int, now: float, held: Expiring | None, initial: float,
                maximum: float, rng: Jitter) -> float:
    """Seconds until the next attempt after ``failures`` consecutive failures: exponential from
    ``initial`` to ``maximum``; while the certificate in use (``held``) is valid, at most a
    quarter of its remaining lifetime (several attempts must fit before it expires) but not
    below ``initial``; then jittered to 50-100% so clients that failed together do not retry
    together."""
    delay = min(maximum, initial * 2.0 ** min(max(failures - 1, 0), 30))
    if held is not None and now < held.not_after:
        delay = min(delay, max((held.not_after - now) / 4, initial))
    return delay * rng.uniform(0.5, 1.0)

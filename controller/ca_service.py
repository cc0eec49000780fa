"""The mesh CA over gRPC: ``ambit.v1.CertificateService/CreateCertificate``.

Why it exists: ztunnels generate workload keys locally and send only a CSR; the controller signs
it after two checks, so a compromised node can impersonate only the workloads it already runs:

1. *who is calling*: the ``authorization: Bearer <token>`` metadata names a node, according to a
   ``NodeAuthenticator`` (embedded mode: node tokens from ``ambit node join``; Kubernetes mode:
   the ztunnel's service-account token, checked with TokenReview);
2. *may that node have this identity*: an ``IssuancePolicy`` says whether a workload with the
   CSR's SPIFFE ID is scheduled on that node (from the registry).

Both are small protocols so the registry and the Kubernetes source plug in without this module
knowing them. Either may answer synchronously or return an awaitable (TokenReview is a network
call). Every refusal is a gRPC status with a message naming the problem, logged, and counted in
``ambit_ca_requests_total{result}``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeAlias, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry, Counter

from controller.ca import DEFAULT_WORKLOAD_TTL, CertificateAuthority, WorkloadPublicKey
from mesh.api.ambit.v1 import ca_pb2, ca_pb2_grpc
from mesh.ratelimit import RateLimitedLog
from mesh.spiffe import TRUST_DOMAIN, PeerIdentityError, SpiffeId, identity_from_uris

log = logging.getLogger("controller.ca")

T = TypeVar("T")
MaybeAwaitable: TypeAlias = T | Awaitable[T]

MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048

# Values of the `result` label.
ISSUED = "issued"
UNAUTHENTICATED = "unauthenticated"
PERMISSION_DENIED = "permission_denied"
INVALID_ARGUMENT = "invalid_argument"
INTERNAL = "internal"
UNAVAILABLE = "unavailable"


class NodeAuthenticator(Protocol):
    """Maps a bearer token to the node it was issued to."""

    def authenticate(self, token: str) -> MaybeAwaitable[str | None]:
        """The node name ``token`` proves, or None when the token is unknown or invalid."""
        ...


class IssuancePolicy(Protocol):
    """Which identities a node may obtain certificates for."""

    def may_issue(self, node: str, identity: SpiffeId) -> MaybeAwaitable[bool]:
        """True when a workload with ``identity`` is scheduled on ``node``."""
        ...


async def resolve(value: MaybeAwaitable[T]) -> T:
    if isinstance(value, Awaitable):
        result: T = await value
        return result
    return value


class AuthenticatorUnavailable(Exception):
    """The node authenticator could not decide (e.g. the API server is unreachable): the
    caller should retry, the token is not known to be bad."""


class CsrError(ValueError):
    """A CSR the CA will not sign; the message says why."""


@dataclass(frozen=True)
class ValidCsr:
    identity: SpiffeId
    public_key: WorkloadPublicKey


def _key_description(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__.lstrip("_")


def validate_csr(csr_pem: str, trust_domain: str) -> ValidCsr:
    """Check a PKCS#10 CSR: valid signature, an EC P-256 or RSA >= 2048 key, and exactly one
    SAN, a URI that is a workload SPIFFE ID of ``trust_domain``. The subject is ignored (the
    CA issues certificates with an empty subject)."""
    if not csr_pem:
        raise CsrError("csr_pem is empty; send a PEM PKCS#10 request")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrError(f"csr_pem is {len(csr_pem)} bytes, more than the {MAX_CSR_BYTES} allowed")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as e:
        raise CsrError(f"csr_pem is not a PEM certificate request: {e}") from None
    if not csr.is_signature_valid:
        raise CsrError("the CSR's signature does not verify with its own public key")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise CsrError(f"key type {_key_description(key)} is not accepted; use EC P-256 "
                           f"(secp256r1) or RSA >= {MIN_RSA_BITS} bits")
        public_key: WorkloadPublicKey = key
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrError(f"key type {_key_description(key)} is too weak; use EC P-256 or "
                           f"RSA >= {MIN_RSA_BITS} bits")
        public_key = key
    else:
        raise CsrError(f"key type {_key_description(key)} is not accepted; use EC P-256 "
                       f"(secp256r1) or RSA >= {MIN_RSA_BITS} bits")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrError("the CSR has no subjectAltName; it must carry exactly one URI SAN, "
                       "the workload's SPIFFE ID") from None
    except ValueError as e:  # a malformed extension
        raise CsrError(f"the CSR's extensions cannot be parsed: {e}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    others = [str(n.value) for n in san if not isinstance(n, x509.UniformResourceIdentifier)]
    if others:
        raise CsrError(f"the CSR carries non-URI SANs {others}; workload certificates carry "
                       "only the SPIFFE ID")
    if len(uris) != 1:
        raise CsrError(f"the CSR must carry exactly one URI SAN (the SPIFFE ID), has {uris}")
    if not uris[0].startswith("spiffe://"):
        raise CsrError(f"URI SAN {uris[0]!r} is not a SPIFFE ID (spiffe://...)")
    try:
        # The mesh's one identity check (mesh.spiffe), the same the ztunnels and the xDS port
        # apply to peers: a workload SPIFFE ID of this trust domain.
        identity = identity_from_uris(uris, trust_domain)
    except PeerIdentityError as e:
        hint = f"; this CA issues for {trust_domain!r} only" if e.reason == TRUST_DOMAIN else ""
        raise CsrError(f"{e}{hint}") from None
    return ValidCsr(identity, public_key)


def bearer_token(metadata: Any) -> str | None:
    """The token of the ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        scheme, _, token = text.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


# What a caller does about a missing or refused node token (the ztunnel, the node agent and
# the waypoint agent all take it as --node-token-file or a token file of the same meaning).
NODE_TOKEN_FIX = ("pass the node's token with --node-token-file: `ambit node join NODE` in "
                  "embedded mode, the ztunnel's service-account token in Kubernetes")


class NodeAuthError(Exception):
    """A call whose node credential is refused: ``code`` is the gRPC status to abort with,
    ``result`` the CA's ``result`` label for it, the message says what to fix."""

    def __init__(self, code: grpc.StatusCode, result: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.result = result


async def authenticate_node(authenticator: NodeAuthenticator, metadata: Any,
                            claimed_node: str | None = None) -> str:
    """The node a call's ``authorization: Bearer <token>`` metadata proves, else
    ``NodeAuthError``. With ``claimed_node`` (the node the request speaks for) the token must
    be that node's: a node's credential speaks for that node only.

    Why one function: the CA, the NodeService and the state push (``Subscribe``) all ask
    "which node is calling"; one answer keeps their refusals (status and advice) the same.
    A ``WorkloadCaller`` (a waypoint pod's own token, Kubernetes mode) is a ``str`` whose text
    is never a node name, so it never equals a ``claimed_node`` (fail closed)."""
    token = bearer_token(metadata)
    if token is None:
        raise NodeAuthError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED,
                            "no node credential: send metadata 'authorization: Bearer "
                            f"<node token>'; {NODE_TOKEN_FIX}")
    try:
        node = await resolve(authenticator.authenticate(token))
    except AuthenticatorUnavailable as e:
        raise NodeAuthError(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE,
                            f"cannot check the node token right now ({e}); retry") from None
    if node is None:
        raise NodeAuthError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED,
                            "the node token is not valid (unknown, revoked or expired); "
                            "re-join the node (`ambit node join NODE`) or check the "
                            "ztunnel's service-account token")
    if claimed_node is not None and node != claimed_node:
        raise NodeAuthError(grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED,
                            f"this credential belongs to node {node}, not {claimed_node!r}; a "
                            "node's token speaks only for that node: use the token of node "
                            f"{claimed_node!r} (or fix --node)")
    return node


def _pem_chain(chain_pem: bytes) -> list[str]:
    return [c.public_bytes(serialization.Encoding.PEM).decode()
            for c in x509.load_pem_x509_certificates(chain_pem)]


Context = grpc.aio.ServicerContext[ca_pb2.CreateCertificateRequest,
                                   ca_pb2.CreateCertificateResponse]


class CertificateService(ca_pb2_grpc.CertificateServiceServicer):
    """Signs workload CSRs for authenticated nodes, for the identities they host."""

    def __init__(
        self,
        ca: CertificateAuthority,
        trust_domain: str,
        authenticator: NodeAuthenticator,
        policy: IssuancePolicy,
        registry: CollectorRegistry,
        default_ttl: dt.timedelta = DEFAULT_WORKLOAD_TTL,
        max_ttl: dt.timedelta = DEFAULT_WORKLOAD_TTL,
    ) -> None:
        if default_ttl <= dt.timedelta(0) or max_ttl < default_ttl:
            raise ValueError(f"need 0 < default_ttl ({default_ttl}) <= max_ttl ({max_ttl})")
        self.ca = ca
        self.trust_domain = trust_domain
        self.authenticator = authenticator
        self.policy = policy
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.requests = Counter("ambit_ca_requests", "Certificate requests by result "
                                "(issued, unauthenticated, permission_denied, "
                                "invalid_argument, internal)", ("result",), registry=registry)
        # One line per refusal code every 10 s (with the count left out): a caller without a
        # valid token can ask as often as it likes, and a flood must not become a log flood.
        self._refusals = RateLimitedLog(log, what="refused")

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ca_pb2_grpc.add_CertificateServiceServicer_to_server(self, server)

    def ttl_for(self, requested_seconds: int) -> dt.timedelta:
        """The lifetime to issue: the default for 0, else the request capped at ``max_ttl``."""
        if requested_seconds < 0:
            raise CsrError(f"ttl_seconds is {requested_seconds}; use 0 for the default "
                           f"({int(self.default_ttl.total_seconds())} s) or a positive value")
        if requested_seconds == 0:
            return self.default_ttl
        return min(dt.timedelta(seconds=requested_seconds), self.max_ttl)

    async def _refuse(self, context: Context, result: str, code: grpc.StatusCode,
                      message: str) -> NoReturn:
        self.requests.labels(result).inc()
        self._refusals.log(code.name, "refused certificate request from %s: %s: %s",
                           context.peer(), code.name, message)
        await context.abort(code, message)
        raise AssertionError("abort() returned")  # grpc raises; this keeps NoReturn honest

    async def CreateCertificate(
        self, request: ca_pb2.CreateCertificateRequest, context: Context,
    ) -> ca_pb2.CreateCertificateResponse:
        try:
            node = await authenticate_node(self.authenticator, context.invocation_metadata())
        except NodeAuthError as e:
            await self._refuse(context, e.result, e.code, str(e))
        try:
            csr = validate_csr(request.csr_pem, self.trust_domain)
            ttl = self.ttl_for(request.ttl_seconds)
        except CsrError as e:
            await self._refuse(context, INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT,
                               f"node {node}: {e}")
        if not await resolve(self.policy.may_issue(node, csr.identity)):
            await self._refuse(context, PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED,
                               f"node {node} runs no workload with identity {csr.identity}; "
                               "a node may obtain certificates only for its own workloads")
        try:
            issued = self.ca.issue(csr.identity, ttl, public_key=csr.public_key)
        except Exception as e:  # a signing failure is ours, not the caller's
            log.exception("signing a certificate for %s failed", csr.identity)
            await self._refuse(context, INTERNAL, grpc.StatusCode.INTERNAL,
                               f"signing failed: {type(e).__name__}: {e}")
        self.requests.labels(ISSUED).inc()
        log.info("issued a certificate for %s to node %s (expires %s)", csr.identity, node,
                 issued.not_after.isoformat(timespec="seconds"))
        root = self.ca.root_pem.decode()
        return ca_pb2.CreateCertificateResponse(cert_chain_pem=_pem_chain(issued.chain_pem),
                                                trust_bundle_pem=[root])

"""SPIFFE identities, the one name every component uses for a workload.

A workload's identity is ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``, the same
shape Istio uses, so policies written for Istio (``cluster.local/ns/default/sa/sleep``) carry over.

It also holds the one check of a peer's identity (``peer_identity``, ``peer_identity_pem``,
``identity_from_uris``): exactly one workload SPIFFE ID, of the mesh's trust domain. The
ztunnel (inbound HBONE, outbound pool), the controller's xDS port and the CA's CSR check all
read identities through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SCHEME = "spiffe://"


class SpiffeError(ValueError):
    """A string that is not an Ambit workload SPIFFE ID."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://td/ns/N/sa/S`` (or the Istio principal form without the scheme)."""
        body = text[len(SCHEME) :] if text.startswith(SCHEME) else text
        parts = body.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
            raise SpiffeError(
                f"{text!r} is not a workload identity; expected "
                "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )
        return cls(parts[0], parts[2], parts[4])

    @property
    def principal(self) -> str:
        """The Istio-style principal used in authorization policies (no scheme)."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return SCHEME + self.principal


# Why the trust domain is checked here and not left to the root: a generated root carries a name
# constraint for its own trust domain, but a user's root (--ca-cert) may have none, and a trust
# bundle may hold roots of several domains. Whether a workload of another domain counts as one
# of ours is this mesh's decision, so every component that reads a peer's SPIFFE ID (ztunnel
# inbound and outbound, the controller's xDS port, the CA's CSR check) reads it through these
# functions and gets the same answer and the same words.

# ``PeerIdentityError.reason`` values (metric labels).
NO_CERTIFICATE = "no_certificate"
SPIFFE_SAN = "spiffe_san"
TRUST_DOMAIN = "trust_domain"


class PeerIdentityError(SpiffeError):
    """A certificate that does not prove one workload identity of the expected trust domain.

    ``reason`` is a short label for metrics: ``no_certificate``, ``spiffe_san`` (not exactly
    one workload SPIFFE URI SAN) or ``trust_domain`` (``expected`` and ``presented`` then
    name the two domains)."""

    def __init__(self, reason: str, message: str, *, expected: str = "",
                 presented: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.expected = expected
        self.presented = presented


def check_trust_domain(identity: SpiffeId, trust_domain: str) -> SpiffeId:
    """``identity`` when it belongs to ``trust_domain`` (the mesh's), else
    ``PeerIdentityError(TRUST_DOMAIN)`` naming the domain expected and the one presented."""
    if identity.trust_domain != trust_domain:
        raise PeerIdentityError(
            TRUST_DOMAIN,
            f"trust domain {identity.trust_domain!r} presented ({identity}), expected "
            f"{trust_domain!r}: only identities of the mesh's own trust domain are accepted; "
            f"issue the certificate from the mesh CA for {trust_domain!r}, or give every "
            "component the same --trust-domain",
            expected=trust_domain, presented=identity.trust_domain)
    return identity


def identity_from_uris(uris: Iterable[str], trust_domain: str) -> SpiffeId:
    """The workload identity among a certificate's URI SANs: exactly one ``spiffe://`` URI, a
    workload ID (``/ns/N/sa/S``) of ``trust_domain``. Raises ``PeerIdentityError``."""
    listed = list(uris)
    spiffe = [u for u in listed if u.startswith(SCHEME)]
    if len(spiffe) != 1:
        raise PeerIdentityError(SPIFFE_SAN, "the certificate must carry exactly one SPIFFE URI "
                                f"SAN, has {listed}")
    try:
        identity = SpiffeId.parse(spiffe[0])
    except SpiffeError as e:
        raise PeerIdentityError(SPIFFE_SAN, str(e)) from None
    return check_trust_domain(identity, trust_domain)


def peer_identity(peercert: Mapping[str, Any] | None, trust_domain: str) -> SpiffeId:
    """The identity a verified peer certificate proves, in ``ssl``'s form
    (``SSLObject.getpeercert()``); raises ``PeerIdentityError``."""
    if not peercert:
        raise PeerIdentityError(NO_CERTIFICATE, "peer presented no certificate")
    return identity_from_uris((str(v) for k, v in peercert.get("subjectAltName", ())
                               if k == "URI"), trust_domain)


def peer_identity_pem(pem: bytes, trust_domain: str) -> SpiffeId:
    """The same for a PEM certificate (gRPC's ``auth_context()["x509_pem_cert"]``)."""
    # Imported here: every `ambit` command's parser imports this module, and cryptography
    # costs each of them (tests/unit/test_cli_dispatch.py keeps the parser light).
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerIdentityError(SPIFFE_SAN, "the certificate has no subjectAltName; it must "
                                "carry exactly one SPIFFE URI SAN") from None
    except ValueError as e:
        raise PeerIdentityError(SPIFFE_SAN, f"the certificate cannot be read: {e}") from None
    return identity_from_uris(san.get_values_for_type(x509.UniformResourceIdentifier),
                              trust_domain)

"""The mesh's one peer-identity check (``mesh.spiffe``) as a table: certificate -> identity or
refusal with its reason, for both forms the components read (``ssl``'s dict, gRPC's PEM)."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from controller.ca import CertificateAuthority
from mesh.spiffe import (
    NO_CERTIFICATE,
    SPIFFE_SAN,
    TRUST_DOMAIN,
    PeerIdentityError,
    SpiffeId,
    check_trust_domain,
    identity_from_uris,
    peer_identity,
    peer_identity_pem,
)

TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")


def uris(*values: str) -> dict[str, Any]:
    return {"subjectAltName": tuple(("URI", v) for v in values)}


# name: (peercert, expected identity, or (reason, words the message must contain))
CASES: dict[str, tuple[dict[str, Any] | None, SpiffeId | tuple[str, str]]] = {
    "own trust domain": (uris(str(WEB)), WEB),
    "non-SPIFFE URIs beside it are ignored": (uris("https://x.example/", str(WEB)), WEB),
    "another trust domain": (uris("spiffe://evil.example/ns/default/sa/web"),
                             (TRUST_DOMAIN, "trust domain 'evil.example' presented "
                              "(spiffe://evil.example/ns/default/sa/web), expected "
                              "'cluster.local'")),
    # No prefix or suffix match: the domain is compared whole.
    "a domain ending like ours": (uris("spiffe://evil-cluster.local/ns/default/sa/web"),
                                  (TRUST_DOMAIN, "'evil-cluster.local' presented")),
    "our domain as a prefix": (uris("spiffe://cluster.local.evil/ns/default/sa/web"),
                               (TRUST_DOMAIN, "'cluster.local.evil' presented")),
    "case differs": (uris("spiffe://Cluster.Local/ns/default/sa/web"),
                     (TRUST_DOMAIN, "'Cluster.Local' presented")),
    "no certificate": (None, (NO_CERTIFICATE, "no certificate")),
    "empty certificate": ({}, (NO_CERTIFICATE, "no certificate")),
    "no URI SAN": ({"subjectAltName": (("DNS", "web.default"),)},
                   (SPIFFE_SAN, "exactly one SPIFFE URI SAN, has []")),
    "two SPIFFE IDs": (uris(str(WEB), str(SpiffeId(TD, "default", "db"))),
                       (SPIFFE_SAN, "exactly one SPIFFE URI SAN")),
    "not a workload ID": (uris("spiffe://cluster.local/ns/default"),
                          (SPIFFE_SAN, "not a workload identity")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_peer_identity(name: str) -> None:
    peercert, expected = CASES[name]
    if isinstance(expected, SpiffeId):
        assert peer_identity(peercert, TD) == expected
        return
    reason, words = expected
    with pytest.raises(PeerIdentityError) as err:
        peer_identity(peercert, TD)
    assert err.value.reason == reason
    assert words in str(err.value)


def test_trust_domain_refusal_names_both_domains_and_the_fix() -> None:
    with pytest.raises(PeerIdentityError) as err:
        check_trust_domain(SpiffeId("old.example", "a", "b"), TD)
    assert (err.value.expected, err.value.presented) == (TD, "old.example")
    assert "--trust-domain" in str(err.value)
    assert check_trust_domain(WEB, TD) is WEB


def _unconstrained_root() -> CertificateAuthority:
    """A root without a name constraint (a user's --ca-cert may be one): it signs any domain."""
    ca = CertificateAuthority.generate(TD)
    cert = (x509.CertificateBuilder().subject_name(ca.cert.subject)
            .issuer_name(ca.cert.subject).public_key(ca.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(ca.cert.not_valid_before_utc)
            .not_valid_after(ca.cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca.key, hashes.SHA256()))
    return CertificateAuthority(ca.key, cert)


def test_pem_form_reads_the_same_way() -> None:
    ca = _unconstrained_root()
    assert peer_identity_pem(ca.issue(WEB).chain_pem, TD) == WEB
    foreign = SpiffeId("evil.example", "default", "web")
    with pytest.raises(PeerIdentityError) as err:
        peer_identity_pem(ca.issue(foreign).chain_pem, TD)
    assert err.value.reason == TRUST_DOMAIN
    for pem in (ca.root_pem, b"not a certificate"):  # no SAN; unreadable
        with pytest.raises(PeerIdentityError) as err:
            peer_identity_pem(pem, TD)
        assert err.value.reason == SPIFFE_SAN


def test_uris_form_is_the_one_the_csr_check_uses() -> None:
    assert identity_from_uris([str(WEB)], TD) == WEB
    with pytest.raises(PeerIdentityError) as err:
        identity_from_uris(["spiffe://evil.example/ns/default/sa/web"], TD)
    assert err.value.reason == TRUST_DOMAIN

"""The mesh CA: workload certificates carry one SPIFFE URI SAN and chain to the root."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from controller.ca import CertificateAuthority, identity_paths, write_identity, write_trust_bundle
from mesh.spiffe import SpiffeError, SpiffeId
from ztunnel.identity import IdentityError, SecretManager, peer_identity


async def test_issue_and_load(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("cluster.local")
    ident = SpiffeId("cluster.local", "default", "web")
    issued = ca.issue(ident, ttl=dt.timedelta(hours=1))
    leaf = x509.load_pem_x509_certificates(issued.chain_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(ident)]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(hours=1, minutes=6)
    leaf.verify_directly_issued_by(ca.cert)
    write_trust_bundle(tmp_path, ca)
    write_identity(tmp_path, ident, issued)
    mgr = SecretManager(tmp_path)
    assert isinstance(await mgr.client_context(ident), ssl.SSLContext)
    assert [c.identity for c in mgr.certificates()] == [ident]
    # Read through ssl's own handshake, not cryptography: the same expiry and serial.
    (info,) = mgr.certificates()
    assert info.not_after == leaf.not_valid_after_utc
    assert info.serial == format(leaf.serial_number, "x")
    assert identity_paths(tmp_path, ident)[1].stat().st_mode & 0o077 == 0


async def test_certificate_not_chaining_to_the_bundle_is_refused_at_load(tmp_path: Path) -> None:
    ident = SpiffeId("cluster.local", "default", "web")
    write_trust_bundle(tmp_path, CertificateAuthority.generate("cluster.local"))
    write_identity(tmp_path, ident, CertificateAuthority.generate("cluster.local").issue(ident))
    with pytest.raises(IdentityError, match=r"cannot load certificate .*verify failed"):
        await SecretManager(tmp_path).client_context(ident)


async def test_missing_identity_says_how_to_fix(tmp_path: Path) -> None:
    write_trust_bundle(tmp_path, CertificateAuthority.generate("cluster.local"))
    with pytest.raises(IdentityError, match="ambit dev certs"):
        await SecretManager(tmp_path).server_context(SpiffeId("cluster.local", "a", "b"))


async def test_mismatched_file_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("cluster.local")
    write_trust_bundle(tmp_path, ca)
    wanted, other = SpiffeId("cluster.local", "a", "b"), SpiffeId("cluster.local", "x", "y")
    write_identity(tmp_path, wanted, ca.issue(other))
    with pytest.raises(IdentityError, match="not for"):
        await SecretManager(tmp_path).client_context(wanted)


def test_peer_identity() -> None:
    cert = {"subjectAltName": (("URI", "spiffe://td/ns/a/sa/b"),)}
    assert peer_identity(cert, "td") == SpiffeId("td", "a", "b")
    with pytest.raises(IdentityError) as err:
        peer_identity({"subjectAltName": (("DNS", "x"),)}, "td")
    assert err.value.reason == "peer_identity"
    with pytest.raises(IdentityError) as err:
        peer_identity(None, "td")
    assert err.value.reason == "peer_identity"
    with pytest.raises(IdentityError, match=r"'td' presented .* expected 'mesh\.example'") as err:
        peer_identity(cert, "mesh.example")
    assert err.value.reason == "trust_domain"


@pytest.mark.parametrize("text", ["spiffe://td/ns/a", "spiffe://td/ns/a/sa/", "td/x/a/sa/b"])
def test_bad_spiffe_ids(text: str) -> None:
    with pytest.raises(SpiffeError):
        SpiffeId.parse(text)

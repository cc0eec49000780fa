"""The mesh certificate authority.

Why it exists: every HBONE connection is mutual TLS between SPIFFE identities, so something has
to mint a root and short-lived workload certificates. The controller serves this over gRPC
(later); the same code writes identity directories for standalone ztunnels, tests, the demo and
the benchmarks (``ambit dev certs``), so there is one implementation of "what a workload
certificate looks like".
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.files import write_atomic
from mesh.identity_dir import TRUST_BUNDLE_FILE, identity_paths
from mesh.spiffe import SpiffeId

DEFAULT_WORKLOAD_TTL = dt.timedelta(hours=24)
ROOT_TTL = dt.timedelta(days=3650)
# Tolerate small clock differences between nodes when a certificate is used right away.
BACKDATE = dt.timedelta(minutes=5)


# Keys the CA signs with, and workload keys it certifies (the gRPC CA accepts P-256 or RSA>=2048
# CSRs; `ambit dev certs` generates P-256).
CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
WorkloadPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: CaKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class IssuedCert:
    """A workload's key and chain (leaf first, root last) in PEM."""

    key_pem: bytes
    chain_pem: bytes
    not_after: dt.datetime


class CertificateAuthority:
    """A self-signed root that signs workload certificates (generated roots are ECDSA P-256;
    a user-supplied root may also be RSA)."""

    def __init__(self, key: CaKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def generate(cls, trust_domain: str, now: dt.datetime | None = None) -> CertificateAuthority:
        now = now or _now()
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Ambit mesh root ({trust_domain})"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ROOT_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                # RFC 5280 URI constraints name a host: this root only vouches for SPIFFE IDs
                # of its own trust domain.
                x509.NameConstraints(
                    permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                    excluded_subtrees=None,
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, key_pem: bytes, cert_pem: bytes) -> CertificateAuthority:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError("the CA key must be an ECDSA or RSA key")
        return cls(key, x509.load_pem_x509_certificate(cert_pem))

    @property
    def root_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    def issue(
        self,
        identity: SpiffeId,
        ttl: dt.timedelta = DEFAULT_WORKLOAD_TTL,
        now: dt.datetime | None = None,
        public_key: WorkloadPublicKey | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
    ) -> IssuedCert:
        """Sign a certificate for ``identity``; generate the key pair unless one is given.

        ``dns_names``/``ip_addresses`` add SANs for a serving certificate (the controller's
        gRPC endpoint is dialled by address, so clients check those, not the SPIFFE ID)."""
        now = now or _now()
        if public_key is None:
            key = key or ec.generate_private_key(ec.SECP256R1())
            public_key = key.public_key()
        not_after = min(now + ttl, self.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([
                    x509.UniformResourceIdentifier(str(identity)),
                    *(x509.DNSName(d) for d in dns_names),
                    *(x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses),
                ]),
                critical=True,  # the subject is empty, so RFC 5280 wants the SAN critical
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.root_pem
        key_pem = _pem_key(key) if key else b""
        return IssuedCert(key_pem=key_pem, chain_pem=chain, not_after=not_after)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o600)  # a watching ztunnel never reads half a file


def write_identity(root: Path, identity: SpiffeId, issued: IssuedCert) -> None:
    chain, key = identity_paths(root, identity)
    _write_private(key, issued.key_pem)
    _write_private(chain, issued.chain_pem)


def write_trust_bundle(root: Path, ca: CertificateAuthority) -> None:
    _write_private(root / TRUST_BUNDLE_FILE, ca.root_pem)

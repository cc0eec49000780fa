"""The CA client core every component shares: the CSR, the check of the CA's answer, the gRPC
channel options.

Why here: the ztunnel (a certificate per local workload identity) and the waypoint agent (its one
gateway identity) both ask the controller's CA for certificates; the rules for what they send
and what they accept are one contract, so they live once, in the base layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.api.ambit.v1 import ca_pb2
from mesh.spiffe import SpiffeId

# gRPC's own reconnect backoff grows to 120 s by default; a CA that comes back should be used
# within seconds.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


@dataclass(frozen=True)
class Issued:
    """A CA answer that passed ``check_issued``, with our key in PEM."""

    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    leaf: x509.Certificate


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

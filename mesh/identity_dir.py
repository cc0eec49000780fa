"""The layout of an identity directory: where a workload's certificate chain and key live.

Why shared: ``ambit dev certs`` and the controller's CA write it, the ztunnel's file-based
secret source reads it; the names are a contract between them, so they are defined once here.
"""

from __future__ import annotations

from pathlib import Path

from mesh.spiffe import SpiffeId

TRUST_BUNDLE_FILE = "trust-bundle.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
KEY_FILE = "key.pem"


def identity_paths(root: Path, identity: SpiffeId) -> tuple[Path, Path]:
    """Where the chain and key of ``identity`` live inside an identity directory."""
    d = root / identity.namespace / identity.service_account
    return d / CERT_CHAIN_FILE, d / KEY_FILE

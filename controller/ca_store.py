"""Where the mesh root comes from, and how it survives a controller restart.

Every workload certificate chains to one root, so the root must not change when the controller
restarts: ztunnels would stop trusting each other's certificates. The root is either supplied by
the operator (``--ca-cert``/``--ca-key`` files, or the PEM pair of a Kubernetes Secret passed to
``ca_from_pem``) or generated on first start and persisted in the controller's data directory.
The generated pair is written to a temporary directory and renamed into place in one step, so a
crash never leaves half a root behind, and two replicas starting at once agree on one root.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controller.ca import CertificateAuthority

log = logging.getLogger("controller.ca")

CA_DIR = "ca"
ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"


class CaStoreError(Exception):
    """The root cannot be loaded or created; the message says which file and what to do."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _public_numbers_equal(a: object, b: object) -> bool:
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.public_numbers() == b.public_numbers()
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    return False


def ca_from_pem(key_pem: bytes, cert_pem: bytes, trust_domain: str, source: str,
                now: dt.datetime | None = None) -> CertificateAuthority:
    """Load and check a root: it must be a valid, self-signed CA certificate matching its key,
    and must not forbid SPIFFE IDs of ``trust_domain``. ``source`` names where the PEM came
    from (file paths, a Secret) for error messages."""
    try:
        ca = CertificateAuthority.load(key_pem, cert_pem)
    except (ValueError, TypeError) as e:
        raise CaStoreError(f"{source}: cannot load the CA key and certificate: {e}") from None
    cert = ca.cert
    if not _public_numbers_equal(ca.key.public_key(), cert.public_key()):
        raise CaStoreError(f"{source}: the CA key does not belong to the CA certificate "
                           f"({cert.subject.rfc4514_string()})")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CaStoreError(f"{source}: {cert.subject.rfc4514_string()} is not a CA certificate "
                           "(basicConstraints CA:TRUE is missing)")
    if cert.issuer != cert.subject:
        raise CaStoreError(
            f"{source}: {cert.subject.rfc4514_string()} is issued by "
            f"{cert.issuer.rfc4514_string()}; Ambit needs a self-signed root (intermediate CAs "
            "are not supported yet): supply the root's key and certificate, or omit "
            "--ca-cert/--ca-key to let the controller generate one")
    now = now or _now()
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise CaStoreError(f"{source}: the CA certificate is valid from "
                           f"{cert.not_valid_before_utc} to {cert.not_valid_after_utc}, "
                           f"not now ({now:%Y-%m-%d %H:%M:%S} UTC)")
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        nc = None
    if nc is not None and nc.permitted_subtrees is not None:
        hosts = [n.value for n in nc.permitted_subtrees
                 if isinstance(n, x509.UniformResourceIdentifier)]
        if hosts and trust_domain not in hosts:
            raise CaStoreError(
                f"{source}: the root only vouches for trust domain(s) {', '.join(hosts)}, "
                f"but the mesh trust domain is {trust_domain!r}; use the root made for "
                f"{trust_domain!r} or set the trust domain to match")
    return ca


def load_ca_files(cert_path: Path, key_path: Path, trust_domain: str) -> CertificateAuthority:
    """The operator-supplied root (``--ca-cert``/``--ca-key``)."""
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as e:
        raise CaStoreError(f"cannot read the CA from {e.filename}: {e.strerror}") from None
    _warn_if_readable(key_path)
    return ca_from_pem(key_pem, cert_pem, trust_domain, f"--ca-cert {cert_path} / "
                       f"--ca-key {key_path}")


def _warn_if_readable(key_path: Path) -> None:
    try:
        mode = key_path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("CA key %s is readable by group/others (mode %o); chmod 600 it",
                    key_path, mode & 0o777)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load_or_create_ca(data_dir: Path, trust_domain: str) -> CertificateAuthority:
    """The root persisted in ``data_dir/ca/``, generated (and persisted) on first start."""
    ca_dir = data_dir / CA_DIR
    cert_path, key_path = ca_dir / ROOT_CERT_FILE, ca_dir / ROOT_KEY_FILE
    if not ca_dir.exists():
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".ca-", dir=data_dir))  # mode 0700
        except OSError as e:
            raise CaStoreError(f"cannot create the CA in data directory {data_dir}: "
                               f"{e.strerror}") from None
        try:
            ca = CertificateAuthority.generate(trust_domain)
            _write_new(staging / ROOT_KEY_FILE, ca.key_pem)
            _write_new(staging / ROOT_CERT_FILE, ca.root_pem)
            try:
                # Atomic; fails if another replica renamed its root into place first.
                os.rename(staging, ca_dir)
            except OSError:
                if not ca_dir.is_dir():
                    raise
            else:
                log.info("generated a new mesh root for trust domain %s in %s",
                         trust_domain, ca_dir)
                return ca
        except OSError as e:
            raise CaStoreError(f"cannot persist the CA in {ca_dir}: {e.strerror}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    missing = [p.name for p in (cert_path, key_path) if not p.is_file()]
    if missing:
        raise CaStoreError(
            f"{ca_dir} exists but lacks {' and '.join(missing)}; restore it from a backup "
            "(ztunnels trust the old root), or delete the directory to generate a new root "
            "(every workload certificate is then reissued)")
    ca = load_ca_files(cert_path, key_path, trust_domain)
    log.info("loaded the mesh root from %s (expires %s)", ca_dir, ca.cert.not_valid_after_utc)
    return ca


def open_ca(trust_domain: str, data_dir: Path | None = None, ca_cert: Path | None = None,
            ca_key: Path | None = None) -> CertificateAuthority:
    """The controller's root: user files when given, else the one in ``data_dir``."""
    if (ca_cert is None) != (ca_key is None):
        raise CaStoreError("--ca-cert and --ca-key go together: give both (a user-supplied "
                           "root) or neither (a root generated in the data directory)")
    if ca_cert is not None and ca_key is not None:
        ca = load_ca_files(ca_cert, ca_key, trust_domain)
        log.info("using the user-supplied mesh root %s", ca.cert.subject.rfc4514_string())
        return ca
    if data_dir is None:
        raise CaStoreError("no mesh root: give --ca-cert and --ca-key, or a data directory "
                           "where the controller keeps the root it generates")
    return load_or_create_ca(data_dir, trust_domain)

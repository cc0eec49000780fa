"""Workload certificates and the TLS contexts built from them.

The ztunnel holds one certificate per SPIFFE identity it serves (every service account with a
pod on its node). It presents the *source* workload's identity when it opens HBONE and the
*destination* workload's identity when it accepts, and checks the peer's SPIFFE ID itself
(hostnames mean nothing here).

Two sources implement ``Secrets``: ``SecretManager`` reads an identity directory and re-reads it
when the files change, so rotation needs no restart; ``ztunnel.ca_client.CaSecretManager``
obtains certificates from the controller's CA. Accessors are async because the CA source may
have to fetch a certificate before it can answer; the directory source answers at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mesh.identity_dir import CERT_CHAIN_FILE, KEY_FILE, TRUST_BUNDLE_FILE, identity_paths
from mesh.spiffe import TRUST_DOMAIN, PeerIdentityError, SpiffeId
from mesh.spiffe import peer_identity as mesh_peer_identity

log = logging.getLogger("ztunnel.identity")

ALPN = ["h2"]
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h), which ssl.VerifyFlags does not name.
_NO_CHECK_TIME = 0x200000


class IdentityError(Exception):
    """No usable certificate for an identity, or a peer presenting the wrong one. ``reason``
    is the label the listeners count it under."""

    def __init__(self, message: str, reason: str = "peer_identity") -> None:
        super().__init__(message)
        self.reason = reason


def peer_identity(peercert: dict[str, Any] | None, trust_domain: str) -> SpiffeId:
    """The SPIFFE ID in a verified peer certificate (``SSLObject.getpeercert()``), which must
    be of ``trust_domain`` (the mesh's). The check is the mesh's one (``mesh.spiffe``), shared
    with the controller; refusals carry reason ``trust_domain`` (another domain) or
    ``peer_identity`` (no certificate, not exactly one workload SPIFFE ID)."""
    try:
        return mesh_peer_identity(peercert, trust_domain)
    except PeerIdentityError as e:
        raise IdentityError(str(e), TRUST_DOMAIN if e.reason == TRUST_DOMAIN
                            else "peer_identity") from None


@dataclass(frozen=True)
class CertInfo:
    identity: SpiffeId
    not_after: dt.datetime
    serial: str


@dataclass
class _Loaded:
    stamp: tuple[float, float, float]
    info: CertInfo
    client: ssl.SSLContext
    server: ssl.SSLContext


class Secrets(Protocol):
    """What the listeners and the HBONE pool need: TLS contexts per local identity."""

    async def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """Context presenting ``identity`` when opening HBONE; raises ``IdentityError``."""
        ...

    async def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """Context presenting ``identity`` when accepting HBONE; raises ``IdentityError``."""
        ...

    def certificates(self) -> list[CertInfo]:
        """The certificates currently held (for /config_dump and the expiry gauge)."""
        ...

    def prefetch(self, identities: Collection[SpiffeId]) -> None:
        """Obtain certificates for the identities of the node's workloads before the first
        connection needs them; problems are logged, not raised."""
        ...

    async def close(self) -> None:
        """Stop background work."""
        ...


def _new_context(server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identities are SPIFFE IDs, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(ALPN)
    return ctx


def _context(server_side: bool, chain: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    ctx = _new_context(server_side)
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.load_cert_chain(str(chain), str(key))
    return ctx


def _load_chain_from_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``ssl`` loads keys only from paths. Use anonymous in-memory files (memfd) so the private
    key never touches a disk; elsewhere, a private temporary directory removed at once."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("ambit-chain"), os.memfd_create("ambit-key")]
        try:
            for fd, data in zip(fds, (chain_pem, key_pem), strict=True):
                os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="ambit-cert-") as d:  # mode 0700
        chain, key = Path(d) / "chain.pem", Path(d) / "key.pem"
        for path, data in ((chain, chain_pem), (key, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(str(chain), str(key))


def context_from_pem(server_side: bool, chain_pem: bytes, key_pem: bytes,
                     bundle_pem: bytes) -> ssl.SSLContext:
    """A TLS context like the directory source's, from PEM held in memory."""
    ctx = _new_context(server_side)
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    _load_chain_from_memory(ctx, chain_pem, key_pem)
    return ctx


def presented_certificate(client: ssl.SSLContext, server: ssl.SSLContext) -> dict[str, Any]:
    """The certificate ``server`` presents, verified and decoded by ``client``, from a TLS
    handshake between the two in memory (a few milliseconds, once per load).

    Why not parse the PEM: the only parser at hand is ``cryptography``, about 8 MiB of every
    process that imports it, and the directory source would be its only user in a ztunnel
    without the CA (``--workers`` children never need it either). The handshake also proves
    more than a parse: the key matches the certificate and the chain verifies against the
    trust bundle, so a broken identity is reported when it is loaded, not at a peer's refusal.
    """
    bios = [ssl.MemoryBIO() for _ in range(4)]
    ends = [client.wrap_bio(bios[0], bios[1], server_side=False),
            server.wrap_bio(bios[2], bios[3], server_side=True)]
    done = [False, False]
    for _ in range(8):  # TLS 1.3 with a client certificate takes three flights
        for i, (end, out, peer_in) in enumerate(((ends[0], bios[1], bios[2]),
                                                   (ends[1], bios[3], bios[0]))):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            if out.pending:
                peer_in.write(out.read())
        if all(done):
            break
    else:
        raise ssl.SSLError("the certificate's self-check handshake did not complete")
    cert = ends[0].getpeercert()
    if not cert:
        raise ssl.SSLError("the self-check handshake saw no certificate")
    return cert


def cert_info(identity: SpiffeId, cert: dict[str, Any]) -> tuple[CertInfo, list[str]]:
    """``CertInfo`` and the URI SANs of a certificate decoded by ``ssl`` (``getpeercert()``)."""
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    not_after = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), dt.UTC)
    return CertInfo(identity, not_after, format(int(cert["serialNumber"], 16), "x")), uris


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return -1.0


class SecretManager:
    """Loads and caches per-identity TLS contexts from an identity directory (``Secrets``)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._loaded: dict[SpiffeId, _Loaded] = {}

    @property
    def bundle(self) -> Path:
        if self.root is None:
            raise IdentityError("no identity directory configured (--identity-dir)")
        return self.root / TRUST_BUNDLE_FILE

    def _get(self, identity: SpiffeId) -> _Loaded:
        if self.root is None:
            raise IdentityError("no identity directory configured (--identity-dir)")
        chain, key = identity_paths(self.root, identity)
        stamp = (_mtime(chain), _mtime(key), _mtime(self.bundle))
        cached = self._loaded.get(identity)
        if cached is not None and cached.stamp == stamp:
            return cached
        if stamp[0] < 0 or stamp[1] < 0:
            raise IdentityError(
                f"no certificate for {identity}: expected {chain} and {key} "
                f"({CERT_CHAIN_FILE}, {KEY_FILE}); issue one with "
                f"`ambit dev certs --out {self.root} --identity "
                f"{identity.namespace}/{identity.service_account}`"
            )
        try:
            client = _context(False, chain, key, self.bundle)
            server = _context(True, chain, key, self.bundle)
            checkers = [_context(side, chain, key, self.bundle) for side in (False, True)]
            for ctx in checkers:
                # Expiry is the peers' to judge (and ours to show in the expiry gauge), as
                # before: an expired file still loads.
                ctx.verify_flags |= _NO_CHECK_TIME
            info, uris = cert_info(identity, presented_certificate(*checkers))
        except (OSError, ValueError, KeyError, ssl.SSLError) as e:
            raise IdentityError(f"cannot load certificate for {identity} from {chain}: {e}") \
                from None
        if str(identity) not in uris:
            raise IdentityError(f"{chain} is for {uris}, not for {identity}")
        if cached is not None:
            log.info("reloaded certificate for %s (expires %s)", identity, info.not_after)
        self._loaded[identity] = _Loaded(stamp, info, client, server)
        return self._loaded[identity]

    async def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._get(identity).client

    async def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._get(identity).server

    def certificates(self) -> list[CertInfo]:
        return [v.info for v in self._loaded.values()]

    def prefetch(self, identities: Collection[SpiffeId]) -> None:
        """Load now, so a missing certificate is reported at startup, not at the first
        connection."""
        for identity in identities:
            try:
                self._get(identity)
            except IdentityError as e:
                log.warning("%s", e)

    async def close(self) -> None:
        return None

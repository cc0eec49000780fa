"""Ztunnels with certificates from a real gRPC mesh CA on loopback: issuance, on-demand
single-flight, rotation at half-life under an open tunnel, CA outages, and refusals."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path

import pytest
from cryptography import x509

from mesh.spiffe import SpiffeId
from tests.component.harness import (
    NET,
    OTHER_CLIENT_IP,
    TD,
    CaServer,
    Mesh,
    mesh,
    sample,
)
from tests.component.test_hbone_mesh import refused, roundtrip, wait_for
from ztunnel.ca_client import CaSecretManager
from ztunnel.identity import IdentityError
from ztunnel.metrics import Metrics

CLIENT = SpiffeId(TD, "default", "client")
OTHER = SpiffeId(TD, "other", "other")
ECHO = SpiffeId(TD, "default", "echo")


def serials(m: Mesh) -> dict[SpiffeId, str]:
    return {c.identity: c.serial for zt in (m.a, m.b) for c in zt.secrets.certificates()}


def expiries(m: Mesh) -> dict[SpiffeId, dt.datetime]:
    return {c.identity: c.not_after for zt in (m.a, m.b) for c in zt.secrets.certificates()}


async def all_certificates(m: Mesh) -> dict[SpiffeId, str]:
    await wait_for(lambda: len(serials(m)) == 3)
    return serials(m)


def inbound_peer_serials(m: Mesh) -> set[str]:
    """Serials of the client certificates ztunnel B's open HBONE connections were made with."""
    out = set()
    for proto in m.b.inbound.connections:
        assert proto.transport is not None
        der = proto.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        out.add(format(x509.load_der_x509_certificate(der).serial_number, "x"))
    return out


async def new_hbone_connection(m: Mesh) -> None:
    """Make A's next tunnel open a new HBONE connection (a fresh TLS handshake)."""
    opened = m.a.ctx.pool.connections_opened if m.a.ctx.pool else 0
    for proto in list(m.b.inbound.connections):
        proto.start_drain()  # B refuses new tunnels on the old connections; A retries anew
    assert await roundtrip(m, b"fresh handshake") == b"fresh handshake"
    assert m.a.ctx.pool is not None and m.a.ctx.pool.connections_opened == opened + 1


async def test_traffic_over_hbone_with_ca_issued_certificates(tmp_path: Path) -> None:
    async with mesh(tmp_path, use_ca=True) as m:
        assert m.ca is not None
        certs = await all_certificates(m)
        assert set(certs) == {CLIENT, OTHER, ECHO}
        assert await roundtrip(m, b"hello mesh") == b"hello mesh"
        assert await roundtrip(m, b"from other", source=OTHER_CLIENT_IP) == b"from other"
        # Prefetched once per identity, by the node that runs it; nothing refused.
        assert m.ca.count("issued") == 3
        assert m.ca.count("permission_denied") == m.ca.count("unauthenticated") == 0
        # The connections B accepted were made with the certificates the CA issued to A.
        assert inbound_peer_serials(m) == {certs[CLIENT], certs[OTHER]}
        expiry = sample(m.b, "ambit_certificate_expiry_seconds", identity=str(ECHO))
        assert 23 * 3600 < expiry - time.time() <= 24 * 3600
        assert sample(m.a, "ambit_ca_fetch_errors_total") == 0


async def test_rotation_at_half_life_keeps_open_tunnel(tmp_path: Path) -> None:
    ttl = dt.timedelta(seconds=4)
    async with mesh(tmp_path, use_ca=True, ca_ttl=ttl) as m:
        first = await all_certificates(m)
        first_expiry = max(c.not_after for zt in (m.a, m.b) for c in zt.secrets.certificates())
        r, w = await m.connect()
        w.write(b"before ")
        await w.drain()
        assert await r.readexactly(7) == b"before "
        assert inbound_peer_serials(m) == {first[CLIENT]}
        await asyncio.sleep(1.0)
        assert serials(m) == first  # not before half-life
        # Every certificate is renewed at half-life, about 2 s before it expires...
        old_expiry = expiries(m)
        await wait_for(lambda: all(serials(m)[i] != first[i] for i in first), limit=3.0)
        for identity, expires in expiries(m).items():
            assert expires - old_expiry[identity] <= dt.timedelta(seconds=3), identity
        # ...and the tunnel opened with the first certificates outlives them.
        delay = (first_expiry - dt.datetime.now(dt.UTC)).total_seconds() + 0.3
        await asyncio.sleep(max(delay, 0))
        w.write(b"after expiry")
        await w.drain()
        assert await r.readexactly(12) == b"after expiry"
        w.write_eof()
        assert await r.read() == b""
        w.close()
        # New connections use the renewed certificates.
        await new_hbone_connection(m)
        current = serials(m)
        assert current[CLIENT] in inbound_peer_serials(m)
        assert m.ca is not None and m.ca.count("issued") >= 6
        assert sample(m.a, "ambit_ca_fetch_errors_total") == 0


async def test_ca_outage_keeps_serving_with_cached_certificates(tmp_path: Path) -> None:
    ttl = dt.timedelta(seconds=6)
    async with mesh(tmp_path, use_ca=True, ca_ttl=ttl) as m:
        assert m.ca is not None
        first = await all_certificates(m)
        r, w = await m.connect()
        w.write(b"1")
        assert await r.readexactly(1) == b"1"
        await m.ca.stop()
        # Renewal at half-life (3 s) fails; it is counted and retried.
        await wait_for(lambda: sample(m.a, "ambit_ca_fetch_errors_total",
                                      code="UNAVAILABLE") >= 1, limit=5.0)
        assert serials(m) == first
        # The open tunnel, new tunnels, and new TLS handshakes all work with the cached
        # (still valid) certificates.
        w.write(b"2")
        assert await r.readexactly(1) == b"2"
        assert await roundtrip(m, b"new tunnel") == b"new tunnel"
        await new_hbone_connection(m)
        assert inbound_peer_serials(m) >= {first[CLIENT]}
        # The CA comes back before expiry: the retries renew every certificate.
        await m.ca.start()
        await wait_for(lambda: all(serials(m)[i] != first[i] for i in first), limit=3.0)
        assert await roundtrip(m, b"renewed") == b"renewed"
        w.write(b"3")
        assert await r.readexactly(1) == b"3"
        w.close()


async def test_identity_not_on_the_node_is_refused_cleanly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = Mesh(tmp_path, use_ca=True)
    assert m.ca is not None
    # The state says "other" runs on node-a; the CA's registry says it does not.
    m.ca.directory.identities["node-a"].discard(OTHER)
    with caplog.at_level(logging.INFO):
        async with m:
            assert await refused(m, source=OTHER_CLIENT_IP)
            assert m.echo.received == 0
            # Other workloads on the node are unaffected.
            assert await roundtrip(m, b"client ok") == b"client ok"
    assert m.ca.count("permission_denied") >= 1
    assert sample(m.a, "ambit_ca_fetch_errors_total", code="PERMISSION_DENIED") >= 1
    assert sample(m.a, "istio_tcp_connections_opened_total", response_flags="NO_IDENTITY") == 1
    reason = f"node node-a runs no workload with identity {OTHER}"
    logs = [r.getMessage() for r in caplog.records]
    assert any(r.startswith("refused certificate request") and reason in r for r in logs)
    # The ztunnel's own log says why the connection failed.
    assert any("connect_failed" in r and "PERMISSION_DENIED" in r and reason in r
               for r in logs if r.startswith("socks5"))
    assert OTHER not in {c.identity for c in m.a.secrets.certificates()}


async def test_on_demand_fetch_is_single_flight_and_backs_off(tmp_path: Path) -> None:
    ca = CaServer(tmp_path, f"127.{NET}.40.2")
    await ca.start()
    mgr = CaSecretManager(ca.address, ca.token_files["node-a"], Metrics())
    try:
        contexts = await asyncio.gather(*(mgr.client_context(CLIENT) for _ in range(20)))
        assert len({id(c) for c in contexts}) == 1
        assert ca.count("issued") == 1
        assert await mgr.server_context(CLIENT) is not None
        assert ca.count("issued") == 1  # cached
        # A refusal is not retried per connection: during the backoff, callers fail fast.
        with pytest.raises(IdentityError, match="PERMISSION_DENIED"):
            await mgr.client_context(ECHO)
        with pytest.raises(IdentityError, match="next attempt in"):
            await mgr.client_context(ECHO)
        assert ca.count("permission_denied") == 1
        # Dropping an identity from the node stops its renewal and its expiry gauge.
        mgr.prefetch([])
        assert mgr.certificates() == []
        assert sample_gauge(mgr, CLIENT) is None
    finally:
        await mgr.close()
        await ca.stop()


def sample_gauge(mgr: CaSecretManager, identity: SpiffeId) -> float | None:
    value: float | None = mgr.metrics.registry.get_sample_value(
        "ambit_certificate_expiry_seconds", {"identity": str(identity)})
    return value


async def test_bad_node_token_is_reported(tmp_path: Path) -> None:
    ca = CaServer(tmp_path, f"127.{NET}.40.3")
    await ca.start()
    forged = tmp_path / "forged.token"
    forged.write_text("not-a-token")
    metrics = Metrics()
    mgr = CaSecretManager(ca.address, forged, metrics)
    missing = CaSecretManager(ca.address, tmp_path / "absent.token", metrics)
    try:
        with pytest.raises(IdentityError, match=r"UNAUTHENTICATED.*node token is not valid"):
            await mgr.client_context(CLIENT)
        with pytest.raises(IdentityError, match=r"cannot read the node token .*absent\.token"):
            await missing.client_context(CLIENT)
        assert ca.count("unauthenticated") == 1
        assert metrics.registry.get_sample_value("ambit_ca_fetch_errors_total",
                                                 {"code": "token"}) == 1
    finally:
        await mgr.close()
        await missing.close()
        await ca.stop()


async def test_expired_certificate_with_the_ca_down_fails_with_the_reason(
        tmp_path: Path) -> None:
    ca = CaServer(tmp_path, f"127.{NET}.40.4", ttl=dt.timedelta(seconds=2))
    await ca.start()
    mgr = CaSecretManager(ca.address, ca.token_files["node-a"], Metrics(),
                          backoff_initial=0.1, backoff_max=0.5)
    try:
        await mgr.client_context(CLIENT)
        await ca.stop()
        (cert,) = mgr.certificates()
        await asyncio.sleep(max((cert.not_after - dt.datetime.now(dt.UTC)).total_seconds(), 0)
                            + 0.2)
        with pytest.raises(IdentityError, match=r"expired at .*UNAVAILABLE"):
            await mgr.client_context(CLIENT)
        errors = mgr.metrics.registry.get_sample_value("ambit_ca_fetch_errors_total",
                                                       {"code": "UNAVAILABLE"})
        assert errors is not None and errors >= 1
    finally:
        await mgr.close()
        await ca.stop()

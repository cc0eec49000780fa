"""The waypoint agent's certificate handling without sockets: the CA answer check, the retry
schedule, SDS responses, and the SDS stream protocol (ACK, NACK, stale nonce, rotation push)
driven through a fake gRPC context."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from controller.ca import CertificateAuthority
from mesh.api.ambit.v1 import ca_pb2
from mesh.ca_client import CaError, make_csr, retry_delay
from mesh.spiffe import SpiffeId
from waypoint.certs import WaypointCertificate, accept_response
from waypoint.sds import SECRET_TYPE_URL, SdsServer, SecretStore, build_sds_response

TD = "cluster.local"
WAYPOINT = SpiffeId(TD, "wp-ns", "wp")


def cert(serial: str = "abc", chain: bytes = b"CHAIN", key: bytes = b"KEY",
         bundle: bytes = b"BUNDLE", fetched_at: float = 1000.0,
         not_after: float = 2000.0) -> WaypointCertificate:
    return WaypointCertificate(WAYPOINT, chain, key, bundle, serial, not_after, fetched_at)


def unpack(resp: Any) -> dict[str, Any]:
    out = {}
    for any_msg in resp.resources:
        assert any_msg.type_url == SECRET_TYPE_URL
        secret = secret_pb2.Secret()
        any_msg.Unpack(secret)
        out[secret.name] = secret
    return out


# -- CA answers ---------------------------------------------------------------------------


def issue(identity: SpiffeId = WAYPOINT) -> tuple[Any, ca_pb2.CreateCertificateResponse]:
    ca = CertificateAuthority.generate(TD)
    key, csr_pem = make_csr(identity)
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    issued = ca.issue(identity, ttl=dt.timedelta(hours=1), public_key=public_key)
    chain = [c.public_bytes(serialization.Encoding.PEM).decode()
             for c in x509.load_pem_x509_certificates(issued.chain_pem)]
    return key, ca_pb2.CreateCertificateResponse(cert_chain_pem=chain,
                                                 trust_bundle_pem=[ca.root_pem.decode()])


def test_accept_response_keeps_chain_key_and_bundle() -> None:
    key, resp = issue()
    now = dt.datetime.now(dt.UTC).timestamp()
    c = accept_response(WAYPOINT, key, resp, now, "ca:15012")
    assert c.chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in c.key_pem
    assert c.trust_bundle_pem == resp.trust_bundle_pem[0].encode()
    assert now + 3500 < c.not_after <= now + 3600
    assert c.refresh_at == pytest.approx(now + (c.not_after - now) / 2)


def test_accept_response_refuses_a_certificate_for_another_key_or_identity() -> None:
    key, resp = issue()
    other_key, _ = make_csr(WAYPOINT)
    with pytest.raises(CaError, match="not for the key in our CSR") as err:
        accept_response(WAYPOINT, other_key, resp, 0.0, "ca:15012")
    assert err.value.code == "bad_response"
    with pytest.raises(CaError, match="names"):
        accept_response(SpiffeId(TD, "wp-ns", "other"), key, resp, 0.0, "ca:15012")
    with pytest.raises(CaError, match="empty"):
        accept_response(WAYPOINT, key, ca_pb2.CreateCertificateResponse(), 0.0, "ca:15012")


def test_retry_delay_grows_is_capped_and_fits_in_the_remaining_lifetime() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, 0.0, None, 1.0, 60.0, rng) for n in range(1, 10)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(d <= 60.0 for d in delays) and delays[-1] >= 30.0
    held = cert(fetched_at=0.0, not_after=40.0)
    # 40 s left: at most 10 s between attempts, whatever the failure count.
    assert all(retry_delay(n, 0.0, held, 1.0, 60.0, rng) <= 10.0 for n in range(1, 12))
    # Expired: back to the plain schedule.
    assert retry_delay(8, 50.0, held, 1.0, 60.0, rng) >= 30.0


# -- SDS responses ------------------------------------------------------------------------


def test_sds_response_carries_the_requested_secrets_in_order() -> None:
    c = cert()
    resp = build_sds_response(["ROOTCA", "default", "ROOTCA"], c, "7-abc", "n1")
    assert resp.version_info == "7-abc" and resp.nonce == "n1"
    assert resp.type_url == SECRET_TYPE_URL
    assert [s for s in unpack(resp)] == ["ROOTCA", "default"]
    secrets = unpack(resp)
    tls = secrets["default"].tls_certificate
    assert tls.certificate_chain.inline_bytes == b"CHAIN"
    assert tls.private_key.inline_bytes == b"KEY"
    assert secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes == b"BUNDLE"


def test_sds_response_skips_unknown_names_and_empty_means_all() -> None:
    assert list(unpack(build_sds_response(["nope", "default"], cert(), "1", "n"))) \
        == ["default"]
    assert list(unpack(build_sds_response([], cert(), "1", "n"))) == ["default", "ROOTCA"]


# -- SDS stream protocol ------------------------------------------------------------------


class FakeContext:
    """The slice of ``grpc.aio.ServicerContext`` the SDS stream uses."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.sent: asyncio.Queue[Any] = asyncio.Queue()

    async def read(self) -> Any:
        return await self.requests.get()

    async def write(self, message: Any) -> None:
        await self.sent.put(message)

    def peer(self) -> str:
        return "unix:test"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")

    async def next_sent(self) -> Any:
        return await asyncio.wait_for(self.sent.get(), 1)

    async def nothing_sent(self) -> None:
        await asyncio.sleep(0.05)
        assert self.sent.empty()


def request(names: list[str], version: str = "", nonce: str = "",
            error: str = "") -> Any:
    req = discovery_pb2.DiscoveryRequest(resource_names=names, type_url=SECRET_TYPE_URL,
                                         version_info=version, response_nonce=nonce)
    if error:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


async def test_sds_stream_ack_nack_stale_and_rotation() -> None:
    store = SecretStore()
    server = SdsServer(store, CollectorRegistry())
    ctx = FakeContext()
    task = asyncio.create_task(server.StreamSecrets(None, ctx))  # type: ignore[arg-type]
    try:
        # Asked before there is a certificate: answered when the first one arrives.
        await ctx.requests.put(request(["default"]))
        await ctx.nothing_sent()
        store.update(cert("aaa"))
        first = await ctx.next_sent()
        assert list(unpack(first)) == ["default"] and first.version_info == store.version
        # ACK: no answer, remembered.
        await ctx.requests.put(request(["default"], first.version_info, first.nonce))
        await ctx.nothing_sent()
        assert server.acked == {"default": first.version_info}
        # Rotation: pushed unasked, with a new version and the new chain.
        store.update(cert("bbb", chain=b"NEWCHAIN"))
        second = await ctx.next_sent()
        assert second.version_info != first.version_info and second.nonce != first.nonce
        assert unpack(second)["default"].tls_certificate.certificate_chain.inline_bytes \
            == b"NEWCHAIN"
        # A request carrying the old nonce is stale: ignored.
        await ctx.requests.put(request(["default", "ROOTCA"], first.version_info, first.nonce))
        await ctx.nothing_sent()
        # NACK: logged and counted, not retried while nothing changes.
        await ctx.requests.put(request(["default"], first.version_info, second.nonce,
                                       error="bad key"))
        await ctx.nothing_sent()
        assert server.nacks._value.get() == 1
        # A different set of names gets an answer at once.
        await ctx.requests.put(request(["default", "ROOTCA"], second.version_info,
                                       second.nonce))
        third = await ctx.next_sent()
        assert list(unpack(third)) == ["default", "ROOTCA"]
        assert server.pushes._value.get() == 3
        assert server.streams._value.get() == 1
        await ctx.requests.put(grpc.aio.EOF)
        await asyncio.wait_for(task, 1)
        assert server.streams._value.get() == 0
    finally:
        task.cancel()


async def test_sds_stream_refuses_another_type() -> None:
    server = SdsServer(SecretStore(), CollectorRegistry())
    ctx = FakeContext()
    req = request(["default"])
    req.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    await ctx.requests.put(req)
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        await asyncio.wait_for(server.StreamSecrets(None, ctx), 1)  # type: ignore[arg-type]

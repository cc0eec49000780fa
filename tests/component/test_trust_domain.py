"""Identities of another trust domain are refused over real TLS, even when the root signs them.

The mesh's generated root carries a name constraint for its trust domain, so OpenSSL alone
would already refuse another domain's certificate. A user's root (``--ca-cert``) may carry
none; these tests use such a root, so what refuses the foreign certificate is the mesh's own
check (``mesh.spiffe``): the ztunnel's inbound HBONE, its outbound pool and the controller's
xDS port (client certificates required) each refuse it, naming both domains.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from controller.app import Controller, ControllerConfig
from controller.ca import CertificateAuthority, write_identity
from controller.xds import LISTENER_TYPE, AdsServer, XdsCache
from mesh.spiffe import SpiffeId
from tests.component.harness import ECHO_IP, ECHO_PORT, NET, TD, mesh, sample
from tests.component.test_controller_tls import QueueFeed
from tests.component.test_push import Tokens
from ztunnel.hbone.core import DEFAULT_SETTINGS
from ztunnel.hbone.pool import HbonePool, PoolKey, UpstreamConnectError
from ztunnel.identity import context_from_pem

FOREIGN_TD = "evil.example"
HOST = "127.0.0.1"


def unconstrained_root() -> CertificateAuthority:
    """A self-signed root without a name constraint, as a user's --ca-cert may be."""
    ca = CertificateAuthority.generate(TD)
    cert = (x509.CertificateBuilder().subject_name(ca.cert.subject)
            .issuer_name(ca.cert.subject).public_key(ca.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(ca.cert.not_valid_before_utc)
            .not_valid_after(ca.cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca.key, hashes.SHA256()))
    return CertificateAuthority(ca.key, cert)


def tls_for(ca: CertificateAuthority, identity: SpiffeId, server_side: bool) -> ssl.SSLContext:
    issued = ca.issue(identity)
    return context_from_pem(server_side, issued.chain_pem, issued.key_pem, ca.root_pem)


# --- ztunnel inbound HBONE -----------------------------------------------------------------------

async def _connect_status(ctx: ssl.SSLContext) -> str | None:
    """One CONNECT to the echo pod through ztunnel B over ``ctx``; the :status answered."""
    r, w = await asyncio.open_connection(ECHO_IP, 15008, ssl=ctx, server_hostname=ECHO_IP)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", f"{ECHO_IP}:{ECHO_PORT}")])
    w.write(conn.data_to_send())
    try:
        async with asyncio.timeout(5):
            while data := await r.read(65536):
                for e in conn.receive_data(data):
                    if isinstance(e, h2.events.ResponseReceived):
                        return dict(e.headers)[b":status"].decode()
                    if isinstance(e, h2.events.StreamReset | h2.events.ConnectionTerminated):
                        return None
                w.write(conn.data_to_send())
    finally:
        w.close()
    return None


async def test_inbound_refuses_a_client_of_another_trust_domain(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        ca = unconstrained_root()
        (m.ids / "trust-bundle.pem").write_bytes(ca.root_pem)
        for ns, sa in (("default", "client"), ("other", "other"), ("default", "echo")):
            write_identity(m.ids, SpiffeId(TD, ns, sa), ca.issue(SpiffeId(TD, ns, sa)))
        # Positive control: the same root, the mesh's trust domain: the tunnel opens.
        own = tls_for(ca, SpiffeId(TD, "default", "client"), False)
        assert await _connect_status(own) == "200"
        foreign = tls_for(ca, SpiffeId(FOREIGN_TD, "default", "client"), False)
        assert await _connect_status(foreign) == "401"
        assert sample(m.b, "ambit_ztunnel_connection_errors_total", listener="inbound",
                      reason="trust_domain") == 1
        assert m.echo.received == 0


# --- ztunnel outbound pool -----------------------------------------------------------------------

async def test_pool_refuses_a_server_of_another_trust_domain() -> None:
    ca = unconstrained_root()
    host = f"127.{NET}.30.1"
    expected = SpiffeId(TD, "default", "echo")
    source = SpiffeId(TD, "default", "client")
    held: list[asyncio.StreamWriter] = []

    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    async def client_context(_identity: SpiffeId) -> ssl.SSLContext:
        return tls_for(ca, source, False)

    def make_socket(family: int) -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        return s

    server_tls = tls_for(ca, SpiffeId(FOREIGN_TD, "default", "echo"), True)
    server = await asyncio.start_server(accept, host, 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    pool = HbonePool(client_context, make_socket, settings=DEFAULT_SETTINGS)
    try:
        with pytest.raises(UpstreamConnectError) as err:
            await pool.open_stream(PoolKey(source, expected, (host, port)), f"{host}:80")
        assert err.value.flag == "IDENTITY"
        assert (f"trust domain '{FOREIGN_TD}' presented "
                f"(spiffe://{FOREIGN_TD}/ns/default/sa/echo), expected '{TD}'") in str(err.value)
        assert pool.size == 0
    finally:
        await pool.close()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


# --- controller xDS port (client certificates required) -----------------------------------------

@contextlib.asynccontextmanager
async def xds_controller(ca: CertificateAuthority, ads: AdsServer) -> AsyncIterator[Controller]:
    config = ControllerConfig(listen_host=HOST, grpc_port=0, monitoring_port=0, mtls_port=0)
    controller = Controller(config, QueueFeed(), ca, add_services=ads.add_to_server,
                            authenticator=Tokens({}))
    await controller.start()
    try:
        yield controller
    finally:
        await controller.stop(0)


def node(namespace: str = "ns1", gateway: str = "gw") -> base_pb2.Node:
    md = struct_pb2.Struct()
    md.update({"NAMESPACE": namespace, "GATEWAY": gateway})
    return base_pb2.Node(id=f"{namespace}/{gateway}/pod", metadata=md)


async def ads_status(port: int, ca: CertificateAuthority, identity: SpiffeId,
                     n: base_pb2.Node) -> tuple[grpc.StatusCode, str]:
    """Open an ADS stream over mutual TLS presenting ``identity``; the status it ends with
    (OK once a first response arrives)."""
    issued = ca.issue(identity)
    creds = grpc.ssl_channel_credentials(ca.root_pem, issued.key_pem, issued.chain_pem)
    async with grpc.aio.secure_channel(f"{HOST}:{port}", creds) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources(
            iter([discovery_pb2.DiscoveryRequest(node=n, type_url=LISTENER_TYPE)]))
        try:
            async with asyncio.timeout(5):
                async for _ in call:
                    return grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
    return grpc.StatusCode.UNKNOWN, "stream ended without an answer"


async def test_xds_refuses_a_client_certificate_of_another_trust_domain() -> None:
    ca = unconstrained_root()
    metrics = CollectorRegistry()
    cache = XdsCache()
    cache.set("ns1/gw", "1", {LISTENER_TYPE: {}})
    seen: list[SpiffeId | None] = []

    def authorize(_node: object, identity: SpiffeId | None) -> str:
        seen.append(identity)
        return "ns1/gw"

    ads = AdsServer(cache, authorize, metrics, trust_domain=TD)
    async with xds_controller(ca, ads) as controller:
        assert controller.mtls_port
        own = SpiffeId(TD, "ns1", "gw")
        assert await ads_status(controller.mtls_port, ca, own, node()) == (
            grpc.StatusCode.OK, "")
        code, details = await ads_status(controller.mtls_port, ca,
                                         SpiffeId(FOREIGN_TD, "ns1", "gw"), node())
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert (f"client certificate refused: trust domain '{FOREIGN_TD}' presented "
                f"(spiffe://{FOREIGN_TD}/ns/ns1/sa/gw), expected '{TD}'") in details
        assert seen == [own]
        assert metrics.get_sample_value("ambit_xds_denied_total",
                                        {"reason": "trust_domain"}) == 1

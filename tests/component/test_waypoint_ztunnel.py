"""A ztunnel sending a service's traffic to its waypoint, on loopback.

The waypoint instance is a small HBONE terminator built from the ztunnel's own HBONE pieces: it
terminates mutual TLS with a certificate for the waypoint's identity (issued by the same test
CA as the pods'), accepts CONNECT, records ``:authority``, the client's SPIFFE ID and the
``Forwarded`` header, and echoes bytes. It stands in for Envoy, so these tests check exactly
the ztunnel's half of the contract: where it connects, what it asks for, as whom, and what it
reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from mesh.spiffe import SpiffeId
from mesh.state.store import GATEWAY_NAME_LABEL
from tests.component import harness
from tests.component.harness import (
    CLIENT_IP,
    NET,
    SERVICE_VIP,
    TD,
    Mesh,
    base_state,
    digest,
    exchange,
    mesh,
    sample,
)
from tests.component.waiting import until
from ztunnel.hbone.conn import HboneProtocol, HboneStream, StreamError
from ztunnel.identity import IdentityError, SecretManager, peer_identity
from ztunnel.listeners.admin import config_dump

WAYPOINT_IP = f"127.{NET}.30.1"
WAYPOINT_PORT = 15008
WAYPOINT = SpiffeId(TD, "default", "waypoint")
ECHO_HOST = "echo.default.svc.cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"


def waypoint_state(bound: str | None = "waypoint", instance: bool = True) -> dict[str, Any]:
    """``base_state()`` plus a waypoint pod (not captured: protocol TCP, on a node without a
    ztunnel here) and the echo service bound to waypoint ``bound``."""
    state = copy.deepcopy(base_state())
    if instance:
        state["workloads"].append(
            {"name": "waypoint-0", "namespace": "default", "serviceAccount": "waypoint",
             "workloadName": "waypoint", "node": "node-w", "addresses": [WAYPOINT_IP],
             "protocol": "TCP", "labels": {GATEWAY_NAME_LABEL: "waypoint"}})
    if bound is not None:
        state["services"][0]["waypoint"] = {"name": bound}
    return state


@dataclass
class Tunnel:
    authority: str
    client: str
    forwarded: str
    received: int = 0


@dataclass
class FakeWaypoint:
    """HBONE terminator on WAYPOINT_IP:15008 presenting ``identity``; echoes each tunnel."""

    tls: ssl.SSLContext
    tunnels: list[Tunnel] = field(default_factory=list)
    handshakes: int = 0
    server: asyncio.Server | None = None
    conns: set[HboneProtocol] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> HboneProtocol:
            box: list[HboneProtocol] = []

            def on_request(stream: HboneStream) -> None:
                task = asyncio.create_task(self._serve(box[0], stream))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

            proto = HboneProtocol(False, on_request=on_request,
                                  on_close=self.conns.discard)
            box.append(proto)
            self.conns.add(proto)
            self.handshakes += 1
            return proto

        self.server = await loop.create_server(factory, WAYPOINT_IP, WAYPOINT_PORT,
                                               ssl=self.tls, reuse_address=True)

    async def _serve(self, proto: HboneProtocol, stream: HboneStream) -> None:
        assert proto.transport is not None
        try:
            client = str(peer_identity(proto.transport.get_extra_info("peercert"), TD))
        except IdentityError:
            stream.reject(401)
            return
        tunnel = Tunnel(stream.authority, client, stream.headers.get("forwarded", ""))
        self.tunnels.append(tunnel)
        stream.accept()
        with contextlib.suppress(StreamError):
            while True:
                data, flow = await stream.read()
                if not data:
                    if flow:
                        stream.consumed(flow)
                    stream.write_eof()
                    return
                tunnel.received += len(data)
                await stream.write(data)
                stream.consumed(flow)

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for proto in list(self.conns):
            proto.abort()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)


@pytest.fixture
def access_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "access.log"
    monkeypatch.setenv("AMBIT_TEST_ACCESS_LOG", str(path))
    yield path


@pytest.fixture(autouse=True)
def waypoint_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness writes the pods' certificates with a fresh test CA; have it issue the
    waypoint's from the same CA."""
    original = harness.write_certs

    def write_certs(root: Path, identities: list[tuple[str, str]]) -> Any:
        return original(root, [*identities, (WAYPOINT.namespace, WAYPOINT.service_account)])

    monkeypatch.setattr(harness, "write_certs", write_certs)


@contextlib.asynccontextmanager
async def waypoint_for(m: Mesh, identity: SpiffeId = WAYPOINT) -> AsyncIterator[FakeWaypoint]:
    wp = FakeWaypoint(await SecretManager(m.ids).server_context(identity))
    await wp.start()
    try:
        yield wp
    finally:
        await wp.stop()


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


wait_for = partial(until, limit=3.0, interval=0.02)


async def refused(m: Mesh, dest: tuple[str, int]) -> bool:
    """True if the connection is closed without carrying a byte."""
    try:
        r, w = await m.connect(dest)
        got = await asyncio.wait_for(exchange(r, w, b"secret"), 5)
    except (ConnectionError, OSError):
        return True
    return got == b""


async def test_bound_service_goes_to_the_waypoint_and_unbinding_goes_direct(
        tmp_path: Path, access_log: Path) -> None:
    async with mesh(tmp_path, waypoint_state()) as m, waypoint_for(m) as wp:
        payload = os.urandom(500_000)
        r, w = await m.connect((SERVICE_VIP, 80))
        got = await asyncio.wait_for(exchange(r, w, payload), 10)
        assert digest(got) == digest(payload)

        # The waypoint was asked for the service address the client dialled, by the client's
        # identity, and the bytes went through it, not to the echo pod.
        assert len(wp.tunnels) == 1
        tunnel = wp.tunnels[0]
        assert tunnel.authority == f"{SERVICE_VIP}:80"
        assert tunnel.client == CLIENT_ID
        assert tunnel.forwarded == f"for={CLIENT_IP}"
        assert tunnel.received == len(payload)
        assert m.echo.received == 0

        # Metrics: the service as destination_service, the instance as destination workload.
        labels = {"reporter": "source", "destination_service": ECHO_HOST,
                  "destination_service_name": "echo",
                  "destination_service_namespace": "default",
                  "destination_workload": "waypoint",
                  "destination_workload_namespace": "default",
                  "destination_principal": str(WAYPOINT), "source_principal": CLIENT_ID,
                  "connection_security_policy": "mutual_tls", "response_flags": "-"}
        await wait_for(lambda: sample(m.a, "istio_tcp_connections_closed_total", **labels) == 1)
        assert sample(m.a, "istio_tcp_connections_opened_total", **labels) == 1
        assert sample(m.a, "istio_tcp_sent_bytes_total", **labels) == len(payload)
        assert sample(m.a, "istio_tcp_received_bytes_total", **labels) == len(payload)
        # The destination ztunnel saw nothing: the waypoint is reached directly.
        assert sample(m.b, "istio_tcp_connections_opened_total") == 0

        (rec,) = [x for x in records(access_log) if x.get("plan") == "waypoint"]
        assert rec["waypoint"] == "default/waypoint"
        assert rec["dst"] == f"{SERVICE_VIP}:80"
        assert rec["dst_service"] == ECHO_HOST
        assert rec["dst_workload"] == "default/waypoint-0"
        assert rec["dst_identity"] == str(WAYPOINT)
        assert rec["src_identity"] == CLIENT_ID
        assert rec["outcome"] == "ok" and rec["response_flags"] == "-"
        assert rec["bytes_sent"] == rec["bytes_received"] == len(payload)

        # /config_dump shows the binding and the instances it resolves to.
        (svc,) = config_dump(m.a.ctx)["services"]
        assert svc["waypoint"] == {"namespace": "default", "name": "waypoint"}
        assert svc["waypoint_instances"] == ["default/waypoint-0"]

        # A second connection reuses the pooled HBONE connection to the instance.
        r, w = await m.connect((SERVICE_VIP, 80))
        assert await asyncio.wait_for(exchange(r, w, b"again"), 5) == b"again"
        assert len(wp.tunnels) == 2 and wp.handshakes == 1

        # Unbind: the next connection goes straight to an endpoint (the echo pod).
        m.write_state(waypoint_state(bound=None))
        await wait_for(lambda: all(
            zt.store.current.config.services[0].waypoint is None for zt in (m.a, m.b)))
        r, w = await m.connect((SERVICE_VIP, 80))
        assert await asyncio.wait_for(exchange(r, w, b"direct"), 5) == b"direct"
        assert m.echo.received == len(b"direct")
        assert len(wp.tunnels) == 2
        assert sample(m.b, "istio_tcp_connections_opened_total", reporter="destination",
                      destination_workload="echo", destination_service="unknown") == 1
        direct = [x for x in records(access_log)
                  if x.get("listener") == "socks5" and x.get("plan") == "hbone"]
        assert len(direct) == 1 and "waypoint" not in direct[0]


async def test_waypoint_without_instances_refuses(tmp_path: Path, access_log: Path) -> None:
    async with mesh(tmp_path, waypoint_state(instance=False)) as m, waypoint_for(m) as wp:
        assert await refused(m, (SERVICE_VIP, 80))
        assert wp.tunnels == [] and wp.handshakes == 0
        assert m.echo.received == 0
        refusal = {"reporter": "source", "response_flags": "NR",
                   "destination_service": ECHO_HOST, "destination_workload": "unknown"}
        await wait_for(lambda: sample(m.a, "istio_tcp_connections_closed_total", **refusal) == 1)
        assert sample(m.a, "istio_tcp_connections_opened_total", **refusal) == 1
        assert sample(m.a, "ambit_ztunnel_connection_errors_total", listener="socks5",
                      reason="no_route") == 1
        (rec,) = [x for x in records(access_log) if x.get("listener") == "socks5"]
        assert rec["plan"] == "deny" and rec["waypoint"] == "default/waypoint"
        assert rec["outcome"] == "no_route" and rec["response_flags"] == "NR"
        assert rec["reason"] == ("service default/echo is bound to waypoint default/waypoint, "
                                 "which has no ready instance")

        # The instance turns up: traffic flows through it without a restart.
        m.write_state(waypoint_state())
        await wait_for(lambda: len(m.a.store.current.config.workloads) == 4)
        r, w = await m.connect((SERVICE_VIP, 80))
        assert await asyncio.wait_for(exchange(r, w, b"now"), 5) == b"now"
        assert [t.authority for t in wp.tunnels] == [f"{SERVICE_VIP}:80"]


async def test_waypoint_proving_another_identity_is_refused(tmp_path: Path) -> None:
    # Whoever answers on the instance's IP must prove the instance's identity.
    imposter = SpiffeId(TD, "default", "echo")
    async with mesh(tmp_path, waypoint_state()) as m, waypoint_for(m, imposter) as wp:
        assert await refused(m, (SERVICE_VIP, 80))
        assert wp.tunnels == []
        await wait_for(lambda: sample(m.a, "istio_tcp_connections_closed_total",
                                      response_flags="IDENTITY") == 1)
        assert sample(m.a, "istio_tcp_connections_opened_total", response_flags="IDENTITY",
                      destination_principal=str(WAYPOINT), destination_service=ECHO_HOST) == 1
        assert m.echo.received == 0

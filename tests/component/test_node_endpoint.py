"""The node metrics endpoint over real loopback sockets, against a real ztunnel metrics port.

The fake ztunnel is the ztunnel's own stats server (``serve_http`` + ``Metrics``), so the merge
is checked against the exposition the ztunnel really produces (process and platform collectors
included).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.capture.base import PodCounters
from agent.node_endpoint import NodeEndpoint
from agent.node_metrics import NodeMetrics
from mesh.http_server import Response, serve_http
from mesh.listener import Listener, bind_socket
from ztunnel.metrics import Metrics

LOOPBACK = "127.0.0.1"


async def _request(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()  # the server closes after one response
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    return await _request(port, f"{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())


def _families(body: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    names = []
    for f in text_string_to_metric_families(body.decode()):
        names.append(f.name)
        for s in f.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    assert len(names) == len(set(names)), "duplicate family in the merged exposition"
    return out


@dataclass
class Agent:
    ready: tuple[bool, str] = (False, "waiting for the registry")
    pods: dict[str, PodCounters] = field(default_factory=lambda: {
        "10.244.1.2": PodCounters(captured=4, passed=1)})

    def status(self) -> dict[str, object]:
        return {"mode": "ebpf", "enrolled": set(self.pods), "counters": self.pods}


async def _ztunnel(metrics: Metrics) -> Listener:
    def route(method: str, target: str) -> Response:
        return Response(200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    listener = Listener("fake-ztunnel-stats", bind_socket(LOOPBACK, 0), serve_http(route))
    listener.start()
    return listener


@pytest.fixture
async def ztunnel() -> AsyncIterator[Listener]:
    metrics = Metrics()
    metrics.state_workloads.set(7)
    listener = await _ztunnel(metrics)
    yield listener
    listener.close()


def _endpoint(agent: Agent, url: str | None) -> NodeEndpoint:
    metrics = NodeMetrics("node-a", "0.1.0", "ebpf", counters=lambda: agent.pods,
                          pod_name=lambda ip: ("default", "client-1"),
                          components=lambda: {"agent": os.getpid(), "ztunnel": None})
    return NodeEndpoint(metrics, LOOPBACK, 0, url, lambda: agent.ready, agent.status)


@pytest.fixture
def agent() -> Agent:
    return Agent()


async def test_merges_the_ztunnel_and_survives_its_death(ztunnel: Listener,
                                                         agent: Agent) -> None:
    url = f"http://{LOOPBACK}:{ztunnel.address[1]}/metrics"
    ep = _endpoint(agent, url)
    await ep.start()
    try:
        assert ep.port != 0
        status, body = await _get(ep.port, "/metrics")
        assert status == 200
        f = _families(body)
        assert f["ambit_agent_ztunnel_scrape_up"] == {(): 1}
        assert f["ambit_state_workloads"] == {(): 7}  # the ztunnel's
        assert f["ambit_agent_info"] == {
            (("node", "node-a"), ("redirect_mode", "ebpf"), ("version", "0.1.0")): 1}
        assert f["ambit_capture_connections_total"] == {
            (("pod_ip", "10.244.1.2"), ("pod_name", "client-1"),
             ("pod_namespace", "default")): 4}
        assert "process_resident_memory_bytes" in f  # the ztunnel's own process collector
        rss = f["ambit_process_resident_memory_bytes"][(("component", "agent"),)]
        assert rss > 1 << 20
        assert f["ambit_process_up"] == {(("component", "agent"),): 1,
                                         (("component", "ztunnel"),): 0}

        ztunnel.close()
        await ztunnel.drain(1)
        status, body = await _get(ep.port, "/metrics")
        assert status == 200
        f = _families(body)
        assert f["ambit_agent_ztunnel_scrape_up"] == {(): 0}
        assert "ambit_state_workloads" not in f
        assert "ambit_agent_pods_known" in f
    finally:
        await ep.close()


async def test_a_hung_ztunnel_times_out_without_blocking_the_loop(agent: Agent) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(hang, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    ep = _endpoint(agent, f"http://{LOOPBACK}:{port}/metrics")
    await ep.start()
    try:
        started = time.monotonic()
        scrape = asyncio.create_task(_get(ep.port, "/metrics"))
        await asyncio.sleep(0.2)
        assert not scrape.done()
        ready_status, _ = await _get(ep.port, "/healthz/ready")  # served while it waits
        assert ready_status == 503
        assert time.monotonic() - started < 0.9
        status, body = await scrape
        assert status == 200
        assert 0.9 < time.monotonic() - started < 3
        assert _families(body)["ambit_agent_ztunnel_scrape_up"] == {(): 0}
        assert accepted
    finally:
        await ep.close()
        server.close()
        for w in accepted:
            w.close()
        await server.wait_closed()


async def test_without_a_ztunnel_url_serves_the_agent_alone(agent: Agent) -> None:
    ep = _endpoint(agent, None)
    await ep.start()
    try:
        status, body = await _get(ep.port, "/metrics")
        assert status == 200
        f = _families(body)
        assert "ambit_agent_ztunnel_scrape_up" not in f
        assert "ambit_agent_info" in f
    finally:
        await ep.close()


async def test_readiness_debug_and_errors(agent: Agent) -> None:
    ep = _endpoint(agent, None)
    await ep.start()
    try:
        assert await _get(ep.port, "/healthz/ready") == (503, b"waiting for the registry\n")
        # The liveness probe's path answers while not ready: waiting is no reason to restart.
        assert await _get(ep.port, "/healthz/live") == (200, b"live\n")
        agent.ready = (True, "ready: 1 pod enrolled")
        assert await _get(ep.port, "/healthz/ready") == (200, b"ready: 1 pod enrolled\n")

        status, body = await _get(ep.port, "/debug/pods?verbose=1")
        assert status == 200
        assert json.loads(body) == {
            "mode": "ebpf", "enrolled": ["10.244.1.2"],
            "counters": {"10.244.1.2": {"captured": 4, "passed": 1, "errors": 0}}}

        assert (await _get(ep.port, "/nope"))[0] == 404
        assert (await _get(ep.port, "/metrics", method="POST"))[0] == 405
        assert (await _get(ep.port, "/healthz/ready", method="DELETE"))[0] == 405
    finally:
        await ep.close()


async def test_a_failing_readiness_check_is_not_ready(agent: Agent) -> None:
    def ready() -> tuple[bool, str]:
        raise RuntimeError("state torn")

    ep = NodeEndpoint(NodeMetrics("node-a", "0.1.0", "ebpf"), LOOPBACK, 0, None, ready,
                      agent.status)
    await ep.start()
    try:
        status, body = await _get(ep.port, "/healthz/ready")
        assert status == 503 and b"state torn" in body
    finally:
        await ep.close()


async def test_garbage_closes_only_its_connection(agent: Agent) -> None:
    ep = _endpoint(agent, None)
    await ep.start()
    try:
        idle_reader, idle_writer = await asyncio.open_connection(LOOPBACK, ep.port)
        status, _ = await _request(ep.port, b"\x16\x03\x01 not http at all\r\n\r\n")
        assert status == 400
        assert (await _get(ep.port, "/healthz/ready"))[0] == 503
        # A connection opened before the garbage is still being served.
        idle_writer.write(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\n\r\n")
        async with asyncio.timeout(5):
            data = await idle_reader.read()
        assert data.startswith(b"HTTP/1.1 503 ")
        idle_writer.close()
    finally:
        await ep.close()

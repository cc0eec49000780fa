"""The controller process core: TLS gRPC with a mesh-issued serving certificate, monitoring."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.app import Controller, ControllerConfig
from controller.ca import CertificateAuthority
from mesh.state.controller_source import ControllerSource
from mesh.state.model import MeshConfig
from mesh.state.parse import parse_state
from mesh.state.store import StateStore
from tests.component.harness import free_port
from tests.component.test_push import NODE_TOKENS, Tokens, doc, eventually, token_file


class QueueFeed:
    """A registry double: states pushed by the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[MeshConfig] = asyncio.Queue()

    async def states(self) -> AsyncIterator[MeshConfig]:
        while True:
            yield await self.queue.get()


async def test_ztunnel_subscribes_over_tls_and_sees_changes(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("cluster.local")
    feed = QueueFeed()
    cfg = ControllerConfig(listen_host="127.0.0.1", grpc_port=0, monitoring_host="127.0.0.1",
                           monitoring_port=free_port("127.0.0.1"))
    controller = Controller(cfg, feed, ca, authenticator=Tokens(NODE_TOKENS))
    await controller.start()
    store = StateStore()
    creds = grpc.ssl_channel_credentials(root_certificates=ca.root_pem)
    source = ControllerSource(f"localhost:{controller.grpc_port}", "n1", store, creds,
                              token_file=token_file(tmp_path, "token-n1"), backoff_initial=0.05)
    task = asyncio.create_task(source.run())
    try:
        await feed.queue.put(parse_state(doc("1")))
        await eventually(lambda: store.current.version == "1")
        await feed.queue.put(parse_state(doc("2", workloads=doc("2")["workloads"][:1])))
        await eventually(lambda: store.current.version == "2", limit=1.0)
        assert len(store.current.config.workloads) == 1
        assert controller._monitoring is not None
        host, port = controller._monitoring.address
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"http://{host}:{port}/metrics", timeout=5).read().decode())
        assert "ambit_controller_subscribers 1.0" in body
        assert 'ambit_controller_pushes_total{kind="delta"} 1.0' in body
    finally:
        task.cancel()
        await controller.stop()


async def test_untrusted_controller_is_refused(tmp_path: Path) -> None:
    ca, other = CertificateAuthority.generate("cluster.local"), CertificateAuthority.generate("x")
    feed = QueueFeed()
    controller = Controller(ControllerConfig(listen_host="127.0.0.1", grpc_port=0,
                                             monitoring_port=0), feed, ca,
                            authenticator=Tokens(NODE_TOKENS))
    await controller.start()
    await feed.queue.put(parse_state(doc("1")))
    store = StateStore()
    source = ControllerSource(f"localhost:{controller.grpc_port}", "n1", store,
                              grpc.ssl_channel_credentials(root_certificates=other.root_pem),
                              token_file=token_file(tmp_path, "token-n1"))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(source._session(), 5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert store.current.version == ""
    finally:
        await controller.stop()

"""The controller process core: TLS gRPC with a mesh-issued serving certificate, monitoring;
plaintext (``--insecure``) only on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.app import Controller, ControllerConfig, InsecureBindError, check_insecure_bind
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


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1", True), ("127.0.0.5", True), ("::1", True), ("[::1]", True),
    ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("192.168.1.5", False),
    ("ctl.example", False),
])
def test_plaintext_grpc_only_on_loopback(host: str, allowed: bool) -> None:
    check_insecure_bind(False, host)  # TLS: any address
    if allowed:
        check_insecure_bind(True, host)
    else:
        with pytest.raises(InsecureBindError, match=r"use --listen-host 127\.0\.0\.1"):
            check_insecure_bind(True, host)


async def test_controller_core_refuses_insecure_off_loopback() -> None:
    controller = Controller(ControllerConfig(listen_host="0.0.0.0", grpc_port=0,
                                             monitoring_port=0, insecure=True),
                            QueueFeed(), CertificateAuthority.generate("cluster.local"),
                            authenticator=Tokens(NODE_TOKENS))
    with pytest.raises(InsecureBindError, match="other machines can reach"):
        await controller.start()
    assert controller.server is None and controller.grpc_port == 0  # nothing bound


def test_ambit_controller_insecure_off_loopback_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "AMBIT_DB")}
    proc = subprocess.run(
        [sys.executable, "-m", "ambit.cli", "controller", "--mode", "embedded", "--insecure",
         "--db", str(tmp_path / "registry.db"), "--data-dir", str(tmp_path / "data")],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--insecure with --listen-host 0.0.0.0" in proc.stderr
    assert "--listen-host 127.0.0.1" in proc.stderr
    assert not (tmp_path / "registry.db").exists()  # refused before opening anything

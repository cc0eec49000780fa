"""agent.k8s_owner over HTTP: the DaemonSet GET against the repo's API-server double (plain
HTTP, bearer token) and a tiny HTTPS server (the in-cluster CA path), and the agent's SIGTERM
decision wired to it."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.capture.base import BackendStatus, PodCounters
from agent.config import AgentConfig
from agent.k8s_owner import ApiTarget, DaemonSetClient, Observation, OwnerWatch
from tests.k8s_double.server import ADMIN_TOKEN, ApiServerDouble

NS, NAME = "ambit-system", "ambit-node"
DAEMONSET: dict[str, Any] = {
    "apiVersion": "apps/v1", "kind": "DaemonSet",
    "metadata": {"name": NAME, "namespace": NS},
    "spec": {"selector": {"matchLabels": {"app": NAME}}},
}  # fmt: skip


def client_for(url: str, tmp_path: Path, token: str = ADMIN_TOKEN,
               ca: Path | None = None) -> DaemonSetClient:
    (tmp_path / "token").write_text(token + "\n")
    return DaemonSetClient(ApiTarget(url, tmp_path / "token", ca), NS, NAME, timeout=2)


async def test_observe_and_decide_against_the_double(double: ApiServerDouble,
                                                     tmp_path: Path) -> None:
    client = client_for(double.url, tmp_path)
    watch = OwnerWatch(client, retry=0.05)
    # Not there yet: never seen, so even a 404 is no reason to remove.
    assert (await client.observe()).status == 404
    assert not (await watch.decide_at_exit()).remove

    uid = double.apply("daemonsets", DAEMONSET)["metadata"]["uid"]
    await watch.learn()
    assert watch.known_uid == uid
    request = double.requests[-1]
    assert (request.method, request.path) == (
        "GET", f"/apis/apps/v1/namespaces/{NS}/daemonsets/{NAME}")

    # Rolling update / drain: the DaemonSet is there.
    d = await watch.decide_at_exit()
    assert not d.remove and "still there" in d.reason
    # 403 (RBAC missing) and a 500 leave everything in place.
    double.fail_next("daemonsets", 1, 403)
    assert (await client.observe()).status == 403
    double.fail_next("daemonsets", 1, 500)
    assert not (await watch.decide_at_exit()).remove
    # A token the API server does not accept: 401, leave in place.
    (tmp_path / "other").mkdir()
    wrong = OwnerWatch(client_for(double.url, tmp_path / "other", "wrong"))
    wrong.known_uid = uid
    d = await wrong.decide_at_exit()
    assert not d.remove and "(401" in d.reason

    # `ambit uninstall`: foreground deletion sets deletionTimestamp.
    marked = {**DAEMONSET, "metadata": {**DAEMONSET["metadata"],
                                        "deletionTimestamp": "2025-06-01T10:00:00Z"}}
    double.apply("daemonsets", marked)
    assert await client.observe() == Observation(200, uid, "2025-06-01T10:00:00Z")
    assert (await watch.decide_at_exit()).remove
    # Background deletion: gone.
    double.delete("daemonsets", NAME, NS)
    d = await watch.decide_at_exit()
    assert d.remove and "404" in d.reason
    # Deleted and re-created: a new uid, its pods take over.
    double.apply("daemonsets", DAEMONSET)
    d = await watch.decide_at_exit()
    assert not d.remove and "replaced" in d.reason


async def test_unreachable_api_server_leaves_everything(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    watch = OwnerWatch(client_for(f"http://127.0.0.1:{port}", tmp_path))
    watch.known_uid = "some-uid"
    obs = await watch.client.observe()
    assert obs.status is None and obs.error
    d = await watch.decide_at_exit()
    assert not d.remove and "cannot ask the API server" in d.reason


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "ca.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_https_with_the_service_account_ca(tmp_path: Path) -> None:
    ca, key = _self_signed(tmp_path)
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"metadata": {"name": NAME, "uid": "u-1",
                                               "deletionTimestamp": "2025-06-01T10:00:00Z"}})

    app = web.Application()
    app.router.add_get(f"/apis/apps/v1/namespaces/{NS}/daemonsets/{NAME}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(ca, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock, ssl_context=ctx)
    await site.start()
    url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    try:
        obs = await client_for(url, tmp_path, "sa-token", ca).observe()
        assert obs == Observation(200, "u-1", "2025-06-01T10:00:00Z")
        assert seen == ["Bearer sa-token"]
        # Without the cluster's CA the server is not trusted: no answer, never a removal.
        untrusted = await client_for(url, tmp_path, "sa-token", None).observe()
        assert untrusted.status is None and "CERTIFICATE_VERIFY_FAILED" in untrusted.error
    finally:
        await runner.cleanup()


class _Backend:
    mode = "iptables"

    def counters(self) -> dict[str, PodCounters]:
        return {}

    def status(self) -> BackendStatus:
        return BackendStatus(self.mode)


async def test_agent_removes_itself_only_when_its_daemonset_goes(
        double: ApiServerDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from agent.app import Agent

    caplog.set_level(logging.INFO)
    config = AgentConfig(node="node-1", controller_address="127.0.0.1:1", run_dir=tmp_path,
                         daemonset=NAME, daemonset_namespace=NS).validate()
    removed: list[str] = []

    def remove_install() -> list[str]:
        removed.append("called")
        return ["ambit-cni from 10-flannel.conflist", "iptables chains and policy routing"]

    watch = OwnerWatch(client_for(double.url, tmp_path), retry=0.05)
    agent = Agent(config, _Backend(), "test", owner=watch,  # type: ignore[arg-type]
                  remove_install=remove_install)
    try:
        double.apply("daemonsets", DAEMONSET)
        await watch.learn()
        assert not await agent.removal_wanted()  # a rolling update
        double.delete("daemonsets", NAME, NS)
        assert await agent.removal_wanted()
        await agent.remove_from_node()
        assert removed == ["called"]
        messages = [r.getMessage() for r in caplog.records]
        assert "removed: ambit-cni from 10-flannel.conflist" in messages
        assert "Ambit removed from node node-1" in messages
        # Without --daemonset nothing is ever removed.
        plain = Agent(AgentConfig(node="n", controller_address="c:1", run_dir=tmp_path),
                      _Backend(), "test")  # type: ignore[arg-type]
        assert not await plain.removal_wanted()
        plain._kernel_pool.shutdown()
    finally:
        agent._kernel_pool.shutdown()

"""The whole control plane on loopback: embedded registry -> controller (state push and CA over
TLS) -> two ztunnels that get their state and their certificates from it.

Issue 3's component checks: a workload added to the registry becomes reachable over HBONE
within a second; a policy applied is enforced within a second; with the controller killed
traffic continues; restarted, the ztunnels resync.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from controller.app import Controller, ControllerConfig
from controller.ca_service import CertificateService
from controller.ca_store import open_ca
from controller.embedded import EmbeddedFeed
from controller.registry.sqlite import EmbeddedRegistry
from tests.component import waiting
from tests.component.harness import (
    CLIENT_IP,
    ECHO_IP,
    ECHO_PORT,
    NET,
    OTHER_CLIENT_IP,
    EchoServer,
    exchange,
    free_port,
    sample,
    socks_connect,
)
from ztunnel.app import Ztunnel
from ztunnel.config import ZtunnelConfig

TD = "cluster.local"


def workload(name: str, ns: str, sa: str, node: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "ambit.dev/v1", "kind": "Workload",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"serviceAccount": sa, "node": node, "addresses": [ip]}}


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"ambit.dev/dataplane-mode": "ambient"}}}


DENY_OTHER = {"apiVersion": "security.ambit.dev/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "deny-other", "namespace": "default"},
              "spec": {"action": "DENY", "rules": [{"from": [{"source": {
                  "namespaces": ["other"]}}]}]}}


@dataclass
class Plane:
    tmp: Path
    registry: EmbeddedRegistry
    controller: Controller
    a: Ztunnel
    b: Ztunnel
    echo: EchoServer
    socks: tuple[str, int]
    grpc_port: int

    async def roundtrip(self, payload: bytes, source: str = CLIENT_IP) -> bytes:
        r, w = await socks_connect(self.socks, (ECHO_IP, ECHO_PORT), source)
        return await asyncio.wait_for(exchange(r, w, payload), 10)

    async def refused(self, source: str) -> bool:
        try:
            return await self.roundtrip(b"secret", source) == b""
        except (ConnectionError, OSError):
            return True


def start_controller(tmp: Path, registry: EmbeddedRegistry, port: int) -> Controller:
    ca = open_ca(TD, tmp / "data")
    feed = EmbeddedFeed(registry, TD, interval=0.02)
    controller = Controller(ControllerConfig(trust_domain=TD, listen_host="127.0.0.1",
                                             grpc_port=port, monitoring_port=0), feed, ca,
                            authenticator=feed)
    ca_service = CertificateService(ca, TD, feed, feed, controller.metrics)
    controller.add_services = ca_service.add_to_server
    (tmp / "trust-bundle.pem").write_bytes(ca.root_pem)
    return controller


@contextlib.asynccontextmanager
async def plane(tmp: Path) -> AsyncIterator[Plane]:
    registry = EmbeddedRegistry(tmp / "registry.db")
    registry.apply([namespace("default"), namespace("other"),
                    workload("client", "default", "client", "node-a", CLIENT_IP),
                    workload("other", "other", "other", "node-a", OTHER_CLIENT_IP)])
    port = free_port("127.0.0.1")
    controller = start_controller(tmp, registry, port)
    await controller.start()
    ztunnels = []
    socks = (f"127.{NET}.10.254", free_port(f"127.{NET}.10.254"))
    for node, host in (("node-a", f"127.{NET}.10.254"), ("node-b", f"127.{NET}.20.254")):
        token = tmp / f"{node}.token"
        token.write_text(registry.issue_node_token(node))
        extra: dict[str, Any] = {"socks5_port": socks[1], "socks5_host": socks[0]} \
            if node == "node-a" else {}
        ztunnels.append(Ztunnel(ZtunnelConfig(
            node=node, controller_address=f"localhost:{port}", ca_address=f"localhost:{port}",
            node_token_file=token, ca_root_cert=tmp / "trust-bundle.pem",
            inbound_bind="workload", bind_host=host, outbound_port=0, admin_host=host,
            admin_port=free_port(host), stats_host=host, metrics_port=free_port(host),
            readiness_port=free_port(host), transparent=False, socket_mark=0, access_log="",
            loopback_pods=True,  # pods are 127.N addresses here
            drain_seconds=1.0, **extra).validate()))
    echo = EchoServer()
    await echo.start()
    for z in ztunnels:
        await z.start()
    p = Plane(tmp, registry, controller, ztunnels[0], ztunnels[1], echo, socks, port)
    try:
        await until(lambda: p.a.store.ready and p.b.store.ready)
        yield p
    finally:
        for z in ztunnels:
            await z.shutdown()
        await p.controller.stop(grace=0)
        await echo.stop()
        registry.close()


until = partial(waiting.until, limit=5.0)


async def test_registry_changes_reach_the_data_plane_within_a_second(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        assert sample(p.a, "ambit_xds_connected") == 1
        # A workload added to the registry becomes reachable over HBONE within a second.
        p.registry.apply([workload("echo", "default", "echo", "node-b", ECHO_IP)])
        took = await until(lambda: ECHO_IP in {str(a) for w in p.b.store.current.config.workloads
                                               for a in w.addresses}
                           and p.a.store.current.version == p.b.store.current.version)
        assert took < 1.0
        await until(lambda: bool(p.b._workload_listeners))  # B opened 15008 on the new pod
        assert await p.roundtrip(b"over hbone") == b"over hbone"
        assert sample(p.b, "istio_tcp_connections_opened_total", reporter="destination",
                      connection_security_policy="mutual_tls",
                      source_principal=f"spiffe://{TD}/ns/default/sa/client") == 1
        # The certificates came from the controller's CA, not from files.
        dump = {str(c.identity) for c in p.b.secrets.certificates()}
        assert f"spiffe://{TD}/ns/default/sa/echo" in dump

        # A policy applied is enforced within a second.
        assert await p.roundtrip(b"allowed", OTHER_CLIENT_IP) == b"allowed"
        p.registry.apply([DENY_OTHER])
        took = await until(lambda: any(pol.name == "deny-other"
                                       for pol in p.b.store.current.config.policies))
        assert took < 1.0
        assert await p.refused(OTHER_CLIENT_IP)
        assert await p.roundtrip(b"client still fine") == b"client still fine"


async def test_controller_down_traffic_continues_then_resync(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        p.registry.apply([workload("echo", "default", "echo", "node-b", ECHO_IP)])
        await until(lambda: bool(p.b._workload_listeners))
        assert await p.roundtrip(b"before") == b"before"
        version = p.a.store.current.version

        await p.controller.stop(grace=0)
        await until(lambda: sample(p.a, "ambit_xds_connected") == 0
                    and sample(p.b, "ambit_xds_connected") == 0)
        # Traffic continues on the last good state and cached certificates...
        assert await p.roundtrip(b"while down") == b"while down"
        assert p.a.store.current.version == version
        # ...and the registry keeps changing meanwhile.
        p.registry.apply([DENY_OTHER])

        # Restarted (same registry, same root in the data dir): the ztunnels resync.
        p.controller = start_controller(tmp_path, p.registry, p.grpc_port)
        await p.controller.start()
        await until(lambda: sample(p.a, "ambit_xds_connected") == 1
                    and sample(p.b, "ambit_xds_connected") == 1, limit=15)
        await until(lambda: any(pol.name == "deny-other"
                                for pol in p.b.store.current.config.policies))
        assert p.b.store.current.version == str(p.registry.revision)
        assert await p.refused(OTHER_CLIENT_IP)
        assert await p.roundtrip(b"after") == b"after"


async def test_commands_end_to_end(tmp_path: Path) -> None:
    """The user's path: `ambit controller`, `ambit namespace enable`, `ambit node join`,
    `ambit workload add`, `ambit ztunnel --controller ...`, all as processes."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    env = {**os.environ, "AMBIT_DB": str(tmp_path / "registry.db")}
    ambit = [sys.executable, "-m", "ambit.cli"]

    def cli(*args: str) -> str:
        r = subprocess.run([*ambit, *args], env=env, capture_output=True, text=True,
                           check=False, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    async def get(url: str) -> tuple[int, bytes]:
        def fetch() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return int(resp.status), bytes(resp.read())
            except OSError:
                return 0, b""
        return await asyncio.to_thread(fetch)

    async def wait_http(url: str, limit: float = 20) -> bytes:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            status, body = await get(url)
            if status == 200:
                return body
            assert loop.time() - start < limit, f"{url} not ready"
            await asyncio.sleep(0.1)

    cli("namespace", "enable", "default")
    (tmp_path / "node-b.token").write_text(cli("node", "join", "node-b").strip())
    grpc_port, mon_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    host = f"127.{NET}.40.1"
    ready_port, admin_port = free_port(host), free_port(host)
    procs = []
    try:
        procs.append(await asyncio.create_subprocess_exec(
            *ambit, "controller", "--data-dir", str(tmp_path / "data"), "--listen-host",
            "127.0.0.1", "--grpc-port", str(grpc_port), "--monitoring-host", "127.0.0.1",
            "--monitoring-port", str(mon_port), env=env, stderr=subprocess.DEVNULL))
        await wait_http(f"http://127.0.0.1:{mon_port}/ready")
        procs.append(await asyncio.create_subprocess_exec(
            *ambit, "ztunnel", "--node", "node-b", "--controller", f"localhost:{grpc_port}",
            "--node-token-file", str(tmp_path / "node-b.token"), "--ca-root-cert",
            str(tmp_path / "data" / "trust-bundle.pem"), "--inbound-bind", "workload",
            "--outbound-port", "0", "--no-transparent", "--admin-host", host, "--admin-port",
            str(admin_port), "--stats-host", host, "--metrics-port", str(free_port(host)),
            "--readiness-port", str(ready_port), env=env, stderr=subprocess.DEVNULL))
        await wait_http(f"http://{host}:{ready_port}/healthz/ready")
        cli("workload", "add", "--name", "echo", "--namespace", "default", "--node", "node-b",
            "--ip", ECHO_IP, "--service-account", "echo")
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            dump = json.loads(await wait_http(f"http://{host}:{admin_port}/config_dump"))
            names = {w["name"] for w in dump["workloads"]}
            certs = {c["identity"] for c in dump["certificates"]}
            if "echo" in names and f"spiffe://{TD}/ns/default/sa/echo" in certs:
                break
            assert loop.time() - start < 10, dump
            await asyncio.sleep(0.1)
        _, metrics = await get(f"http://{host}:{ready_port}/metrics")
        assert b"ambit_xds_connected 1.0" in metrics
    finally:
        for proc in reversed(procs):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    assert await asyncio.wait_for(proc.wait(), 10) == 0
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                    raise

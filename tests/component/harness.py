"""Two ztunnels, an echo server and a SOCKS5 client, all in one asyncio loop on loopback.

Each "pod" is a 127.0.x.y address (all of 127/8 is local), so ztunnel B can open 15008 on the
echo pod's own IP (per-workload listeners) and ztunnel A dials it exactly as it would dial a
remote pod. Nothing leaves the loopback interface.

Certificates come from an identity directory, or (``use_ca=True``) from a real gRPC mesh CA on
loopback (``CaServer``) that knows which identities run on which node.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from prometheus_client import CollectorRegistry

from controller.ca import (
    DEFAULT_WORKLOAD_TTL,
    CertificateAuthority,
    write_identity,
    write_trust_bundle,
)
from controller.ca_service import CertificateService
from mesh.spiffe import SpiffeId
from tests.ca_fakes import InMemoryNodeDirectory
from ztunnel.app import Ztunnel
from ztunnel.ca_client import CaSecretManager
from ztunnel.config import ZtunnelConfig

# A random 127.N.0.0/16 per test process, so parallel runs on one machine never collide.
NET = random.Random(os.getpid()).randrange(16, 250)
CLIENT_IP = f"127.{NET}.10.1"
OTHER_CLIENT_IP = f"127.{NET}.10.2"
ECHO_IP = f"127.{NET}.20.1"
SERVICE_VIP = f"127.{NET}.96.10"
ECHO_PORT = 8080
TD = "cluster.local"


def base_state() -> dict[str, Any]:
    return {
        "trustDomain": TD,
        "workloads": [
            {"name": "client", "namespace": "default", "serviceAccount": "client",
             "node": "node-a", "addresses": [CLIENT_IP], "labels": {"app": "client"}},
            {"name": "other", "namespace": "other", "serviceAccount": "other",
             "node": "node-a", "addresses": [OTHER_CLIENT_IP], "labels": {"app": "other"}},
            {"name": "echo", "namespace": "default", "serviceAccount": "echo",
             "node": "node-b", "addresses": [ECHO_IP], "labels": {"app": "echo"}},
        ],
        "services": [
            {"name": "echo", "namespace": "default", "vips": [SERVICE_VIP],
             "selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": ECHO_PORT}]},
        ],
    }


def write_certs(root: Path, identities: list[tuple[str, str]]) -> CertificateAuthority:
    ca = CertificateAuthority.generate(TD)
    write_trust_bundle(root, ca)
    for ns, sa in identities:
        ident = SpiffeId(TD, ns, sa)
        write_identity(root, ident, ca.issue(ident))
    return ca


class CaServer:
    """The controller's CA on loopback (plaintext gRPC), with an in-memory node directory
    mirroring ``base_state()``: node-a runs client and other, node-b runs echo."""

    def __init__(self, tmp: Path, host: str, ttl: dt.timedelta = DEFAULT_WORKLOAD_TTL) -> None:
        self.ca = CertificateAuthority.generate(TD)
        self.directory = InMemoryNodeDirectory()
        self.token_files: dict[str, Path] = {}
        for node, idents in (("node-a", [("default", "client"), ("other", "other")]),
                             ("node-b", [("default", "echo")])):
            token = f"token-{node}-{os.urandom(8).hex()}"
            self.directory.add(node, token, *(SpiffeId(TD, ns, sa) for ns, sa in idents))
            path = tmp / f"{node}.token"
            path.write_text(token + "\n")
            self.token_files[node] = path
        self.registry = CollectorRegistry()
        self.service = CertificateService(self.ca, TD, self.directory, self.directory,
                                          self.registry, default_ttl=ttl,
                                          max_ttl=max(ttl, DEFAULT_WORKLOAD_TTL))
        self.address = f"{host}:{free_port(host)}"
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Serve (again, after ``stop``) on the same address with the same root."""
        self.server = grpc.aio.server()
        self.service.add_to_server(self.server)
        if not self.server.add_insecure_port(self.address):
            raise OSError(f"cannot listen on {self.address}")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None

    def count(self, result: str) -> float:
        v = self.registry.get_sample_value("ambit_ca_requests_total", {"result": result})
        return v or 0.0


class EchoServer:
    """Echoes everything; counts bytes and remembers peers."""

    def __init__(self) -> None:
        self.received = 0
        self.peers: list[str] = []
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[0])
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def start(self, host: str = ECHO_IP, port: int = ECHO_PORT) -> None:
        self.server = await asyncio.start_server(self._handle, host, port, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)


async def socks_connect(proxy: tuple[str, int], dest: tuple[str, int], source: str) \
        -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a SOCKS5 CONNECT through ``proxy`` from local address ``source``."""
    reader, writer = await asyncio.open_connection(proxy[0], proxy[1], local_addr=(source, 0))
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    ip = ipaddress.ip_address(dest[0])
    writer.write(b"\x05\x01\x00\x01" + ip.packed + struct.pack("!H", dest[1]))
    rep = await reader.readexactly(10)
    if rep[1] != 0:
        raise ConnectionRefusedError(f"SOCKS5 reply {rep[1]}")
    return reader, writer


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   payload: bytes) -> bytes:
    """Send ``payload``, half-close, read everything back."""
    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    chunks = []
    while data := await reader.read(262144):
        chunks.append(data)
    await sender
    writer.close()
    return b"".join(chunks)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Mesh:
    """Ztunnel A (node-a, SOCKS5 for the clients) and ztunnel B (node-b, hosts echo)."""

    def __init__(self, tmp: Path, state: dict[str, Any] | None = None, use_ca: bool = False,
                 ca_ttl: dt.timedelta = DEFAULT_WORKLOAD_TTL) -> None:
        self.tmp = tmp
        self.ids = tmp / "ids"
        self.state_a = tmp / "state-a.yaml"
        self.state_b = tmp / "state-b.yaml"
        self.write_state(state or base_state())
        self.ca: CaServer | None = None
        if use_ca:
            self.ca = CaServer(tmp, f"127.{NET}.40.1", ca_ttl)
        else:
            write_certs(self.ids, [("default", "client"), ("other", "other"),
                                   ("default", "echo")])
        host_a, host_b = f"127.{NET}.10.254", f"127.{NET}.20.254"
        self.socks = (host_a, free_port(host_a))
        self.a = Ztunnel(self._config("node-a", host_a, self.state_a,
                                      socks5_port=self.socks[1], socks5_host=self.socks[0]))
        self.b = Ztunnel(self._config("node-b", host_b, self.state_b))
        for zt in (self.a, self.b):
            if isinstance(zt.secrets, CaSecretManager):  # retry quickly in tests
                zt.secrets.backoff_initial, zt.secrets.backoff_max = 0.1, 1.0
        self.echo = EchoServer()

    def write_state(self, state: dict[str, Any], which: str = "ab") -> None:
        for w in which:
            path = self.state_a if w == "a" else self.state_b
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(state))
            tmp.replace(path)

    def _config(self, node: str, host: str, state: Path, **kw: Any) -> ZtunnelConfig:
        if self.ca is not None:
            kw.update(ca_address=self.ca.address, node_token_file=self.ca.token_files[node])
        else:
            kw.update(identity_dir=self.ids)
        return ZtunnelConfig(
            node=node, state_file=state, inbound_bind="workload",
            bind_host=host, outbound_port=0, admin_host=host, admin_port=free_port(host),
            stats_host=host, metrics_port=free_port(host), readiness_port=free_port(host),
            transparent=False, socket_mark=0, reload_interval=0.05,
            access_log=os.environ.get("AMBIT_TEST_ACCESS_LOG", ""),
            # The pods here are 127.N addresses: judged like pod addresses, while every other
            # loopback address (127.0.0.1 above all) stays the node and is refused.
            loopback_pods=True,
            drain_seconds=1.0, **kw,
        ).validate()

    async def __aenter__(self) -> Mesh:
        if self.ca is not None:
            await self.ca.start()
        await self.echo.start()
        await self.a.start()
        await self.b.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.a.shutdown()
        await self.b.shutdown()
        await self.echo.stop()
        if self.ca is not None:
            await self.ca.stop()

    async def connect(self, dest: tuple[str, int] = (ECHO_IP, ECHO_PORT),
                      source: str = CLIENT_IP) -> tuple[asyncio.StreamReader,
                                                        asyncio.StreamWriter]:
        return await socks_connect(self.socks, dest, source)


def sample(zt: Ztunnel, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for family in zt.metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@contextlib.asynccontextmanager
async def mesh(tmp: Path, state: dict[str, Any] | None = None,
               **kw: Any) -> AsyncIterator[Mesh]:
    async with Mesh(tmp, state, **kw) as m:
        yield m

"""Two ztunnels, an echo server and a SOCKS5 client, all in one asyncio loop on loopback.

Each "pod" is a 127.0.x.y address (all of 127/8 is local), so ztunnel B can open 15008 on the
echo pod's own IP (per-workload listeners) and ztunnel A dials it exactly as it would dial a
remote pod. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from ambit.spiffe import SpiffeId
from controller.ca import CertificateAuthority, write_identity, write_trust_bundle
from ztunnel.app import Ztunnel
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

    def __init__(self, tmp: Path, state: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.ids = tmp / "ids"
        self.state_a = tmp / "state-a.yaml"
        self.state_b = tmp / "state-b.yaml"
        self.write_state(state or base_state())
        write_certs(self.ids, [("default", "client"), ("other", "other"),
                               ("default", "echo")])
        host_a, host_b = f"127.{NET}.10.254", f"127.{NET}.20.254"
        self.socks = (host_a, free_port(host_a))
        self.a = Ztunnel(self._config("node-a", host_a, self.state_a,
                                      socks5_port=self.socks[1], socks5_host=self.socks[0]))
        self.b = Ztunnel(self._config("node-b", host_b, self.state_b))
        self.echo = EchoServer()

    def write_state(self, state: dict[str, Any], which: str = "ab") -> None:
        for w in which:
            path = self.state_a if w == "a" else self.state_b
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(state))
            tmp.replace(path)

    def _config(self, node: str, host: str, state: Path, **kw: Any) -> ZtunnelConfig:
        return ZtunnelConfig(
            node=node, state_file=state, identity_dir=self.ids, inbound_bind="workload",
            bind_host=host, outbound_port=0, admin_host=host, admin_port=free_port(host),
            stats_host=host, metrics_port=free_port(host), readiness_port=free_port(host),
            transparent=False, socket_mark=0, reload_interval=0.05,
            access_log=os.environ.get("AMBIT_TEST_ACCESS_LOG", ""),
            drain_seconds=1.0, **kw,
        ).validate()

    async def __aenter__(self) -> Mesh:
        await self.echo.start()
        await self.a.start()
        await self.b.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.a.shutdown()
        await self.b.shutdown()
        await self.echo.stop()

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
async def mesh(tmp: Path, state: dict[str, Any] | None = None) -> AsyncIterator[Mesh]:
    async with Mesh(tmp, state) as m:
        yield m

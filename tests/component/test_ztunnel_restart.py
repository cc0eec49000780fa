"""A ztunnel restart loses no connection (issue 15): the node agent keeps the capture
listeners, the next ztunnel takes the very same sockets over, and one started beside a running
one supersedes it only once ready.

Two ``Ztunnel`` objects in this process stand for the old and the new process, with the agent's
link server (``ZtunnelLinkServer``, peer check off) between them. Their capture handlers are
replaced by one that answers with the ztunnel's tag, so a client can tell who accepted it. The
whole restart on real nodes, under load, is ``tests/e2e/test_cluster.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import pytest
import yaml

from agent.ztunnel_link import PEER_CHECK_OFF, ZtunnelLinkServer
from tests.component.harness import free_port, write_certs
from ztunnel.app import Ztunnel
from ztunnel.config import ZtunnelConfig

pytestmark = pytest.mark.timeout(60)

NET = random.Random(os.getpid() + 15).randrange(16, 250)
HOST = f"127.{NET}.50.1"


class Tagged(Ztunnel):
    """A ztunnel whose capture listeners answer every connection with ``<tag> <listener>``."""

    def __init__(self, config: ZtunnelConfig, tag: str) -> None:
        super().__init__(config)
        self.tag = tag
        self.superseded = asyncio.Event()
        self.on_superseded = self.superseded.set

    def _capture_handlers(self) -> dict[str, Callable[[socket.socket], Awaitable[None]]]:
        def answer(name: str) -> Callable[[socket.socket], Awaitable[None]]:
            async def handle(sock: socket.socket) -> None:
                await asyncio.get_running_loop().sock_sendall(
                    sock, f"{self.tag} {name}\n".encode())
            return handle

        return {n: answer(n) for n in ("outbound", "inbound_plaintext", "inbound")}


class Node:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.path = tmp / "ztunnel.sock"
        self.ports = {n: free_port(HOST) for n in
                      ("outbound", "inbound_plaintext", "inbound", "admin", "metrics")}
        (tmp / "state.yaml").write_text(yaml.safe_dump({"workloads": []}))
        write_certs(tmp / "ids", [("default", "client")])
        self.registered: list[Mapping[str, int]] = []

    def ztunnel(self, tag: str, workers: int = 1) -> Tagged:
        p = self.ports
        return Tagged(ZtunnelConfig(
            node="n1", state_file=self.tmp / "state.yaml", identity_dir=self.tmp / "ids",
            inbound_bind="shared", bind_host=HOST, outbound_port=p["outbound"],
            inbound_plaintext_port=p["inbound_plaintext"], inbound_port=p["inbound"],
            admin_host=HOST, admin_port=p["admin"], stats_host=HOST,
            metrics_port=p["metrics"], readiness_port=p["metrics"], transparent=False,
            socket_mark=0, agent_socket=self.path, access_log="", drain_seconds=1.0,
            workers=workers).validate(), tag)

    def agent(self, hold: float = 30.0) -> ZtunnelLinkServer:
        async def on_listeners(fds: Mapping[str, int], _pid: int) -> None:
            self.registered.append(dict(fds))

        return ZtunnelLinkServer(self.path, on_listeners, peer_check=PEER_CHECK_OFF,
                                 hold_seconds=hold)


async def ask(port: int, patience: float = 5.0) -> str:
    """Connect to a capture port; the tag of the ztunnel that answered."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), patience)
    try:
        return (await asyncio.wait_for(reader.readline(), patience)).decode().strip()
    finally:
        writer.close()


async def until(predicate: Callable[[], object], what: str, limit: float = 10.0) -> None:
    for _ in range(int(limit / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} not reached within {limit:g}s")


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


@contextlib.asynccontextmanager
async def running(zt: Ztunnel) -> AsyncIterator[Ztunnel]:
    await zt.start()
    try:
        yield zt
    finally:
        await zt.shutdown()


async def test_a_new_ztunnel_takes_the_same_sockets_and_supersedes_the_old(
        tmp_path: Path) -> None:
    node = Node(tmp_path)
    agent = node.agent()
    await agent.start()
    old, new = node.ztunnel("old"), node.ztunnel("new")
    try:
        await old.start()
        await until(lambda: agent.ztunnel_pid is not None, "the old ztunnel registered")
        assert agent.held is not None and agent.held.counts() == {
            "outbound": 1, "inbound_plaintext": 1, "inbound": 1}
        assert await ask(node.ports["inbound"]) == "old inbound"
        sockets = {n: inode(s[0]) for n, s in old.capture.items()}
        # The new one starts beside it: no "address in use", the very same sockets.
        await new.start()
        assert {n: [inode(s) for s in socks] for n, socks in new.taken.items()} == \
            {n: [i] for n, i in sockets.items()}
        assert agent.takeovers == 1
        # Ready (its state file loaded), it registers; the agent tells the old one.
        await asyncio.wait_for(old.superseded.wait(), 10)
        assert old.superseded_by == os.getpid()
        assert len(node.registered) == 2
        # The old one drains (as ``serve`` does when superseded): it lets go of its admin
        # and metrics ports at once, and the new one opens them.
        draining = asyncio.create_task(old.shutdown())
        await until(lambda: "admin" in new.listeners and "metrics" in new.listeners,
                    "the new ztunnel to open the ports the old one let go")
        for port in ("outbound", "inbound_plaintext", "inbound"):
            assert await ask(node.ports[port]) == f"new {port}"
        await draining
        assert await ask(node.ports["inbound"]) == "new inbound"
    finally:
        await old.shutdown()
        await new.shutdown()
        await agent.close()


async def test_connections_queued_while_no_ztunnel_runs_are_served_by_the_next(
        tmp_path: Path) -> None:
    node = Node(tmp_path)
    agent = node.agent()
    await agent.start()
    try:
        async with running(node.ztunnel("first")):
            await until(lambda: agent.ztunnel_pid is not None, "the first ztunnel registered")
        # It drained and left the link; the agent keeps its listeners, so the kernel still
        # completes handshakes: the connections wait in the accept queue.
        await until(lambda: agent.ztunnel_pid is None, "the agent to see the ztunnel go")
        assert agent.held_status() is not None
        waiting = [asyncio.create_task(ask(node.ports["outbound"], 20)) for _ in range(20)]
        await asyncio.sleep(0.3)
        assert not any(t.done() for t in waiting)
        async with running(node.ztunnel("second")):
            assert await asyncio.wait_for(asyncio.gather(*waiting), 10) == \
                ["second outbound"] * 20
    finally:
        await agent.close()


async def test_without_a_ztunnel_the_agent_lets_the_listeners_go_after_the_hold(
        tmp_path: Path) -> None:
    node = Node(tmp_path)
    agent = node.agent(hold=0.3)
    await agent.start()
    try:
        async with running(node.ztunnel("only")):
            await until(lambda: agent.ztunnel_pid is not None, "the ztunnel registered")
        await until(lambda: agent.held is None, "the agent to let the listeners go", 5)
        with pytest.raises(ConnectionRefusedError):  # fail closed again, as before
            await ask(node.ports["outbound"])
        # The next ztunnel binds its own.
        async with running(node.ztunnel("fresh")) as zt:
            assert zt.taken == {}
            await until(lambda: agent.ztunnel_pid is not None, "the fresh one registered")
            assert await ask(node.ports["outbound"]) == "fresh outbound"
    finally:
        await agent.close()


async def test_a_worker_group_is_kept_and_handed_over_whole(tmp_path: Path) -> None:
    """A ztunnel with worker processes registers every member of each SO_REUSEPORT group;
    the SOCKMAP gets the first, the next ztunnel gets them all back."""
    from mesh.listener import bind_group
    from ztunnel.agent_link import AgentLink, take_listeners

    node = Node(tmp_path)
    agent = node.agent()
    await agent.start()
    groups = {n: bind_group(HOST, node.ports[n], 2) for n in
              ("outbound", "inbound_plaintext", "inbound")}
    link = AgentLink(node.path, groups)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.registered.wait(), 5)
        assert list(node.registered[-1]) == list(groups)  # one per name: the SOCKMAP's
        assert agent.held is not None
        assert agent.held.counts() == {"outbound": 2, "inbound_plaintext": 2, "inbound": 2}
        task.cancel()
        taken = await take_listeners(node.path, {n: node.ports[n] for n in groups})
        assert {n: sorted(map(inode, s)) for n, s in taken.items()} == \
            {n: sorted(map(inode, g)) for n, g in groups.items()}
        # A ztunnel configured with other ports refuses them (and binds its own).
        other = await take_listeners(node.path, {"outbound": node.ports["inbound"],
                                                 "inbound": node.ports["outbound"]})
        assert other == {}
        for socks in taken.values():
            for s in socks:
                s.close()
    finally:
        task.cancel()
        await agent.close()
        for g in groups.values():
            for s in g:
                s.close()

"""The ztunnel hands its capture listeners to the node agent over a Unix socket (SCM_RIGHTS),
and does it again after the agent restarts. The ztunnel here is this test process, not an
``ambit ztunnel``: the peer's command line is not checked (tests/component/test_unix_sockets.py
covers that check)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from agent.ztunnel_link import PEER_CHECK_OFF, ZtunnelLinkServer
from ztunnel.agent_link import AgentLink


async def test_listeners_cross_and_are_resent_after_an_agent_restart(tmp_path: Path) -> None:
    path = tmp_path / "ztunnel.sock"
    listeners = {}
    for name in ("outbound", "inbound"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        listeners[name] = s
    received: list[dict[str, tuple[str, int]]] = []

    async def on_listeners(fds: Mapping[str, int], pid: int) -> None:
        assert pid == os.getpid()
        seen = {}
        for name, fd in fds.items():
            # The agent got real descriptors of the very same sockets.
            dup = socket.socket(fileno=os.dup(fd))
            seen[name] = dup.getsockname()
            dup.close()
        received.append(seen)

    link = AgentLink(path, listeners, backoff_initial=0.05, backoff_max=0.1)
    task = asyncio.create_task(link.run())
    server = ZtunnelLinkServer(path, on_listeners, peer_check=PEER_CHECK_OFF)
    try:
        await server.start()
        await asyncio.wait_for(link.registered.wait(), 5)
        expected = {n: s.getsockname() for n, s in listeners.items()}
        assert received == [expected]
        assert server.ztunnel_pid == os.getpid()
        # The agent restarts: the ztunnel notices and registers again with the new one.
        await server.close()
        await asyncio.sleep(0.1)
        server = ZtunnelLinkServer(path, on_listeners, peer_check=PEER_CHECK_OFF)
        await server.start()
        for _ in range(100):
            if len(received) == 2 and link.registered.is_set():
                break
            await asyncio.sleep(0.05)
        assert received == [expected, expected]
    finally:
        task.cancel()
        await server.close()
        for s in listeners.values():
            s.close()


async def test_a_bad_registration_is_refused_and_the_server_keeps_serving(tmp_path: Path) \
        -> None:
    path = tmp_path / "ztunnel.sock"
    calls = []

    async def on_listeners(fds: Mapping[str, int], pid: int) -> None:
        calls.append(dict(fds))

    server = ZtunnelLinkServer(path, on_listeners, peer_check=PEER_CHECK_OFF)
    await server.start()
    try:
        r, w = await asyncio.open_unix_connection(str(path))
        w.write(b'{"listeners": ["outbound"]}\n')  # a name but no descriptor
        await w.drain()
        answer = await asyncio.wait_for(r.readline(), 5)
        assert b'"ok": false' in answer and b"descriptor" in answer
        w.close()
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        link = AgentLink(path, {"outbound": s})
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.registered.wait(), 5)
        task.cancel()
        s.close()
        assert len(calls) == 1
    finally:
        await server.close()

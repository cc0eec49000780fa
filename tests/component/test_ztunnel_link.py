"""The ztunnel hands its capture listeners to the node agent over a Unix socket (SCM_RIGHTS),
and does it again after the agent restarts. The ztunnel here is this test process, not an
``ambit ztunnel``: the peer's command line is not checked (tests/component/test_unix_sockets.py
covers that check)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

import pytest

from agent.capture.base import LISTENER_SLOTS
from agent.ztunnel_link import PEER_CHECK_OFF, ZtunnelLinkServer
from ztunnel.agent_link import AgentLink


def listening() -> dict[str, socket.socket]:
    """The ztunnel's capture listeners: one listening TCP socket per slot name."""
    out = {}
    for name in LISTENER_SLOTS:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        out[name] = s
    return out


async def test_listeners_cross_and_are_resent_after_an_agent_restart(tmp_path: Path) -> None:
    path = tmp_path / "ztunnel.sock"
    listeners = listening()
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
        names = json.dumps({"listeners": list(LISTENER_SLOTS)})
        w.write(names.encode() + b"\n")  # the names but no descriptors
        await w.drain()
        answer = await asyncio.wait_for(r.readline(), 5)
        assert b'"ok": false' in answer and b"3 listener name(s) but 0 descriptor(s)" in answer
        w.close()
        listeners = listening()
        link = AgentLink(path, listeners)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.registered.wait(), 5)
        task.cancel()
        for s in listeners.values():
            s.close()
        assert len(calls) == 1
    finally:
        await server.close()


async def test_a_flood_of_bad_registrations_is_no_log_flood(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ztunnel.sock"

    async def on_listeners(fds: Mapping[str, int], pid: int) -> None:
        raise AssertionError("a bad registration reached the SOCKMAP")

    server = ZtunnelLinkServer(path, on_listeners, peer_check=PEER_CHECK_OFF)
    await server.start()
    try:
        with caplog.at_level(logging.WARNING, logger="agent.ztunnel_link"):
            for _ in range(100):
                reply = await register_raw(path, [], [])
                assert reply["ok"] is False and "no listeners" in str(reply["error"])
    finally:
        await server.close()
    lines = [r.getMessage() for r in caplog.records if "ztunnel link" in r.getMessage()]
    assert len(lines) == 1, lines  # the rest are counted, not logged
    assert server.bad_messages.total == 100


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def register_raw(path: Path, names: list[str], fds: list[int]) -> dict[str, object]:
    """One registration as the ztunnel sends it, on a connection of its own; the answer."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, str(path))
        socket.send_fds(sock, [json.dumps({"listeners": names}).encode() + b"\n"], fds)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            assert chunk, "the agent closed the link without answering"
            answer += chunk
    reply: dict[str, object] = json.loads(answer)
    return reply


async def test_bad_listener_sets_are_refused_and_the_registration_in_place_stays(
        tmp_path: Path) -> None:
    path = tmp_path / "ztunnel.sock"
    calls: list[tuple[dict[str, int], int]] = []

    async def on_listeners(fds: Mapping[str, int], pid: int) -> None:
        calls.append((dict(fds), pid))

    server = ZtunnelLinkServer(path, on_listeners, peer_check=PEER_CHECK_OFF)
    await server.start()
    listeners = listening()
    link = AgentLink(path, listeners)
    task = asyncio.create_task(link.run())
    unlistened = socket.socket()
    unlistened.bind(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r, w = os.pipe()
    try:
        await asyncio.wait_for(link.registered.wait(), 5)
        assert len(calls) == 1 and server.ztunnel_pid == os.getpid()
        good = [listeners[n].fileno() for n in LISTENER_SLOTS]
        names = list(LISTENER_SLOTS)
        cases: list[tuple[list[str], list[int], str]] = [
            ([], [], "no listeners (it would empty every SOCKMAP slot)"),
            (["outbound"], good[:1], "missing: inbound, inbound_plaintext"),
            ([*names, "socks5"], [*good, good[0]], "unknown: socks5"),
            (names, [good[0], unlistened.fileno(), good[2]],
             "inbound: a TCP socket that is not listening"),
            (names, [good[0], good[1], udp.fileno()], "inbound_plaintext: not a TCP socket"),
            (names, [r, good[1], good[2]], "outbound: the descriptor is not a socket"),
        ]
        for bad_names, fds, problem in cases:
            before = open_fds()
            reply = await register_raw(path, bad_names, fds)
            assert reply["ok"] is False, bad_names
            assert problem in str(reply["error"]), reply
            # The descriptors the agent received are closed again (with the connection, just
            # after the answer).
            for _ in range(100):
                if open_fds() <= before:
                    break
                await asyncio.sleep(0.02)
            assert open_fds() <= before, bad_names
        # Nothing reached the SOCKMAP; the ztunnel's registration is still the current one.
        assert len(calls) == 1
        assert server.ztunnel_pid == os.getpid() and link.registered.is_set()
        assert server.registrations == 1
    finally:
        task.cancel()
        await server.close()
        for s in [*listeners.values(), unlistened, udp]:
            s.close()
        os.close(r)
        os.close(w)

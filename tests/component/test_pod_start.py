"""Pod start (issue 19 item 1): the agent hands a new mesh pod's workload to the ztunnel over
their link before CNI ADD returns, and the ztunnel holds a captured connection from a source it
does not know yet until the state names it (bounded).

The link runs over a real Unix socket between the agent's server and the ztunnel's client in
this process (peer check off: the ztunnel here is not an ``ambit ztunnel`` process); the hold
runs in the two-ztunnel loopback mesh of ``harness.py``, with capture stood in for by a listener
on the destination's address that hands connections from the pods to the outbound handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.capture.base import LISTENER_SLOTS, BackendStatus, PodCapture, PodCounters
from agent.cni_server import CniRequest
from agent.config import AgentConfig
from agent.membership import Answer
from agent.ztunnel_link import PEER_CHECK_OFF, LinkUnavailable, ZtunnelLinkServer
from mesh.listener import Listener, bind_socket
from mesh.state.model import MeshConfig, Protocol, Workload
from mesh.state.store import OverlayStateStore
from tests.component.harness import NET, OTHER_CLIENT_IP, Mesh, base_state, sample
from tests.component.waiting import until
from ztunnel.agent_link import AgentLink, LinkRequest, PodAdded, PodDeleted
from ztunnel.listeners import outbound

wait_for = partial(until, limit=5.0, interval=0.02)
NODE = "node-1"
POD_IP = "10.244.1.7"


def listening() -> dict[str, socket.socket]:
    out = {}
    for name in LISTENER_SLOTS:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        out[name] = s
    return out


class FakeZtunnel:
    """The ztunnel's side as ``Ztunnel.on_agent_request`` does it, on a real store."""

    def __init__(self) -> None:
        self.store = OverlayStateStore()

    def on_request(self, request: LinkRequest) -> None:
        if isinstance(request, PodDeleted):
            self.store.remove_provisional(request.uid)
        else:
            self.store.add_provisional(request.workload, time.time())

    def knows(self, ip: str) -> Workload | None:
        return self.store.current.workload_by_ip(ipaddress.ip_address(ip))


@contextlib.asynccontextmanager
async def linked(path: Path, server: ZtunnelLinkServer, zt: FakeZtunnel, node: str = NODE) \
        -> AsyncIterator[AgentLink]:
    listeners = listening()
    link = AgentLink(path, listeners, backoff_initial=0.05, backoff_max=0.1, node=node,
                     on_request=zt.on_request)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.registered.wait(), 5)
        await wait_for(lambda: server.ztunnel_pid is not None, "the link registered")
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for s in listeners.values():
            s.close()


def workload_doc(name: str = "web", ip: str = POD_IP, node: str = NODE) -> dict[str, Any]:
    return {"uid": f"default/{name}", "name": name, "namespace": "default",
            "serviceAccount": f"{name}-sa", "node": node, "addresses": [ip],
            "labels": {"app": name}}


async def test_pod_added_is_in_the_store_when_the_request_returns(tmp_path: Path) -> None:
    path = tmp_path / "ztunnel.sock"

    async def on_listeners(_fds: Any, _pid: int) -> None:
        pass

    server = ZtunnelLinkServer(path, on_listeners, peer_check=PEER_CHECK_OFF)
    await server.start()
    zt = FakeZtunnel()
    try:
        async with linked(path, server, zt) as link:
            await server.request({"op": "pod_added", "workload": workload_doc()}, 2)
            w = zt.knows(POD_IP)  # no wait: it is there when the answer came
            assert w is not None and str(w.identity).endswith("/ns/default/sa/web-sa")
            assert w.protocol is Protocol.HBONE and not w.healthy
            # Many at once, answered each by its id.
            await asyncio.gather(*(server.request(
                {"op": "pod_added", "workload": workload_doc(f"p{i}", f"10.244.1.{100 + i}")},
                2) for i in range(50)))
            assert all(zt.knows(f"10.244.1.{100 + i}") for i in range(50))
            # Refused with the ztunnel's reason: another node's pod.
            with pytest.raises(LinkUnavailable, match="not this ztunnel's node"):
                await server.request({"op": "pod_added",
                                      "workload": workload_doc("x", node="node-9")}, 2)
            # Too big to send: refused before it is sent, with the reason.
            fat = workload_doc("fat")
            fat["labels"] = {f"k{i}": "v" * 60 for i in range(300)}
            with pytest.raises(LinkUnavailable, match="limit"):
                await server.request({"op": "pod_added", "workload": fat}, 2)
            await server.request({"op": "pod_deleted", "uid": "default/web"}, 2)
            assert zt.knows(POD_IP) is None
            assert link.requests == 52 and link.refused == 1
    finally:
        await server.close()


async def test_without_a_linked_ztunnel_the_request_fails_in_time(tmp_path: Path) -> None:
    async def on_listeners(_fds: Any, _pid: int) -> None:
        pass

    server = ZtunnelLinkServer(tmp_path / "ztunnel.sock", on_listeners,
                               peer_check=PEER_CHECK_OFF)
    await server.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(LinkUnavailable, match="no ztunnel has registered"):
            await server.request({"op": "pod_added", "workload": workload_doc()}, 0.3)
        assert time.monotonic() - t0 < 1.0
    finally:
        await server.close()


async def test_a_ztunnel_that_never_answers_fails_the_request_in_time(tmp_path: Path) -> None:
    path = tmp_path / "ztunnel.sock"

    async def on_listeners(_fds: Any, _pid: int) -> None:
        pass

    server = ZtunnelLinkServer(path, on_listeners, peer_check=PEER_CHECK_OFF)
    await server.start()
    loop = asyncio.get_running_loop()
    listeners = listening()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # a ztunnel of the old kind: registers, then reads and ignores everything
        sock.setblocking(False)
        await loop.sock_connect(sock, str(path))
        socket.send_fds(sock, [b'{"listeners": ["outbound", "inbound", '
                               b'"inbound_plaintext"]}\n'],
                        [listeners[n].fileno() for n in ("outbound", "inbound",
                                                         "inbound_plaintext")])
        assert b'"ok": true' in await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
        with pytest.raises(LinkUnavailable, match=r"did not answer pod_added within 0\.3s"):
            await server.request({"op": "pod_added", "workload": workload_doc()}, 0.3)
    finally:
        sock.close()
        for s in listeners.values():
            s.close()
        await server.close()


# -- the agent's ADD -----------------------------------------------------------------------


class Backend:
    mode = "iptables"

    def __init__(self) -> None:
        self.captured: set[str] = set()

    def watch_interface(self, pod: PodCapture) -> None:
        pass

    def enroll(self, pod: PodCapture) -> None:
        self.captured |= set(pod.ips)

    def unenroll(self, pod: PodCapture) -> None:
        self.captured -= set(pod.ips)

    def forget_interface(self, pod: PodCapture) -> None:
        pass

    def enrolled(self) -> set[str]:
        return set(self.captured)

    def set_listeners(self, fds: Any) -> None:
        pass

    def counters(self) -> dict[str, PodCounters]:
        return {}

    def status(self) -> BackendStatus:
        return BackendStatus(self.mode)


class Membership:
    async def ask(self, namespace: str, name: str) -> Answer:
        return Answer(True, True, "namespace is ambient", f"{name}-sa", (("app", name),), "")

    async def close(self) -> None:
        pass


def add(name: str, ip: str) -> CniRequest:
    return CniRequest("add", f"c-{name}", f"/var/run/netns/{name}", "eth0", name, "default",
                      "", (ip,), f"veth-{name}")


def delete(name: str) -> CniRequest:
    return CniRequest("del", f"c-{name}", "", "eth0", "", "", "", (), "")


async def test_cni_add_returns_once_the_ztunnel_knows_the_pod(tmp_path: Path) -> None:
    config = AgentConfig(node=NODE, controller_address="c:1", run_dir=tmp_path,
                         ztunnel_peer_check=PEER_CHECK_OFF, ztunnel_handoff_timeout=0.5)
    backend = Backend()
    agent = Agent(config, backend, "test", initial_uplinks=("eth0",))  # type: ignore[arg-type]
    agent.membership = Membership()  # type: ignore[assignment]
    await agent.link.start()
    zt = FakeZtunnel()
    agent.setup_done = True
    agent.store.replace(MeshConfig())
    try:
        # Not ready without the ztunnel, in iptables mode too: ADD of a mesh pod needs it.
        assert agent.ready() == (False, "waiting for the ztunnel to link (hand over its "
                                 "listeners)")
        # No ztunnel linked: ADD fails closed (the kubelet retries), nothing captured.
        answer = await agent.handle_cni(add("early", "10.244.1.5"))
        assert not answer["ok"] and "no ztunnel has registered" in answer["error"]
        assert "kubelet will retry" in answer["error"] and backend.captured == set()
        async with linked(config.ztunnel_socket, agent.link, zt):
            assert agent.ready() == (True, "ready")
            answer = await agent.handle_cni(add("web", POD_IP))
            assert answer["ok"] and answer["captured"]
            w = zt.knows(POD_IP)  # known when ADD returned, with the registry's identity
            assert w is not None and w.uid == "default/web" and w.service_account == "web-sa"
            assert w.labels == (("app", "web"),) and POD_IP in backend.captured
            # DEL (which may come without the pod's name) drops the provisional workload.
            assert (await agent.handle_cni(delete("web")))["ok"]
            assert zt.knows(POD_IP) is None
    finally:
        await agent.link.close()
        agent._kernel_pool.shutdown()


# -- hold ----------------------------------------------------------------------------------

NEW_IP = f"127.{NET}.10.7"  # the new pod, in no state yet
LEGACY_IP, LEGACY_PORT = f"127.{NET}.61.1", 7072  # outside the mesh: passthrough target


def new_pod() -> dict[str, Any]:
    return {"name": "newpod", "namespace": "default", "serviceAccount": "newpod",
            "node": "node-a", "addresses": [NEW_IP]}


def state_with(*extra: dict[str, Any]) -> dict[str, Any]:
    state = base_state()
    state["workloads"] += [{"name": "legacy", "namespace": "default", "node": "node-b",
                            "addresses": [LEGACY_IP], "protocol": "TCP"}, *extra]
    return state


@contextlib.asynccontextmanager
async def captured(handle: Callable[[socket.socket], Awaitable[None]]) -> AsyncIterator[None]:
    """Capture without capture: connections from the pods to LEGACY go to ``handle``; the
    ztunnel's own (passthrough) connection is echoed."""
    async def echo(sock: socket.socket) -> None:
        r, w = await asyncio.open_connection(sock=sock)
        while data := await r.read(65536):
            w.write(data)
        w.close()

    async def handler(sock: socket.socket) -> None:
        if sock.getpeername()[0] in (NEW_IP, OTHER_CLIENT_IP):
            await handle(sock)
        else:
            await echo(sock)

    listener = Listener("captured", bind_socket(LEGACY_IP, LEGACY_PORT), handler)
    listener.start()
    try:
        yield
    finally:
        listener.close()


async def served(r: asyncio.StreamReader, w: asyncio.StreamWriter, payload: bytes,
                 within: float = 5) -> bool:
    try:
        w.write(payload)
        return await asyncio.wait_for(r.readexactly(len(payload)), within) == payload
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        return False


async def from_new_pod() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(LEGACY_IP, LEGACY_PORT, local_addr=(NEW_IP, 0))


def held(m: Mesh, outcome: str) -> float:
    return sample(m.a, "ambit_ztunnel_held_total", outcome=outcome)


async def test_a_held_connection_succeeds_when_the_state_arrives_in_time(tmp_path: Path) \
        -> None:
    m = Mesh(tmp_path, state_with())
    m.a.config.pod_start_hold = 3.0
    async with m, captured(partial(outbound.handle_captured, m.a.ctx)):
        # 1. The state push names the pod while its first connection is held.
        r, w = await from_new_pod()
        await wait_for(lambda: m.a.ctx.source_hold is not None and m.a.ctx.source_hold.held,
                       "the connection held")
        assert sample(m.a, "ambit_ztunnel_held_connections") == 1
        m.write_state(state_with(new_pod()), "a")
        assert await served(r, w, b"first")
        w.close()
        assert held(m, "released") == 1
        assert sample(m.a, "ambit_ztunnel_held_connections") == 0


async def test_the_agents_hand_off_releases_a_held_connection(tmp_path: Path) -> None:
    m = Mesh(tmp_path, state_with())
    async with m, captured(partial(outbound.handle_captured, m.a.ctx)):
        r, w = await from_new_pod()
        await wait_for(lambda: m.a.ctx.source_hold is not None and m.a.ctx.source_hold.held,
                       "the connection held")
        pod = Workload("default/newpod", "newpod", "default", "newpod", "node-a",
                       (ipaddress.ip_address(NEW_IP),), "cluster.local", healthy=False)
        m.a.on_agent_request(PodAdded(pod))
        assert await served(r, w, b"first")
        w.close()
        assert held(m, "released") == 1


async def test_a_held_connection_is_refused_after_the_bound(tmp_path: Path) -> None:
    m = Mesh(tmp_path, state_with())
    m.a.config.pod_start_hold = 0.4
    m.a.config.pod_start_hold_per_source = 1
    async with m, captured(partial(outbound.handle_captured, m.a.ctx)):
        t0 = time.monotonic()
        r, w = await from_new_pod()
        await wait_for(lambda: m.a.ctx.source_hold is not None and m.a.ctx.source_hold.held,
                       "the connection held")
        # A second one from the same pod is over its share: refused at once, not held.
        r2, w2 = await from_new_pod()
        assert not await served(r2, w2, b"second", within=2)
        assert held(m, "over_source") == 1
        assert time.monotonic() - t0 < 0.4
        assert not await served(r, w, b"late")  # refused (unknown source) after 0.4 s
        assert time.monotonic() - t0 >= 0.4
        assert held(m, "timeout") == 1 and held(m, "released") == 0
        # The state arrives later: the pod's next connection is carried at once.
        m.write_state(state_with(new_pod()), "a")
        await wait_for(lambda: m.a.store.current.workload_by_ip(
            ipaddress.ip_address(NEW_IP)) is not None, "the state applied")
        r3, w3 = await from_new_pod()
        assert await served(r3, w3, b"next")
        for wr in (w, w2, w3):
            wr.close()
        # A known pod is never held.
        r4, w4 = await asyncio.open_connection(LEGACY_IP, LEGACY_PORT,
                                               local_addr=(OTHER_CLIENT_IP, 0))
        assert await served(r4, w4, b"known")
        w4.close()
        assert held(m, "released") == 0


async def test_hold_disabled_refuses_at_once(tmp_path: Path) -> None:
    m = Mesh(tmp_path, state_with())
    m.a.config.pod_start_hold = 0
    async with m, captured(partial(outbound.handle_captured, m.a.ctx)):
        t0 = time.monotonic()
        r, w = await from_new_pod()
        assert not await served(r, w, b"x")
        assert time.monotonic() - t0 < 0.3
        w.close()
        assert held(m, "timeout") == 0

"""The agent's CNI DEL and reconcile together (issue 19): a deleted pod is never adopted back
from a lagging state push, a pod whose interface vanished is an expected event (not a failed
reconcile), and a new pod reusing a deleted pod's IP is captured on its own CNI ADD's word.

A recording backend stands in for the kernel; the live facts (interfaces, routes) are a dict
the test edits, so each step is exact."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import app as app_module
from agent.app import Agent
from agent.capture.base import BackendStatus, CaptureError, PodCapture, PodCounters
from agent.cni_server import CniRequest
from agent.config import AgentConfig
from agent.pods import LocalPod
from mesh.state.model import MeshConfig, Protocol, Workload


class Backend:
    """Captures IPs in a set; watching or enrolling a missing interface fails as eBPF does."""

    mode = "ebpf"

    def __init__(self, ifaces: set[str]) -> None:
        self.ifaces = ifaces
        self.captured: set[str] = set()
        self.ever_captured: list[str] = []

    def watch_interface(self, pod: PodCapture) -> None:
        if pod.host_iface not in self.ifaces:
            raise CaptureError(f"eBPF capture, watch_interface: no such device "
                               f"{pod.host_iface}")

    def enroll(self, pod: PodCapture) -> None:
        self.watch_interface(pod)
        self.captured |= set(pod.ips)
        self.ever_captured += pod.ips

    def unenroll(self, pod: PodCapture) -> None:
        self.captured -= set(pod.ips)

    def forget_interface(self, pod: PodCapture) -> None:
        pass

    def enrolled(self) -> set[str]:
        return set(self.captured)

    def counters(self) -> dict[str, PodCounters]:
        return {}

    def status(self) -> BackendStatus:
        return BackendStatus(self.mode)


def workload(name: str, ip: str, sa: str | None = None) -> Workload:
    return Workload(f"default/{name}", name, "default", sa or name, "node-1",
                    (ipaddress.ip_address(ip),), "cluster.local", protocol=Protocol.HBONE)


def req(op: str, name: str, ip: str, iface: str) -> CniRequest:
    return CniRequest(op, f"c-{name}", f"/var/run/netns/{name}", "eth0", name, "default", "",
                      (ip,), iface)


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) \
        -> Iterator[tuple[Agent, Backend, dict[str, str]]]:
    routes: dict[str, str] = {}  # pod IP -> host interface: the node's routing table
    ifaces: set[str] = set()
    backend = Backend(ifaces)
    monkeypatch.setattr(app_module, "host_iface_for",
                        lambda ip, _uplinks: routes.get(ip) if routes.get(ip) in ifaces else None)
    monkeypatch.setattr(app_module, "iface_exists", lambda name: name in ifaces)
    config = AgentConfig(node="node-1", controller_address="c:1", run_dir=tmp_path,
                         uplinks=("eth0",))
    agent = Agent(config, backend, "test", initial_uplinks=("eth0",))  # type: ignore[arg-type]
    yield agent, backend, routes
    agent._kernel_pool.shutdown()


def wire(agent: Agent, backend: Backend, routes: dict[str, str], name: str, ip: str) -> LocalPod:
    """What CNI ADD leaves behind: a veth with a route, a record, capture."""
    iface = f"veth-{name}"
    backend.ifaces.add(iface)
    routes[ip] = iface
    pod = LocalPod(f"default/{name}", (ip,), iface, f"/var/run/netns/{name}", f"c-{name}", True)
    agent.table.put(pod)
    backend.enroll(pod.capture())
    return pod


async def test_deleted_pods_are_not_adopted_back(
        node: tuple[Agent, Backend, dict[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "agent")
    agent, backend, routes = node
    pods = [wire(agent, backend, routes, f"p{i}", f"10.244.1.{i + 10}") for i in range(20)]
    agent.store.replace(MeshConfig(workloads=tuple(
        workload(p.uid.split("/")[1], p.ips[0]) for p in pods)))
    await agent.reconcile_once()
    assert backend.captured == {p.ips[0] for p in pods}
    captures_before = len(backend.ever_captured)
    for i, p in enumerate(pods):
        # ambit-cni's DEL runs before the main plugin's: the route and veth are still there
        answer = await agent.handle_cni(req("del", p.uid.split("/")[1], p.ips[0],
                                            p.host_iface))
        assert answer["ok"] and p.ips[0] not in backend.captured
        await agent.reconcile_once()  # the push still lists every pod
        if i % 2:  # then the main plugin's DEL: veth and route go
            backend.ifaces.discard(p.host_iface)
            routes.pop(p.ips[0])
        await agent.reconcile_once()
    assert agent.table.pods == {} and backend.captured == set()
    assert len(backend.ever_captured) == captures_before, "a deleted pod's IP was captured"
    assert len(agent.table.deleted) == 20
    assert agent.status()["pods"] == [] and agent.last_error == ""
    assert "adopted" not in caplog.text
    # the push catches up: tombstones are cleared once it no longer lists the pods
    agent.store.replace(MeshConfig())
    agent.table.set_deleted(tuple(dataclasses.replace(t, deleted_at=t.deleted_at - 60)
                                  for t in agent.table.deleted))
    await agent.reconcile_once()
    assert agent.table.deleted == ()


async def test_vanished_interface_is_gone_not_a_failure(
        node: tuple[Agent, Backend, dict[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent")
    agent, backend, routes = node
    pod = wire(agent, backend, routes, "lost", "10.244.1.50")
    backend.captured.clear()  # not captured yet: the reconcile will want to enroll it
    backend.ifaces.discard(pod.host_iface)  # deleted without a DEL reaching the agent
    agent.store.replace(MeshConfig(workloads=(workload("lost", "10.244.1.50"),)))
    await agent.reconcile_once()
    assert agent.table.pods == {} and backend.captured == set()
    assert agent.pods_gone == 1 and agent.last_error == ""
    assert "gone" in caplog.text and "reconcile failed" not in caplog.text
    assert [t.uid for t in agent.table.deleted] == ["default/lost"]
    assert "ambit_agent_pods_gone_total 1.0" in agent.metrics.render().decode()


async def test_new_pod_with_a_deleted_pods_ip(
        node: tuple[Agent, Backend, dict[str, str]]) -> None:
    agent, backend, routes = node
    old = wire(agent, backend, routes, "old", "10.244.1.60")
    agent.store.replace(MeshConfig(workloads=(workload("old", "10.244.1.60"),)))
    await agent.handle_cni(req("del", "old", "10.244.1.60", old.host_iface))
    backend.ifaces.discard(old.host_iface)
    routes.pop("10.244.1.60")
    # the CNI gives the address to a new pod; the push still lists the old one (and then both)
    new = wire(agent, backend, routes, "new", "10.244.1.60")
    await agent.reconcile_once()
    assert backend.captured == {"10.244.1.60"} and set(agent.table.pods) == {"default/new"}
    assert agent.table.deleted == ()  # the new pod's record replaced the tombstone
    agent.store.replace(MeshConfig(workloads=(workload("old", "10.244.1.60"),
                                              workload("new", "10.244.1.60", "other"))))
    assert "10.244.1.60" not in agent._mesh()  # claimed twice: nobody's until it settles
    await agent.reconcile_once()
    status = {p["pod"]: p for p in agent.status()["pods"]}
    assert status["default/new"]["captured"] and status["default/new"]["shouldCapture"]
    assert set(status) == {"default/new"}
    assert new.uid in agent.table.pods

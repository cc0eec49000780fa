"""The agent's `--uplink auto` loop: each resync re-reads the links and hands new uplinks to the
backend, which attaches to them (``setup()`` again: idempotent, in place)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent import uplinks
from agent.app import Agent
from agent.capture.base import BackendStatus, PodCounters
from agent.config import AgentConfig
from agent.pods import LocalPod
from agent.uplinks import Link


class EbpfLikeBackend:
    """Records what the eBPF backend would attach its uplink program to."""

    mode = "ebpf"

    def __init__(self, initial: tuple[str, ...]) -> None:
        self.uplinks = initial
        self.setups: list[tuple[str, ...]] = []

    def setup(self) -> None:
        self.setups.append(self.uplinks)

    def counters(self) -> dict[str, PodCounters]:
        return {}

    def status(self) -> BackendStatus:
        return BackendStatus(self.mode)


LINKS = [Link("lo", loopback=True, link_type=772, ipv4=("127.0.0.1",)),
         Link("eth0", ipv4=("10.0.2.15",), gateway_routes=True)]


async def test_new_uplinks_are_attached_on_resync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent")
    current = list(LINKS)
    monkeypatch.setattr(uplinks, "read_links", lambda: list(current))
    config = AgentConfig(node="n", controller_address="c:1", run_dir=tmp_path,
                         uplinks=("auto",)).validate()
    backend = EbpfLikeBackend(("eth0",))
    agent = Agent(config, backend, "test", initial_uplinks=("eth0",))  # type: ignore[arg-type]
    try:
        await agent.refresh_uplinks()
        assert backend.setups == [] and list(agent.uplinks) == ["eth0"]  # nothing new

        # flannel starts after the agent: flannel.1 appears; and a pod's veth with an address.
        current.append(Link("flannel.1", kind="vxlan", ipv4=("10.244.1.0",)))
        current.append(Link("macvlan-a", kind="macvlan", ipv4=("10.244.1.9",)))
        agent.table.put(LocalPod("demo/a", ("10.244.1.9",), "macvlan-a"))
        await agent.refresh_uplinks()
        assert backend.setups == [("eth0", "flannel.1")]
        assert list(agent.uplinks) == ["eth0", "flannel.1"]
        assert agent.status()["uplinks"] == ["eth0", "flannel.1"]
        msg = next(r.getMessage() for r in caplog.records if "uplinks (auto)" in r.getMessage())
        assert "new: flannel.1" in msg and "macvlan-a: a pod's host interface" in msg

        del current[2:]  # flannel.1 went away: nothing to attach
        await agent.refresh_uplinks()
        assert list(agent.uplinks) == list(backend.uplinks) == ["eth0"]
        assert len(backend.setups) == 1

        # Explicit uplinks are never re-resolved.
        fixed = Agent(AgentConfig(node="n", controller_address="c:1", run_dir=tmp_path,
                                  uplinks=("eth1",)), backend, "t")  # type: ignore[arg-type]
        await fixed.refresh_uplinks()
        assert fixed.uplinks == ("eth1",) and len(backend.setups) == 1
        fixed._kernel_pool.shutdown()
    finally:
        agent._kernel_pool.shutdown()

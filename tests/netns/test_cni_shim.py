"""The static host binary of ambit-cni in a real chain: ptp + host-local, the shim, the agent.

What this proves: wired as containerd/libcni would wire a pod (``CniRunner`` runs the conflist
inside a node namespace), the static binary hands the pod to a real agent CNI server
(agent/cni_server.py, on a socket in a temp directory) with exactly what ptp created: the
agent's handler is asked about the right pod, IPs and host veth, and the runtime gets ptp's
result back. CHECK and DEL go the same way, DEL cleans up with or without the agent, a
missing agent fails the sandbox with code 11 (fail-closed) or lets it start (fail-open), and
VERSION is answered by the binary itself.

Network safety: every namespace is created by the test (``Cluster``, names ``amb-<pid>-...``),
none is connected to the root namespace, and the plugins run only inside the node namespace;
the test checks the root namespace's links are unchanged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cni import shim as shim_build
from agent.cni import spec
from agent.cni_server import CniRequest, CniServer
from ambit.dev import netns
from ambit.dev.cni_runner import (
    CniError,
    CniRunner,
    RuntimeConf,
    conflist_for_node,
    k8s_pod_args,
    prepare_plugin_dir,
)
from ambit.dev.topology import Cluster, Node

NETNS_DIR = Path("/var/run/netns")




class Agent:
    """A real ``CniServer`` on its own event loop thread; the handler records and answers."""

    def __init__(self, path: Path, answer: dict[str, Any] | None = None) -> None:
        self.requests: list[CniRequest] = []
        self.answer = answer or {"ok": True, "captured": True, "reason": "in the mesh"}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = CniServer(path, self._handle)
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)

    async def _handle(self, req: CniRequest) -> dict[str, Any]:
        self.requests.append(req)
        return self.answer

    def ops(self) -> list[str]:
        return [r.op for r in self.requests]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class NodeCni:
    def __init__(self, cluster: Cluster, node: Node, workdir: Path, bin_dir: Path) -> None:
        self.cluster, self.node, self.workdir, self.bin_dir = cluster, node, workdir, bin_dir
        self.socket = workdir / "cni.sock"

    def runner(self, **options: Any) -> CniRunner:
        node_dir = self.workdir / self.node.name
        conflist = conflist_for_node(self.node.pod_cidr, node_dir, self.socket, **options)
        return CniRunner(conflist, [self.bin_dir], self.node.netns, node_dir / "cache")

    def new_pod(self, name: str, container_id: str) -> RuntimeConf:
        ns = f"{self.cluster.prefix}{name}"
        netns.create_netns(ns)
        self.cluster.cleanup.netns(ns)
        return RuntimeConf(container_id, str(NETNS_DIR / ns), "eth0",
                           k8s_pod_args("demo", name, f"uid-{name}", container_id))  # fmt: skip

    def node_links(self) -> list[str]:
        return [link["ifname"] for link in json.loads(netns.ip(self.node.netns, ["-j", "link"]))]

    def leases(self) -> list[str]:
        d = self.workdir / self.node.name / "host-local" / "ambit"
        return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.is_dir() else []


def _root_links() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


@pytest.fixture
def node_cni(shim: Path) -> Iterator[NodeCni]:
    workdir = Path(tempfile.mkdtemp(prefix="ambit-shim-"))
    before = _root_links()
    try:
        with Cluster(1) as c:
            # The plugin dir holds the static binary as "ambit-cni", as /opt/cni/bin would.
            bin_dir = prepare_plugin_dir(workdir / "bin", ambit_cni=shim)
            yield NodeCni(c, c.node(1), workdir, bin_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert _root_links() == before, "a CNI plugin touched the root namespace"


@pytest.mark.netns
def test_the_shim_hands_the_pod_to_the_agent(node_cni: NodeCni) -> None:
    nc = node_cni
    assert (nc.bin_dir / "ambit-cni").resolve() == shim_build.BINARY
    runner = nc.runner()
    rt = nc.new_pod("web", "5ca1ab1e")
    agent = Agent(nc.socket)
    try:
        result = runner.add(rt)
        address = ipaddress.ip_interface(result["ips"][0]["address"])
        assert address.ip in ipaddress.ip_network(nc.node.pod_cidr)
        (req,) = agent.requests
        host = [i["name"] for i in result["interfaces"] if not i.get("sandbox")]
        assert req == CniRequest(
            op="add", container_id="5ca1ab1e", netns=rt.netns_path, ifname="eth0",
            pod_name="web", pod_namespace="demo", pod_uid="uid-web",
            ips=(str(address.ip),), host_iface=host[0],
        )  # fmt: skip
        assert req.host_iface.startswith("veth") and req.host_iface in nc.node_links()
        # ptp's result came back through the shim unchanged.
        assert runner.cached_result(rt) == result

        runner.check(rt)
        assert agent.ops() == ["add", "check"]
        assert runner.delete(rt) == []
        assert agent.ops() == ["add", "check", "del"]
        assert agent.requests[2].host_iface == req.host_iface
        assert req.host_iface not in nc.node_links() and nc.leases() == []
    finally:
        agent.close()


@pytest.mark.netns
def test_the_agents_refusal_fails_the_sandbox(node_cni: NodeCni) -> None:
    runner = node_cni.runner()
    rt = node_cni.new_pod("web", "feed02")
    agent = Agent(node_cni.socket, {"ok": False, "error": "pod demo/web is not known yet"})
    try:
        with pytest.raises(CniError) as info:
            runner.add(rt)
        assert (info.value.plugin, info.value.code) == ("ambit-cni", spec.ERR_AGENT_REFUSED)
        assert "not known yet" in info.value.msg
        assert runner.delete(rt) == []
        assert agent.ops() == ["add", "del"]
    finally:
        agent.close()
    assert node_cni.leases() == []


@pytest.mark.netns
def test_without_the_agent_fail_closed_and_del_cleans_up(node_cni: NodeCni) -> None:
    nc = node_cni
    runner = nc.runner()
    rt = nc.new_pod("web", "deadbee5")
    with pytest.raises(CniError) as info:
        runner.add(rt)
    err = info.value
    assert (err.plugin, err.command, err.code) == ("ambit-cni", "ADD", spec.ERR_TRY_AGAIN_LATER)
    assert f"node agent at {nc.socket} is not running" in err.msg
    assert "demo/web" in err.msg and "does not exist" in err.details
    assert any(name.startswith("veth") for name in nc.node_links())
    assert runner.delete(rt) == []  # the shim's DEL succeeds without an agent
    assert not any(name.startswith("veth") for name in nc.node_links())
    assert nc.leases() == []


@pytest.mark.netns
def test_without_the_agent_fail_open_starts_the_pod(
    node_cni: NodeCni, caplog: pytest.LogCaptureFixture
) -> None:
    runner = node_cni.runner(failure_policy="fail-open", timeout_seconds=2)
    rt = node_cni.new_pod("web", "0pen0002")
    caplog.set_level("INFO", logger="ambit.dev.cni_runner")
    result = runner.add(rt)
    pod_ip = str(ipaddress.ip_interface(result["ips"][0]["address"]).ip)
    (eth0,) = json.loads(netns.ip(Path(rt.netns_path).name, ["-j", "addr", "show", "dev", "eth0"]))
    assert pod_ip in [a["local"] for a in eth0["addr_info"]]
    assert "starts WITHOUT capture (failurePolicy fail-open)" in caplog.text
    runner.check(rt)
    assert runner.delete(rt) == []


@pytest.mark.netns
def test_version_through_the_runner(node_cni: NodeCni) -> None:
    assert node_cni.runner().version("ambit-cni") == spec.version_result()

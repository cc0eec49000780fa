"""`ambit agent cni install|uninstall` against a real ptp config and the real plugins.

What this proves: after `ambit agent cni install` into a conf dir holding a ptp conflist (the
cluster's own CNI), running that directory's primary config the way libcni does (the dev
runner, plugins executed inside a node namespace) wires the pod with ptp + host-local *and*
reaches the ambit-cni entry, which tells the node agent about the pod; after
`ambit agent cni uninstall` (or `ambit agent uninstall` with the CNI directories, run inside
the node namespace) the same execution wires pods without asking the agent, and the conflist
is byte-for-byte the cluster's again. Also: `--uplink auto`'s netlink reading on a namespace
shaped like a flannel node.

Network safety: every namespace is created here (``Cluster``/``netns.netns``, names
``amb-<pid>-...``) and removed at the end; plugins and `ambit agent uninstall` run only inside
the node namespace; the CNI directories are in a temp directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ambit.dev import netns
from ambit.dev.cni_runner import (
    CniRunner,
    RuntimeConf,
    conflist_for_node,
    default_ambit_cni,
    k8s_pod_args,
    prepare_plugin_dir,
)
from ambit.dev.topology import Cluster, Node
from tests.netns.test_cni import NETNS_DIR, _root_links, fake_agent

PRIMARY = "10-ptp.conflist"


@dataclass
class Host:
    """One node namespace with host-like CNI directories: ptp's config, the system plugins."""

    cluster: Cluster
    node: Node
    workdir: Path

    @property
    def bin_dir(self) -> Path:
        return self.workdir / "opt-cni-bin"

    @property
    def conf_dir(self) -> Path:
        return self.workdir / "etc-cni-net.d"

    @property
    def socket(self) -> Path:
        return self.workdir / "cni.sock"

    def dirs(self) -> list[str]:
        return ["--cni-bin-dir", str(self.bin_dir), "--cni-conf-dir", str(self.conf_dir)]

    def runner(self, cache: str) -> CniRunner:
        """What the runtime does for a pod: load the primary config of the conf dir and run
        it with the plugins of the bin dir (as containerd's go-cni and libcni do)."""
        files = sorted(p.name for p in self.conf_dir.iterdir()
                       if p.suffix in (".conf", ".conflist", ".json"))
        assert files and files[0] == PRIMARY, files
        conflist = json.loads((self.conf_dir / files[0]).read_text())
        return CniRunner(conflist, [self.bin_dir], self.node.netns, self.workdir / cache)

    def pod(self, name: str, cid: str) -> RuntimeConf:
        ns = f"{self.cluster.prefix}{name}"
        netns.create_netns(ns)
        self.cluster.cleanup.netns(ns)
        return RuntimeConf(cid, str(NETNS_DIR / ns), "eth0",
                           k8s_pod_args("demo", name, f"uid-{name}", cid))


@pytest.fixture
def host() -> Iterator[Host]:
    before = _root_links()
    workdir = Path(tempfile.mkdtemp(prefix="ambit-cnii-"))
    try:
        with Cluster(1) as c:
            h = Host(c, c.node(1), workdir)
            prepare_plugin_dir(h.bin_dir)
            (h.bin_dir / "ambit-cni").unlink()  # the installer puts it there
            h.conf_dir.mkdir()
            ptp = conflist_for_node(h.node.pod_cidr, workdir / "node", h.socket)
            ptp["plugins"] = ptp["plugins"][:1]  # the cluster's CNI: ptp + host-local only
            (h.conf_dir / PRIMARY).write_text(json.dumps(ptp, indent=2))
            yield h
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert _root_links() == before, "something touched the root namespace"


def _ambit(*args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ambit.cli", *args]
    if ns is not None:
        argv = netns.ns_argv(ns, argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          cwd=Path(__file__).resolve().parents[2])


def _pod_ip(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"]).split("/")[0]


@pytest.mark.netns
def test_installed_chain_reaches_ambit_cni_and_uninstall_removes_it(host: Host) -> None:
    original = (host.conf_dir / PRIMARY).read_text()
    r = _ambit("agent", "cni", "install", *host.dirs(), "--binary", str(default_ambit_cni()),
               "--agent-socket", str(host.socket), "--timeout", "10")
    assert r.returncode == 0, r.stderr
    assert f"chained ambit-cni into {PRIMARY}" in r.stdout
    assert (host.bin_dir / "ambit-cni").read_bytes() == default_ambit_cni().read_bytes()
    types = [p["type"] for p in json.loads((host.conf_dir / PRIMARY).read_text())["plugins"]]
    assert types == ["ptp", "ambit-cni"]

    # A pod sandbox, wired from the conf dir as the runtime would: ptp gives it its address,
    # then ambit-cni (the copy in the bin dir) hands it to the agent with ptp's result.
    runner = host.runner("cache1")
    rt = host.pod("web", "c0ffee11")
    with fake_agent(host.socket) as agent:
        result = runner.add(rt)
        pod_ip = _pod_ip(result)
        (req,) = agent.requests
        assert (req["op"], req["podName"], req["ips"]) == ("add", "web", [pod_ip])
        assert req["hostIface"] in [link["ifname"] for link in json.loads(
            netns.ip(host.node.netns, ["-j", "link"]))]
        assert runner.delete(rt) == []
        assert agent.ops() == ["add", "del"]

    # Removed: the same execution no longer reaches ambit-cni; the agent is not asked.
    r = _ambit("agent", "cni", "uninstall", *host.dirs())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"removed ambit-cni from {PRIMARY} (in {host.conf_dir})",
        f"removed {host.bin_dir / 'ambit-cni'}"]
    assert json.loads((host.conf_dir / PRIMARY).read_text()) == json.loads(original)
    runner = host.runner("cache2")
    assert [p["type"] for p in runner.plugins] == ["ptp"]
    rt = host.pod("api", "c0ffee12")
    with fake_agent(host.socket) as agent:
        result = runner.add(rt)
        assert _pod_ip(result).startswith(host.node.pod_cidr.rsplit(".", 2)[0])
        assert agent.requests == []
        assert runner.delete(rt) == []
        assert agent.requests == []


@pytest.mark.netns
def test_agent_uninstall_in_the_node_removes_the_chain_too(host: Host) -> None:
    r = _ambit("agent", "cni", "install", *host.dirs(), "--binary", str(default_ambit_cni()),
               "--agent-socket", str(host.socket))
    assert r.returncode == 0, r.stderr
    run_dir = host.workdir / "run"
    run_dir.mkdir()
    (run_dir / "pods.json").write_text("{}")
    # What a node's operator (or `ambit uninstall` falling back) runs: everything goes, CNI
    # first. Run inside the node namespace: capture removal acts on the caller's namespace.
    r = _ambit("agent", "uninstall", "--run-dir", str(run_dir), "--bpf-dir",
               str(host.workdir / "bpf"), *host.dirs(), ns=host.node.netns)
    assert r.returncode == 0, r.stderr + r.stdout
    lines = r.stdout.splitlines()
    assert lines[0] == f"removed: removed ambit-cni from {PRIMARY} (in {host.conf_dir})"
    assert lines[1] == f"removed: removed {host.bin_dir / 'ambit-cni'}"
    assert "removed: iptables chains and policy routing" in lines
    assert not (run_dir / "pods.json").exists()
    assert [p["type"] for p in host.runner("cache").plugins] == ["ptp"]
    assert not (host.bin_dir / "ambit-cni").exists()


UPLINK_PROBE = ("import json; from agent import uplinks; links = uplinks.read_links(); "
                "print(json.dumps({'links': {l.name: [l.kind, l.up, l.link_type, "
                "list(l.ipv4), l.gateway_routes] for l in links}, "
                "'auto': uplinks.select(links)}))")


@pytest.mark.netns
def test_uplink_auto_reads_a_flannel_shaped_node() -> None:
    """eth0 (a veth here, like a kind node's: it carries the default route), eth1 (a veth
    too: an uplink only once it routes via a gateway, as a VM's second NIC would be one
    anyway), flannel.1 (vxlan), cni0 (bridge) with a pod's veth, an interface still down."""
    before = _root_links()
    prefix = netns.netns_prefix()
    with netns.netns(f"{prefix}upl-node") as node, netns.netns(f"{prefix}upl-peer") as peer, \
            netns.netns(f"{prefix}upl-pod") as pod:
        netns.add_veth(node, "eth0", peer, "eth0")
        netns.add_address(node, "eth0", "10.0.2.15/24")
        netns.add_route(node, "default", via="10.0.2.2", dev="eth0")
        netns.add_veth(node, "eth1", peer, "eth1")
        netns.add_address(node, "eth1", "192.168.56.11/24")
        netns.ip(node, ["link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "eth1",
                        "local", "192.168.56.11", "dstport", "8472"])
        netns.add_address(node, "flannel.1", "10.244.1.0/32")
        netns.link_up(node, "flannel.1")
        netns.add_bridge(node, "cni0")
        netns.add_address(node, "cni0", "10.244.1.1/24")
        netns.add_veth(node, "vethpod1", pod, "eth0")
        netns.set_master(node, "vethpod1", "cni0")
        netns.add_veth(node, "ens9", peer, "ens9", up=False)  # not up yet
        netns.add_address(node, "ens9", "10.96.0.1/32")
        first = json.loads(netns.ns_run(node, [sys.executable, "-c", UPLINK_PROBE]))
        netns.add_route(node, "192.168.57.0/24", via="192.168.56.1", dev="eth1")
        netns.link_up(node, "ens9")
        second = json.loads(netns.ns_run(node, [sys.executable, "-c", UPLINK_PROBE]))
    assert first["auto"] == ["eth0", "flannel.1"]
    links = first["links"]
    assert links["eth0"] == ["veth", True, 1, ["10.0.2.15"], True]
    assert links["eth1"] == ["veth", True, 1, ["192.168.56.11"], False]
    assert links["flannel.1"][0] == "vxlan" and links["cni0"][0] == "bridge"
    assert links["vethpod1"][:2] == ["veth", True] and links["lo"][2] == 772
    assert links["ens9"][1] is False
    # Re-resolved later: eth1 now routes via a gateway, ens9 came up (a veth without one).
    assert second["auto"] == ["eth0", "eth1", "flannel.1"]
    assert second["links"]["ens9"][1] is True
    assert _root_links() == before


AUTO_ATTACH = """
import asyncio, json, subprocess, sys
from pathlib import Path
from agent import uplinks
from agent.app import Agent
from agent.capture.ebpf import EbpfCapture
from agent.capture.tc import attached
from agent.config import AgentConfig

bpf, run = Path(sys.argv[1]), Path(sys.argv[2])
cfg = AgentConfig(node="n", controller_address="c:1", run_dir=run, bpf_dir=bpf,
                  uplinks=("auto",)).validate()
found = uplinks.resolve(cfg.uplinks, uplinks.read_links())
backend = EbpfCapture(bpf, found)
out = {"found": found}
try:
    backend.setup()
    out["before"] = attached()
    for cmd in (["link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "eth0",
                 "local", "10.0.2.15", "dstport", "8472"],
                ["addr", "add", "10.244.1.0/32", "dev", "flannel.1"],
                ["link", "set", "flannel.1", "up"]):
        subprocess.run(["ip", *cmd], check=True)
    agent = Agent(cfg, backend, "test", initial_uplinks=found)
    asyncio.run(agent.refresh_uplinks())
    agent._kernel_pool.shutdown()
    out["after"] = attached()
    out["uplinks"] = agent.uplinks
finally:
    backend.uninstall()
out["removed"] = attached()
print(json.dumps(out))
"""


@pytest.mark.netns
def test_auto_uplinks_get_the_uplink_program_when_they_appear(bpffs: Path) -> None:
    """eBPF mode: an uplink that appears after the agent started (flannel.1 once flannel
    runs) gets the uplink program on the next resync."""
    before = _root_links()
    prefix = netns.netns_prefix()
    run_dir = Path(tempfile.mkdtemp(prefix="ambit-upl-"))
    try:
        with netns.netns(f"{prefix}upa-node") as node, \
                netns.netns(f"{prefix}upa-peer") as peer:
            netns.add_veth(node, "eth0", peer, "eth0")
            netns.add_address(node, "eth0", "10.0.2.15/24")
            netns.add_route(node, "default", via="10.0.2.2", dev="eth0")
            out = netns.ns_run(node, [sys.executable, "-c", AUTO_ATTACH,
                                      str(bpffs / "auto-uplinks"), str(run_dir)], timeout=120)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    doc = json.loads(out)
    assert doc["found"] == ["eth0"]
    assert doc["before"] == {"eth0": "uplink_ingress"}
    assert doc["uplinks"] == ["eth0", "flannel.1"]
    assert doc["after"] == {"eth0": "uplink_ingress", "flannel.1": "uplink_ingress"}
    assert doc["removed"] == {}
    assert _root_links() == before

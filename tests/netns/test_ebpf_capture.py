"""eBPF capture (agent/capture/ebpf.py) against the kernel, with a transparent relay as the proxy.

The eBPF twin of test_capture.py: the same contract (agent/capture/base.py), proved the same
way. In each node namespace of a two-node cluster, ``ebpf_driver.py agent`` runs the backend as
the node agent would (pinned maps in this test's own bpffs mount, one directory per node) and
hands the ztunnel's listeners to a relay that logs every connection it accepts: which listener,
the original destination the kernel preserved, the peer. Where it proves the point, IP
forwarding is off in the node, so a connection can only succeed by being captured.

The driver compiles and loads through the loader process, as the agent does, and reports
whether bcc ever got into its own process (it must not: bcc's clang/LLVM would stay resident).

The tests share one cluster and run in file order; the last three change it for good (agent
restart, ztunnel gone, uninstall).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.capture import ebpf_programs
from ambit.dev import netns
from ambit.dev.mesh import start_echo, tcp_probe
from ambit.dev.topology import Cluster, Node, Pod

pytestmark = pytest.mark.netns

DRIVER = Path(__file__).with_name("ebpf_driver.py")
PY = sys.executable


@dataclass
class Agent:
    node: Node
    proc: subprocess.Popen[bytes]
    ready: dict[str, Any]


@dataclass
class World:
    c: Cluster
    workdir: Path
    bpffs: Path
    pods: dict[str, Pod]
    enrolled: dict[int, list[str]]
    excluded: dict[int, list[str]]
    agents: dict[int, Agent] = field(default_factory=dict)
    relay_pids: dict[int, int] = field(default_factory=dict)

    def pod(self, name: str) -> Pod:
        return self.pods[name]

    def bpf_dir(self, node: int) -> Path:
        return self.bpffs / f"node-{node}"

    def log(self, node: int) -> Path:
        return self.workdir / f"relay-{node}.jsonl"

    def entries(self, node: int) -> list[tuple[int, str, str]]:
        """(listener, original destination, peer IP) of every connection the relay accepted."""
        log = self.log(node)
        if not log.exists():
            return []
        out = []
        for line in log.read_text().splitlines():
            e = json.loads(line)
            out.append((e["listener"], e["orig_dst"], e["peer"].rsplit(":", 1)[0]))
        return out

    def base_args(self, node: int) -> list[str]:
        args = ["--bpf-dir", str(self.bpf_dir(node)), "--uplink", "eth0"]
        for cidr in self.excluded.get(node, []):
            args += ["--exclude", cidr]
        return args

    def agent_argv(self, node: int, tag: str, pods: list[str] | None = None) -> list[str]:
        """The driver's agent role; it watches ``pods`` (default: every pod of the node)."""
        n = self.c.node(node)
        ready = self.workdir / f"agent-{node}-{tag}.json"
        argv = [PY, str(DRIVER), "agent", *self.base_args(node), "--ready", str(ready),
                "--log", str(self.log(node))]  # fmt: skip
        for p in n.pods.values():
            if pods is None or p.name in pods:
                argv += ["--pod", f"{p.name}={p.ip}={p.host_iface}"]
        return argv

    def start_agent(self, node: int, *, listen: bool, tag: str,
                    pods: list[str] | None = None) -> subprocess.Popen[bytes]:
        n = self.c.node(node)
        argv = self.agent_argv(node, tag, pods)
        for name in self.enrolled.get(node, []):
            argv += ["--enroll", name]
        if listen:
            argv.append("--listen")
        out = self.workdir / f"agent-{node}-{tag}.out"
        proc = self.c.spawn(n.netns, argv, log=out)
        self.agents[node] = Agent(n, proc, {})
        return proc

    def wait_agent(self, node: int, tag: str, timeout: float = 30.0) -> dict[str, Any]:
        ready = self.workdir / f"agent-{node}-{tag}.json"
        agent = self.agents[node]
        deadline = time.monotonic() + timeout
        while not ready.exists():
            out = self.workdir / f"agent-{node}-{tag}.out"
            assert agent.proc.poll() is None, f"agent on node-{node} exited:\n{out.read_text()}"
            assert time.monotonic() < deadline, f"agent on node-{node} not ready in {timeout}s"
            time.sleep(0.05)
        agent.ready = json.loads(ready.read_text())
        if agent.ready["relay_pid"] is not None:
            pid = int(agent.ready["relay_pid"])
            self.relay_pids[node] = pid
            self.c.cleanup.callback(f"stop relay {pid}", lambda: _kill(pid))
        return agent.ready

    def inspect(self, node: int) -> dict[str, Any]:
        out = self.c.run(self.c.node(node).netns,
                         [PY, str(DRIVER), "inspect", *self.base_args(node)])  # fmt: skip
        return dict(json.loads(out))

    def counters(self, node: int, pod: str) -> dict[str, int]:
        zero = {"captured": 0, "passed": 0, "errors": 0}
        return dict(self.inspect(node)["counters"].get(self.pod(pod).ip, zero))


def filter_ids(ns: str, iface: str) -> list[tuple[str, int]]:
    """(program, kernel id) of every bpf filter at tc ingress of ``iface``."""
    out = netns.ns_run(ns, ["tc", "filter", "show", "dev", iface, "ingress"])
    return [(m[1], int(m[2])) for m in re.finditer(r"ambit_(\w+)\S* .*? id (\d+)", out)]


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    """Wait until ``pid`` (not our child) has exited: gone from /proc, or a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still running after {timeout}s")


@contextlib.contextmanager
def forwarding(w: World, node: int, on: bool) -> Iterator[None]:
    ns = w.c.node(node).netns
    netns.set_sysctl(ns, "net.ipv4.ip_forward", int(on))
    try:
        yield
    finally:
        netns.set_sysctl(ns, "net.ipv4.ip_forward", 1)


@pytest.fixture(scope="module")
def world(bpffs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("ebpf-capture")
    with Cluster(2) as c:
        pods = {
            name: c.add_pod(node, name)
            for node, name in [(1, "client"), (1, "plain"), (1, "server"),
                               (2, "remote"), (2, "meshed"), (2, "other")]
        }  # fmt: skip
        for name in ("remote", "meshed", "other", "server", "plain"):
            start_echo(c, pods[name], workdir)
        start_echo(c, pods["server"], workdir, 15008)
        w = World(
            c, workdir, bpffs, pods,
            enrolled={1: ["client", "server"], 2: ["meshed"]},
            excluded={1: [f"{pods['other'].ip}/32"]},
        )  # fmt: skip
        # Both nodes compile their programs at the same time (clang takes ~1 s per program).
        for node in (1, 2):
            w.start_agent(node, listen=True, tag="first")
        for node in (1, 2):
            w.wait_agent(node, "first")
        yield w


def _new(w: World, node: int, before: int) -> list[tuple[int, str, str]]:
    return w.entries(node)[before:]


def test_agent_sets_up_and_enrolls(world: World) -> None:
    w = world
    ready = w.agents[1].ready
    assert ready["enrolled_before"] == []
    assert ready["enrolled"] == sorted([w.pod("client").ip, w.pod("server").ip])
    status = ready["status"]
    assert "eth0 (uplink_ingress)" in status["attached"]
    for name in ("client", "plain", "server"):  # every local pod, enrolled or not
        assert f"veth-{name} (pod_ingress)" in status["attached"]
    assert status["listeners"] == "outbound=ready, inbound=ready, inbound_plaintext=ready"
    n1 = w.c.node(1).netns
    assert "lookup 100" in netns.ip(n1, ["rule", "show"])
    assert "local default dev lo" in netns.ip(n1, ["route", "show", "table", "100"])
    assert sorted(os.listdir(w.bpf_dir(1))) == ["excluded", "listeners", "pods",
                                                "prog_pod_ingress", "prog_uplink_ingress",
                                                "stats"]  # fmt: skip
    # The attached programs are the pinned ones.
    ids = ebpf_programs.pinned_program_ids(w.bpf_dir(1))
    assert status["programs"] == ", ".join(f"{n} (id {i})" for n, i in ids.items())
    assert filter_ids(n1, "eth0") == [("uplink_ingress", ids["uplink_ingress"])]
    assert filter_ids(n1, "veth-plain") == [("pod_ingress", ids["pod_ingress"])]


def test_bcc_stays_out_of_the_agent_process(world: World) -> None:
    """bcc and its clang/LLVM ran in the loader process, which exited; the agent process
    attached the pinned programs without ever loading them (it stayed far from the ~220 MB an
    in-process bcc compile left resident)."""
    for node in (1, 2):
        ready = world.agents[node].ready
        assert ready["bcc_imported"] == [], ready
        assert not ready["libbcc_mapped"] and not ready["llvm_mapped"], ready
        assert ready["rss_bytes"] < 120 * 2**20, ready


def test_outbound_from_enrolled_pod_goes_to_15001(world: World) -> None:
    w = world
    client, plain, remote = w.pod("client"), w.pod("plain"), w.pod("remote")
    before = len(w.entries(1))
    with forwarding(w, 1, False):
        # The control: a pod that is not enrolled has no way out with forwarding off.
        assert not tcp_probe(plain.netns, remote.ip, 8080, timeout=1.0).ok
        res = tcp_probe(client.netns, remote.ip, 8080, "out")
    assert res.ok, res.error
    assert res.peer_ip == w.c.node(1).ip  # the server was called by the node, i.e. the relay
    assert _new(w, 1, before) == [(15001, f"{remote.ip}:8080", client.ip)]


def test_inbound_from_another_node_plaintext_and_hbone(world: World) -> None:
    w = world
    server, remote = w.pod("server"), w.pod("remote")
    before = len(w.entries(1))
    with forwarding(w, 1, False):
        for port in (8080, 15008):
            res = tcp_probe(remote.netns, server.ip, port, f"in:{port}")
            assert res.ok, res.error
            assert res.peer_ip == w.c.node(1).ip
            assert res.answer is not None and res.answer["local"] == f"{server.ip}:{port}"
    assert _new(w, 1, before) == [
        (15006, f"{server.ip}:8080", remote.ip),
        (15008, f"{server.ip}:15008", remote.ip),
    ]


def test_same_node_pod_to_pod(world: World) -> None:
    w = world
    client, plain, server = w.pod("client"), w.pod("plain"), w.pod("server")
    before = len(w.entries(1))
    with forwarding(w, 1, False):
        # Not enrolled -> enrolled: inbound, seen by the program on the caller's veth.
        res = tcp_probe(plain.netns, server.ip, 8080)
        assert res.ok, res.error
        # Enrolled -> enrolled: outbound only; the relay's own call to the server is not
        # captured again, and the server's replies find the relay's socket.
        for i in range(3):
            res = tcp_probe(client.netns, server.ip, 8080, f"n{i}")
            assert res.ok, res.error
            assert res.answer is not None and res.answer["data"] == f"n{i}"
    assert _new(w, 1, before) == [
        (15006, f"{server.ip}:8080", plain.ip),
        *[(15001, f"{server.ip}:8080", client.ip)] * 3,
    ]


def test_cross_node_both_ends_enrolled(world: World) -> None:
    w = world
    client, meshed = w.pod("client"), w.pod("meshed")
    b1, b2 = len(w.entries(1)), len(w.entries(2))
    res = tcp_probe(client.netns, meshed.ip, 8080, "across")
    assert res.ok, res.error
    assert res.peer_ip == w.c.node(2).ip  # delivered by node-2's relay
    assert _new(w, 1, b1) == [(15001, f"{meshed.ip}:8080", client.ip)]
    # node-1's relay called from node-1's address; node-2's uplink program captured it.
    assert _new(w, 2, b2) == [(15006, f"{meshed.ip}:8080", w.c.node(1).ip)]


def test_not_enrolled_excluded_and_non_tcp_pass_untouched(world: World) -> None:
    w = world
    client, plain, remote, other = (w.pod(n) for n in ("client", "plain", "remote", "other"))
    before = len(w.entries(1))
    passed = w.counters(1, "client")["passed"]
    res = tcp_probe(plain.netns, remote.ip, 8080)
    assert res.ok and res.peer_ip == plain.ip, res  # routed, not proxied
    res = tcp_probe(client.netns, other.ip, 8080)  # other's /32 is excluded on node-1
    assert res.ok and res.peer_ip == client.ip, res
    # UDP from an enrolled pod is routed as it is.
    got, bound = w.workdir / "udp.txt", w.workdir / "udp.bound"
    recv = ("import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            f"s.bind(('{remote.ip}',9999)); open('{bound}','w').close(); s.settimeout(5); "
            f"d,a=s.recvfrom(100); open('{got}','w').write(a[0])")  # fmt: skip
    rproc = w.c.spawn(remote.netns, [PY, "-c", recv])
    deadline = time.monotonic() + 10
    while not bound.exists():
        assert rproc.poll() is None and time.monotonic() < deadline, "UDP receiver did not start"
        time.sleep(0.02)
    send = ("import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            f"s.sendto(b'x',('{remote.ip}',9999))")  # fmt: skip
    w.c.run(client.netns, [PY, "-c", send])
    assert rproc.wait(10) == 0
    assert got.read_text() == client.ip
    assert _new(w, 1, before) == []
    # The excluded connection's packets and the datagram were seen and passed.
    assert w.counters(1, "client")["passed"] > passed


def test_node_own_connection_is_not_captured(world: World) -> None:
    w = world
    server = w.pod("server")
    before = len(w.entries(1))
    with forwarding(w, 1, False):
        res = tcp_probe(w.c.node(1).netns, server.ip, 8080, "kubelet")  # a kubelet probe
    assert res.ok, res.error
    assert _new(w, 1, before) == []


def test_counters_count_new_connections(world: World) -> None:
    w = world
    client, server, meshed = w.pod("client"), w.pod("server"), w.pod("meshed")
    entries = w.entries(1)
    got = w.inspect(1)["counters"]
    assert got[client.ip]["captured"] == sum(1 for e in entries if e[0] == 15001)
    assert got[server.ip]["captured"] == sum(1 for e in entries if e[0] in (15006, 15008))
    assert got[client.ip]["errors"] == got[server.ip]["errors"] == 0
    assert w.pod("plain").ip not in got  # not enrolled, not counted
    got2 = w.inspect(2)["counters"]
    assert got2[meshed.ip]["captured"] == len(w.entries(2))


def _broken_sources(tmp: Path) -> Path:
    src = tmp / "broken-ebpf"
    shutil.copytree(ebpf_programs.DEFAULT_SOURCE_DIR, src)
    text = (src / "pod_ingress.c").read_text()
    at = text.index("return ", text.index("int pod_ingress("))
    (src / "pod_ingress.c").write_text(text[:at] + "ambit_oops = 1;\n\t" + text[at:])
    return src


def test_broken_program_fails_setup_and_leaves_capture_alone(world: World) -> None:
    """An agent whose program does not compile fails ``setup`` with the compiler's message;
    what its predecessor installed keeps capturing (the loader replaces no pin unless every
    program loaded)."""
    w = world
    client, remote = w.pod("client"), w.pod("remote")
    ids = ebpf_programs.pinned_program_ids(w.bpf_dir(1))
    argv = [*w.agent_argv(1, "broken"), "--source-dir", str(_broken_sources(w.workdir))]
    res = subprocess.run(netns.ns_argv(w.c.node(1).netns, argv), capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert res.returncode == 3, res
    assert "SETUP FAILED: compiling" in res.stdout
    assert "pod_ingress.c" in res.stdout
    assert "error: use of undeclared identifier 'ambit_oops'" in res.stdout
    # The driver logs the loader's whole output as the agent would (no logging set up: stderr).
    assert "eBPF loader failed" in res.stderr and "ambit_oops" in res.stderr
    assert ebpf_programs.pinned_program_ids(w.bpf_dir(1)) == ids
    assert filter_ids(w.c.node(1).netns, "eth0") == [("uplink_ingress", ids["uplink_ingress"])]
    before = len(w.entries(1))
    with forwarding(w, 1, False):
        assert tcp_probe(client.netns, remote.ip, 8080, "still").ok
    assert _new(w, 1, before) == [(15001, f"{remote.ip}:8080", client.ip)]


def test_agent_restart_keeps_connections_and_capture(world: World) -> None:
    w = world
    client, remote = w.pod("client"), w.pod("remote")
    before = len(w.entries(1))
    with forwarding(w, 1, False):
        held = subprocess.Popen(
            netns.ns_argv(client.netns, [PY, str(DRIVER), "client", remote.ip, "8080"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        w.c.cleanup.process(held)
        assert held.stdin is not None and held.stdout is not None

        def say(msg: str) -> dict[str, Any]:
            assert held.stdin is not None and held.stdout is not None
            held.stdin.write(msg + "\n")
            held.stdin.flush()
            return dict(json.loads(held.stdout.readline()))

        assert say("one")["peer"].startswith(w.c.node(1).ip + ":")
        # The agent dies; its programs stay attached, its maps pinned, the relay (ztunnel) runs.
        old = w.agents[1].proc
        old.send_signal(signal.SIGKILL)
        old.wait(5)
        assert say("two")["data"] == "two"
        assert tcp_probe(client.netns, remote.ip, 8080, "agentless").ok
        # A new agent reads back what its predecessor enrolled and replaces the programs,
        # on every interface that had them, also a pod's it does not know about (yet).
        old_ids = ebpf_programs.pinned_program_ids(w.bpf_dir(1))
        w.start_agent(1, listen=False, tag="second", pods=["client", "server"])
        ready = w.wait_agent(1, "second")
        assert ready["enrolled_before"] == sorted([client.ip, w.pod("server").ip])
        assert ready["status"]["listeners"].startswith("outbound=ready")
        new_ids = ebpf_programs.pinned_program_ids(w.bpf_dir(1))
        assert all(new_ids[n] != old_ids[n] for n in ebpf_programs.PROGRAMS)
        n1 = w.c.node(1).netns
        assert filter_ids(n1, "eth0") == [("uplink_ingress", new_ids["uplink_ingress"])]
        for name in ("client", "plain", "server"):
            assert filter_ids(n1, f"veth-{name}") == [("pod_ingress", new_ids["pod_ingress"])]
        assert say("three")["data"] == "three"
        res = tcp_probe(client.netns, remote.ip, 8080, "restarted")
        assert res.ok, res.error
        held.stdin.close()
        assert held.wait(5) == 0
    assert _new(w, 1, before) == [(15001, f"{remote.ip}:8080", client.ip)] * 3
    out = netns.ns_run(w.c.node(1).netns, ["tc", "filter", "show", "dev", "eth0", "ingress"])
    assert out.count("ambit_uplink_ingress") == 1  # replaced, not stacked


def test_capture_fails_closed_without_a_listener(world: World) -> None:
    w = world
    client, plain, remote = w.pod("client"), w.pod("plain"), w.pod("remote")
    errors = w.counters(1, "client")["errors"]
    relay = w.relay_pids[1]
    _kill(relay, signal.SIGTERM)
    _wait_gone(relay)
    assert w.inspect(1)["listeners"] == dict.fromkeys(
        ["outbound", "inbound", "inbound_plaintext"]
    )
    before = len(w.entries(1))
    # Forwarding is on: the kernel could route the SYN around the proxy, capture must not.
    res = tcp_probe(client.netns, remote.ip, 8080, timeout=1.5)
    assert not res.ok
    assert w.counters(1, "client")["errors"] > errors
    assert tcp_probe(plain.netns, remote.ip, 8080).ok  # pods that are not enrolled are fine
    assert _new(w, 1, before) == []


def test_uninstall_removes_everything(world: World) -> None:
    w = world
    client, remote = w.pod("client"), w.pod("remote")
    for node in (1, 2):
        netns.stop_process(w.agents[node].proc)
        n = w.c.node(node)
        w.c.run(n.netns, [PY, str(DRIVER), "uninstall", *w.base_args(node)])
        for iface in ["eth0", *(p.host_iface for p in n.pods.values())]:
            out = netns.ns_run(n.netns, ["tc", "filter", "show", "dev", iface, "ingress"])
            assert out.strip() == "", f"{n.name} {iface}: {out}"
        assert "lookup 100" not in netns.ip(n.netns, ["rule", "show"])
        assert netns.ip(n.netns, ["route", "show", "table", "100"]).strip() == ""
        assert not w.bpf_dir(node).exists()
    assert not [p for p in os.listdir(w.bpffs) if p.startswith("node-")]
    # Node-1's relay is gone, so a captured connection would fail; it is routed instead.
    res = tcp_probe(client.netns, remote.ip, 8080)
    assert res.ok and res.peer_ip == client.ip, res

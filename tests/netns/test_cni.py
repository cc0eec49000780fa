"""ambit-cni and the dev CNI runner, against the real ptp + host-local plugins and the kernel.

What this proves: a pod wired exactly as containerd/libcni would wire it (the conflist of
``conflist_for_node`` run by ``CniRunner`` inside the node namespace) gets its interface,
address and routes from the real plugins; the node agent is told the right pod, IPs and host
interface; a missing or refusing agent fails the sandbox with the CNI code that makes the kubelet
retry; DEL undoes everything and releases the IP lease; and the ``ambit-cni`` executable speaks
the CNI protocol on its own (stdin/env in, one JSON document out, no tracebacks).

Network safety: every namespace here is created by the test (``Cluster`` or ``netns.netns``,
names ``amb-<pid>-...``), no namespace is connected to the root namespace, and the plugins run
only inside a node namespace. The agent sockets and host-local lease directories live in a temp
directory removed at the end.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.cni import spec
from ambit.dev import netns
from ambit.dev.cni_runner import (
    CniConfigError,
    CniError,
    CniRunner,
    RuntimeConf,
    conflist_for_node,
    default_ambit_cni,
    k8s_pod_args,
    prepare_plugin_dir,
)
from ambit.dev.mesh import PYTHON, tcp_probe
from ambit.dev.topology import Cluster, Node
from tests.cni_data import PREV_RESULT

AMBIT_CNI = default_ambit_cni()
NETNS_DIR = Path("/var/run/netns")


def _ok(_: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "captured": True, "reason": "test agent"}


class FakeAgent:
    """The node agent's side of the pinned protocol, recording every request.

    ``answer`` maps a request to the response; ``None`` means "never answer" (a hung agent),
    and a ``str`` is sent as is (a broken agent).
    """

    def __init__(self, path: Path, answer: Callable[[dict[str, Any]], Any] = _ok) -> None:
        self.path = path
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self._release = threading.Event()
        agent = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request = json.loads(self.rfile.readline())
                agent.requests.append(request)
                response = agent.answer(request)
                if response is None:
                    agent._release.wait(30)
                    return
                text = response if isinstance(response, str) else json.dumps(response)
                self.wfile.write(text.encode() + b"\n")

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True
            block_on_close = False

        self._server = Server(str(path), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def ops(self) -> list[str]:
        return [r["op"] for r in self.requests]

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self.path.unlink(missing_ok=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, so Unix socket paths stay under the 108-byte limit.
    d = Path(tempfile.mkdtemp(prefix="ambit-cni-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def fake_agent(path: Path, answer: Callable[[dict[str, Any]], Any] = _ok) -> Iterator[FakeAgent]:
    agent = FakeAgent(path, answer)
    try:
        yield agent
    finally:
        agent.close()


# --- helpers for the namespace tests -------------------------------------------------------


@dataclass
class NodeCni:
    """One dev node wired for CNI: its namespace, plugin dir, state dir and agent socket."""

    cluster: Cluster
    node: Node
    workdir: Path
    bin_dir: Path

    @property
    def node_dir(self) -> Path:
        return self.workdir / self.node.name

    @property
    def socket(self) -> Path:
        return self.workdir / "agent.sock"

    def runner(self, **options: Any) -> CniRunner:
        conflist = conflist_for_node(self.node.pod_cidr, self.node_dir, self.socket, **options)
        return CniRunner(conflist, [self.bin_dir], self.node.netns, self.node_dir / "cache")

    def new_pod(self, name: str, container_id: str) -> RuntimeConf:
        """A pod sandbox: an empty namespace (lo up) and the RuntimeConf containerd would use."""
        ns = f"{self.cluster.prefix}{name}"
        netns.create_netns(ns)
        self.cluster.cleanup.netns(ns)
        return RuntimeConf(
            container_id=container_id,
            netns_path=str(NETNS_DIR / ns),
            ifname="eth0",
            args=k8s_pod_args("demo", name, f"uid-{name}", container_id),
        )

    def leases(self) -> list[str]:
        """IPs host-local holds for this node (one file per leased address)."""
        d = self.node_dir / "host-local" / "ambit"
        if not d.is_dir():
            return []
        names = [p.name for p in d.iterdir()]
        return sorted(n for n in names if _is_ip(n))

    def node_links(self) -> list[str]:
        return [link["ifname"] for link in json.loads(netns.ip(self.node.netns, ["-j", "link"]))]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ns_of(rt: RuntimeConf) -> str:
    return Path(rt.netns_path).name


def _root_links() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


@pytest.fixture
def node_cni(workdir: Path) -> Iterator[NodeCni]:
    before = _root_links()
    with Cluster(1) as c:
        yield NodeCni(c, c.node(1), workdir, prepare_plugin_dir(workdir / "bin"))
    assert _root_links() == before, "a CNI plugin touched the root namespace"


def _start_echo(nc: NodeCni, ns: str, ip: str) -> None:
    ready = nc.workdir / f"echo-{ns}.ready"
    argv = [PYTHON, "-m", "ambit.dev.echo", "--host", ip, "--port", "8080"]
    nc.cluster.spawn(ns, [*argv, "--ready-file", str(ready)], log=nc.workdir / "echo.log")
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline, (nc.workdir / "echo.log").read_text()
        time.sleep(0.05)


# --- the real chain: ptp + host-local + ambit-cni ------------------------------------------


@pytest.mark.netns
def test_add_check_del_with_the_real_plugins(node_cni: NodeCni) -> None:
    nc = node_cni
    runner = nc.runner()
    rt = nc.new_pod("web", "c0ffee01")
    pod_ns = _ns_of(rt)
    with fake_agent(nc.socket) as agent:
        result = runner.add(rt)

        # The pod got eth0 with an address of the node's pod subnet, and a default route.
        address = ipaddress.ip_interface(result["ips"][0]["address"])
        pod_ip = str(address.ip)
        assert address.ip in ipaddress.ip_network(nc.node.pod_cidr)
        assert pod_ip != nc.node.gateway
        assert result["ips"][0]["gateway"] == nc.node.gateway
        (eth0,) = json.loads(netns.ip(pod_ns, ["-j", "addr", "show", "dev", "eth0"]))
        assert [a["local"] for a in eth0["addr_info"] if a["family"] == "inet"] == [pod_ip]
        (default,) = json.loads(netns.ip(pod_ns, ["-j", "route", "show", "default"]))
        assert (default["gateway"], default["dev"]) == (nc.node.gateway, "eth0")

        # The agent heard about the pod from ambit-cni, with what the runtime and ptp said.
        assert agent.ops() == ["add"]
        (req,) = agent.requests
        host_iface = req["hostIface"]
        assert req == {
            "op": "add",
            "containerId": "c0ffee01",
            "netns": rt.netns_path,
            "ifname": "eth0",
            "podName": "web",
            "podNamespace": "demo",
            "podUid": "uid-web",
            "ips": [pod_ip],
            "hostIface": host_iface,
        }
        assert host_iface.startswith("veth") and host_iface in nc.node_links()
        assert [i["name"] for i in result["interfaces"] if not i.get("sandbox")] == [host_iface]
        assert nc.leases() == [pod_ip]

        # The node reaches the pod over the new veth (inside the namespaces only).
        _start_echo(nc, pod_ns, pod_ip)
        probe = tcp_probe(nc.node.netns, pod_ip, 8080)
        assert probe.ok, probe.error

        # CHECK runs the chain against the cached result; the agent is asked too.
        runner.check(rt)
        assert agent.ops() == ["add", "check"]
        assert agent.requests[1]["ips"] == [pod_ip]

        # DEL (reverse order, cached result): veth gone, lease released, agent told.
        assert runner.delete(rt) == []
        assert agent.ops() == ["add", "check", "del"]
        assert agent.requests[2]["ips"] == [pod_ip]
        assert agent.requests[2]["hostIface"] == host_iface
        assert host_iface not in nc.node_links()
        assert nc.leases() == []
        links = json.loads(netns.ip(pod_ns, ["-j", "link"]))
        assert [link["ifname"] for link in links] == ["lo"]
        assert runner.cached_result(rt) is None
        assert not tcp_probe(nc.node.netns, pod_ip, 8080, timeout=1.0).ok

        # DEL again (the runtime retries DELs): still fine, the agent is told without IPs.
        assert runner.delete(rt) == []
        assert agent.requests[3]["op"] == "del" and agent.requests[3]["ips"] == []


@pytest.mark.netns
def test_two_pods_get_distinct_addresses_and_veths(node_cni: NodeCni) -> None:
    runner = node_cni.runner()
    a, b = node_cni.new_pod("a", "aaaa"), node_cni.new_pod("b", "bbbb")
    with fake_agent(node_cni.socket) as agent:
        ra, rb = runner.add(a), runner.add(b)
        assert ra["ips"][0]["address"] != rb["ips"][0]["address"]
        assert agent.requests[0]["hostIface"] != agent.requests[1]["hostIface"]
        assert len(node_cni.leases()) == 2
        assert runner.delete(a) == []
        # The runtime may remove a sandbox's namespace before its DEL: still a clean DEL.
        netns.delete_netns(_ns_of(b))
        assert runner.delete(b) == []
        assert node_cni.leases() == []
        assert not any(name.startswith("veth") for name in node_cni.node_links())
        assert agent.ops() == ["add", "add", "del", "del"]


@pytest.mark.netns
def test_add_fails_closed_without_the_agent_and_del_cleans_up(node_cni: NodeCni) -> None:
    nc = node_cni
    runner = nc.runner()
    rt = nc.new_pod("web", "deadbeef")
    with pytest.raises(CniError) as info:
        runner.add(rt)
    err = info.value
    assert (err.plugin, err.command, err.code) == ("ambit-cni", "ADD", spec.ERR_TRY_AGAIN_LATER)
    assert str(nc.socket) in err.msg and "not running" in err.msg
    assert "demo/web" in err.msg and "kubelet retries" in err.msg
    assert "code 11" in str(err)

    # ptp had already wired the pod: exactly what containerd's DEL after a failed ADD cleans.
    assert any(name.startswith("veth") for name in nc.node_links())
    assert len(nc.leases()) == 1
    assert runner.cached_result(rt) is None  # only a successful ADD is cached
    assert runner.delete(rt) == []  # ambit-cni's DEL succeeds without an agent
    assert not any(name.startswith("veth") for name in nc.node_links())
    assert nc.leases() == []


@pytest.mark.netns
def test_agent_refusal_fails_the_sandbox(node_cni: NodeCni) -> None:
    runner = node_cni.runner()
    rt = node_cni.new_pod("web", "feed01")

    def refuse(_: dict[str, Any]) -> dict[str, Any]:
        return {"ok": False, "error": "pod demo/web is not in the registry yet"}

    with fake_agent(node_cni.socket, refuse) as agent, pytest.raises(CniError) as info:
        runner.add(rt)
    assert agent.ops() == ["add"]
    assert info.value.code == spec.ERR_AGENT_REFUSED
    assert "not in the registry yet" in info.value.msg
    assert runner.delete(rt) == []
    assert node_cni.leases() == []


@pytest.mark.netns
def test_fail_open_starts_the_pod_uncaptured(
    node_cni: NodeCni, caplog: pytest.LogCaptureFixture
) -> None:
    runner = node_cni.runner(failure_policy="fail-open")
    rt = node_cni.new_pod("web", "0pen0001")
    caplog.set_level("INFO", logger="ambit.dev.cni_runner")
    result = runner.add(rt)
    pod_ip = str(ipaddress.ip_interface(result["ips"][0]["address"]).ip)
    (eth0,) = json.loads(netns.ip(_ns_of(rt), ["-j", "addr", "show", "dev", "eth0"]))
    assert pod_ip in [a["local"] for a in eth0["addr_info"]]
    # The runner surfaces ambit-cni's stderr: the failure is logged, not hidden.
    assert "starts WITHOUT capture (failurePolicy fail-open)" in caplog.text
    runner.check(rt)  # CHECK follows the same policy
    assert runner.delete(rt) == []


@pytest.mark.netns
def test_check_reports_what_the_agent_says(node_cni: NodeCni) -> None:
    runner = node_cni.runner()
    rt = node_cni.new_pod("web", "c4ec4")
    with pytest.raises(CniError, match=r"no cached result.*ADD it first"):
        runner.check(rt)

    def lost_on_check(req: dict[str, Any]) -> dict[str, Any]:
        if req["op"] == "check":
            return {"ok": False, "error": "capture of demo/web is missing"}
        return _ok(req)

    with fake_agent(node_cni.socket, lost_on_check):
        runner.add(rt)
        with pytest.raises(CniError) as info:
            runner.check(rt)
        assert (info.value.plugin, info.value.code) == ("ambit-cni", spec.ERR_AGENT_REFUSED)
        assert "capture of demo/web is missing" in info.value.msg
        assert runner.delete(rt) == []


@pytest.mark.netns
def test_version_of_the_plugins_through_the_runner(node_cni: NodeCni) -> None:
    runner = node_cni.runner()
    assert runner.version("ambit-cni") == spec.version_result()
    assert "1.0.0" in runner.version("ptp")["supportedVersions"]
    with pytest.raises(CniError, match="no executable 'flannel'"):
        runner.version("flannel")


# --- the runner's libcni behaviour, with a recording plugin --------------------------------

RECORDER = """#!{python}
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
rec = {{"type": conf["type"], "conf": conf, "netns": os.readlink("/proc/self/ns/net"),
        "env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}}}
with open(conf["log"], "a") as f:
    f.write(json.dumps(rec) + "\\n")
if cmd == conf.get("fail"):
    if conf.get("crash"):
        print("oops", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 123, "msg": "boom",
                      "details": "from " + conf["type"]}}))
    sys.exit(1)
if cmd == "ADD":
    res = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "ips": []}}
    res = dict(res, chain=res.get("chain", []) + [conf["type"]])
    print(json.dumps(res))
"""


@pytest.fixture
def recorder_ns(workdir: Path) -> Iterator[tuple[str, Path]]:
    """A lone namespace plus a plugin dir with two recording plugins, rec1 and rec2."""
    bin_dir = workdir / "rec-bin"
    bin_dir.mkdir()
    for name in ("rec1", "rec2"):
        path = bin_dir / name
        path.write_text(RECORDER.format(python=sys.executable))
        path.chmod(0o755)
    with netns.netns(f"{netns.netns_prefix()}cnirec") as ns:
        yield ns, bin_dir


def _records(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [json.loads(line) for line in lines]


@pytest.mark.netns
def test_runner_calls_plugins_like_libcni(recorder_ns: tuple[str, Path], workdir: Path) -> None:
    ns, bin_dir = recorder_ns
    log = workdir / "calls.jsonl"
    conflist = {
        "cniVersion": "1.0.0",
        "name": "recnet",
        "plugins": [
            {"type": "rec1", "log": str(log), "name": "ignored", "cniVersion": "0.1.0"},
            {"type": "rec2", "log": str(log)},
        ],
    }
    runner = CniRunner(conflist, [workdir / "nowhere", bin_dir], ns, workdir / "cache")
    rt = RuntimeConf("abc", "/var/run/netns/somepod", "eth1", (("K8S_POD_NAME", "p"),))
    result = runner.add(rt)
    assert result["chain"] == ["rec1", "rec2"]

    add1, add2 = _records(log)
    node_ns = netns.ns_run(ns, ["readlink", "/proc/self/ns/net"]).strip()
    assert add1["netns"] == add2["netns"] == node_ns  # run inside the node namespace
    assert add1["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "abc",
        "CNI_NETNS": "/var/run/netns/somepod",
        "CNI_IFNAME": "eth1",
        "CNI_ARGS": "K8S_POD_NAME=p",
        "CNI_PATH": f"{workdir / 'nowhere'}:{bin_dir}",
    }
    # name and cniVersion come from the list; only the second plugin gets a prevResult.
    assert (add1["conf"]["name"], add1["conf"]["cniVersion"]) == ("recnet", "1.0.0")
    assert "prevResult" not in add1["conf"]
    assert add2["conf"]["prevResult"]["chain"] == ["rec1"]

    # CHECK: in order, each with the final cached result. DEL: reverse order, same result.
    runner.check(rt)
    assert runner.delete(rt) == []
    calls = _records(log)[2:]
    assert [(c["env"]["CNI_COMMAND"], c["type"]) for c in calls] == [
        ("CHECK", "rec1"), ("CHECK", "rec2"), ("DEL", "rec2"), ("DEL", "rec1"),
    ]  # fmt: skip
    assert all(c["conf"]["prevResult"] == result for c in calls)
    assert runner.cached_result(rt) is None


@pytest.mark.netns
def test_runner_surfaces_errors_and_del_runs_every_plugin(
    recorder_ns: tuple[str, Path], workdir: Path
) -> None:
    ns, bin_dir = recorder_ns
    log = workdir / "calls.jsonl"
    plugins: list[dict[str, Any]] = [
        {"type": "rec1", "log": str(log)},
        {"type": "rec2", "log": str(log), "fail": "DEL", "crash": True},
    ]
    conflist = {"cniVersion": "1.0.0", "name": "recnet", "plugins": plugins}
    rt = RuntimeConf("abc", "/var/run/netns/somepod")
    runner = CniRunner(conflist, [bin_dir], ns, workdir / "cache")
    result = runner.add(rt)

    # rec2 crashes on DEL without an error object; rec1 is still deleted, the cache kept.
    (err,) = runner.delete(rt)
    assert (err.plugin, err.command, err.code) == ("rec2", "DEL", None)
    assert "exited with status 2" in err.msg and err.stderr.strip() == "oops"
    assert [c["type"] for c in _records(log) if c["env"]["CNI_COMMAND"] == "DEL"] == [
        "rec2",
        "rec1",
    ]
    assert runner.cached_result(rt) == result

    # A CNI error object becomes code, msg and details.
    plugins[0]["fail"] = "ADD"
    failing = CniRunner(conflist, [bin_dir], ns, workdir / "cache2")
    with pytest.raises(CniError) as info:
        failing.add(rt)
    assert (info.value.plugin, info.value.code, info.value.msg) == ("rec1", 123, "boom")
    assert info.value.details == "from rec1"
    assert [c["type"] for c in _records(log)][-1] == "rec1"  # rec2 never ran

    missing = CniRunner(
        {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "nope"}]},
        [bin_dir],
        ns,
        workdir / "cache3",
    )
    with pytest.raises(CniError, match="no executable 'nope'") as info:
        missing.add(rt)
    assert info.value.plugin == "nope"


# --- pure parts of the runner --------------------------------------------------------------


def test_conflist_for_node(tmp_path: Path) -> None:
    conflist = conflist_for_node("10.244.3.0/24", tmp_path / "node-3", "/run/ambit/cni.sock")
    assert conflist == {
        "cniVersion": "1.0.0",
        "name": "ambit",
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": False,
                "mtu": 1500,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.244.3.0/24", "gateway": "10.244.3.1"}]],
                    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.3.1"}],
                    "dataDir": str(tmp_path / "node-3" / "host-local"),
                },
            },
            {
                "type": "ambit-cni",
                "agentSocket": "/run/ambit/cni.sock",
                "failurePolicy": "fail-closed",
            },
        ],
    }
    custom = conflist_for_node(
        "10.9.0.0/16", tmp_path, "/s", gateway="10.9.0.254", timeout_seconds=3
    )
    assert custom["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.9.0.0/16",
                                                         "gateway": "10.9.0.254"}]]  # fmt: skip
    assert custom["plugins"][1]["timeoutSeconds"] == 3


@pytest.mark.parametrize(
    ("cidr", "gateway", "needle"),
    [("10.244.1.1/24", None, "host bits"), ("nope", None, "pod CIDR"),
     ("10.244.1.0/24", "10.244.2.1", "outside the pod CIDR")],
)  # fmt: skip
def test_conflist_for_node_rejects_bad_subnets(
    tmp_path: Path, cidr: str, gateway: str | None, needle: str
) -> None:
    with pytest.raises(CniConfigError, match=needle):
        conflist_for_node(cidr, tmp_path, "/s", gateway=gateway)


@pytest.mark.parametrize(
    "conflist",
    [{}, {"name": "n", "cniVersion": "1.0.0", "plugins": []},
     {"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "../ptp"}]},
     {"name": "n", "plugins": [{"type": "ptp"}]}],
)  # fmt: skip
def test_runner_rejects_bad_conflists(tmp_path: Path, conflist: dict[str, Any]) -> None:
    with pytest.raises(CniConfigError, match="conflist"):
        CniRunner(conflist, [tmp_path], "node", tmp_path)


def test_runtime_conf_checks_its_fields() -> None:
    assert RuntimeConf("abc", "/x", args=(("A", "1"), ("B", "2"))).cni_args == "A=1;B=2"
    with pytest.raises(CniConfigError, match="container id"):
        RuntimeConf("a b", "/x")
    with pytest.raises(CniConfigError, match="CNI_ARGS"):
        RuntimeConf("abc", "/x", args=(("A", "1;B=2"),))
    with pytest.raises(ValueError, match="interface name"):
        RuntimeConf("abc", "/x", ifname="much-too-long-name")


def test_plugin_dir_links_the_plugins(tmp_path: Path) -> None:
    bin_dir = prepare_plugin_dir(tmp_path / "bin")
    assert sorted(p.name for p in bin_dir.iterdir()) == [
        "ambit-cni", "host-local", "loopback", "ptp",
    ]  # fmt: skip
    assert (bin_dir / "ptp").readlink() == Path("/usr/lib/cni/ptp")
    assert (bin_dir / "ambit-cni").readlink() == AMBIT_CNI
    prepare_plugin_dir(tmp_path / "bin")  # idempotent
    with pytest.raises(CniConfigError, match="containernetworking-plugins"):
        prepare_plugin_dir(tmp_path / "bin2", system_dir=tmp_path / "empty")
    with pytest.raises(CniConfigError, match="pip install"):
        prepare_plugin_dir(tmp_path / "bin3", ambit_cni=tmp_path / "no-such-script")


# --- the ambit-cni executable on its own ---------------------------------------------------



@dataclass
class PluginRun:
    status: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.stdout)  # exactly one JSON document, nothing else
        assert isinstance(doc, dict)
        return doc


def run_plugin(command: str, stdin: str | dict[str, Any], **env: str) -> PluginRun:
    assert AMBIT_CNI.exists(), f"{AMBIT_CNI} is missing: run `.venv/bin/pip install -e .`"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    full_env.update(
        CNI_COMMAND=command,
        CNI_CONTAINERID="abc123",
        CNI_NETNS="/var/run/netns/x",
        CNI_IFNAME="eth0",
        CNI_ARGS="K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web;K8S_POD_UID=u1",
        CNI_PATH="/opt/cni/bin",
    )
    full_env.update(env)
    text = stdin if isinstance(stdin, str) else json.dumps(stdin)
    res = subprocess.run(
        [str(AMBIT_CNI)], input=text, capture_output=True, text=True, env=full_env, timeout=30
    )
    assert "Traceback" not in res.stderr
    return PluginRun(res.returncode, res.stdout, res.stderr)


def netconf(sock: Path, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "ambit", "type": "ambit-cni",
            "agentSocket": str(sock), "prevResult": PREV_RESULT, **extra}  # fmt: skip


def test_version_direct() -> None:
    run = run_plugin("VERSION", '{"cniVersion": "1.0.0"}')
    assert (run.status, run.json(), run.stderr) == (0, spec.version_result(), "")


def test_bad_config_direct() -> None:
    run = run_plugin("ADD", "{this is not json")
    assert run.status == 1
    err = run.json()
    assert err["code"] == spec.ERR_INVALID_NETWORK_CONFIG and err["cniVersion"] == "1.0.0"
    assert "not valid JSON" in err["msg"]
    assert set(err) == {"cniVersion", "code", "msg", "details"}


def test_bad_env_and_unchained_add_direct(workdir: Path) -> None:
    run = run_plugin("ADD", netconf(workdir / "a.sock"), CNI_IFNAME="")
    assert run.status == 1 and run.json()["code"] == spec.ERR_INVALID_ENV
    assert "CNI_IFNAME" in run.json()["msg"]
    run = run_plugin("ADD", netconf(workdir / "a.sock", prevResult=None))
    assert run.status == 1 and run.json()["code"] == spec.ERR_INVALID_NETWORK_CONFIG
    assert "chained plugin" in run.json()["msg"]
    run = run_plugin("DANCE", "{}")
    assert run.status == 1 and run.json()["code"] == spec.ERR_INVALID_ENV


def test_add_passes_the_result_through_direct(workdir: Path) -> None:
    sock = workdir / "a.sock"
    with fake_agent(sock) as agent:
        run = run_plugin("ADD", netconf(sock, cniVersion="0.4.0"))
    assert run.status == 0, run.stdout + run.stderr
    assert run.json() == PREV_RESULT
    (req,) = agent.requests
    assert (req["op"], req["ips"], req["hostIface"]) == ("add", ["10.244.1.5"], "veth12345678")
    assert (req["podName"], req["podNamespace"], req["podUid"]) == ("web", "demo", "u1")


def test_add_without_agent_direct(workdir: Path) -> None:
    sock = workdir / "gone.sock"
    run = run_plugin("ADD", netconf(sock))
    assert run.status == 1
    err = run.json()
    assert err["code"] == spec.ERR_TRY_AGAIN_LATER
    assert f"node agent at {sock} is not running" in err["msg"]
    assert "does not exist" in err["details"]

    # A socket file nobody listens on (an agent that died) is the same "try again later".
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    run = run_plugin("ADD", netconf(sock))
    assert run.json()["code"] == spec.ERR_TRY_AGAIN_LATER
    assert "nothing listens" in run.json()["details"]

    run = run_plugin("ADD", netconf(sock, failurePolicy="fail-open"))
    assert (run.status, run.json()) == (0, PREV_RESULT)
    assert "WITHOUT capture" in run.stderr


def test_hung_and_broken_agents_direct(workdir: Path) -> None:
    sock = workdir / "a.sock"
    with fake_agent(sock, lambda _: None):
        started = time.monotonic()
        run = run_plugin("ADD", netconf(sock, timeoutSeconds=0.5))
        assert time.monotonic() - started < 10
    assert run.status == 1 and run.json()["code"] == spec.ERR_TRY_AGAIN_LATER
    assert "no answer within 0.5s" in run.json()["msg"]

    with fake_agent(sock, lambda _: "<html>"):
        run = run_plugin("ADD", netconf(sock))
    assert run.status == 1 and run.json()["code"] == spec.ERR_AGENT_PROTOCOL


def test_del_never_fails_direct(workdir: Path) -> None:
    sock = workdir / "a.sock"
    for stdin in (netconf(sock), netconf(sock, prevResult=None), "{garbage"):
        run = run_plugin("DEL", stdin, CNI_NETNS="")
        assert (run.status, run.stdout) == (0, "")
    with fake_agent(sock, lambda _: {"ok": False, "error": "whatever"}) as agent:
        run = run_plugin("DEL", netconf(sock))
    assert (run.status, run.stdout, agent.ops()) == (0, "", ["del"])
    assert "whatever" in run.stderr


def test_check_direct(workdir: Path) -> None:
    sock = workdir / "a.sock"
    with fake_agent(sock) as agent:
        run = run_plugin("CHECK", netconf(sock))
    assert (run.status, run.stdout, agent.ops()) == (0, "", ["check"])
    with fake_agent(sock, lambda _: {"ok": False, "error": "not captured"}):
        run = run_plugin("CHECK", netconf(sock))
    assert run.status == 1 and run.json()["code"] == spec.ERR_AGENT_REFUSED
    assert "not captured" in run.json()["msg"]

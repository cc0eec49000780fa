"""Probe 11: the node agent's unix sockets against processes that are not the node's ztunnel.

On node-2, while the real ztunnel holds its registration: a root process that is not
``ambit ztunnel`` offers its own listening sockets (200 times); processes that pose as one
(run as ``python .../ambit ztunnel``) register no listeners, a partial or repeated set, pipes,
unbound TCP or UDP sockets; a process running as uid 65534 knocks on ``ztunnel.sock`` and
``cni.sock`` (refused by their 0600 mode, and with the mode widened, by the agent's
``SO_PEERCRED`` check). Every one is refused with its reason; the agent's registration (the
ztunnel's pid) and its SOCKMAP (the pinned ``listeners`` map, dumped with bpftool) are the same
before and after, and mesh traffic, which eBPF steers through that SOCKMAP, flows throughout.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ambit.dev import mesh, netns
from tests.hostile.conftest import HostileMesh, Watch, peer_argv, run_in

pytestmark = [pytest.mark.netns, pytest.mark.hostile, pytest.mark.timeout(180)]

RSS_BUDGET_MIB = 16  # the agent
REFUSED_WITHIN_S = 2.0
SLOTS = ["outbound", "inbound", "inbound_plaintext"]
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
# Run by the system interpreter as uid 65534: one line to a unix socket, its answer back.
NOBODY_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": type(e).__name__}))
    sys.exit(0)
try:
    s.sendall(sys.argv[2].encode() + b"\\n")
except OSError:
    pass
answer = b""
while not answer.endswith(b"\\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    answer += chunk
print(json.dumps({"answer": json.loads(answer or b"null")}))
"""
POSING = """import sys
from tests.hostile.peer import main
sys.exit(main(sys.argv[2:]))
"""


def _sockmap(m: HostileMesh, node: str) -> Any:
    pinned = Path(m.cluster.node(node).bpf_dir) / "listeners"
    return json.loads(netns.run(["bpftool", "-j", "map", "dump", "pinned", str(pinned)]))


def _as_nobody(ns: str, path: Path, line: str) -> dict[str, Any]:
    res = subprocess.run(netns.ns_argv(ns, [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        SYSTEM_PYTHON, "-c", NOBODY_CLIENT, str(path), line]),
        capture_output=True, text=True, timeout=30, check=False, cwd="/")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_agent_sockets_refuse_all_but_the_ztunnel(hostile_mesh: HostileMesh) -> None:
    m = hostile_mesh
    c = m.cluster
    node = c.node("node-2")
    run_dir = Path(node.run_dir)
    zsock, csock = run_dir / "ztunnel.sock", run_dir / "cni.sock"
    zt = m.ztunnel("node-2")
    agent = c.process("agent/node-2")
    before, map_before = c.agent_status(node), _sockmap(m, "node-2")
    assert before["ztunnelPid"] == zt.pid, before
    assert len(map_before) == len(SLOTS), map_before
    posing = m.work / "posing" / "ambit"
    posing.parent.mkdir(exist_ok=True)
    posing.write_text(POSING)

    def link(names: list[str], kind: str, count: int, pose: bool = True) -> dict[str, Any]:
        args = ["link", "--socket", str(zsock), "--kind", kind, "--count", str(count), *names]
        argv = [mesh.PYTHON, str(posing), "ztunnel", *args] if pose else peer_argv(*args)
        return run_in(node.netns, argv, timeout=90)

    cases: dict[str, tuple[dict[str, Any], int, str]] = {}
    with Watch(agent.pid, {"log": Path(agent.log)}) as watch, m.legit_loop() as during:
        cases["root, not ambit ztunnel, its own listeners"] = (
            link(SLOTS, "listening", 200, pose=False), 200, "is not an `ambit ztunnel` process")
        cases["posing, no listeners"] = (link([], "none", 20), 20, "no listeners")
        cases["posing, outbound only"] = (link(["outbound"], "listening", 20), 20,
                                          "missing: inbound, inbound_plaintext")
        # A name may repeat (the members of a worker group), but only on one address.
        cases["posing, a name twice"] = (link(["outbound", *SLOTS], "listening", 20), 20,
                                          "must share its address")
        cases["posing, pipes"] = (link(SLOTS, "pipe", 20), 20, "the descriptor is not a socket")
        cases["posing, unbound TCP"] = (link(SLOTS, "unbound", 20), 20, "not listening")
        cases["posing, UDP"] = (link(SLOTS, "udp", 20), 20, "not a TCP socket")
        nobody: dict[str, Any] = {}
        for name, path, line in (("ztunnel.sock", zsock, '{"listeners": []}'),
                                 ("cni.sock", csock, '{"op": "del", "containerId": "x"}')):
            assert path.stat().st_mode & 0o777 == 0o600, oct(path.stat().st_mode)
            nobody[f"{name} as is"] = _as_nobody(node.netns, path, line)
            path.chmod(0o666)  # as if its mode were wrong: the peer check must hold alone
            try:
                nobody[f"{name} widened"] = _as_nobody(node.netns, path, line)
            finally:
                path.chmod(0o600)
    after, map_after = c.agent_status(node), _sockmap(m, "node-2")
    legit_after = m.legit()
    m.record("11 agent sockets", agent_rss_growth_mib=watch.growth_mib,
             refused={k: (r["answers"], r["max_elapsed_s"]) for k, (r, _, _) in cases.items()},
             nobody=nobody, refused_peers=after["refusedPeers"],
             agent_log_lines=watch.lines["log"], legit_during=during.result,
             legit_after=legit_after)
    for name, (r, count, reason) in cases.items():
        assert r["answers"] == {"refused": count}, (name, r)
        assert reason in r["first"]["refused"]["error"], (name, r["first"])
        assert r["max_elapsed_s"] < REFUSED_WITHIN_S, (name, r)
    for name in ("ztunnel.sock", "cni.sock"):
        assert nobody[f"{name} as is"] == {"connect": "PermissionError"}, nobody
        answer = nobody[f"{name} widened"]["answer"]
        assert answer["ok"] is False and f"refused a peer with uid {NOBODY}" in answer["error"], \
            nobody
    assert after["ztunnelPid"] == zt.pid, after
    assert map_after == map_before, (map_before, map_after)
    assert after["refusedPeers"]["ztunnel"] - before["refusedPeers"]["ztunnel"] == 201, after
    assert after["refusedPeers"]["cni"] - before["refusedPeers"]["cni"] == 1, after
    assert watch.growth_mib < RSS_BUDGET_MIB, watch.growth_mib
    assert during.result["ok"] >= 1 and during.result["failed"] == 0, during.result
    assert legit_after["ok"] == 5 and legit_after["failed"] == 0, legit_after

"""Probe 10: the controller's state stream to a caller without a node token.

``StateService.Subscribe`` streams the whole mesh (every workload, address and policy), so it
is for nodes only: without a token, with a made-up one, and with a certificate but no token
(the mTLS port 15011, using the attacker's valid mesh certificate), any node name gets
UNAUTHENTICATED and no state; node-1's real token naming node-2 gets PERMISSION_DENIED; 200
such calls at once are all refused while the ztunnels stay subscribed and mesh traffic flows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ambit.dev import mesh
from mesh.ports import METRICS_PORT
from tests.hostile.conftest import HostileMesh, Watch, peer_argv, run_in

pytestmark = [pytest.mark.netns, pytest.mark.hostile, pytest.mark.timeout(180)]

RSS_BUDGET_MIB = 32  # the controller, over 200 refused streams
REFUSED_WITHIN_S = 2.0
FLOOD = 200
NODES = ["node-1", "node-2", "no-such-node", "../node-1", "node-1\n", "n" * 300]


def _subscribe(m: HostileMesh, *args: str) -> dict[str, Any]:
    c = m.cluster
    return run_in(m.attacker.netns, peer_argv(
        "subscribe", "--root-cert", str(c.trust_bundle), *args), timeout=90)


def _xds_connected(m: HostileMesh, node: str) -> float:
    status, body = mesh.http_get(m.cluster.node(node).netns,
                                 f"http://127.0.0.1:{METRICS_PORT}/metrics")
    assert status == 200, body[:200]
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("ambit_xds_connected"))


def _refused(result: dict[str, Any], code: str) -> None:
    for node, r in result["nodes"].items():
        assert r["updates"] == 0, (node, r)
        assert r["code"] == code, (node, r)
        assert r["elapsed_s"] < REFUSED_WITHIN_S, (node, r)


def test_subscribe_without_a_node_token_gets_no_state(hostile_mesh: HostileMesh) -> None:
    m = hostile_mesh
    c = m.cluster
    ctl = c.process("controller")
    tls_port = c.controller_address
    mtls_port = tls_port.rsplit(":", 1)[0] + ":15011"
    node1_token = (Path(c.node("node-1").run_dir) / "node.token").read_text().strip()
    with Watch(ctl.pid, {"log": Path(ctl.log)}) as watch, m.legit_loop() as during:
        no_token = _subscribe(m, "--address", tls_port, "--flood", str(FLOOD), *NODES)
        empty = _subscribe(m, "--address", tls_port, "")
        cert_only = _subscribe(m, "--address", mtls_port, "--identity-dir",
                               str(m.identities), *NODES[:3])
        made_up = _subscribe(m, "--address", tls_port, "--token", "x" * 43, "node-1")
        other_node = _subscribe(m, "--address", tls_port, "--token", node1_token, "node-2")
    after = m.legit()
    connected = {n: _xds_connected(m, n) for n in ("node-1", "node-2")}
    m.record("10 Subscribe without node token", controller_rss_growth_mib=watch.growth_mib,
             refused_in_s=max(r["elapsed_s"] for r in no_token["nodes"].values()),
             flood=no_token["flood"], other_node=other_node["nodes"]["node-2"]["code"],
             controller_log_lines=watch.lines["log"], legit_during=during.result,
             legit_after=after, xds_connected=connected)
    _refused(no_token, "UNAUTHENTICATED")
    _refused(cert_only, "UNAUTHENTICATED")
    _refused(made_up, "UNAUTHENTICATED")
    _refused(other_node, "PERMISSION_DENIED")
    assert empty["nodes"][""]["code"] in ("INVALID_ARGUMENT", "UNAUTHENTICATED"), empty
    assert empty["nodes"][""]["updates"] == 0, empty
    flood = no_token["flood"]
    assert flood["codes"] == {"UNAUTHENTICATED": FLOOD} and flood["updates"] == 0, flood
    assert flood["max_elapsed_s"] < 10, flood
    assert watch.growth_mib < RSS_BUDGET_MIB, watch.growth_mib
    assert connected == {"node-1": 1.0, "node-2": 1.0}, connected
    assert during.result["ok"] >= 1 and during.result["failed"] == 0, during.result
    assert after["ok"] == 5 and after["failed"] == 0, after

"""Probe 9: a workload asking the ztunnel to connect to the node's own ports.

The ztunnel runs in the node's network namespace, so a connection it dials to 127.0.0.1:15000
reaches its own admin (``/config_dump``), and one to the node's address reaches the node
agent (15022, ``/debug/pods``). Three ways to ask: SOCKS5 from the mesh pod ``client`` (for
this probe ztunnel-1 serves SOCKS5 on node-1's pod gateway address 10.244.1.1, which the
agent leaves uncaptured, ``--exclude-cidr``: the listener needs a workload on its node as the
source), a captured connection from ``client`` to node-1's own addresses, and an HBONE CONNECT
from the attacker to ztunnel-2. The fix: SOCKS5 answers 0x02 (not
allowed), the captured connection is refused, HBONE answers 403, and nothing of the admin or
the agent comes back; a SOCKS5 request to the echo backend works all along (the control).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ambit.dev import mesh
from tests.hostile.conftest import BACKEND_PORT, HostileMesh, Watch, Ztunnel, peer_argv, run_in

pytestmark = [pytest.mark.netns, pytest.mark.hostile, pytest.mark.timeout(180)]

SOCKS5_PORT = 15080
REFUSED_WITHIN_S = 2.0
RSS_BUDGET_MIB = 16
NODE1_IP, NODE1_GATEWAY = "10.100.0.1", "10.244.1.1"
SOCKS5_TARGETS = ["localhost:15000", "127.0.0.1:15000", "[::1]:15000", "0.0.0.0:15000",
                  "127.0.0.1:15020", "127.0.0.1:15021", f"{NODE1_IP}:15000",
                  f"{NODE1_IP}:15022", f"{NODE1_GATEWAY}:15022", f"{NODE1_IP}:15008"]
# Captured (10.244.1.1 is not, in this probe: see socks5_ztunnel).
CAPTURED_URLS = [f"http://{NODE1_IP}:15022/debug/pods", f"http://{NODE1_IP}:15000/config_dump",
                 f"http://{NODE1_IP}:15021/healthz/ready"]


@pytest.fixture
def socks5_ztunnel(hostile_mesh: HostileMesh) -> Iterator[Ztunnel]:
    """ztunnel-1 with SOCKS5 on 10.244.1.1:15080, which node-1's agent does not capture;
    afterwards both as before."""
    m = hostile_mesh
    try:
        m.restart_agent("node-1", extra=["--exclude-cidr", f"{NODE1_GATEWAY}/32"])
        zt = m.restart_ztunnel("node-1", extra=["--socks5-host", NODE1_GATEWAY,
                                                "--socks5-port", str(SOCKS5_PORT)])
        m.wait_legit()
        yield zt
    finally:
        m.restart_ztunnel("node-1")
        m.restart_agent("node-1")
        m.wait_legit()


def test_the_node_own_ports_are_never_reached(hostile_mesh: HostileMesh,
                                              socks5_ztunnel: Ztunnel,
                                              fresh_ztunnel: Ztunnel) -> None:
    m, zt1, zt2 = hostile_mesh, socks5_ztunnel, fresh_ztunnel
    node1 = m.cluster.node("node-1")
    # The threat is real: the agent answers on node-1's address.
    assert mesh.http_get(node1.netns, f"http://{NODE1_IP}:15022/debug/pods")[0] == 200
    with Watch(zt1.pid, zt1.logs()) as watch1, Watch(zt2.pid, zt2.logs()) as watch2, \
            m.legit_loop() as during:
        socks = run_in(m.client.netns, peer_argv(
            "socks5", "--host", NODE1_GATEWAY, "--port", str(SOCKS5_PORT), *SOCKS5_TARGETS,
            f"{m.server.ip}:{BACKEND_PORT}"), timeout=120)
        captured = {url: mesh.http_get(m.client.netns, url, timeout=5) for url in CAPTURED_URLS}
        hbone = m.attack("own-ports")
    after = m.legit()
    control = socks.pop(f"{m.server.ip}:{BACKEND_PORT}")
    m.record("9 own ports through the ztunnel",
             socks5={k: (v.get("reply"), v.get("elapsed_s")) for k, v in socks.items()},
             captured={k: v[0] for k, v in captured.items()},
             hbone={k: v["status"] for k, v in hbone["bad"].items()},
             socks5_control=control, rss_growth_mib=[watch1.growth_mib, watch2.growth_mib],
             legit_during=during.result, legit_after=after)
    for dest, r in socks.items():
        assert r.get("reply") == 0x02, (dest, r)
        assert "leaked" not in r and not r.get("after_reply"), (dest, r)
        assert r["elapsed_s"] < REFUSED_WITHIN_S, (dest, r)
    assert control.get("reply") == 0 and control.get("echo") == "through socks5\n", control
    for url, (status, body) in captured.items():
        assert status is None, (url, status, body[:200])
    statuses: dict[str, Any] = {k: v["status"] for k, v in hbone["bad"].items()}
    assert set(statuses.values()) == {403}, statuses
    assert hbone["before"]["status"] == 200 and hbone["after"]["status"] == 200, hbone
    assert watch1.growth_mib < RSS_BUDGET_MIB and watch2.growth_mib < RSS_BUDGET_MIB
    assert during.result["ok"] >= 1 and during.result["failed"] == 0, during.result
    assert after["ok"] == 5 and after["failed"] == 0, after

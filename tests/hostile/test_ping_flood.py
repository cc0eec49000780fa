"""Probe 5: PING frames as fast as the ztunnel reads them, and never a byte read back.

Every PING gets an ACK the attacker never reads, so the ACKs queue at the ztunnel. The fix:
more than 1000 queued control frames is GOAWAY ENHANCE_YOUR_CALM and the connection is gone
(aborted if the GOAWAY cannot drain), counted as control_frame_flood.
"""

from __future__ import annotations

import pytest

from tests.hostile.conftest import HostileMesh, Watch, Ztunnel

pytestmark = [pytest.mark.netns, pytest.mark.hostile, pytest.mark.timeout(180)]

PING_RSS_BUDGET_MIB = 16
PING_ENDED_WITHIN_S = 5.0
ERRORS = "ambit_ztunnel_connection_errors_total"


def test_ping_flood_never_read_is_cut(hostile_mesh: HostileMesh,
                                      fresh_ztunnel: Ztunnel) -> None:
    m, zt = hostile_mesh, fresh_ztunnel
    before = m.metric("node-2", ERRORS, listener="inbound", reason="control_frame_flood")
    with Watch(zt.pid, zt.logs()) as watch, m.legit_loop() as during:
        res = m.attack("ping-flood", seconds=10)
    after = m.legit()
    counted = m.metric("node-2", ERRORS, listener="inbound", reason="control_frame_flood") \
        - before
    m.record("5 PING flood, ACKs never read", rss_growth_mib=watch.growth_mib,
             pings_sent=res["pings_sent"], ended_after_s=res["ended_after_s"],
             goaway=res["goaway"], counted_control_frame_flood=counted,
             legit_during=during.result, legit_after=after, log_lines=watch.lines)
    assert res["ended_after_s"] is not None and res["ended_after_s"] < PING_ENDED_WITHIN_S, res
    if res["goaway"] is not None:  # it may not drain: then the connection is aborted
        assert res["goaway"]["code"] == "ENHANCE_YOUR_CALM", res
    assert counted == 1, counted
    assert watch.growth_mib < PING_RSS_BUDGET_MIB, watch.growth_mib
    assert during.result["ok"] >= 1 and during.result["failed"] == 0, during.result
    assert after["ok"] == 5 and after["failed"] == 0, after

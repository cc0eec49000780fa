"""Probe 4: rapid reset (CVE-2023-44487): HEADERS and RST_STREAM, 20000 times.

The attacker opens a CONNECT to the backend and resets it in the same breath, again and
again; when the ztunnel ends a connection, it opens the next one. The fix: a stream reset
before it is answered never dials its backend, more than 100 such resets within 10 s end the
connection with GOAWAY ENHANCE_YOUR_CALM, and the ztunnel's log stays short (one line per
reason per 10 s). Counted here: the backend's accepted connections during the flood (far
fewer than 20000: none at all once the legitimate client's are taken away), the ztunnel's
log lines, the time each connection lasted.
"""

from __future__ import annotations

import pytest

from tests.hostile.conftest import HostileMesh, Watch, Ztunnel

pytestmark = [pytest.mark.netns, pytest.mark.hostile, pytest.mark.timeout(180)]

PAIRS = 20000
MAX_CONNECTIONS = 400
CLOSE_WITHIN_S = 5.0
RSS_BUDGET_MIB = 32
MAX_BACKEND_DIALS = 10  # by the attacker's streams; unfixed, thousands
MAX_LOG_LINES = 20


def test_rapid_reset_dials_nothing_and_is_cut(hostile_mesh: HostileMesh,
                                              fresh_ztunnel: Ztunnel) -> None:
    m, zt = hostile_mesh, fresh_ztunnel
    accepts = m.backend_accepts()
    with Watch(zt.pid, zt.logs()) as watch, m.legit_loop() as during:
        res = m.attack("rapid-reset", connections=MAX_CONNECTIONS, seconds=30)
    dials = m.backend_accepts() - accepts - during.result["ok"] - during.result["failed"]
    after = m.legit()
    m.record("4 rapid reset x20000", rss_growth_mib=watch.growth_mib,
             pairs_sent=res["pairs_sent"], connections=res["connections"],
             goaway=res["goaway_codes"], max_close_s=res["max_close_s"],
             max_pairs_per_connection=res["max_pairs_per_connection"],
             backend_dials=dials, answered_200=res["answered_200"], flood_s=res["seconds"],
             log_lines=watch.lines, legit_during=during.result, legit_after=after)
    assert res["pairs_sent"] == PAIRS, res
    assert res["goaway_codes"] == {"ENHANCE_YOUR_CALM": res["connections"]}, res
    assert res["closed"] == res["connections"], res
    assert res["max_close_s"] < CLOSE_WITHIN_S, res
    assert 0 <= dials <= MAX_BACKEND_DIALS, dials
    assert watch.lines["log"] <= MAX_LOG_LINES, watch.lines
    assert watch.growth_mib < RSS_BUDGET_MIB, watch.growth_mib
    assert during.result["ok"] >= 1 and during.result["failed"] == 0, during.result
    assert after["ok"] == 5 and after["failed"] == 0, after

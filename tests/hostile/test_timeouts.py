"""Probe 6: connections that finish mutual TLS and then send nothing.

50 connections send not one byte after the TLS handshake, and 10 more send the client preface
but never their SETTINGS. The fix: the preface and SETTINGS must arrive within the handshake
timeout (5 s by default), else GOAWAY PROTOCOL_ERROR and close, counted as handshake_timeout.
"""

from __future__ import annotations

import pytest

from tests.hostile.conftest import HostileMesh, Watch, Ztunnel

pytestmark = [pytest.mark.netns, pytest.mark.hostile, pytest.mark.timeout(180)]

SILENT = 50
PREFACE_ONLY = 10
HANDSHAKE_TIMEOUT_S = 5.0  # hbone_handshake_timeout's default
CLOSED_WITHIN_S = HANDSHAKE_TIMEOUT_S + 3.0
RSS_BUDGET_MIB = 16
ERRORS = "ambit_ztunnel_connection_errors_total"


def test_silent_connections_are_closed_after_the_handshake_timeout(
        hostile_mesh: HostileMesh, fresh_ztunnel: Ztunnel) -> None:
    m, zt = hostile_mesh, fresh_ztunnel
    before = m.metric("node-2", ERRORS, listener="inbound", reason="handshake_timeout")
    with Watch(zt.pid, zt.logs()) as watch, m.legit_loop() as during:
        preface = m.background_attack("idle-preface", connections=PREFACE_ONLY, seconds=20,
                                      pod=m.attacker2)
        try:
            silent = m.attack("idle", connections=SILENT, seconds=20)
        finally:
            preface_only = preface.finish()
    after = m.legit()
    counted = m.metric("node-2", ERRORS, listener="inbound", reason="handshake_timeout") - before
    m.record("6 silent after mTLS, 50 connections (+10 preface only)",
             rss_growth_mib=watch.growth_mib,
             close_s=[silent["min_close_s"], silent["max_close_s"]],
             preface_only_close_s=[preface_only["min_close_s"], preface_only["max_close_s"]],
             goaway=[silent["goaway_codes"], preface_only["goaway_codes"]],
             counted_handshake_timeout=counted, legit_during=during.result, legit_after=after,
             log_lines=watch.lines)
    for res, n in ((silent, SILENT), (preface_only, PREFACE_ONLY)):
        assert res["connections"] == n and res["closed"] == n, res
        assert res["min_close_s"] >= HANDSHAKE_TIMEOUT_S - 0.5, res  # the timeout, not sooner
        assert res["max_close_s"] < CLOSED_WITHIN_S, res
        assert set(res["goaway_codes"]) <= {"PROTOCOL_ERROR", "none"}, res
    assert counted == SILENT + PREFACE_ONLY, counted
    assert watch.growth_mib < RSS_BUDGET_MIB, watch.growth_mib
    assert during.result["ok"] >= 10 and during.result["failed"] == 0, during.result
    assert after["ok"] == 5 and after["failed"] == 0, after

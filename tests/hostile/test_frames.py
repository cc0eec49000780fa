"""Probes 2 and 3: frames that would make the ztunnel buffer what the peer declares.

Probe 2: 8 connections each send a frame header declaring 16 MiB (the ztunnel's max frame is
256 KiB), then the payload but one byte: HTTP/2 libraries wait for the whole frame before they
look at its length. Probe 3: 8 connections each open a header block and never end it,
CONTINUATION after CONTINUATION (256 KiB ones on half of them, 1 KiB ones on the rest). The
fix: the ztunnel judges each frame by its 9 header bytes and ends the connection with GOAWAY
at once (FRAME_SIZE_ERROR; for the header block ENHANCE_YOUR_CALM), buffering nothing.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.hostile.conftest import HostileMesh, Watch, Ztunnel

pytestmark = [pytest.mark.netns, pytest.mark.hostile, pytest.mark.timeout(180)]

CONNECTIONS = 8
CLOSE_WITHIN_S = 3.0
# Unfixed, each connection holds up to 16 MiB (a whole frame, or 64 x 256 KiB CONTINUATIONs):
# 128 MiB for 8. Fixed, nothing is buffered.
RSS_BUDGET_MIB = 16


def _attack(m: HostileMesh, zt: Ztunnel, probe: str) \
        -> tuple[dict[str, Any], Watch, dict[str, Any], dict[str, Any]]:
    with Watch(zt.pid, zt.logs()) as watch, m.legit_loop() as during:
        res = m.attack(probe, connections=CONNECTIONS, seconds=10)
    after = m.legit()
    return res, watch, during.result, after


def _common(conns: list[dict[str, Any]], codes: set[str], watch: Watch,
            during: dict[str, Any], after: dict[str, Any]) -> None:
    assert len(conns) == CONNECTIONS, conns
    for c in conns:
        assert c.get("goaway") is not None and c["goaway"]["code"] in codes, c
        assert c["closed_after_s"] is not None and c["closed_after_s"] < CLOSE_WITHIN_S, c
    assert watch.growth_mib < RSS_BUDGET_MIB, watch.growth_mib
    assert during["ok"] >= 1 and during["failed"] == 0, during
    assert after["ok"] == 5 and after["failed"] == 0, after


def test_frame_declaring_16_mib_is_refused_at_its_header(hostile_mesh: HostileMesh,
                                                         fresh_ztunnel: Ztunnel) -> None:
    m, zt = hostile_mesh, fresh_ztunnel
    res, watch, during, after = _attack(m, zt, "bigframe")
    conns = res["connections"]
    m.record("2 frame header declaring 16 MiB, 8 connections", rss_growth_mib=watch.growth_mib,
             max_close_s=max(c.get("closed_after_s") or 99 for c in conns),
             goaway={c["goaway"]["code"] for c in conns if c.get("goaway")},
             max_payload_sent_mib=round(max(c.get("payload_sent", 0) for c in conns) / 2**20, 2),
             legit_during=during, legit_after=after, log_lines=watch.lines)
    _common(conns, {"FRAME_SIZE_ERROR"}, watch, during, after)


def test_continuation_flood_is_cut(hostile_mesh: HostileMesh, fresh_ztunnel: Ztunnel) -> None:
    m, zt = hostile_mesh, fresh_ztunnel
    res, watch, during, after = _attack(m, zt, "continuation")
    conns = res["connections"]
    m.record("3 CONTINUATION flood, 8 connections", rss_growth_mib=watch.growth_mib,
             max_close_s=max(c.get("closed_after_s") or 99 for c in conns),
             goaway={c["goaway"]["code"] for c in conns if c.get("goaway")},
             max_frames_sent={c.get("fragment"): c.get("continuation_frames_sent")
                              for c in conns},
             legit_during=during, legit_after=after, log_lines=watch.lines)
    _common(conns, {"ENHANCE_YOUR_CALM"}, watch, during, after)

"""Probes 7 and 8: malformed CONNECTs from a peer with a valid mesh certificate.

A header block whose bytes are not UTF-8 (probe 7), and an ``:authority`` whose port is not
ASCII digits (probe 8: Arabic-Indic ``٨٠٨٠`` and friends, which ``int()`` would read as 8080),
each on its own stream of one HBONE connection. The fix: that stream is answered 400 and the
connection carries on: a good CONNECT before and after the bad ones echoes through the mesh.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.hostile.conftest import HostileMesh, Watch, Ztunnel

pytestmark = [pytest.mark.netns, pytest.mark.hostile, pytest.mark.timeout(180)]

RSS_BUDGET_MIB = 16  # a handful of streams: nothing should grow
ANSWER_WITHIN_S = 2.0  # each bad stream's 400


def _check(m: HostileMesh, zt: Ztunnel, probe: str, res: dict[str, Any], watch: Watch,
           during: dict[str, Any]) -> None:
    after = m.legit()
    m.record(probe, rss_growth_mib=watch.growth_mib, bad_streams={
        k: (v["status"], v["elapsed_s"]) for k, v in res["bad"].items()},
        connection_closed=res["closed_after_s"], legit_during=during, legit_after=after,
        log_lines=watch.lines)
    assert res["before"] == {"status": 200, "echo": "before\n"}, res
    for name, r in res["bad"].items():
        # The 400 may be followed by RST_STREAM(NO_ERROR) (RFC 9113 8.1: the request need not
        # be finished); never by an error code, and the connection goes on (below).
        assert r["status"] == 400 and r["reset"] in (None, "NO_ERROR"), (name, r)
    times = [r["elapsed_s"] for r in res["bad"].values()]
    assert max(times) < ANSWER_WITHIN_S * len(times), times
    # The same connection still carries a tunnel, and the ztunnel never ended it.
    assert res["after"] == {"status": 200, "echo": "after\n"}, res
    assert res["goaway"] is None and res["closed_after_s"] is None, res
    assert watch.growth_mib < RSS_BUDGET_MIB, watch.growth_mib
    assert during["ok"] >= 1 and during["failed"] == 0, during
    assert after["ok"] == 5 and after["failed"] == 0, after


def test_header_bytes_not_utf8_refuse_only_their_stream(hostile_mesh: HostileMesh,
                                                        fresh_ztunnel: Ztunnel) -> None:
    m, zt = hostile_mesh, fresh_ztunnel
    with Watch(zt.pid, zt.logs()) as watch, m.legit_loop() as during:
        res = m.attack("bad-header")
    _check(m, zt, "7 header bytes not UTF-8", res, watch, during.result)


def test_authority_port_not_ascii_digits_is_400(hostile_mesh: HostileMesh,
                                                fresh_ztunnel: Ztunnel) -> None:
    m, zt = hostile_mesh, fresh_ztunnel
    accepts = m.backend_accepts()
    with Watch(zt.pid, zt.logs()) as watch, m.legit_loop() as during:
        res = m.attack("bad-authority")
    _check(m, zt, "8 CONNECT port in non-ASCII digits", res, watch, during.result)
    # Only the good streams and the legitimate client reached the backend; ٨٠٨٠ never did.
    reached = m.backend_accepts() - accepts
    assert reached == 2 + during.result["ok"] + 5, reached

"""Connection limits: one source IP, one identity, more HBONE connections than the caps.

With the ztunnel's defaults (max_hbone_connections_per_ip 1024, _per_identity 1024): the
attacker pod opens 1100 mutual-TLS HBONE connections to ztunnel-2 and holds them; the ones
beyond 1024 are reset before the TLS handshake. From a second pod (another source IP) the same
identity opens 20 more: each finishes TLS and gets GOAWAY "too many connections from this
identity" at once. Meanwhile another identity from that second pod gets a tunnel and its echo,
and the legitimate client is served throughout. Every refusal is counted by its reason
(ambit_ztunnel_connections_refused_total{listener="inbound",reason}).
"""

from __future__ import annotations

import pytest

from tests.hostile.conftest import OTHER, HostileMesh, Watch, Ztunnel

pytestmark = [pytest.mark.netns, pytest.mark.hostile, pytest.mark.timeout(240)]

PER_IP = 1024  # the defaults of max_hbone_connections_per_ip and _per_identity
BEYOND = 76
SAME_IDENTITY_ELSEWHERE = 20
REFUSED_WITHIN_S = 2.0
RSS_BUDGET_MIB = 128  # 1024 connections held open (measured: about 73 KiB each)
REFUSED = "ambit_ztunnel_connections_refused_total"


def test_connections_beyond_the_caps_are_refused(hostile_mesh: HostileMesh,
                                                 fresh_ztunnel: Ztunnel) -> None:
    m, zt = hostile_mesh, fresh_ztunnel
    with Watch(zt.pid, zt.logs()) as watch, m.legit_loop() as during:
        holder = m.background_attack("hold", connections=PER_IP + BEYOND, seconds=120)
        try:
            held = holder.first_line(timeout=120)
            same_identity = m.attack("hold", connections=SAME_IDENTITY_ELSEWHERE,
                                     pod=m.attacker2)
            other = m.attack("echo", identity=OTHER, pod=m.attacker2)
            refused = {r: m.metric("node-2", REFUSED, listener="inbound", reason=r)
                       for r in ("per_ip", "per_identity", "total")}
        finally:
            final = holder.finish()
    after = m.legit()
    m.record("connection limits (defaults)", rss_growth_mib=watch.growth_mib,
             held=held["counts"], open_s=held["open_s"],
             max_refusal_s=max(held["max_refusal_s"], same_identity["max_refusal_s"]),
             same_identity_elsewhere=same_identity["counts"],
             goaway_reason=same_identity["reasons"].get("goaway"),
             other_identity=other["before"], refused_metric=refused,
             still_open=final["still_open"], log_lines=watch.lines,
             legit_during=during.result, legit_after=after)
    assert held["counts"] == {"open": PER_IP, "reset": BEYOND}, held
    assert same_identity["counts"] == {"goaway": SAME_IDENTITY_ELSEWHERE}, same_identity
    assert same_identity["reasons"]["goaway"] == "too many connections from this identity"
    assert held["max_refusal_s"] < REFUSED_WITHIN_S, held
    assert same_identity["max_refusal_s"] < REFUSED_WITHIN_S, same_identity
    assert other["before"] == {"status": 200, "echo": "before\n"}, other
    assert refused == {"per_ip": BEYOND, "per_identity": SAME_IDENTITY_ELSEWHERE, "total": 0}
    assert final["still_open"] == PER_IP, final
    assert watch.growth_mib < RSS_BUDGET_MIB, watch.growth_mib
    assert during.result["ok"] >= 1 and during.result["failed"] == 0, during.result
    assert after["ok"] == 5 and after["failed"] == 0, after

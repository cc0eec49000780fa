"""Probe 1: 100 tunnels per connection each uploading 2 MiB to an echo backend, the answers
never acknowledged (the attacker's windows stay at 65535), on several connections at once.

Before the hardening this grew the ztunnel by about 190 MiB per connection, linearly (4
connections: +770 MiB). Now the bytes a connection may hold are its buffer budget
(HboneSettings.buffer_limit, 8 MiB: the connection window received and undelivered, half the
budget queued towards the peer), and all of one peer's connections share a budget (PeerBudget,
16 MiB shared out over the --workers processes); the relay holds nothing outside them: a
tunnel's bytes are read from its backend only while the tunnel has room, and a chunk written to
a backend keeps its credit until the socket took it. What grows with the attack's size is the
tunnels themselves (objects, sockets, allocator slack: about 6 MiB per 100 tunnels measured),
which the stream and connection limits bound. Measured over the ztunnel's whole process tree
(the parent and its --workers). The legitimate client is served throughout.
"""

from __future__ import annotations

import pytest

from tests.hostile.conftest import HostileMesh, Watch, Ztunnel

pytestmark = [pytest.mark.netns, pytest.mark.hostile, pytest.mark.timeout(240)]

UPLOAD_CONNECTIONS = 8
# The 16 MiB peer budget (8 MiB in each of 2 workers), plus 800 tunnels' objects (about 6 MiB
# per 100) and the TLS buffers. Measured: 50-59 MiB (1, 2, 4 connections: 9, 14, 29 MiB).
UPLOAD_RSS_BUDGET_MIB = 64


def test_upload_with_answers_never_read_stays_in_budget(hostile_mesh: HostileMesh,
                                                        fresh_ztunnel: Ztunnel) -> None:
    m, zt = hostile_mesh, fresh_ztunnel
    with Watch(zt.pid, zt.logs()) as watch, m.legit_loop() as during:
        res = m.attack("upload", connections=UPLOAD_CONNECTIONS, seconds=15)
    after = m.legit()
    conns = res["connections"]
    sent = [c.get("bytes_sent", 0) for c in conns]
    m.record("1 upload 100 streams x 2 MiB, answers never read",
             connections=UPLOAD_CONNECTIONS, rss_growth_mib=watch.growth_mib,
             bytes_sent_mib=[round(s / 2**20, 1) for s in sent],
             streams_accepted=[c.get("streams_accepted") for c in conns],
             legit_during=during.result, legit_after=after, log_lines=watch.lines)
    assert all("error" not in c for c in conns), conns
    # The attack did get going on every connection (else the budget proves nothing) ...
    assert all(c["streams_accepted"] == 100 for c in conns), conns
    assert all(s >= 4 * 2**20 for s in sent), sent
    # ... and was held: memory within the budget, a legitimate client served.
    assert watch.growth_mib < UPLOAD_RSS_BUDGET_MIB, watch.growth_mib
    assert during.result["ok"] >= 1 and during.result["failed"] == 0, during.result
    assert after["ok"] == 5 and after["failed"] == 0, after

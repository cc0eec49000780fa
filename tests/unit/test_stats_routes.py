"""The ztunnel's readiness port (15021): readiness and liveness mean different things."""

from __future__ import annotations

from typing import Any, cast

from ztunnel.listeners.admin import stats_routes


def test_live_answers_while_not_ready() -> None:
    ready = [False, "waiting for the first state"]
    route = stats_routes(cast(Any, None), lambda: (bool(ready[0]), str(ready[1])))
    r = route("GET", "/healthz/ready")
    assert (r.status, r.body) == (503, b"waiting for the first state\n")
    r = route("GET", "/healthz/live")
    assert (r.status, r.body) == (200, b"live\n")  # the kubelet must not restart it for waiting
    ready[:] = [True, "ready"]
    assert route("GET", "/ready").status == 200
    assert route("GET", "/nope").status == 404

"""One connection yields one opened/closed pair with the same labels, however it ends."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from mesh.state.model import Action, AuthorizationPolicy, Rule
from mesh.state.store import StateStore
from ztunnel.accesslog import AccessLog
from ztunnel.authz import ConnectionInfo
from ztunnel.config import ZtunnelConfig
from ztunnel.identity import SecretManager
from ztunnel.metrics import Metrics
from ztunnel.proxy import ConnectionRecord, ProxyContext


def _ctx() -> ProxyContext:
    return ProxyContext(ZtunnelConfig(node="n"), StateStore(), SecretManager(None), Metrics(),
                        AccessLog(""))


def _flags(ctx: ProxyContext, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in ctx.metrics.registry.collect():
        for s in family.samples:
            if s.name == name:
                out[s.labels["response_flags"]] = out.get(s.labels["response_flags"], 0) + s.value
    return out


def _record(ctx: ProxyContext) -> ConnectionRecord:
    return ConnectionRecord(ctx, "source", "outbound", ipaddress.ip_address("10.0.0.1"),
                            (ipaddress.ip_address("10.0.0.2"), 80))


def test_failure_after_open_keeps_the_pair() -> None:
    ctx = _ctx()
    rec = _record(ctx)
    rec.opened()
    rec.count_sent(10)
    rec.fail("error", "reset mid-stream", "UC")
    rec.count_received(5)
    rec.finish()
    assert _flags(ctx, "istio_tcp_connections_opened_total") == {"-": 1}
    assert _flags(ctx, "istio_tcp_connections_closed_total") == {"-": 1}
    assert _flags(ctx, "istio_tcp_sent_bytes_total") == {"-": 10}
    assert _flags(ctx, "istio_tcp_received_bytes_total") == {"-": 5}


def test_refused_connection_is_counted_with_its_flag() -> None:
    ctx = _ctx()
    rec = _record(ctx)
    rec.fail("denied", "policy", "DENY")
    rec.finish()
    assert _flags(ctx, "istio_tcp_connections_opened_total") == {"DENY": 1}
    assert _flags(ctx, "istio_tcp_connections_closed_total") == {"DENY": 1}


AUDIT_ALL = AuthorizationPolicy("audit", "default", Action.AUDIT, (Rule(),))
DENY_ALL = AuthorizationPolicy("deny", "default", Action.DENY, (Rule(),))
INFO = ConnectionInfo(ipaddress.ip_address("10.0.0.1"), 80)


def _denied(ctx: ProxyContext) -> dict[str, float]:
    return {s.labels["policy"]: s.value for family in ctx.metrics.registry.collect()
            for s in family.samples if s.name == "ambit_ztunnel_policy_denied_total"}


def test_authorize_records_a_denial_with_its_policy() -> None:
    ctx = _ctx()
    rec = _record(ctx)
    assert not rec.authorize((AUDIT_ALL, DENY_ALL), INFO)
    assert (rec.outcome, rec.flags, rec.reason) == ("denied", "DENY",
                                                     "denied by DENY policy default/deny")
    assert rec.extra == {"audit": ["default/audit"], "policy": "default/deny"}
    rec.finish()
    assert _flags(ctx, "istio_tcp_connections_opened_total") == {"DENY": 1}
    assert _denied(ctx) == {"default/deny": 1}


def test_authorize_allows_and_records_audit_matches() -> None:
    ctx = _ctx()
    rec = _record(ctx)
    assert rec.authorize((AUDIT_ALL,), INFO)
    assert (rec.outcome, rec.flags, rec.extra) == ("ok", "-", {"audit": ["default/audit"]})
    rec = _record(ctx)
    assert rec.authorize((AUDIT_ALL,), INFO, record_audit=False)
    assert rec.extra == {}


class _Transport:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


class _Writer:
    def __init__(self) -> None:
        self.transport = _Transport()


def test_refuse_resets_unless_the_listener_answers_once() -> None:
    ctx = _ctx()
    # Captured (no answer): a refusal is a reset, as before.
    rec, w = _record(ctx), _Writer()
    rec.fail("denied", "policy", "DENY")
    rec.refuse(w)  # type: ignore[arg-type]
    assert w.transport.aborted == 1

    # SOCKS5-style: the answer hears the refusal instead of the client getting a reset.
    answers: list[tuple[str, BaseException | None]] = []
    rec, w = _record(ctx), _Writer()
    rec.answer = lambda r, e: answers.append((r.outcome, e))
    err = ConnectionRefusedError(111, "refused")
    rec.fail("connect_failed", "refused", "UF")
    rec.refuse(w, err)  # type: ignore[arg-type]
    assert answers == [("connect_failed", err)] and w.transport.aborted == 0

    # Opened: the answer hears "ok" once; a later failure is a reset, not a second answer.
    answers.clear()
    rec, w = _record(ctx), _Writer()
    rec.answer = lambda r, e: answers.append((r.outcome, e))
    rec.opened()
    rec.fail("error", "mid-stream", "UC")
    rec.refuse(w)  # type: ignore[arg-type]
    assert answers == [("ok", None)] and w.transport.aborted == 1


def test_a_flood_of_failures_is_a_few_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Every failed connection has its access-log line and metrics, but its log line comes at
    most once per listener and outcome every 10 s (the count left out in the next one): 1000
    denied connections are one line, and a different outcome still gets its own."""
    ctx = _ctx()
    with caplog.at_level(logging.INFO, logger="ztunnel.proxy"):
        for _ in range(1000):
            rec = _record(ctx)
            rec.fail("denied", "policy deny-all", "DENY")
            rec.finish()
        rec = _record(ctx)
        rec.fail("connect_failed", "refused", "UF")
        rec.finish()
    lines = [r.getMessage() for r in caplog.records if r.name == "ztunnel.proxy"]
    assert len(lines) == 2, lines
    assert "denied" in lines[0] and "connect_failed" in lines[1]
    assert _flags(ctx, "istio_tcp_connections_closed_total") == {"DENY": 1000, "UF": 1}
    assert ctx.failure_log.suppressed(("outbound", "denied")) == 999

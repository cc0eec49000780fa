"""Connection limits: the admission decision as a table, the gates' counters, the refusal
metric and its rate-limited log, and the settings and flags behind them."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest

import ztunnel.app
from ambit.cli import main
from ztunnel.admission import ADMIT, ConnectionLimits, Decision, Gate, Limit, Reason, decide
from ztunnel.cli import CONNECTION_LIMITS
from ztunnel.config import ConfigError, ZtunnelConfig
from ztunnel.metrics import Metrics

PER_IP = Limit(2, "max_hbone_connections_per_ip")
TOTAL = Limit(3, "max_hbone_connections")
OFF = Limit(0, "max_hbone_connections")

# source, open from it, open in total, per-source limit, total limit, per-source reason
#   -> admitted, reason, words the message must contain
CASES: list[tuple[Any, ...]] = [
    # Below both limits.
    ("10.0.0.1", 0, 0, PER_IP, TOTAL, Reason.PER_IP, True, None, ""),
    ("10.0.0.1", 1, 2, PER_IP, TOTAL, Reason.PER_IP, True, None, ""),
    # The source's own cap: refused whatever the total.
    ("10.0.0.1", 2, 2, PER_IP, TOTAL, Reason.PER_IP, False, Reason.PER_IP,
     "2 connections already open from source IP 10.0.0.1 (limit 2, "
     "max_hbone_connections_per_ip / --max-hbone-connections-per-ip)"),
    ("10.0.0.1", 5, 9, PER_IP, TOTAL, Reason.PER_IP, False, Reason.PER_IP, "limit 2"),
    # Another source while the total is full: the total refuses.
    ("10.0.0.2", 0, 3, PER_IP, TOTAL, Reason.PER_IP, False, Reason.TOTAL,
     "3 connections already open in total (limit 3, max_hbone_connections / "
     "--max-hbone-connections)"),
    # 0 = unlimited, for either limit; None = the stage has no such limit.
    ("10.0.0.1", 10**6, 10**6, Limit(0, "x"), OFF, Reason.PER_IP, True, None, ""),
    ("10.0.0.1", 10**6, 0, None, TOTAL, Reason.PER_IP, True, None, ""),
    ("10.0.0.1", 0, 10**6, PER_IP, None, Reason.PER_IP, True, None, ""),
    ("", 0, 3, None, TOTAL, Reason.TOTAL, False, Reason.TOTAL, "in total"),
    # Each per-source reason names its source.
    ("spiffe://cluster.local/ns/a/sa/b", 1, 1, Limit(1, "max_hbone_connections_per_identity"),
     None, Reason.PER_IDENTITY, False, Reason.PER_IDENTITY,
     "from identity spiffe://cluster.local/ns/a/sa/b"),
    ("default/client-7f9c", 4, 4, Limit(4, "max_outbound_connections_per_pod"), None,
     Reason.PER_POD, False, Reason.PER_POD,
     "from pod default/client-7f9c (limit 4, max_outbound_connections_per_pod"),
    # A limit of 1 admits exactly one.
    ("10.0.0.1", 0, 0, Limit(1, "x"), Limit(1, "y"), Reason.PER_IP, True, None, ""),
    ("10.0.0.1", 1, 1, Limit(1, "x"), Limit(1, "y"), Reason.PER_IP, False, Reason.PER_IP, ""),
]


@pytest.mark.parametrize(
    ("source", "from_source", "total_open", "per_source", "total", "reason", "admitted",
     "why", "words"), CASES)
def test_decide(source: str, from_source: int, total_open: int, per_source: Limit | None,
                total: Limit | None, reason: Reason, admitted: bool, why: Reason | None,
                words: str) -> None:
    d = decide(source, from_source, total_open, per_source, total, reason)
    assert d.admitted is admitted
    assert d.reason is why
    if admitted:
        assert d == ADMIT
    else:
        assert words in d.message


def _gate(per: int, total: int) -> tuple[Gate, list[tuple[str, Decision, str]]]:
    refused: list[tuple[str, Decision, str]] = []
    gate = Gate("inbound", Reason.PER_IP, lambda: (Limit(per, "p"), Limit(total, "t")),
                lambda listener, d, peer: refused.append((listener, d, peer)))
    return gate, refused


def test_gate_counts_and_releases_once() -> None:
    gate, refused = _gate(per=2, total=3)
    a1, a2 = gate.acquire("a"), gate.acquire("a")
    assert a1.admitted and a2.admitted
    over = gate.acquire("a", "a:1234")
    assert not over.admitted and over.decision.reason is Reason.PER_IP
    assert refused == [("inbound", over.decision, "a:1234")]
    b = gate.acquire("b")
    assert b.admitted and not gate.acquire("c").admitted  # total 3 reached
    assert refused[-1][1].reason is Reason.TOTAL
    assert (gate.total, gate.by_key) == (3, {"a": 2, "b": 1})
    over.release()  # a refused slot holds nothing
    a1.release()
    a1.release()  # idempotent
    assert (gate.total, gate.by_key) == (2, {"a": 1, "b": 1})
    with gate.acquire("a") as slot:  # the freed place
        assert slot.admitted
    with b, a2:
        pass
    assert (gate.total, gate.by_key) == (0, {})  # no entry left per source gone


def test_gate_slot_is_released_when_the_handler_fails() -> None:
    gate, _ = _gate(per=1, total=0)
    with pytest.raises(RuntimeError), gate.acquire("a") as slot:
        assert slot.admitted
        raise RuntimeError("handler failed")
    assert gate.acquire("a").admitted


def test_gate_reads_its_limits_at_each_admission() -> None:
    config = ZtunnelConfig(node="n", max_socks5_connections=1)
    limits = ConnectionLimits(config, Metrics())
    first = limits.socks5.acquire("")
    assert first.admitted and not limits.socks5.acquire("").admitted
    config.max_socks5_connections = 0  # unlimited from now on
    assert limits.socks5.acquire("").admitted


def test_refusals_are_counted_and_logged_at_a_bounded_rate(
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    config = ZtunnelConfig(node="n", max_plaintext_connections_per_ip=1,
                           max_plaintext_connections=2)
    limits = ConnectionLimits(config, metrics)
    held = [limits.plaintext.acquire("10.0.0.1"), limits.plaintext.acquire("10.0.0.2")]
    with caplog.at_level(logging.INFO, "ztunnel.limits"):
        for i in range(1000):
            assert not limits.plaintext.acquire("10.0.0.1").admitted  # per_ip
            assert not limits.plaintext.acquire(f"10.1.{i // 250}.{i % 250}").admitted  # total
    for reason in ("per_ip", "total"):
        assert metrics.registry.get_sample_value(
            "ambit_ztunnel_connections_refused_total",
            {"listener": "inbound_plaintext", "reason": reason}) == 1000
    # One line per listener and reason within the interval (the test runs well within 10 s).
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("inbound_plaintext: refused a connection from 10.0.0.1: 1 "
                               "connections already open from source IP 10.0.0.1")
    assert "in total" in lines[1]
    assert limits.log.suppressed(("inbound_plaintext", Reason.PER_IP)) == 999
    for slot in held:
        slot.release()


# -- settings and flags ---------------------------------------------------------------------


def test_defaults_match_the_flags_and_are_documented_numbers() -> None:
    config = ZtunnelConfig(node="n").validate()
    settings = {f.name for f in dataclasses.fields(config)
                if f.name.startswith("max_") and "connections" in f.name}
    assert settings == {name for name, _, _ in CONNECTION_LIMITS}
    for name, default, _ in CONNECTION_LIMITS:
        assert getattr(config, name) == default, name
    assert (config.max_hbone_connections, config.max_hbone_connections_per_ip,
            config.max_hbone_connections_per_identity, config.max_plaintext_connections,
            config.max_plaintext_connections_per_ip, config.max_outbound_connections_per_pod,
            config.max_socks5_connections) == (4096, 1024, 1024, 4096, 1024, 2048, 1024)


@pytest.mark.parametrize("value", [-1, True, "10", 1.5])
def test_a_limit_must_be_a_count(value: object) -> None:
    with pytest.raises(ConfigError, match="max_hbone_connections_per_ip: .* is not a "
                       r"connection count \(0 = unlimited\)"):
        ZtunnelConfig.from_mapping({"node": "n", "max_hbone_connections_per_ip": value})


def test_zero_is_unlimited_and_valid() -> None:
    c = ZtunnelConfig.from_mapping({"node": "n", **{n: 0 for n, _, _ in CONNECTION_LIMITS}})
    assert all(getattr(c, n) == 0 for n, _, _ in CONNECTION_LIMITS)


def test_flags_set_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ZtunnelConfig] = []

    def run(config: ZtunnelConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(ztunnel.app, "run", run)
    argv = ["ztunnel", "--node", "n1"]
    for i, (name, _, _) in enumerate(CONNECTION_LIMITS):
        argv += ["--" + name.replace("_", "-"), str(i)]
    assert main(argv) == 0
    assert [getattr(seen[0], name) for name, _, _ in CONNECTION_LIMITS] == \
        list(range(len(CONNECTION_LIMITS)))


def test_a_negative_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["ztunnel", "--node", "n1", "--max-outbound-connections-per-pod", "-5"])
    assert e.value.code == 2
    assert "max_outbound_connections_per_pod: -5 is not a connection count" in \
        capsys.readouterr().err

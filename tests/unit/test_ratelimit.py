"""mesh.ratelimit.RateLimitedLog: one line per key per interval, with the count left out."""

from __future__ import annotations

import logging

import pytest

from mesh.ratelimit import RateLimitedLog

LOGGER = "test.ratelimit"


# (key, clock) per event -> logged?: keys are limited independently.
@pytest.mark.parametrize(("events", "logged"), [
    ([("a", 0.0)], [True]),
    ([("a", 0.0), ("a", 5.0), ("a", 10.0)], [True, False, True]),
    ([("a", 0.0), ("b", 1.0), ("a", 2.0), ("b", 3.0)], [True, True, False, False]),
    ([("a", 0.0), ("b", 9.0), ("a", 10.0), ("b", 12.0), ("b", 19.0)],
     [True, True, True, False, True]),
])
def test_one_line_per_key_per_interval(events: list[tuple[str, float]], logged: list[bool],
                                       caplog: pytest.LogCaptureFixture) -> None:
    clock = iter(t for _, t in events)
    rl = RateLimitedLog(logging.getLogger(LOGGER), 10.0, clock=lambda: next(clock))
    with caplog.at_level(logging.WARNING, LOGGER):
        got = [rl.log(key, "event %s", key) for key, _ in events]
    assert got == logged
    assert rl.total == len(events)
    assert len(caplog.records) == sum(logged)


def test_the_next_line_counts_what_was_left_out(caplog: pytest.LogCaptureFixture) -> None:
    clock = iter([0.0, 1.0, 2.0, 3.0, 11.0, 12.0])
    rl = RateLimitedLog(logging.getLogger(LOGGER), 10.0, clock=lambda: next(clock),
                        level=logging.INFO, what="refused")
    with caplog.at_level(logging.INFO, LOGGER):
        for key in ("x", "x", "x", "y", "x", "y"):
            rl.log(key, "refused %s (%d%%)", key, 5)
    assert rl.suppressed("x") == 0 and rl.suppressed("y") == 1
    assert [r.getMessage() for r in caplog.records] == [
        "refused x (5%)", "refused y (5%)",
        "refused x (5%) (2 more refused since the last such line)"]
    assert {r.levelno for r in caplog.records} == {logging.INFO}


def test_a_flood_is_a_handful_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger(LOGGER), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, LOGGER):
        for i in range(10_000):
            now[0] = i * 0.01  # 100 s of 100 events a second, two reasons
            rl.log(i % 2, "event")
    assert len(caplog.records) == 20  # one per reason per 10 s

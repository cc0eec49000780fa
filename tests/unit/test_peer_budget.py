"""PeerBudget: one peer's HBONE connections share a buffer budget. Reading stops on all of
them at half the limit received-and-undelivered and resumes below a quarter; writers towards
the peer stop at half the limit queued and are woken below a quarter."""

from __future__ import annotations

import pytest

from ztunnel.hbone.conn import PeerBudget


class _Member:
    def __init__(self) -> None:
        self.paused = False
        self.woken = 0

    def _peer_pause(self) -> None:
        self.paused = True

    def _peer_resume(self) -> None:
        self.paused = False

    def _wake_all(self) -> None:
        self.woken += 1


@pytest.mark.parametrize(("received", "stopped"), [
    ([49], False),  # under half: read on
    ([50], True),  # half: every member stops
    ([50, -25], True),  # hysteresis: a quarter is not below a quarter
    ([50, -26], False),  # below a quarter: every member reads again
    ([30, 30, -10], True),  # summed over the members
])
def test_reading_stops_at_half_and_resumes_below_a_quarter(received: list[int],
                                                           stopped: bool) -> None:
    budget = PeerBudget(100)
    members = [_Member(), _Member()]
    budget.members.update(members)  # type: ignore[arg-type]
    for delta in received:
        budget.update(delta, 0)
    assert budget.reading_stopped is stopped
    assert [m.paused for m in members] == [stopped, stopped]


def test_writers_stop_at_half_queued_and_are_woken_below_a_quarter() -> None:
    budget = PeerBudget(100)
    member = _Member()
    budget.members.add(member)  # type: ignore[arg-type]
    budget.update(0, 60)
    assert budget.writing_stopped and member.woken == 0
    budget.update(0, -30)
    assert budget.writing_stopped and member.woken == 0
    budget.update(0, -10)
    assert not budget.writing_stopped and member.woken == 1
    assert budget.times_stopped == 0  # reading never stopped

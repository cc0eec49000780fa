"""``LeaderElector`` step by step, on a fake clock and an in-memory Lease with the API server's
optimistic concurrency (no sleeping: each ``attempt()`` is one retry period's try)."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import pytest

from controller.leader import LeaderElector, Timings, parse_lease
from controller.waypoint.k8s_apply import ApiError, Resource, Rest

T = Timings(lease_duration=15, renew_deadline=10, retry_period=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> dt.datetime:
        return dt.datetime(2025, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=self.now)


class LeaseServer(Rest):
    """One Lease; PUT needs the current resourceVersion (409 otherwise), POST only if absent;
    ``down`` answers every request as an unreachable server would."""

    def __init__(self) -> None:
        super().__init__(cast(Any, None))
        self.obj: dict[str, Any] | None = None
        self.rv = 0
        self.down = False
        self.writes: list[tuple[str, int]] = []  # (verb, status)
        # Runs once after the next read is answered (another replica acting in between).
        self.after_get: Callable[[], Awaitable[None]] | None = None

    def _check(self) -> None:
        if self.down:
            raise ApiError(0, "Unreachable", "connection refused")

    def _store(self, body: Mapping[str, Any]) -> dict[str, Any]:
        self.rv += 1
        self.obj = copy.deepcopy(dict(body))
        self.obj["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.obj)

    async def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        self._check()
        seen = copy.deepcopy(self.obj)
        hook, self.after_get = self.after_get, None
        if hook is not None:
            await hook()
        return seen

    async def create(self, res: Resource, namespace: str, body: Mapping[str, Any],
                     field_manager: str) -> dict[str, Any]:
        self._check()
        if self.obj is not None:
            self.writes.append(("create", 409))
            raise ApiError(409, "AlreadyExists", "leases exists")
        self.writes.append(("create", 201))
        return self._store(body)

    async def replace(self, res: Resource, namespace: str, name: str, body: Mapping[str, Any],
                      field_manager: str) -> dict[str, Any]:
        self._check()
        assert self.obj is not None
        if body["metadata"].get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
            self.writes.append(("replace", 409))
            raise ApiError(409, "Conflict", "the object has been modified")
        self.writes.append(("replace", 200))
        return self._store(body)

    @property
    def holder(self) -> str:
        return parse_lease(self.obj).holder if self.obj else ""


def elector(server: LeaseServer, clock: Clock, name: str, events: list[str]) -> LeaderElector:
    async def lead() -> None:
        pass

    return LeaderElector(server, "ambit-system", "ambit-controller", name, timings=T,
                         lead=lead, clock=clock, wall_clock=clock.wall,
                         on_change=lambda v: events.append(f"{name} {'up' if v else 'down'}"))


async def test_the_leader_steps_down_at_the_renew_deadline_before_others_may_take_over(
) -> None:
    server, clock, events = LeaseServer(), Clock(), cast(list[str], [])
    a, b = elector(server, clock, "a", events), elector(server, clock, "b", events)
    await a.attempt()
    await b.attempt()
    assert (a.is_leader, b.is_leader, server.holder) == (True, False, "a")
    assert events == ["a up"]
    # The API server becomes unreachable for a (b is not asked meanwhile).
    server.down = True
    for _ in range(4):  # 8 s of failed renewals: still within the 10 s deadline
        clock.now += 2
        await a.attempt()
    assert a.is_leader
    clock.now += 2  # 10 s since the last renewal was sent
    await a.attempt()
    assert not a.is_leader and events == ["a up", "a down"]
    # b, which last saw the record change at t=0, may not take over before 15 s.
    server.down = False
    clock.now += 4.9  # 14.9 s
    await b.attempt()
    assert not b.is_leader and server.holder == "a"
    clock.now += 0.1
    await b.attempt()
    assert b.is_leader and server.holder == "b"
    assert parse_lease(server.obj or {}).transitions == 1
    # a, back, sees b's valid lease and follows.
    await a.attempt()
    assert not a.is_leader and a.leader == "b"
    assert events == ["a up", "a down", "b up"]


async def test_a_renewal_that_lost_a_race_steps_the_leader_down_at_once() -> None:
    server, clock, events = LeaseServer(), Clock(), cast(list[str], [])
    a = elector(server, clock, "a", events)
    await a.attempt()
    # Someone else took the Lease (e.g. a paused during an expiry): a's next read shows it.
    obj = server.obj
    assert obj is not None
    obj["spec"]["holderIdentity"] = "c"
    server._store(obj)
    clock.now += 2
    await a.attempt()
    assert not a.is_leader and a.leader == "c" and events == ["a up", "a down"]


async def test_close_releases_only_a_lease_we_hold() -> None:
    server, clock, events = LeaseServer(), Clock(), cast(list[str], [])
    a, b = elector(server, clock, "a", events), elector(server, clock, "b", events)
    await a.attempt()
    await b.attempt()
    await b.close()  # a follower has nothing to release
    assert server.holder == "a"
    await a.close()
    spec = (server.obj or {})["spec"]
    assert (spec["holderIdentity"], spec["leaseDurationSeconds"]) == ("", 1)
    # Released: the next candidate takes it at its next try, no expiry wait.
    c = elector(server, clock, "c", events)
    await c.attempt()
    assert c.is_leader and parse_lease(server.obj or {}).transitions == 1
    assert events == ["a up", "a down", "c up"]


async def test_a_stale_read_loses_to_409_and_stays_a_follower() -> None:
    server, clock, events = LeaseServer(), Clock(), cast(list[str], [])
    a, b = elector(server, clock, "a", events), elector(server, clock, "b", events)
    await a.attempt()
    await b.attempt()
    # 20 s later b finds the record unchanged (a was paused) and takes over, but a renews
    # between b's read and b's write: b's PUT carries a stale resourceVersion.
    clock.now += 20
    server.after_get = a.attempt
    await b.attempt()
    assert not b.is_leader and a.is_leader and server.holder == "a"
    assert server.writes[-1] == ("replace", 409)


@pytest.mark.parametrize("identity", ["", None])
def test_an_identity_is_required(identity: str | None) -> None:
    with pytest.raises(ValueError, match="identity"):
        LeaderElector(LeaseServer(), "ns", "l", identity or "")

"""The leader-election decision (``controller.leader.decide``) and the Lease record, in tables.

Time is passed in: ``now`` (wall clock, written into the Lease) and ``unchanged_for`` (seconds
our own clock has seen the record unchanged, the measure of expiry)."""

from __future__ import annotations

import datetime as dt

import pytest

from controller.leader import (
    Action,
    Lease,
    Timings,
    decide,
    default_identity,
    format_micro_time,
    keep_leading,
    lease_body,
    parse_lease,
    parse_micro_time,
    released,
)

NOW = dt.datetime(2025, 3, 1, 12, 0, 0, 250000, tzinfo=dt.UTC)
EARLIER = NOW - dt.timedelta(seconds=40)
ME, OTHER = "ambit-controller-a", "ambit-controller-b"


def held(holder: str, *, duration: int = 15, transitions: int = 3,
         renew: dt.datetime = EARLIER) -> Lease:
    return Lease(holder, duration, EARLIER, renew, transitions, resource_version="7")


@pytest.mark.parametrize(("lease", "unchanged_for", "action", "leader", "transitions"), [
    # No Lease: create it, holding it, transition count 0.
    (None, 0.0, Action.CREATE, ME, 0),
    # I hold it: renew (whatever its age: a restarted process with the same pod name).
    (held(ME), 0.0, Action.RENEW, ME, 3),
    (held(ME), 100.0, Action.RENEW, ME, 3),
    # Someone else holds a lease that is still valid on our clock: wait.
    (held(OTHER), 0.0, Action.WAIT, OTHER, None),
    (held(OTHER), 14.9, Action.WAIT, OTHER, None),
    # ... even when its renewTime looks old to our (possibly skewed) wall clock.
    (held(OTHER, renew=NOW - dt.timedelta(hours=1)), 1.0, Action.WAIT, OTHER, None),
    # Unchanged for the lease duration: expired, take it over (a transition).
    (held(OTHER), 15.0, Action.ACQUIRE, ME, 4),
    (held(OTHER), 60.0, Action.ACQUIRE, ME, 4),
    # The record's own duration counts, not ours.
    (held(OTHER, duration=30), 20.0, Action.WAIT, OTHER, None),
    (held(OTHER, duration=5), 5.0, Action.ACQUIRE, ME, 4),
    # No duration in the record: ours (15 s).
    (held(OTHER, duration=0), 14.0, Action.WAIT, OTHER, None),
    (held(OTHER, duration=0), 15.0, Action.ACQUIRE, ME, 4),
    # Released (empty holder) by a leader's clean shutdown: take it at once.
    (Lease("", 1, NOW, NOW, 3), 0.0, Action.ACQUIRE, ME, 4),
    # An empty Lease object (someone created it without a spec).
    (Lease(), 0.0, Action.ACQUIRE, ME, 1),
])
def test_decide(lease: Lease | None, unchanged_for: float, action: Action, leader: str,
                transitions: int | None) -> None:
    d = decide(lease, ME, NOW, unchanged_for, 15)
    assert d.action is action
    assert d.leader == leader
    if action is Action.WAIT:
        assert d.record is None
        assert d.expires_in > 0
        return
    assert d.record is not None
    assert d.record.holder == ME
    assert d.record.renew_time == NOW
    assert d.record.lease_duration == 15
    assert d.record.transitions == transitions
    # Acquiring starts a new term; renewing keeps the term's acquire time.
    assert d.record.acquire_time == (EARLIER if action is Action.RENEW else NOW)


def test_wait_says_when_the_lease_would_expire() -> None:
    assert decide(held(OTHER), ME, NOW, 4.0, 15).expires_in == pytest.approx(11.0)


@pytest.mark.parametrize(("since", "deadline", "keep"), [
    (0.0, 10.0, True), (9.99, 10.0, True), (10.0, 10.0, False), (30.0, 10.0, False),
])
def test_keep_leading_until_the_renew_deadline(since: float, deadline: float,
                                               keep: bool) -> None:
    assert keep_leading(since, deadline) is keep


def test_release_clears_the_holder_and_keeps_the_count() -> None:
    r = released(held(ME, transitions=5), NOW)
    assert (r.holder, r.lease_duration, r.transitions, r.renew_time) == ("", 1, 5, NOW)
    # ... which any other candidate acquires at once.
    assert decide(r, OTHER, NOW, 0.0, 15).action is Action.ACQUIRE


def test_lease_object_round_trip() -> None:
    record = Lease(ME, 15, EARLIER, NOW, 2)
    body = lease_body("ambit-system", "ambit-controller", record)
    assert body["apiVersion"] == "coordination.k8s.io/v1" and body["kind"] == "Lease"
    assert body["metadata"]["labels"] == {"app.kubernetes.io/part-of": "ambit",
                                          "app.kubernetes.io/managed-by": "ambit"}
    assert body["spec"] == {"holderIdentity": ME, "leaseDurationSeconds": 15,
                            "leaseTransitions": 2,
                            "acquireTime": "2025-03-01T11:59:20.250000Z",
                            "renewTime": "2025-03-01T12:00:00.250000Z"}
    assert parse_lease(body) == record
    # An update keeps the live object's metadata (resourceVersion: optimistic concurrency)
    # and fields of the spec we do not manage.
    live = {"metadata": {"name": "ambit-controller", "namespace": "ambit-system",
                         "resourceVersion": "41", "labels": {"x": "y"}},
            "spec": {"holderIdentity": OTHER, "strategy": "OldestEmulationVersion"}}
    put = lease_body("ambit-system", "ambit-controller", record, live)
    assert put["metadata"] == live["metadata"]
    assert put["spec"]["strategy"] == "OldestEmulationVersion"
    assert parse_lease(put) == record
    assert parse_lease(live).resource_version == "41"


@pytest.mark.parametrize(("spec", "expected"), [
    ({}, Lease()),
    ({"holderIdentity": None, "leaseDurationSeconds": "15", "leaseTransitions": -1},
     Lease()),
    ({"holderIdentity": "x", "leaseDurationSeconds": True}, Lease("x")),
    ({"renewTime": "not a time"}, Lease()),
])
def test_parse_lease_tolerates_missing_and_odd_fields(spec: dict[str, object],
                                                      expected: Lease) -> None:
    assert parse_lease({"spec": spec}) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("2025-03-01T12:00:00.250000Z", NOW),
    ("2025-03-01T12:00:00Z", NOW.replace(microsecond=0)),
    ("2025-03-01T14:00:00.250000+02:00", NOW),
    ("", None), (None, None), (12, None), ("yesterday", None),
])
def test_micro_time(text: object, expected: dt.datetime | None) -> None:
    assert parse_micro_time(text) == expected


def test_micro_time_is_written_in_utc() -> None:
    local = NOW.astimezone(dt.timezone(dt.timedelta(hours=-5)))
    assert format_micro_time(local) == "2025-03-01T12:00:00.250000Z"


@pytest.mark.parametrize(("timings", "error"), [
    (Timings(), None),
    (Timings(1, 0.6, 0.1), None),
    (Timings(0, 0.5, 0.1), "at least 1 second"),
    (Timings(10, 10, 2), "longer than the renew deadline"),
    (Timings(15, 2, 2), "longer than the retry period"),
    (Timings(15, 10, 0), "positive"),
])
def test_timings_are_checked(timings: Timings, error: str | None) -> None:
    if error is None:
        timings.check()
    else:
        with pytest.raises(ValueError, match=error):
            timings.check()


def test_default_identity() -> None:
    assert default_identity({"POD_NAME": "ambit-controller-7d9f-abcde"}) == \
        "ambit-controller-7d9f-abcde"
    # Outside a pod: two processes on one host must not share an identity.
    a, b = default_identity({}), default_identity({"POD_NAME": " "})
    assert a != b and a.rsplit("_", 1)[0] == b.rsplit("_", 1)[0]

"""Leader election on a ``coordination.k8s.io/v1`` Lease, for the controller's single-writer work.

Why it exists: the controller runs as several replicas (Deployment ``ambit-controller``) and
every replica serves gRPC (state push, CA signing, xDS), but some work must have exactly one
writer: creating the mesh root's Secret, writing the ``ambit-ca-root`` ConfigMap, and running
the waypoint deployer (two deployers would fight over the same Deployments and Gateway status).
That work runs only on the replica holding the Lease.

Why not ``kubernetes_asyncio.leaderelection``: it never releases the lease (a clean shutdown
leaves the other replica waiting a whole lease duration), does not count ``leaseTransitions``,
writes the local time zone's wall clock as if it were UTC, refuses retry periods under one
second (so tests would take minutes), returns for good after losing leadership instead of
campaigning again, and mixes the decision with the I/O, so it cannot be tested in a table.

Semantics are client-go's (``tools/leaderelection``):

* the decision (``decide``) is a pure function of the Lease as read, my identity, the time and
  how long this exact record has stayed unchanged: create the Lease when absent, renew it when
  I hold it, acquire it when nobody holds it (a clean release cleared ``holderIdentity``) or
  when it has expired, else wait;
* **expiry is measured on our own clock**: a held Lease is expired when the record has not
  changed for ``leaseDurationSeconds`` since we first saw it (client-go's ``observedTime``),
  not by comparing its ``renewTime`` with our wall clock, so clock skew between nodes can
  neither make a follower steal a live lease nor stop one from taking over a dead one;
* every write is optimistic: a PUT carries the ``resourceVersion`` it was read at, a POST
  creates only if absent, so when two replicas try at once the API server answers the loser
  with 409 Conflict (or AlreadyExists) and it stays a follower;
* the leader renews every ``retry_period``; when no renewal has succeeded for
  ``renew_deadline`` (shorter than the lease duration, so it stops before anyone else may
  start) it gives up leadership, stops the leader-only work and campaigns again; the process
  keeps serving;
* on a clean shutdown the leader stops its work, then releases the Lease (empty
  ``holderIdentity``, ``leaseDurationSeconds: 1``, as client-go's ``ReleaseOnCancel``), so the
  other replica takes over at its next retry instead of after the lease duration;
* ``leaseTransitions`` is incremented whenever the holder changes.

Leader-only work is one coroutine (``lead``), run as a task while leading and cancelled when
leadership is lost, like client-go's ``OnStartedLeading(ctx)``; ``on_change`` hears every
transition (metrics, logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import logging
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from controller.waypoint.k8s_apply import ApiError, Resource, Rest

__all__ = [
    "LEASES", "Action", "AlwaysLeader", "Decision", "ElectionError", "LeaderElector", "Lease",
    "Timings", "decide", "default_identity", "format_micro_time", "keep_leading", "lease_body",
    "parse_lease", "parse_micro_time",
]

log = logging.getLogger("controller.leader")

LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
FIELD_MANAGER = "ambit-controller"
PART_OF = {"app.kubernetes.io/part-of": "ambit", "app.kubernetes.io/managed-by": "ambit"}


class ElectionError(Exception):
    """Leader election cannot work at all (e.g. the Lease's namespace does not exist); the
    message says what to do. Transient failures are retried, never raised."""


@dataclasses.dataclass(frozen=True)
class Timings:
    """client-go's three durations (seconds). ``lease_duration``: how long followers wait
    before taking over a lease that stopped being renewed; ``renew_deadline``: how long the
    leader keeps trying to renew before it gives up leading; ``retry_period``: how often
    everyone tries."""

    lease_duration: int = 15
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    # Followers wait retry_period * (1 + jitter * random) between tries (client-go: 1.2).
    jitter: float = 1.2

    def check(self) -> None:
        """Raise ValueError unless lease > renew deadline > retry period (> 0)."""
        if self.lease_duration < 1:
            raise ValueError("the lease duration must be at least 1 second")
        if self.retry_period <= 0:
            raise ValueError("the retry period must be positive")
        if not self.lease_duration > self.renew_deadline:
            raise ValueError(f"the lease duration ({self.lease_duration}s) must be longer than "
                             f"the renew deadline ({self.renew_deadline}s)")
        if not self.renew_deadline > self.retry_period:
            raise ValueError(f"the renew deadline ({self.renew_deadline}s) must be longer than "
                             f"the retry period ({self.retry_period}s)")


# --- the Lease record -----------------------------------------------------------------------


def format_micro_time(t: dt.datetime) -> str:
    """A ``MicroTime`` as the API server writes it: RFC 3339 UTC with microseconds."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(text: object) -> dt.datetime | None:
    """A ``MicroTime`` or ``Time`` (RFC 3339, with or without fraction); None if unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


@dataclasses.dataclass(frozen=True)
class Lease:
    """The election fields of a Lease's ``spec``, plus the ``resourceVersion`` it was read at
    (not part of the record: two reads of an unchanged record compare equal)."""

    holder: str = ""  # "" = nobody (released)
    lease_duration: int = 0  # seconds; 0 = unset (the caller's default applies)
    acquire_time: dt.datetime | None = None
    renew_time: dt.datetime | None = None
    transitions: int = 0
    resource_version: str = dataclasses.field(default="", compare=False)


def parse_lease(obj: Mapping[str, Any]) -> Lease:
    """The record of a Lease object as the API serves it (missing fields: defaults)."""
    spec = obj.get("spec") or {}
    meta = obj.get("metadata") or {}

    def integer(value: object) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
            else 0

    return Lease(holder=str(spec.get("holderIdentity") or ""),
                 lease_duration=integer(spec.get("leaseDurationSeconds")),
                 acquire_time=parse_micro_time(spec.get("acquireTime")),
                 renew_time=parse_micro_time(spec.get("renewTime")),
                 transitions=integer(spec.get("leaseTransitions")),
                 resource_version=str(meta.get("resourceVersion") or ""))


def lease_body(namespace: str, name: str, lease: Lease,
               live: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Lease object to POST (``live`` None) or PUT (over ``live``, keeping its metadata and
    resourceVersion so a concurrent write conflicts)."""
    spec: dict[str, Any] = {"holderIdentity": lease.holder,
                            "leaseDurationSeconds": lease.lease_duration,
                            "leaseTransitions": lease.transitions}
    if lease.acquire_time is not None:
        spec["acquireTime"] = format_micro_time(lease.acquire_time)
    if lease.renew_time is not None:
        spec["renewTime"] = format_micro_time(lease.renew_time)
    if live is None:
        return {"apiVersion": LEASES.api_version, "kind": LEASES.kind,
                "metadata": {"name": name, "namespace": namespace, "labels": dict(PART_OF)},
                "spec": spec}
    body = {k: v for k, v in live.items() if k != "status"}
    body["apiVersion"], body["kind"] = LEASES.api_version, LEASES.kind
    body["spec"] = {**(live.get("spec") or {}), **spec}
    return body


# --- the decision (pure) --------------------------------------------------------------------


class Action(enum.Enum):
    CREATE = "create"  # no Lease: create it, holding it
    RENEW = "renew"  # I hold it: move renewTime
    ACQUIRE = "acquire"  # free or expired: take it over (a transition)
    WAIT = "wait"  # someone else holds a valid lease


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    # The record to write (CREATE/RENEW/ACQUIRE); None for WAIT.
    record: Lease | None
    # Who leads if the write succeeds (WAIT: the current holder).
    leader: str
    # WAIT: seconds until the lease expires on our clock, if nothing changes.
    expires_in: float = 0.0


def decide(lease: Lease | None, identity: str, now: dt.datetime, unchanged_for: float,
           lease_duration: int) -> Decision:
    """What a candidate does after reading the Lease (None: absent).

    ``now``: the wall clock (written into acquire/renew times); ``unchanged_for``: seconds
    (our monotonic clock) since we first saw this exact record, the measure of expiry;
    ``lease_duration``: ours, written into the record and used when the record has none.
    """
    if lease is None:
        return Decision(Action.CREATE, Lease(identity, lease_duration, now, now, 0), identity)
    if lease.holder == identity:
        # Keep the acquire time and the transition count (client-go: "if IsLeader").
        return Decision(Action.RENEW, Lease(identity, lease_duration,
                                            lease.acquire_time or now, now, lease.transitions),
                        identity)
    duration = lease.lease_duration or lease_duration
    if lease.holder and unchanged_for < duration:
        return Decision(Action.WAIT, None, lease.holder, expires_in=duration - unchanged_for)
    return Decision(Action.ACQUIRE, Lease(identity, lease_duration, now, now,
                                          lease.transitions + 1), identity)


def keep_leading(since_last_renewal: float, renew_deadline: float) -> bool:
    """Whether a leader whose last successful renewal was ``since_last_renewal`` seconds ago
    may still act as leader."""
    return since_last_renewal < renew_deadline


def released(lease: Lease, now: dt.datetime) -> Lease:
    """The record a leader writes on a clean shutdown (client-go's ``release``)."""
    return Lease("", 1, now, now, lease.transitions)


def default_identity(environ: Mapping[str, str]) -> str:
    """``$POD_NAME`` (unique among the pods of a namespace), else the hostname plus a random
    suffix, so two processes on one host never share an identity (two leaders)."""
    pod = environ.get("POD_NAME", "").strip()
    if pod:
        return pod
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


# --- the elector ----------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    """Campaign for the Lease ``namespace/name`` as ``identity``; ``run()`` until cancelled,
    then ``close()`` (stops leader work, releases the Lease).

    ``lead``: the leader-only work, a coroutine run while leading (cancelled when leadership is
    lost; restarted after ``retry_period`` if it fails). ``on_change(leading)``: called on
    every transition.
    """

    def __init__(
        self,
        rest: Rest,
        namespace: str,
        name: str,
        identity: str,
        *,
        timings: Timings | None = None,
        lead: Callable[[], Awaitable[None]] | None = None,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = _utcnow,
        rng: Callable[[], float] = random.random,
    ) -> None:
        timings = timings or Timings()
        timings.check()
        if not identity:
            raise ValueError("the leader election identity must not be empty")
        self.rest = rest
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timings = timings
        self.lead = lead
        self.on_change = on_change
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng
        self.is_leader = False
        self.leader = ""  # the holder as last seen ("" unknown or nobody)
        self.transitions = 0  # leaseTransitions as last seen
        self.leading = asyncio.Event()  # set while leading
        self.attempts = 0
        self._observed: Lease | None = None
        self._observed_at = 0.0
        self._live: dict[str, Any] | None = None  # the Lease object as last read or written
        self._renewed_at = 0.0
        self._lead_task: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._problem = ""  # the last logged failure (logged once per distinct message)
        self._why = ""  # how the last successful acquisition came about (for the log)

    @property
    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    # ----- lifecycle -----

    def start(self) -> asyncio.Task[None]:
        """``run()`` as a task (idempotent: the same task until ``close()``)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"leader-election-{self.name}")
        return self._task

    async def close(self, release_timeout: float = 5.0) -> None:
        """Stop campaigning and any leader work, then release the Lease if we hold it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ElectionError):
                await self._task
            self._task = None
        was_leader = self.is_leader
        await self._lose("shutting down", log_level=logging.INFO)
        if was_leader:
            try:
                async with asyncio.timeout(release_timeout):
                    await self._release()
            except (TimeoutError, ApiError) as e:
                log.warning("leader election: could not release %s (%s); the other replicas "
                            "take over when it expires", self.where, e)

    async def run(self) -> None:
        """Campaign forever: try every retry period (with jitter while following). Raises
        ``ElectionError`` when election cannot work at all."""
        t = self.timings
        while True:
            try:
                await self.attempt()
            except ElectionError:
                await self._lose("leader election failed", log_level=logging.ERROR)
                raise
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the campaign (nor leave a stale leader)
                log.exception("leader election: unexpected failure; retrying")
                if self.is_leader and not keep_leading(self._clock() - self._renewed_at,
                                                       t.renew_deadline):
                    await self._lose("could not renew the lease within the renew deadline")
            if self.is_leader:
                await asyncio.sleep(t.retry_period)
            else:
                await asyncio.sleep(t.retry_period * (1 + t.jitter * self._rng()))

    # ----- one try -----

    async def attempt(self) -> None:
        """One try (``run()`` makes one every retry period): read the Lease, acquire or
        renew it if we may, and step down if we lead but can no longer renew."""
        self.attempts += 1
        t = self.timings
        # A renewal counts from before it was sent (the write lands after this), so the
        # leader's deadline never runs later than the expiry the others measure.
        started = self._clock()
        # A leader's try must end by its renew deadline; a follower's has no deadline to
        # keep, only a bound so that a hung request does not stall the campaign.
        budget = float(t.lease_duration)
        if self.is_leader:
            budget = max(t.renew_deadline - (started - self._renewed_at), 0.05)
        holding = False
        try:
            async with asyncio.timeout(budget):
                holding = await self._try_acquire_or_renew()
        except TimeoutError:
            self._note(f"no answer from the API server within {budget:.1f}s")
        if holding:
            self._renewed_at = started
            if not self.is_leader:
                self._become_leader()
            return
        if self.is_leader:
            if self.leader and self.leader != self.identity:
                await self._lose(f"{self.leader} holds the lease now")
            elif not keep_leading(self._clock() - self._renewed_at, t.renew_deadline):
                await self._lose(f"could not renew the lease within the renew deadline "
                                 f"({t.renew_deadline:g}s)")

    async def _try_acquire_or_renew(self) -> bool:
        """Read the Lease, decide, write; whether we hold it afterwards."""
        try:
            live = await self.rest.get(LEASES, self.namespace, self.name)
        except ApiError as e:
            self._note(self._explain(e, "read"))
            return False
        lease = parse_lease(live) if live is not None else None
        if live is not None:
            self._live = live
        now_m = self._clock()
        if lease is not None and lease != self._observed:
            self._observed, self._observed_at = lease, now_m
            self._seen(lease)
        decision = decide(lease, self.identity, self._wall(),
                          now_m - self._observed_at if lease is not None else 0.0,
                          self.timings.lease_duration)
        if decision.action is Action.WAIT:
            self._problem = ""
            return False
        assert decision.record is not None
        try:
            if decision.action is Action.CREATE:
                written = await self.rest.create(
                    LEASES, self.namespace, lease_body(self.namespace, self.name,
                                                       decision.record), FIELD_MANAGER)
            else:
                assert live is not None
                written = await self.rest.replace(
                    LEASES, self.namespace, self.name,
                    lease_body(self.namespace, self.name, decision.record, live), FIELD_MANAGER)
        except ApiError as e:
            if e.status == 409:
                # Someone else wrote it first (created it, or changed it since our read):
                # they won this round; the next read shows who.
                log.debug("leader election: %s changed under us (%s)", self.where, e.reason)
                return False
            if e.status == 404 and decision.action is Action.CREATE \
                    and (e.details.get("kind") == "namespaces"
                         or "namespace" in e.message.lower()):
                raise ElectionError(
                    f"cannot create {self.where}: namespace {self.namespace} does not exist; "
                    "install Ambit (`ambit install` creates it) or pass "
                    "--leader-election-namespace of an existing namespace") from None
            self._note(self._explain(e, decision.action.value))
            return False
        self._live = written
        record = parse_lease(written)
        self._observed, self._observed_at = record, self._clock()
        self._seen(record)
        self._problem = ""
        if decision.action is Action.CREATE:
            self._why = "created the Lease"
        elif decision.action is Action.ACQUIRE:
            assert lease is not None
            self._why = (f"took over from {lease.holder}, whose lease expired" if lease.holder
                         else "the Lease was free")
        else:
            self._why = "renewed"
        return True

    def _explain(self, e: ApiError, verb: str) -> str:
        if e.status == 403:
            return (f"cannot {verb} {self.where}: forbidden ({e.message}); the controller's "
                    "service account needs get, create and update on leases in "
                    f"coordination.k8s.io in namespace {self.namespace} (Role ambit-controller)")
        return f"cannot {verb} {self.where}: {e}"

    def _note(self, problem: str) -> None:
        """Log a failed try: a warning when the problem is new, debug while it persists."""
        level = logging.WARNING if problem != self._problem else logging.DEBUG
        self._problem = problem
        log.log(level, "leader election: %s; retrying every %gs", problem,
                self.timings.retry_period)

    def _seen(self, lease: Lease) -> None:
        self.transitions = lease.transitions
        if lease.holder != self.leader:
            previous, self.leader = self.leader, lease.holder
            if lease.holder and lease.holder != self.identity:
                log.info("leader election: the leader is %s (%s%s)", lease.holder, self.where,
                         f", was {previous}" if previous else "")
            elif not lease.holder:
                log.info("leader election: %s was released by %s", self.where,
                         previous or "its holder")

    # ----- transitions -----

    def _become_leader(self) -> None:
        self.is_leader = True
        self.leading.set()
        log.info("leader election: %s became the leader (%s: %s; %d transitions); starting "
                 "the leader-only work", self.identity, self.where, self._why, self.transitions)
        if self.lead is not None:
            self._lead_task = asyncio.create_task(
                _supervise(self.lead, self.timings.retry_period), name="leader-work")
        if self.on_change is not None:
            self.on_change(True)

    async def _lose(self, why: str, log_level: int = logging.WARNING) -> None:
        if not self.is_leader:
            return
        self.is_leader = False
        self.leading.clear()
        log.log(log_level, "leader election: %s lost leadership (%s); stopping the "
                "leader-only work%s", self.identity, why,
                "" if why == "shutting down" else ", still serving and campaigning again")
        task, self._lead_task = self._lead_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.on_change is not None:
            self.on_change(False)

    async def _release(self) -> None:
        live = self._live
        if live is None or parse_lease(live).holder != self.identity:
            return
        record = released(parse_lease(live), self._wall())
        try:
            await self.rest.replace(LEASES, self.namespace, self.name,
                                    lease_body(self.namespace, self.name, record, live),
                                    FIELD_MANAGER)
        except ApiError as e:
            if e.status in (404, 409):
                return  # gone, or someone else wrote it since: nothing of ours to release
            raise
        self.leader = ""
        log.info("leader election: released %s", self.where)


async def _supervise(lead: Callable[[], Awaitable[None]], retry: float) -> None:
    """Run the leader-only work; if it fails (a bug), log it and start it again."""
    while True:
        try:
            await lead()
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in leader work must not end the campaign
            log.exception("leader election: the leader-only work failed; restarting it in %gs",
                          retry)
        await asyncio.sleep(retry)


class AlwaysLeader:
    """``--no-leader-election``: a single replica that always leads (same interface)."""

    def __init__(self, *, lead: Callable[[], Awaitable[None]] | None = None,
                 on_change: Callable[[bool], None] | None = None,
                 identity: str = "") -> None:
        self.lead = lead
        self.on_change = on_change
        self.identity = identity
        self.is_leader = False
        self.leader = identity
        self.leading = asyncio.Event()
        self.where = "no leader election"
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="leader-work")
        return self._task

    async def run(self) -> None:
        self.is_leader = True
        self.leading.set()
        log.info("leader election disabled (--no-leader-election): this replica does the "
                 "leader-only work; run only one")
        if self.on_change is not None:
            self.on_change(True)
        if self.lead is not None:
            await _supervise(self.lead, 2.0)
        await asyncio.Event().wait()

    async def close(self, release_timeout: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.is_leader:
            self.is_leader = False
            self.leading.clear()
            if self.on_change is not None:
                self.on_change(False)

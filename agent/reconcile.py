"""Which local pods must be captured, as a pure function (tested as a table).

Why pure: the agent learns about pods from three places that can disagree for a while (CNI
ADD/DEL, the registry's state push, the kernel's own record of what is captured, which survives
agent restarts), and getting the precedence right is the whole job. As in kopf's reconcile,
the function sees a full picture and returns what to change; the agent does the I/O.

Precedence for a pod's desired capture:

1. the state push, when it lists one of the pod's IPs as a workload of this node *under the
   pod's own uid*: HBONE means capture, TCP means the namespace is not enrolled or the pod
   opted out (an IP the push gives another pod, e.g. a deleted pod whose removal has not
   reached the push yet, says nothing about this pod);
2. else the registry's answer at CNI ADD (the pod has no IP in the registry yet);
3. else not captured.

A pod whose host-side interface is gone right now (``gone``: the agent looks just before it
plans) is forgotten: released and its record dropped, as if its CNI DEL had come.

Addresses the kernel captures that belong to no known pod are released, unless the state push
says a mesh pod of this node has that address: then the agent looks for it on the node
(``discover``) instead, which is how pods that predate the agent are adopted. A CNI DEL is
final: a pod the agent saw deleted is remembered as a ``Tombstone`` and never looked for or
adopted again while the push still lists it (it lags behind the runtime). Adoption further
needs live evidence, checked at that moment (``adoption``): a route to the IP over a pod
interface that exists now.

Tombstones are bounded (``prune``): one is dropped once the push no longer lists that pod at
its IPs (after ``TOMBSTONE_SETTLE`` seconds, so a push that has not yet caught up with the
pod's IP does not end it early), once the push or a CNI ADD gives one of its IPs to another
pod, once a new CNI ADD for the same pod is recorded, after ``TOMBSTONE_TTL`` seconds, and
beyond ``MAX_TOMBSTONES`` the oldest go. A dropped tombstone is no risk on its own: adoption
still needs the live interface, which a deleted pod no longer has.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Set
from dataclasses import dataclass

from agent.pods import LocalPod, Tombstone

# Tombstones: at most this many (the newest kept), each at most this old (10 minutes).
MAX_TOMBSTONES = 256
TOMBSTONE_TTL = 600.0
# A tombstone outlives the push listing its pod by at least this long (seconds).
TOMBSTONE_SETTLE = 5.0


@dataclass(frozen=True)
class MeshPod:
    """A workload the state push places on this node."""

    uid: str
    in_mesh: bool


@dataclass(frozen=True)
class Plan:
    enroll: tuple[LocalPod, ...] = ()
    unenroll: tuple[LocalPod, ...] = ()
    release: tuple[str, ...] = ()  # captured IPs of no known pod
    discover: tuple[str, ...] = ()  # mesh IPs of this node without a local pod record
    forget: tuple[LocalPod, ...] = ()  # local pods whose interface is gone: release, drop

    @property
    def empty(self) -> bool:
        return not (self.enroll or self.unenroll or self.release or self.discover
                    or self.forget)


def desired(pod: LocalPod, mesh: Mapping[str, MeshPod]) -> bool:
    listed = [mesh[ip] for ip in pod.ips if ip in mesh and mesh[ip].uid == pod.uid]
    if listed:
        return any(m.in_mesh for m in listed)
    return bool(pod.decision)


def tombstoned(uid: str, ip: str, deleted: Collection[Tombstone]) -> bool:
    """Whether the agent saw pod ``uid`` with ``ip`` deleted."""
    return any(t.uid == uid and ip in t.ips for t in deleted)


def plan(local: Mapping[str, LocalPod], mesh: Mapping[str, MeshPod], enrolled: Set[str],
         deleted: Collection[Tombstone] = (), gone: Set[str] = frozenset()) -> Plan:
    """``deleted``: the tombstones; ``gone``: uids of local pods whose host interface does
    not exist right now."""
    enroll: list[LocalPod] = []
    unenroll: list[LocalPod] = []
    forget: list[LocalPod] = []
    for pod in sorted(local.values(), key=lambda p: p.uid):
        if pod.uid in gone:
            forget.append(pod)
            continue
        want = desired(pod, mesh)
        if want and not set(pod.ips) <= enrolled:
            enroll.append(pod)
        elif not want and set(pod.ips) & enrolled:
            unenroll.append(pod)
    # A pod being forgotten is still known in this pass: ``forget`` releases its IPs, and it
    # is not looked for again (its tombstone holds it back from the next pass on).
    known_ips = {ip for p in local.values() for ip in p.ips}
    discover = sorted(ip for ip, m in mesh.items() if m.in_mesh and ip not in known_ips
                      and not tombstoned(m.uid, ip, deleted))
    release = sorted(ip for ip in enrolled if ip not in known_ips and ip not in discover)
    return Plan(tuple(enroll), tuple(unenroll), tuple(release), tuple(discover),
                tuple(forget))


@dataclass(frozen=True)
class Adoption:
    """Whether to adopt a mesh IP of this node found without a local record, and why."""

    pod: LocalPod | None
    reason: str


def adoption(ip: str, mesh: Mapping[str, MeshPod], deleted: Collection[Tombstone],
             iface: str | None) -> Adoption:
    """Decide on ``ip`` (from ``plan(...).discover``) with the live facts read just now:
    ``iface`` is the pod interface a route to ``ip`` leaves by, None if there is none.

    Precedence: not a mesh pod of this node (any more) → no; a pod the agent saw deleted →
    no, whatever the node shows; no live interface → no; else adopt, with every IP the push
    gives that pod."""
    m = mesh.get(ip)
    if m is None or not m.in_mesh:
        return Adoption(None, f"{ip} is no longer a mesh pod of this node in the state push")
    if tombstoned(m.uid, ip, deleted):
        return Adoption(None, f"pod {m.uid} ({ip}) was deleted (CNI DEL); the state push has "
                        "not caught up yet")
    if iface is None:
        return Adoption(None, f"pod {m.uid} ({ip}): no route to it over a pod interface "
                        "right now, so it is not (or no longer) on this node")
    ips = tuple(sorted(i for i, other in mesh.items() if other.uid == m.uid))
    return Adoption(LocalPod(m.uid, ips, iface, reason="found on the node (no CNI record)"),
                    "found from the registry and a live route")


def prune(deleted: Collection[Tombstone], mesh: Mapping[str, MeshPod],
          local: Mapping[str, LocalPod], now: float) -> tuple[Tombstone, ...]:
    """The tombstones still needed, newest first, at most ``MAX_TOMBSTONES``. One goes when:
    it is older than ``TOMBSTONE_TTL``; a local record (a later CNI ADD) holds its pod or one
    of its IPs; the push gives one of its IPs to another pod; or, past
    ``TOMBSTONE_SETTLE``, the push lists its pod at none of its IPs."""
    local_ips = {ip for p in local.values() for ip in p.ips}
    keep: list[Tombstone] = []
    for t in deleted:
        age = now - t.deleted_at
        if age > TOMBSTONE_TTL or t.uid in local or set(t.ips) & local_ips:
            continue
        if any(ip in mesh and mesh[ip].uid != t.uid for ip in t.ips):
            continue  # replaced: a new pod has the address
        if age >= TOMBSTONE_SETTLE and not any(ip in mesh for ip in t.ips):
            continue  # the push dropped the pod
        keep.append(t)
    keep.sort(key=lambda t: (-t.deleted_at, t.uid))
    return tuple(keep[:MAX_TOMBSTONES])

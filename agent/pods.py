"""The agent's table of the node's pods, kept on disk so a restarted agent still knows them.

Why it exists: the kernel holds *what* is captured (pinned maps, rules), but only the CNI ADD
told the agent *which pod* an address and interface belong to and what the registry said at
that moment. ``pods.json`` in the run directory holds a snapshot of the table on its first
line (written atomically) followed by a journal, one JSON line per change since (put, remove,
bury, tombstones pruned): a CNI ADD or DEL appends one short line instead of rewriting every
pod's record, so its cost does not grow with the node's pods; once the journal is longer than
the table, the snapshot is rewritten and the journal starts over (amortised O(1) per change).
A torn last line (the agent killed mid-write) is skipped; a file of the older format (one
indented document) still loads. An unreadable file is moved aside (and reported) rather than
stopping the agent, since reconcile rediscovers pods from the registry and the routing
table. The same file keeps the tombstones of pods seen deleted (``deleted``), so a restarted
agent does not adopt them back from a registry that still lists them (``agent/reconcile.py``
bounds and prunes them).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.capture.base import PodCapture
from mesh.files import write_atomic

log = logging.getLogger("agent.pods")


@dataclass(frozen=True)
class LocalPod:
    """A pod on this node. ``decision`` is the registry's answer at CNI ADD (None for a pod
    the agent found by itself); the state push overrides it once the pod's IP is known."""

    uid: str  # namespace/name
    ips: tuple[str, ...]
    host_iface: str
    netns: str = ""
    container_id: str = ""
    decision: bool | None = None
    reason: str = ""

    def capture(self) -> PodCapture:
        return PodCapture(self.uid, self.ips, self.host_iface, self.netns)

    def with_decision(self, decision: bool | None, reason: str) -> LocalPod:
        return replace(self, decision=decision, reason=reason)


@dataclass(frozen=True)
class Tombstone:
    """A pod the agent saw deleted (CNI DEL, or its interface found gone): never adopted
    back from the registry while the registry still lists it."""

    uid: str  # namespace/name
    ips: tuple[str, ...]
    container_id: str = ""
    netns: str = ""
    deleted_at: float = 0.0  # time.time()
    reason: str = "CNI DEL"

    @classmethod
    def of(cls, pod: LocalPod, now: float, reason: str = "CNI DEL") -> Tombstone:
        return cls(pod.uid, pod.ips, pod.container_id, pod.netns, now, reason)


# The journal is compacted (snapshot rewritten) once it has more lines than this or than the
# table has records, whichever is larger.
JOURNAL_MIN = 64


def _pod(item: dict[str, Any]) -> LocalPod:
    item["ips"] = tuple(item["ips"])
    return LocalPod(**item)


def _tombstone(item: dict[str, Any]) -> Tombstone:
    item["ips"] = tuple(item["ips"])
    return Tombstone(**item)


def _record(obj: LocalPod | Tombstone) -> dict[str, Any]:
    out = dict(vars(obj))  # flat records: faster than dataclasses.asdict's deep copy
    out["ips"] = list(obj.ips)
    return out


def _line(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":")) + "\n"


class PodTable:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.pods: dict[str, LocalPod] = {}
        self.deleted: tuple[Tombstone, ...] = ()
        self._journal = 0  # lines after the snapshot in the file

    def load(self) -> None:
        self._journal = 0
        try:
            text = self.path.read_text()
            try:
                lines = [json.loads(text)]  # the older format, or a snapshot alone
            except json.JSONDecodeError:
                lines = text.splitlines()
            raw = lines[0] if isinstance(lines[0], dict) else json.loads(lines[0])
            self.pods = {p.uid: p for p in map(_pod, raw["pods"])}
            self.deleted = tuple(map(_tombstone, raw.get("deleted", [])))
            for n, line in enumerate(lines[1:], start=2):
                try:
                    op = json.loads(line)
                except json.JSONDecodeError:
                    if n == len(lines):  # torn by a crash mid-append: the change is lost
                        log.warning("%s: skipping a torn last line", self.path)
                        break
                    raise
                self._replay(op)
                self._journal += 1
        except FileNotFoundError:
            self.pods = {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            aside = self.path.with_suffix(".corrupt")
            log.error("cannot read %s (%s); moved it to %s and starting from the registry and "
                      "the routing table", self.path, e, aside)
            with contextlib.suppress(OSError):
                self.path.replace(aside)
            self.pods = {}
            self.deleted = ()

    def save(self) -> None:
        """Rewrite the snapshot (atomically) and start the journal over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {"pods": [_record(p) for p in sorted(self.pods.values(),
                                                                    key=lambda p: p.uid)],
                               "deleted": [_record(t) for t in self.deleted]}
        write_atomic(self.path, _line(doc))
        self._journal = 0

    def _append(self, op: dict[str, Any]) -> None:
        """Journal one change; compact once the journal outgrows the table."""
        if self._journal >= max(JOURNAL_MIN, len(self.pods) + len(self.deleted)) \
                or not self.path.exists():
            self.save()
            return
        with self.path.open("a") as f:
            f.write(_line(op))
        self._journal += 1

    def _replay(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "put":
            self._put(_pod(op["pod"]))
        elif kind == "remove":
            self.pods.pop(op["uid"], None)
        elif kind == "bury":
            self._bury(_pod(op["pod"]), _tombstone(op["tombstone"]), int(op["limit"]))
        elif kind == "deleted":
            self.deleted = tuple(map(_tombstone, op["deleted"]))
        else:
            raise ValueError(f"unknown journal entry {kind!r}")

    def _put(self, pod: LocalPod) -> None:
        # One address belongs to one pod: a new pod with a reused IP replaces the old record.
        ips = set(pod.ips)
        self.pods = {k: v for k, v in self.pods.items() if k == pod.uid or not ips & set(v.ips)}
        self.pods[pod.uid] = pod

    def put(self, pod: LocalPod) -> None:
        self._put(pod)
        self._append({"op": "put", "pod": _record(pod)})

    def remove(self, uid: str) -> LocalPod | None:
        pod = self.pods.pop(uid, None)
        if pod is not None:
            self._append({"op": "remove", "uid": uid})
        return pod

    def _bury(self, pod: LocalPod, tomb: Tombstone, limit: int) -> None:
        if self.pods.get(pod.uid) == pod:  # not a newer record of the same pod
            del self.pods[pod.uid]
        self.deleted = (tomb, *(t for t in self.deleted if t.uid != pod.uid))[:limit]

    def bury(self, pod: LocalPod, now: float, limit: int, reason: str = "CNI DEL") -> None:
        """Drop ``pod``'s record and remember it as deleted: newest first, at most ``limit``
        (reconcile prunes them further, ``agent.reconcile.prune``)."""
        tomb = Tombstone.of(pod, now, reason)
        self._bury(pod, tomb, limit)
        self._append({"op": "bury", "pod": _record(pod), "tombstone": _record(tomb),
                      "limit": limit})

    def set_deleted(self, deleted: tuple[Tombstone, ...]) -> None:
        if deleted != self.deleted:
            self.deleted = deleted
            self._append({"op": "deleted", "deleted": [_record(t) for t in deleted]})

    def by_container(self, container_id: str) -> LocalPod | None:
        return next((p for p in self.pods.values() if p.container_id == container_id), None)

    def by_ip(self, ip: str) -> LocalPod | None:
        return next((p for p in self.pods.values() if ip in p.ips), None)

"""The agent's table of the node's pods, kept on disk so a restarted agent still knows them.

Why it exists: the kernel holds *what* is captured (pinned maps, rules), but only the CNI ADD
told the agent *which pod* an address and interface belong to and what the registry said at
that moment. The table is written atomically after every change to ``pods.json`` in the run
directory; an unreadable file is moved aside (and reported) rather than stopping the agent,
since reconcile rediscovers pods from the registry and the routing table. The same file keeps
the tombstones of pods seen deleted (``deleted``), so a restarted agent does not adopt them
back from a registry that still lists them (``agent/reconcile.py`` bounds and prunes them).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, replace
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


class PodTable:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.pods: dict[str, LocalPod] = {}
        self.deleted: tuple[Tombstone, ...] = ()

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            pods = {}
            for item in raw["pods"]:
                item["ips"] = tuple(item["ips"])
                pod = LocalPod(**item)
                pods[pod.uid] = pod
            deleted = []
            for item in raw.get("deleted", []):
                item["ips"] = tuple(item["ips"])
                deleted.append(Tombstone(**item))
            self.pods = pods
            self.deleted = tuple(deleted)
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {"pods": [asdict(p) for p in sorted(self.pods.values(),
                                                                   key=lambda p: p.uid)],
                               "deleted": [asdict(t) for t in self.deleted]}
        write_atomic(self.path, json.dumps(doc, indent=1))

    def put(self, pod: LocalPod) -> None:
        # One address belongs to one pod: a new pod with a reused IP replaces the old record.
        self.pods = {k: v for k, v in self.pods.items()
                     if k == pod.uid or not set(v.ips) & set(pod.ips)}
        self.pods[pod.uid] = pod
        self.save()

    def remove(self, uid: str) -> LocalPod | None:
        pod = self.pods.pop(uid, None)
        if pod is not None:
            self.save()
        return pod

    def bury(self, pod: LocalPod, now: float, limit: int, reason: str = "CNI DEL") -> None:
        """Drop ``pod``'s record and remember it as deleted: newest first, at most ``limit``
        (reconcile prunes them further, ``agent.reconcile.prune``)."""
        if self.pods.get(pod.uid) == pod:  # not a newer record of the same pod
            del self.pods[pod.uid]
        self.deleted = (Tombstone.of(pod, now, reason),
                        *(t for t in self.deleted if t.uid != pod.uid))[:limit]
        self.save()

    def set_deleted(self, deleted: tuple[Tombstone, ...]) -> None:
        if deleted != self.deleted:
            self.deleted = deleted
            self.save()

    def by_container(self, container_id: str) -> LocalPod | None:
        return next((p for p in self.pods.values() if p.container_id == container_id), None)

    def by_ip(self, ip: str) -> LocalPod | None:
        return next((p for p in self.pods.values() if ip in p.ips), None)

"""The API-server double's storage: objects, one global resourceVersion, history and watchers.

Why a store of its own: the behaviours a reflector must survive live here, not in HTTP. Like
etcd behind a real API server, every write takes the next global resourceVersion and is kept
in a per-resource history so a watch can resume from any version still retained;
``compact()`` forgets history, after which resuming from an older version is "410 Gone".
Everything is single-threaded asyncio: registering a watcher and computing its replay happen
without an ``await`` in between, so no write can fall in the gap (the property a real server
gets from its watch cache).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Kind:
    """A served resource: where it lives in the URL space and what its lists are called."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS: dict[str, Kind] = {
    k.plural: k
    for k in (
        Kind("", "v1", "namespaces", "Namespace", namespaced=False),
        Kind("", "v1", "pods", "Pod"),
        Kind("", "v1", "services", "Service"),
        Kind("", "v1", "serviceaccounts", "ServiceAccount"),
        Kind("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
        Kind("security.ambit.dev", "v1", "authorizationpolicies", "AuthorizationPolicy"),
        Kind("security.ambit.dev", "v1", "peerauthentications", "PeerAuthentication"),
        Kind("gateway.networking.k8s.io", "v1", "gateways", "Gateway"),
        Kind("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute"),
        Kind("networking.ambit.dev", "v1alpha1", "httpfaults", "HTTPFault"),
    )
}

Key = tuple[str, str]  # (namespace or "", name)


class Gone(Exception):
    """The requested resourceVersion has been compacted away."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")


@dataclass
class Event:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    rv: int
    obj: dict[str, Any]


@dataclass(eq=False)
class Watcher:
    """One open watch stream; the HTTP handler drains ``queue``. ``None`` means disconnect."""

    plural: str
    namespace: str | None
    bookmarks: bool
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)

    def wants(self, obj: dict[str, Any]) -> bool:
        return self.namespace is None or obj["metadata"].get("namespace") == self.namespace


def _key(kind: Kind, obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise ValueError(f"{kind.kind} without metadata.name")
    ns = meta.get("namespace", "") if kind.namespaced else ""
    if kind.namespaced and not ns:
        raise ValueError(f"{kind.kind} {name} without metadata.namespace")
    return (ns, name)


class Store:
    def __init__(self) -> None:
        self.rv = 1
        self.compacted = 0  # events with rv <= compacted are forgotten
        self.objects: dict[str, dict[Key, dict[str, Any]]] = {p: {} for p in KINDS}
        self.history: dict[str, list[Event]] = {p: [] for p in KINDS}
        self.watchers: set[Watcher] = set()
        self.watch_opened = asyncio.Event()  # set whenever a watch opens (tests wait on it)

    # ----- writes -----

    def _write(self, plural: str, type_: str, obj: dict[str, Any]) -> dict[str, Any]:
        kind = KINDS[plural]
        key = _key(kind, obj)
        self.rv += 1
        stored = copy.deepcopy(obj)
        stored["apiVersion"] = kind.api_version
        stored["kind"] = kind.kind
        meta = stored.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.rv)
        old = self.objects[plural].get(key)
        if type_ == "DELETED":
            del self.objects[plural][key]
        else:
            meta.setdefault(
                "uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", old["metadata"]["creationTimestamp"] if old else
                            datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            self.objects[plural][key] = stored
        event = Event(type_, self.rv, stored)
        self.history[plural].append(event)
        for w in self.watchers:
            if w.plural == plural and w.wants(stored):
                w.queue.put_nowait(event)
        return copy.deepcopy(stored)

    def create(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        key = _key(KINDS[plural], obj)
        if key in self.objects[plural]:
            raise KeyError(f"{plural} {key} already exists")
        return self._write(plural, "ADDED", obj)

    def update(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        key = _key(KINDS[plural], obj)
        old = self.objects[plural].get(key)
        if old is None:
            raise KeyError(f"{plural} {key} not found")
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.pop("resourceVersion", None)
        meta["uid"] = old["metadata"]["uid"]
        meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        return self._write(plural, "MODIFIED", obj)

    def apply(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace (whole object, not a merge)."""
        if _key(KINDS[plural], obj) in self.objects[plural]:
            return self.update(plural, obj)
        return self.create(plural, obj)

    def delete(self, plural: str, name: str, namespace: str = "") -> dict[str, Any]:
        old = self.objects[plural].get((namespace, name))
        if old is None:
            raise KeyError(f"{plural} {namespace}/{name} not found")
        return self._write(plural, "DELETED", old)

    # ----- reads -----

    def get(self, plural: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        obj = self.objects[plural].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str | None) -> tuple[list[dict[str, Any]], int]:
        items = [copy.deepcopy(o) for (ns, _), o in sorted(self.objects[plural].items())
                 if namespace is None or ns == namespace]
        return items, self.rv

    # ----- watches -----

    def watch(self, plural: str, namespace: str | None, rv: int | None, bookmarks: bool) \
            -> Watcher:
        """Open a watch from ``rv`` (None: synthetic ADDED of everything now, like rv=0).

        Raises ``Gone`` when events after ``rv`` are no longer all retained.
        """
        w = Watcher(plural, namespace, bookmarks)
        if rv is None:
            for obj in self.list(plural, namespace)[0]:
                w.queue.put_nowait(Event("ADDED", int(obj["metadata"]["resourceVersion"]), obj))
        else:
            if rv < self.compacted:
                raise Gone(rv, self.compacted)
            for e in self.history[plural]:
                if e.rv > rv and w.wants(e.obj):
                    w.queue.put_nowait(e)
        self.watchers.add(w)
        self.watch_opened.set()
        return w

    def unwatch(self, w: Watcher) -> None:
        self.watchers.discard(w)

    def compact(self) -> int:
        """Forget all history up to now: watches resuming from an older version get 410."""
        self.compacted = self.rv
        for plural in self.history:
            self.history[plural] = [e for e in self.history[plural] if e.rv > self.compacted]
        return self.compacted

    def bookmark(self, plural: str | None = None) -> int:
        """Send a BOOKMARK at the current version to every watcher that asked for bookmarks."""
        for w in self.watchers:
            if w.bookmarks and plural in (None, w.plural):
                kind = KINDS[w.plural]
                obj = {"kind": kind.kind, "apiVersion": kind.api_version,
                       "metadata": {"resourceVersion": str(self.rv)}}
                w.queue.put_nowait(Event("BOOKMARK", self.rv, obj))
        return self.rv

    def disconnect(self, plural: str | None = None) -> int:
        """Drop matching watch streams abruptly; returns how many were dropped."""
        dropped = [w for w in self.watchers if plural in (None, w.plural)]
        for w in dropped:
            w.queue.put_nowait(None)
            self.watchers.discard(w)
        return len(dropped)

"""The API-server double's storage: objects, one global resourceVersion, history and watchers.

Why a store of its own: the behaviours a reflector must survive live here, not in HTTP. Like
etcd behind a real API server, every write takes the next global resourceVersion and is kept
in a per-resource history so a watch can resume from any version still retained;
``compact()`` forgets history, after which resuming from an older version is "410 Gone".
Everything is single-threaded asyncio: registering a watcher and computing its replay happen
without an ``await`` in between, so no write can fall in the gap (the property a real server
gets from its watch cache).

Label selectors (``labelSelector``) filter lists and watches as a real server's watch cache
does: a MODIFIED object that starts matching arrives as ADDED, one that stops matching as
DELETED. Objects with a ``spec`` carry ``metadata.generation``, bumped when the spec changes.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import re
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
        Kind("gateway.networking.k8s.io", "v1", "grpcroutes", "GRPCRoute"),
        Kind("gateway.networking.k8s.io", "v1alpha2", "tcproutes", "TCPRoute"),
        Kind("networking.ambit.dev", "v1alpha1", "httpfaults", "HTTPFault"),
        # Written by the waypoint deployer (controller/waypoint/k8s_deployer.py).
        Kind("apps", "v1", "deployments", "Deployment"),
        Kind("", "v1", "configmaps", "ConfigMap"),
        # Written by the controller in Kubernetes mode (leader election, the mesh root) and by
        # `ambit install` (the manifests in deploy/daemonset).
        Kind("", "v1", "secrets", "Secret"),
        Kind("coordination.k8s.io", "v1", "leases", "Lease"),
        Kind("apps", "v1", "daemonsets", "DaemonSet"),
        Kind("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget"),
        Kind("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole",
             namespaced=False),
        Kind("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
             namespaced=False),
        Kind("rbac.authorization.k8s.io", "v1", "roles", "Role"),
        Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
        Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions",
             "CustomResourceDefinition", namespaced=False),
        Kind("gateway.networking.k8s.io", "v1", "gatewayclasses", "GatewayClass",
             namespaced=False),
    )
}

# Kinds whose ``status`` is a subresource: writes to the object keep the stored status, writes
# to ``.../status`` change only the status (as for the real kinds and the Gateway API CRDs).
STATUS_SUBRESOURCE = frozenset({"namespaces", "pods", "services", "deployments", "daemonsets",
                                "gateways", "gatewayclasses", "customresourcedefinitions",
                                "httproutes", "grpcroutes", "tcproutes"})

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
    prev: dict[str, Any] | None = None  # MODIFIED: the object before (for label selectors)


# ----- label selectors (equality- and set-based, as ``labelSelector`` is written) -----

@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op in ("=", "in"):
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # "!=", "notin"


Selector = tuple[Requirement, ...]
_SET_TERM = re.compile(r"^([^\s!=(),]+)\s+(in|notin)\s+\(([^()]*)\)$")
_LABEL_PART = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")


def parse_selector(text: str) -> Selector:
    """``a=b,c!=d,e in (f,g),h,!i``; raises ValueError as the API server answers 400."""
    terms: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    out: list[Requirement] = []
    for raw in terms:
        term = raw.strip()
        if not term:
            if len(terms) == 1:
                return ()
            raise ValueError(f"empty term in label selector {text!r}")
        m = _SET_TERM.match(term)
        if m:
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            req = Requirement(m.group(1), m.group(2), values)
        elif "!=" in term:
            key, value = (p.strip() for p in term.split("!=", 1))
            req = Requirement(key, "!=", frozenset({value}))
        elif "=" in term:
            key, value = (p.strip() for p in term.replace("==", "=", 1).split("=", 1))
            req = Requirement(key, "=", frozenset({value}))
        elif term.startswith("!"):
            req = Requirement(term[1:].strip(), "!exists")
        else:
            req = Requirement(term, "exists")
        if not _LABEL_PART.match(req.key) or any(
                v and not _LABEL_PART.match(v) for v in req.values):
            raise ValueError(f"invalid label selector term {term!r}")
        out.append(req)
    return tuple(out)


def selector_matches(selector: Selector, obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in selector)


@dataclass(eq=False)
class Watcher:
    """One open watch stream; the HTTP handler drains ``queue``. ``None`` means disconnect."""

    plural: str
    namespace: str | None
    bookmarks: bool
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    selector: Selector = ()

    def wants(self, obj: dict[str, Any]) -> bool:
        return ((self.namespace is None or obj["metadata"].get("namespace") == self.namespace)
                and selector_matches(self.selector, obj))

    def view(self, event: Event) -> Event | None:
        """The event as this watcher sees it: filtered, and with a label selector, an object
        that starts (stops) matching arrives as ADDED (DELETED), as from a real server."""
        now = self.wants(event.obj)
        if event.type == "MODIFIED" and self.selector:
            before = event.prev is not None and self.wants(event.prev)
            if now and not before:
                return Event("ADDED", event.rv, event.obj)
            if before and not now:
                return Event("DELETED", event.rv, event.obj)
        return event if now else None


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
            if "spec" in stored:
                before = int((old or {}).get("metadata", {}).get("generation") or 0)
                changed = old is None or old.get("spec") != stored["spec"] or not before
                meta["generation"] = before + 1 if changed else before
            else:
                meta.pop("generation", None)
            self.objects[plural][key] = stored
        event = Event(type_, self.rv, stored, prev=old if type_ == "MODIFIED" else None)
        self.history[plural].append(event)
        for w in self.watchers:
            if w.plural == plural:
                seen = w.view(event)
                if seen is not None:
                    w.queue.put_nowait(seen)
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

    def delete(self, plural: str, name: str, namespace: str = "",
               final: dict[str, Any] | None = None) -> dict[str, Any]:
        """Remove an object; the DELETED event carries ``final`` when given (the object as
        its last update left it, e.g. without its last finalizer), else the stored one."""
        old = self.objects[plural].get((namespace, name))
        if old is None:
            raise KeyError(f"{plural} {namespace}/{name} not found")
        return self._write(plural, "DELETED", old if final is None else final)

    # ----- reads -----

    def get(self, plural: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        obj = self.objects[plural].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str | None, selector: Selector = ()) \
            -> tuple[list[dict[str, Any]], int]:
        items = [copy.deepcopy(o) for (ns, _), o in sorted(self.objects[plural].items())
                 if (namespace is None or ns == namespace) and selector_matches(selector, o)]
        return items, self.rv

    # ----- watches -----

    def watch(self, plural: str, namespace: str | None, rv: int | None, bookmarks: bool,
              selector: Selector = ()) -> Watcher:
        """Open a watch from ``rv`` (None: synthetic ADDED of everything now, like rv=0).

        Raises ``Gone`` when events after ``rv`` are no longer all retained.
        """
        w = Watcher(plural, namespace, bookmarks, selector=selector)
        if rv is None:
            for obj in self.list(plural, namespace, selector)[0]:
                w.queue.put_nowait(Event("ADDED", int(obj["metadata"]["resourceVersion"]), obj))
        else:
            if rv < self.compacted:
                raise Gone(rv, self.compacted)
            for e in self.history[plural]:
                seen = w.view(e) if e.rv > rv else None
                if seen is not None:
                    w.queue.put_nowait(seen)
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

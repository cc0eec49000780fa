"""What the ADS server serves: one versioned snapshot of Envoy resources per cache key.

Why a cache between the generator and the gRPC streams: the waypoint view turns a registry
change into Envoy resources once per waypoint (key ``"<namespace>/<gateway>"``), however many
Envoy replicas of that waypoint are connected. The cache keeps the latest snapshot of each key,
packs every resource into a ``google.protobuf.Any`` once (shared by all streams, and the bytes
streams compare to decide whether a type changed), and wakes the streams of that key.

A snapshot is the whole state of its key (State of the World): a type missing from it means "no
resources of that type". ``remove(key)`` means "forget": connected streams keep what they last
sent (Envoy keeps serving it) and wait for the next ``set``. Call ``set``/``remove`` from the
event loop's thread; watchers run synchronously inside them and must not block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message

log = logging.getLogger("controller.xds")

TYPE_PREFIX = "type.googleapis.com/"
CLUSTER_TYPE = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER_TYPE = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE_TYPE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET_TYPE = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Types whose subscription is "everything" (Envoy sends no names): the response carries every
# resource of the type, and a resource left out is removed by Envoy.
WILDCARD_TYPES = frozenset({CLUSTER_TYPE, LISTENER_TYPE})
# Push order on a change (Envoy's ADS advice, make-before-break): clusters, their endpoints,
# listeners, then the routes that point at them; other types after, by name.
PUSH_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE)
# Field holding each known type's resource name; `set` checks it equals the mapping's key.
NAME_FIELDS: Mapping[str, str] = {
    CLUSTER_TYPE: "name",
    ENDPOINT_TYPE: "cluster_name",
    LISTENER_TYPE: "name",
    ROUTE_TYPE: "name",
    SECRET_TYPE: "name",
}
# Short names, as Istio labels its xDS metrics (`type="cds"`).
SHORT_NAMES: Mapping[str, str] = {
    CLUSTER_TYPE: "cds",
    ENDPOINT_TYPE: "eds",
    LISTENER_TYPE: "lds",
    ROUTE_TYPE: "rds",
    SECRET_TYPE: "sds",
}


def short_type(type_url: str) -> str:
    """``cds``/``eds``/``lds``/``rds``/``sds``, else the message name of the type URL."""
    return SHORT_NAMES.get(type_url) or type_url.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def push_order(type_urls: set[str]) -> list[str]:
    known = [t for t in PUSH_ORDER if t in type_urls]
    return known + sorted(type_urls.difference(PUSH_ORDER))


@dataclass(frozen=True)
class Snapshot:
    """One key's resources at one version. ``resources``: type URL -> name -> message (as
    given to ``set``); ``packed``: the same as ``Any``, serialized deterministically."""

    version: str
    resources: Mapping[str, Mapping[str, Message]]
    packed: Mapping[str, Mapping[str, AnyProto]] = field(repr=False)

    def packed_of(self, type_url: str) -> Mapping[str, AnyProto]:
        return self.packed.get(type_url, {})


def _pack(type_url: str, name: str, message: Message) -> AnyProto:
    if not type_url.startswith(TYPE_PREFIX):
        raise ValueError(f"type URL {type_url!r} does not start with {TYPE_PREFIX!r}")
    full_name = message.DESCRIPTOR.full_name
    if full_name != type_url[len(TYPE_PREFIX):]:
        raise ValueError(f"resource {name!r} under {type_url} is a {full_name}")
    name_field = NAME_FIELDS.get(type_url)
    if name_field is not None and getattr(message, name_field) != name:
        raise ValueError(f"resource {name!r} under {type_url} has {name_field} "
                         f"{getattr(message, name_field)!r}; the key must equal it")
    packed = AnyProto()
    packed.Pack(message, deterministic=True)
    return packed


class XdsCache:
    """Latest snapshot per key, with change watchers (see the module docstring)."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, set[Callable[[], None]]] = {}

    def set(self, key: str, version: str,
            resources: Mapping[str, Mapping[str, Message]]) -> Snapshot:
        """Replace ``key``'s snapshot and wake its watchers. Raises ValueError (and changes
        nothing) when a message is not of its type URL or its name field differs from its key.
        Messages are serialized here: mutating them afterwards changes nothing served."""
        if not version:
            raise ValueError("version must not be empty (Envoy treats it as 'nothing applied')")
        packed = {t: MappingProxyType({n: _pack(t, n, m) for n, m in by_name.items()})
                  for t, by_name in resources.items()}
        frozen = {t: MappingProxyType(dict(by_name)) for t, by_name in resources.items()}
        snapshot = Snapshot(version, MappingProxyType(frozen), MappingProxyType(packed))
        self._snapshots[key] = snapshot
        self._wake(key)
        return snapshot

    def remove(self, key: str) -> None:
        """Forget ``key``: streams keep their last config and wait for a new ``set``."""
        if self._snapshots.pop(key, None) is not None:
            self._wake(key)

    def get(self, key: str) -> Snapshot | None:
        return self._snapshots.get(key)

    def keys(self) -> list[str]:
        return sorted(self._snapshots)

    def watch(self, key: str, on_change: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_change()`` after every ``set``/``remove`` of ``key``; returns the function
        that stops watching."""
        self._watchers.setdefault(key, set()).add(on_change)

        def cancel() -> None:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(on_change)
                if not watchers:
                    del self._watchers[key]

        return cancel

    def _wake(self, key: str) -> None:
        for on_change in list(self._watchers.get(key, ())):
            try:
                on_change()
            except Exception:  # one broken watcher must not starve the others
                log.exception("xDS cache watcher of %s failed", key)

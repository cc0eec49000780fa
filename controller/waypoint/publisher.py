"""Keeps every waypoint's Envoy resources in the xDS cache, one registry change at a time.

Why it exists: the registry changes as a whole (one revision), but each waypoint only needs
its own slice. On every published state this module rebuilds each waypoint's view and Envoy
resources (pure functions in ``view.py`` and ``envoy_config.py``) and stores them under the
waypoint's key with a version that is a hash of their content, so an unrelated change (a pod
elsewhere) pushes nothing to a waypoint. It also decides which proxy may read which key.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from controller.registry.model import RegistrySnapshot
from controller.waypoint.envoy_config import (
    CLUSTER_TYPE,
    LISTENER_TYPE,
    content_version,
    resources,
)
from controller.waypoint.model import WAYPOINT_CLASS
from controller.waypoint.parse import resolve_faults, waypoint_policies
from controller.waypoint.protocol import service_port_protocols
from controller.waypoint.view import build_view
from controller.xds.authz import decide_waypoint
from controller.xds.server import XdsCache, XdsDenied
from mesh.spiffe import SpiffeId
from mesh.state.model import MeshConfig
from mesh.state.store import StateSnapshot

log = logging.getLogger("controller.waypoint")


def node_metadata(node: Any) -> dict[str, str]:
    """An Envoy ``Node``'s string metadata fields (the waypoint agent's bootstrap sets them)."""
    fields = node.metadata.fields
    return {k: v.string_value for k, v in fields.items() if v.WhichOneof("kind") ==
            "string_value"}


class WaypointPublisher:
    def __init__(self, cache: XdsCache, metrics: CollectorRegistry | None = None,
                 insecure: bool = False, *, trust_domain: str) -> None:
        self.cache = cache
        self.insecure = insecure
        self.trust_domain = trust_domain
        self.snapshot: RegistrySnapshot | None = None
        self._versions: dict[str, str] = {}
        self._problems: tuple[str, ...] = ()
        self.waypoints = Gauge("ambit_waypoints", "Waypoints the controller configures",
                               registry=metrics)

    def update(self, snapshot: RegistrySnapshot, config: MeshConfig) -> None:
        """Recompute every waypoint's resources from one registry snapshot and its
        translated mesh state; store what changed, drop waypoints that are gone."""
        self.snapshot = snapshot
        routes = resolve_faults(snapshot.http_routes, snapshot.http_faults)
        policies, policy_problems = waypoint_policies(snapshot.authorization_policies)
        problems = tuple(policy_problems)
        state = StateSnapshot.build(config)
        protocols = service_port_protocols(snapshot.services)
        seen: set[str] = set()
        for gw in snapshot.gateways:
            if gw.gateway_class != WAYPOINT_CLASS:
                continue
            seen.add(gw.key)
            view = build_view(gw, config, routes, policies, state, protocols=protocols,
                              tcp_routes=snapshot.tcp_routes)
            problems += view.problems()
            res = resources(view)
            version = content_version(res)
            if self._versions.get(gw.key) != version:
                self.cache.set(gw.key, version, res)
                self._versions[gw.key] = version
                log.info("waypoint %s: config version %s (%d listeners, %d clusters)",
                         gw.key, version, len(res[LISTENER_TYPE]), len(res[CLUSTER_TYPE]))
        if problems != self._problems:
            # Logged once per change, not on every registry revision.
            for p in problems:
                log.warning("%s", p)
            self._problems = problems
        for key in set(self._versions) - seen:
            self.cache.remove(key)
            del self._versions[key]
            log.info("waypoint %s removed", key)
        self.waypoints.set(len(seen))

    def authorize(self, metadata: Mapping[str, str], identity: SpiffeId | None) -> str:
        """The cache key a proxy may read: its Gateway, when its certificate is exactly that
        Gateway's identity (``controller.xds.authz.decide_waypoint``). Without a certificate
        only an ``--insecure`` controller (loopback development) answers, trusting the
        metadata. Raises ``XdsDenied`` with the decision's reason and label."""
        snap = self.snapshot
        gateways = {(g.namespace, g.name) for g in (snap.gateways if snap else ())
                    if g.gateway_class == WAYPOINT_CLASS}
        decision = decide_waypoint(metadata, identity, gateways, self.trust_domain,
                                   self.insecure)
        if decision.key is None:
            raise XdsDenied(decision.reason, decision.label)
        return decision.key

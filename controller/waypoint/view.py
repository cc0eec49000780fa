"""What one waypoint must know, cut out of the whole mesh state: a pure function.

Why separate from the Envoy generator: deciding *which* services, routes, policies and
endpoints concern a waypoint is mesh logic (bindings, route attachment, policy targets), while
``envoy_config.py`` only spells a view in Envoy's terms. Each is tested on its own, and the
controller recomputes views on every registry change without touching Envoy protos.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.waypoint.model import (
    Gateway,
    HTTPRoute,
    ParentRef,
    TargetRef,
    TCPRoute,
    WaypointPolicy,
)
from controller.waypoint.protocol import PortProtocol, port_key
from mesh.state.model import MeshConfig, Service, Workload
from mesh.state.store import StateSnapshot


@dataclass(frozen=True)
class WaypointView:
    gateway: Gateway
    trust_domain: str
    # Services whose VIP traffic the ztunnels send to this waypoint (sorted by key).
    bound: tuple[Service, ...]
    # Every service a route of a bound service may name as a backend, by "ns/name".
    services: Mapping[str, Service] = field(default_factory=dict)
    # Endpoints (selected workloads) by service key, healthy or not.
    endpoints: Mapping[str, tuple[Workload, ...]] = field(default_factory=dict)
    # HTTP and gRPC routes attached to a bound service (faults resolved), consumer routes
    # (GEP-1294) included, in Gateway API precedence order (oldest first).
    routes: tuple[HTTPRoute, ...] = ()
    # TCPRoutes attached to a bound service's port, oldest first.
    tcp_routes: tuple[TCPRoute, ...] = ()
    # Authorization policies targeting this gateway or one of its bound services.
    policies: tuple[WaypointPolicy, ...] = ()
    # The protocol of each port of ``services`` (``protocol.port_key``); a port not listed
    # is TCP (bytes passed through, never parsed as HTTP).
    protocols: Mapping[str, PortProtocol] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.gateway.key

    def protocol(self, service: Service, port: int) -> PortProtocol:
        return self.protocols.get(port_key(service.namespace, service.name, port),
                                  PortProtocol.TCP)

    def routes_for(self, service: Service, port: int) -> tuple[HTTPRoute, ...]:
        """Routes whose parentRefs name ``service`` (on ``port``, or on every port)."""
        return tuple(r for r in self.routes if any(_names(p, service, port)
                                                   for p in r.parents))

    def problems(self) -> tuple[str, ...]:
        """Routes attached to a bound service port of the wrong protocol, which therefore do
        nothing there (Gateway API would not accept them): one sentence each, with the fix.
        A parentRef without a port attaches to the ports of its kind only, silently."""
        out: list[str] = []
        for svc in self.bound:
            for sp in svc.ports:
                protocol = self.protocol(svc, sp.port)
                attached: list[tuple[str, str, tuple[ParentRef, ...]]] = []
                if not protocol.is_http:
                    attached += [(r.kind, r.key, r.parents) for r in self.routes]
                else:
                    attached += [("TCPRoute", r.key, r.parents) for r in self.tcp_routes]
                for kind, key, parents in attached:
                    if not any(p.port == sp.port and _names(p, svc, sp.port) for p in parents):
                        continue
                    fix = ("attach a TCPRoute, or name the port http-* (grpc-*) or set its "
                           "appProtocol" if kind != "TCPRoute" else "attach an HTTPRoute")
                    out.append(f"{kind} {key} attaches to port {sp.port} of service {svc.key}, "
                               f"which is {protocol.value}, so it does not apply there; {fix}")
        return tuple(out)

    def tcp_routes_for(self, service: Service, port: int) -> tuple[TCPRoute, ...]:
        return tuple(r for r in self.tcp_routes if any(_names(p, service, port)
                                                       for p in r.parents))

    def policies_for(self, service: Service) -> tuple[WaypointPolicy, ...]:
        return tuple(p for p in self.policies
                     if any(_aims_at(t, self.gateway, {service.key}) for t in p.targets))


def _names(parent: ParentRef, service: Service, port: int) -> bool:
    return (parent.kind == "Service" and parent.name == service.name
            and parent.namespace == service.namespace
            and (parent.port is None or parent.port == port))


def _aims_at(target: TargetRef, gateway: Gateway, service_keys: set[str]) -> bool:
    """A policy target naming this gateway, or one of these services ("ns/name")."""
    if target.kind == "Gateway":
        return target.namespace == gateway.namespace and target.name == gateway.name
    return target.kind == "Service" and f"{target.namespace}/{target.name}" in service_keys


def build_view(gateway: Gateway, config: MeshConfig, routes: tuple[HTTPRoute, ...],
               policies: tuple[WaypointPolicy, ...],
               snapshot: StateSnapshot | None = None, *,
               protocols: Mapping[str, PortProtocol],
               tcp_routes: tuple[TCPRoute, ...] = ()) -> WaypointView:
    """The view of ``gateway``: ``config`` is the translated mesh state (services carry their
    waypoint binding), ``routes`` have their faults resolved, ``policies`` are all waypoint
    policies of the registry, ``protocols`` every service port's protocol
    (``protocol.service_port_protocols`` of the registry's Services); ``routes`` holds
    HTTPRoutes and GRPCRoutes alike."""
    snap = snapshot if snapshot is not None else StateSnapshot.build(config)
    bound = tuple(sorted((s for s in config.services
                          if s.waypoint is not None and s.waypoint.key == gateway.key),
                         key=lambda s: s.key))
    services = {s.key: s for s in config.services}
    bound_keys = {s.key for s in bound}
    attached = tuple(sorted(
        (r for r in routes if any(p.kind == "Service" and f"{p.namespace}/{p.name}" in bound_keys
                                  for p in r.parents)),
        key=lambda r: (r.creation_index, r.namespace, r.name)))
    attached_tcp = tuple(sorted(
        (r for r in tcp_routes if any(f"{p.namespace}/{p.name}" in bound_keys
                                      for p in r.parents)),
        key=lambda r: (r.creation_index, r.namespace, r.name)))
    wanted = set(bound_keys)
    for r in attached:
        for rule in r.rules:
            wanted.update(f"{b.namespace}/{b.name}" for b in rule.backends)
    for t in attached_tcp:
        wanted.update(f"{b.namespace}/{b.name}" for b in t.backends)
    endpoints = {k: snap.service_endpoints(services[k]) for k in sorted(wanted) if k in services}
    mine = tuple(p for p in sorted(policies, key=lambda p: p.key)
                 if any(_aims_at(t, gateway, bound_keys) for t in p.targets))
    return WaypointView(gateway=gateway, trust_domain=config.trust_domain, bound=bound,
                        services={k: services[k] for k in sorted(wanted) if k in services},
                        endpoints=endpoints, routes=attached, tcp_routes=attached_tcp,
                        policies=mine,
                        protocols={k: v for k, v in protocols.items()
                                   if k.rpartition(":")[0] in wanted})

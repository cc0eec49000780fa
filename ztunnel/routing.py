"""Routing decisions, as pure functions of (source, destination, state).

Every connection the ztunnel sees is first turned into a plan here, with no I/O, so each case
(service VIP, service bound to a waypoint, local pod, remote pod, non-mesh destination, no
endpoints) is a row in a table test. The listeners only carry plans out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from mesh.ports import HBONE_PORT
from mesh.spiffe import SpiffeId
from mesh.state.model import IPAddress, Service, WaypointRef, Workload
from mesh.state.store import StateSnapshot


class PlanKind(Enum):
    """The plan kinds by name, as the access log reports them (``plan``)."""

    LOCAL = "local"
    HBONE = "hbone"
    PASSTHROUGH = "passthrough"
    WAYPOINT = "waypoint"
    DENY = "deny"


# One type per kind, each with the fields that kind always has, so a listener that matches on
# the type needs no checks for missing ones.


@dataclass(frozen=True)
class LocalPlan:
    """Destination pod on this node: enforce its policy here, connect directly."""

    kind: ClassVar[PlanKind] = PlanKind.LOCAL
    source: Workload
    destination: Workload
    # The pod's address after service resolution: where to connect, and the port its policy
    # is checked against.
    address: tuple[IPAddress, int]
    expected_identity: SpiffeId
    service: Service | None = None


@dataclass(frozen=True)
class HbonePlan:
    """Destination pod on another node: HBONE to its ztunnel."""

    kind: ClassVar[PlanKind] = PlanKind.HBONE
    source: Workload
    destination: Workload
    address: tuple[IPAddress, int]  # the HBONE endpoint: the pod's IP, the HBONE port
    target: tuple[IPAddress, int]  # the pod's address after service resolution (:authority)
    expected_identity: SpiffeId
    service: Service | None = None


@dataclass(frozen=True)
class WaypointPlan:
    """Service VIP bound to a waypoint: HBONE to a waypoint instance, which picks the endpoint
    and applies L7 policy."""

    kind: ClassVar[PlanKind] = PlanKind.WAYPOINT
    source: Workload
    destination: Workload  # the waypoint instance connected to (its identity is checked)
    address: tuple[IPAddress, int]  # the instance's HBONE endpoint
    # The service VIP:port the client dialled (:authority): resolution is the waypoint's job.
    target: tuple[IPAddress, int]
    expected_identity: SpiffeId
    service: Service
    waypoint: WaypointRef


@dataclass(frozen=True)
class PassthroughPlan:
    """Not a mesh destination: plain TCP, as if not captured."""

    kind: ClassVar[PlanKind] = PlanKind.PASSTHROUGH
    source: Workload
    address: tuple[IPAddress, int]
    reason: str
    destination: Workload | None = None  # a known workload that is not enrolled
    service: Service | None = None


@dataclass(frozen=True)
class DenyPlan:
    """No route: the connection is refused, for ``reason``."""

    kind: ClassVar[PlanKind] = PlanKind.DENY
    reason: str
    source: Workload | None = None  # None: the source is not a workload at all
    service: Service | None = None
    waypoint: WaypointRef | None = None  # the waypoint the service is bound to, if that is why


OutboundPlan = LocalPlan | HbonePlan | WaypointPlan | PassthroughPlan | DenyPlan


def plan_outbound(
    state: StateSnapshot,
    node: str,
    source_ip: IPAddress,
    dest: tuple[IPAddress, int],
    pick: Callable[[int], int] = lambda n: 0,
    hbone_port: int = HBONE_PORT,
    # Waypoints (Envoy) take HBONE on the well-known port whatever our own inbound port is.
    waypoint_port: int = HBONE_PORT,
) -> OutboundPlan:
    """Decide how to carry a connection from ``source_ip`` to ``dest``.

    ``pick(n)`` chooses an index in ``range(n)`` for load balancing (among endpoints, or among
    waypoint instances); the caller passes randomness or a round robin, tests pass something
    fixed.
    """
    source = state.workload_by_ip(source_ip)
    if source is None:
        return DenyPlan(f"unknown source {source_ip}: not a workload in the mesh state")
    if source.node != node:
        return DenyPlan(f"source {source.uid} runs on node {source.node}, not on {node}", source)
    if not state.in_mesh(source):
        return DenyPlan(f"source {source.uid} is not enrolled in the mesh (protocol TCP)", source)

    ip, port = dest
    service = state.service_by_vip(ip)
    if service is not None:
        target_port = service.target_port(port)
        if target_port is None:
            return DenyPlan(f"service {service.key} has no port {port}", source, service)
        waypoint = service.waypoint
        # A waypoint's own connections to the service it serves go to an endpoint, or they
        # would come straight back to the waypoint.
        if waypoint is not None and not state.is_waypoint_instance(source, waypoint):
            return _to_waypoint(state, source, service, waypoint, dest, pick, waypoint_port)
        endpoints = [w for w in state.service_endpoints(service) if w.healthy]
        if not endpoints:
            return DenyPlan(f"service {service.key} has no healthy endpoints", source, service)
        chosen = endpoints[pick(len(endpoints)) % len(endpoints)]
        return _to_workload(state, node, source, chosen, (chosen.addresses[0], target_port),
                            service, hbone_port)

    workload = state.workload_by_ip(ip)
    if workload is None:
        return PassthroughPlan(source, dest, "destination is not in the mesh")
    return _to_workload(state, node, source, workload, dest, None, hbone_port)


def _to_waypoint(
    state: StateSnapshot,
    source: Workload,
    service: Service,
    waypoint: WaypointRef,
    vip: tuple[IPAddress, int],
    pick: Callable[[int], int],
    waypoint_port: int,
) -> WaypointPlan | DenyPlan:
    # Waypoint pods are not captured (protocol TCP in the state) yet speak HBONE themselves,
    # so they are reached like a remote ztunnel whatever node they run on.
    instances = state.waypoint_instances(waypoint)
    if not instances:
        # Fail closed: going around the waypoint would skip its L7 policy.
        return DenyPlan(f"service {service.key} is bound to waypoint {waypoint.key}, which has "
                        "no ready instance", source, service, waypoint)
    chosen = instances[pick(len(instances)) % len(instances)]
    return WaypointPlan(source=source, destination=chosen,
                        address=(chosen.addresses[0], waypoint_port), target=vip,
                        expected_identity=chosen.identity, service=service, waypoint=waypoint)


def _to_workload(
    state: StateSnapshot,
    node: str,
    source: Workload,
    dest: Workload,
    target: tuple[IPAddress, int],
    service: Service | None,
    hbone_port: int,
) -> LocalPlan | HbonePlan | PassthroughPlan:
    if not state.in_mesh(dest):
        return PassthroughPlan(source, target,
                               "destination workload is not enrolled (protocol TCP)",
                               destination=dest, service=service)
    if dest.node == node:
        return LocalPlan(source=source, destination=dest, address=target,
                         expected_identity=dest.identity, service=service)
    return HbonePlan(source=source, destination=dest, address=(target[0], hbone_port),
                     target=target, expected_identity=dest.identity, service=service)


@dataclass(frozen=True)
class InboundTarget:
    """Resolution of an inbound (HBONE or plaintext) connection's destination."""

    destination: Workload | None
    address: tuple[IPAddress, int] | None
    reason: str = ""


def resolve_inbound(
    state: StateSnapshot, node: str, dest: tuple[IPAddress, int], reserved_ports: frozenset[int]
) -> InboundTarget:
    """Check that an inbound connection is for an enrolled pod on this node."""
    ip, port = dest
    workload = state.workload_by_ip(ip)
    if workload is None:
        return InboundTarget(None, None, f"unknown destination {ip}: no workload has this IP")
    if workload.node != node:
        return InboundTarget(workload, None,
                             f"destination {workload.uid} runs on node {workload.node}, not {node}")
    if not state.in_mesh(workload):
        return InboundTarget(workload, None, f"destination {workload.uid} is not enrolled")
    if port in reserved_ports:
        # Forwarding to our own listener port would loop the connection back into us.
        return InboundTarget(workload, None, f"destination port {port} is a ztunnel port")
    return InboundTarget(workload, (ip, port))

"""Routing decisions, as pure functions of (source, destination, state).

Every connection the ztunnel sees is first turned into a plan here, with no I/O, so each case
(service VIP, service bound to a waypoint, local pod, remote pod, non-mesh destination, no
endpoints) is a row in a table test. The listeners only carry plans out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from mesh.ports import HBONE_PORT
from mesh.spiffe import SpiffeId
from mesh.state.model import IPAddress, Service, WaypointRef, Workload
from mesh.state.store import StateSnapshot


class PlanKind(Enum):
    LOCAL = "local"  # destination pod on this node: enforce its policy here, connect directly
    HBONE = "hbone"  # destination pod on another node: HBONE to its ztunnel
    PASSTHROUGH = "passthrough"  # not a mesh destination: plain TCP, as if not captured
    # Service VIP bound to a waypoint: HBONE to a waypoint instance, :authority = the VIP:port
    # the client dialled (the waypoint picks the endpoint and applies L7 policy).
    WAYPOINT = "waypoint"
    DENY = "deny"


@dataclass(frozen=True)
class OutboundPlan:
    kind: PlanKind
    # Where to connect: the final address for LOCAL/PASSTHROUGH, the HBONE endpoint for
    # HBONE/WAYPOINT.
    address: tuple[IPAddress, int] | None = None
    # The destination after service resolution (HBONE :authority); for WAYPOINT the service
    # VIP:port itself, since resolution is the waypoint's job.
    target: tuple[IPAddress, int] | None = None
    source: Workload | None = None
    # The workload connected to: the endpoint pod, or for WAYPOINT the waypoint instance.
    destination: Workload | None = None
    service: Service | None = None
    expected_identity: SpiffeId | None = None
    reason: str = ""
    # The waypoint the service is bound to (WAYPOINT, or DENY for want of an instance).
    waypoint: WaypointRef | None = None


def _deny(reason: str, source: Workload | None = None,
          service: Service | None = None, waypoint: WaypointRef | None = None) -> OutboundPlan:
    return OutboundPlan(PlanKind.DENY, source=source, service=service, reason=reason,
                        waypoint=waypoint)


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
        return _deny(f"unknown source {source_ip}: not a workload in the mesh state")
    if source.node != node:
        return _deny(f"source {source.uid} runs on node {source.node}, not on {node}", source)
    if not state.in_mesh(source):
        return _deny(f"source {source.uid} is not enrolled in the mesh (protocol TCP)", source)

    ip, port = dest
    service = state.service_by_vip(ip)
    if service is not None:
        target_port = service.target_port(port)
        if target_port is None:
            return _deny(f"service {service.key} has no port {port}", source, service)
        waypoint = service.waypoint
        # A waypoint's own connections to the service it serves go to an endpoint, or they
        # would come straight back to the waypoint.
        if waypoint is not None and not state.is_waypoint_instance(source, waypoint):
            return _to_waypoint(state, source, service, waypoint, dest, pick, waypoint_port)
        endpoints = [w for w in state.service_endpoints(service) if w.healthy]
        if not endpoints:
            return _deny(f"service {service.key} has no healthy endpoints", source, service)
        chosen = endpoints[pick(len(endpoints)) % len(endpoints)]
        return _to_workload(state, node, source, chosen, (chosen.addresses[0], target_port),
                            service, hbone_port)

    workload = state.workload_by_ip(ip)
    if workload is None:
        return OutboundPlan(PlanKind.PASSTHROUGH, address=dest, target=dest, source=source,
                            reason="destination is not in the mesh")
    return _to_workload(state, node, source, workload, dest, None, hbone_port)


def _to_waypoint(
    state: StateSnapshot,
    source: Workload,
    service: Service,
    waypoint: WaypointRef,
    vip: tuple[IPAddress, int],
    pick: Callable[[int], int],
    waypoint_port: int,
) -> OutboundPlan:
    # Waypoint pods are not captured (protocol TCP in the state) yet speak HBONE themselves,
    # so they are reached like a remote ztunnel whatever node they run on.
    instances = state.waypoint_instances(waypoint)
    if not instances:
        # Fail closed: going around the waypoint would skip its L7 policy.
        return _deny(f"service {service.key} is bound to waypoint {waypoint.key}, which has no "
                     "ready instance", source, service, waypoint)
    chosen = instances[pick(len(instances)) % len(instances)]
    return OutboundPlan(PlanKind.WAYPOINT, address=(chosen.addresses[0], waypoint_port),
                        target=vip, source=source, destination=chosen, service=service,
                        expected_identity=chosen.identity, waypoint=waypoint)


def _to_workload(
    state: StateSnapshot,
    node: str,
    source: Workload,
    dest: Workload,
    target: tuple[IPAddress, int],
    service: Service | None,
    hbone_port: int,
) -> OutboundPlan:
    if not state.in_mesh(dest):
        return OutboundPlan(PlanKind.PASSTHROUGH, address=target, target=target, source=source,
                            destination=dest, service=service,
                            reason="destination workload is not enrolled (protocol TCP)")
    kind = PlanKind.LOCAL if dest.node == node else PlanKind.HBONE
    address = target if kind is PlanKind.LOCAL else (target[0], hbone_port)
    return OutboundPlan(kind, address=address, target=target, source=source, destination=dest,
                        service=service, expected_identity=dest.identity)


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

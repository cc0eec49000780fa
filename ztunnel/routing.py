"""Routing decisions, as pure functions of (source, destination, state).

Every connection the ztunnel sees is first turned into a plan here, with no I/O, so each case
(service VIP, service bound to a waypoint, local pod, remote pod, non-mesh destination, no
endpoints, the node itself) is a row in a table test. The listeners only carry plans out.

An address several workloads claim (a reused IP before the state settles; ``mesh.state.store``)
has no owner: as a source it is unknown (refused), as a destination it is refused rather than
carried to either workload or passed through in plaintext, each with a reason naming them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from mesh.ports import HBONE_PORT, NODE_OWN_PORTS
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
    # The destination is the node itself (loopback, or one of its own ports): refused as a
    # policy denial (SOCKS5 0x02, flag DENY), not as a missing route.
    protected: bool = False


OutboundPlan = LocalPlan | HbonePlan | WaypointPlan | PassthroughPlan | DenyPlan


@dataclass(frozen=True)
class OwnEndpoints:
    """The node itself, which traffic carried for a pod must never reach.

    ``addresses`` are the node's own interface addresses: the ztunnel shares the node's network
    namespace and learns them there (``ztunnel/node_addresses.py``), so this module stays pure.
    ``ports`` are the ports the mesh's processes listen on there (``NODE_OWN_PORTS`` plus the
    ztunnel's configured ones). ``loopback_pods``: pods live on loopback addresses (only the
    component tests' one-machine topology); a loopback address that is a pod in the state is then
    judged like any pod address, while every other loopback address stays refused.
    """

    addresses: frozenset[IPAddress] = frozenset()
    ports: frozenset[int] = NODE_OWN_PORTS
    loopback_pods: bool = False


# The pseudo-policy a refusal of the node itself is reported under (access log ``policy``,
# ambit_ztunnel_policy_denied_total{policy}).
NODE_PROTECTION = "node-protection"

# "This network": the kernel delivers a connect() to 0.0.0.0 (and refuses or loops the rest of
# 0/8), never to a pod.
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def _unmapped(ip: IPAddress) -> IPAddress:
    # ::ffff:127.0.0.1 dialled over AF_INET6 is 127.0.0.1: judge the IPv4 address it carries.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def node_protection(own: OwnEndpoints, address: tuple[IPAddress, int], is_pod: bool) \
        -> str | None:
    """Why dialling ``address`` for a pod would reach the node itself, in words; None if it
    would not. ``is_pod``: the address is a workload's in the mesh state."""
    ip, port = _unmapped(address[0]), address[1]
    where = f"{ip}:{port}"
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK):
        return f"{where} is an unspecified address, which the kernel delivers to the node " \
               "itself: never dialled for a pod"
    if ip.is_loopback and not (own.loopback_pods and is_pod):
        if port in own.ports:
            return f"{where} is a loopback address and {port} one of the mesh's own ports on " \
                   "the node: never reachable through the ztunnel"
        return f"{where} is a loopback address, i.e. the node itself: never dialled for a pod"
    if ip in own.addresses and port in own.ports:
        return f"{where} is this node's own address and {port} one of the mesh's own ports " \
               "(admin, metrics, capture, HBONE, node agent, controller): never reachable " \
               "through the ztunnel"
    return None


def _guard(plan: OutboundPlan, own: OwnEndpoints) -> OutboundPlan:
    """Refuse a plan whose connect address is the node itself; checked on the address actually
    dialled, after service resolution, so a VIP whose endpoint is a node address is caught too."""
    if isinstance(plan, DenyPlan):
        return plan
    why = node_protection(own, plan.address, plan.destination is not None)
    if why is None:
        return plan
    return DenyPlan(why, plan.source, plan.service, protected=True)


def plan_outbound(
    state: StateSnapshot,
    node: str,
    source_ip: IPAddress,
    dest: tuple[IPAddress, int],
    pick: Callable[[int], int] = lambda n: 0,
    hbone_port: int = HBONE_PORT,
    # Waypoints (Envoy) take HBONE on the well-known port whatever our own inbound port is.
    waypoint_port: int = HBONE_PORT,
    own: OwnEndpoints = OwnEndpoints(),
) -> OutboundPlan:
    """Decide how to carry a connection from ``source_ip`` to ``dest``.

    ``pick(n)`` chooses an index in ``range(n)`` for load balancing (among endpoints, or among
    waypoint instances); the caller passes randomness or a round robin, tests pass something
    fixed. ``own``: the node itself, never dialled (loopback; own ports on its addresses).
    """
    return _guard(_plan(state, node, source_ip, dest, pick, hbone_port, waypoint_port), own)


def _plan(
    state: StateSnapshot,
    node: str,
    source_ip: IPAddress,
    dest: tuple[IPAddress, int],
    pick: Callable[[int], int],
    hbone_port: int,
    waypoint_port: int,
) -> OutboundPlan:
    source = state.workload_by_ip(source_ip)
    if source is None:
        claimants = state.claimants(source_ip)
        if claimants:
            return DenyPlan(f"unknown source {source_ip}: {_claimed(claimants)}")
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
        claimants = state.claimants(ip)
        if claimants:
            return DenyPlan(f"destination {ip}: {_claimed(claimants)}", source)
        return PassthroughPlan(source, dest, "destination is not in the mesh")
    return _to_workload(state, node, source, workload, dest, None, hbone_port)


def _claimed(uids: tuple[str, ...]) -> str:
    return (f"the address is claimed by {len(uids)} workloads ({', '.join(uids)}), e.g. a "
            "deleted pod and the pod that reuses its IP; no identity is given to it until the "
            "state settles")


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
    # The destination is the node itself: a peer must not use us to reach the node's admin or
    # loopback services; refused as a denial (403), not as an unknown destination.
    protected: bool = False


def resolve_inbound(
    state: StateSnapshot, node: str, dest: tuple[IPAddress, int], reserved_ports: frozenset[int],
    own: OwnEndpoints = OwnEndpoints(),
) -> InboundTarget:
    """Check that an inbound connection is for an enrolled pod on this node."""
    ip, port = dest
    workload = state.workload_by_ip(ip)
    # First, so the reason names the node whatever else is wrong with the destination.
    why = node_protection(own, dest, workload is not None)
    if why is not None:
        return InboundTarget(workload, None, why, protected=True)
    if workload is None:
        claimants = state.claimants(ip)
        if claimants:
            return InboundTarget(None, None, f"unknown destination {ip}: "
                                 f"{_claimed(claimants)}")
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

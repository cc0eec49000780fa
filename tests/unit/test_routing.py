"""Routing decisions as a table: (source IP, destination) -> plan."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from typing import Any

import pytest

from mesh.ports import GATEWAY_NAME_LABEL
from mesh.spiffe import SpiffeId
from mesh.state.model import IPAddress, WaypointRef, Workload
from mesh.state.parse import parse_state
from mesh.state.store import StateSnapshot
from ztunnel.routing import (
    DenyPlan,
    HbonePlan,
    LocalPlan,
    OutboundPlan,
    OwnEndpoints,
    PassthroughPlan,
    PlanKind,
    WaypointPlan,
    plan_outbound,
    resolve_inbound,
)

DOC: dict[str, Any] = {
    "workloads": [
        {"name": "client", "namespace": "default", "serviceAccount": "client", "node": "a",
         "addresses": ["10.0.1.1"], "labels": {"app": "client"}},
        {"name": "local-srv", "namespace": "default", "serviceAccount": "srv", "node": "a",
         "addresses": ["10.0.1.2"], "labels": {"app": "srv"}},
        {"name": "remote-srv", "namespace": "default", "serviceAccount": "srv", "node": "b",
         "addresses": ["10.0.2.2"], "labels": {"app": "srv"}},
        {"name": "legacy", "namespace": "default", "node": "b", "addresses": ["10.0.2.3"],
         "protocol": "TCP", "labels": {"app": "legacy"}},
        {"name": "elsewhere", "namespace": "default", "node": "b", "addresses": ["10.0.2.4"]},
        {"name": "unenrolled-client", "namespace": "default", "node": "a",
         "addresses": ["10.0.1.9"], "protocol": "TCP"},
        {"name": "sick", "namespace": "default", "node": "b", "addresses": ["10.0.2.9"],
         "labels": {"app": "sick"}, "status": "Unhealthy"},
    ],
    "services": [
        {"name": "srv", "namespace": "default", "vips": ["10.96.0.1"],
         "selector": {"app": "srv"}, "ports": [{"port": 80, "targetPort": 8080}]},
        {"name": "legacy", "namespace": "default", "vips": ["10.96.0.2"],
         "selector": {"app": "legacy"}, "ports": [{"port": 80}]},
        {"name": "empty", "namespace": "default", "vips": ["10.96.0.3"],
         "selector": {"app": "nothing"}, "ports": [{"port": 80}]},
        {"name": "sick", "namespace": "default", "vips": ["10.96.0.4"],
         "selector": {"app": "sick"}, "ports": [{"port": 80}]},
    ],
}
STATE = parse_state(DOC)
SNAP = StateSnapshot.build(STATE)
ip = ipaddress.ip_address


# Each plan kind is its own type with only the fields it has; the tables below read a field a
# kind does not have as None (or "" for a reason), as the expectations are written for all
# kinds at once.
def address_of(plan: OutboundPlan) -> tuple[IPAddress, int] | None:
    return None if isinstance(plan, DenyPlan) else plan.address


def identity_of(plan: OutboundPlan) -> SpiffeId | None:
    return plan.expected_identity if isinstance(plan, LocalPlan | HbonePlan | WaypointPlan) \
        else None


def destination_of(plan: OutboundPlan) -> Workload | None:
    return None if isinstance(plan, DenyPlan) else plan.destination


def waypoint_of(plan: OutboundPlan) -> WaypointRef | None:
    return plan.waypoint if isinstance(plan, WaypointPlan | DenyPlan) else None


def reason_of(plan: OutboundPlan) -> str:
    return plan.reason if isinstance(plan, PassthroughPlan | DenyPlan) else ""


# source, destination, pick index -> kind, connect address, expected identity (sa)
CASES = [
    ("10.0.1.1", ("10.0.2.2", 8080), 0, PlanKind.HBONE, ("10.0.2.2", 15008), "srv"),
    ("10.0.1.1", ("10.0.1.2", 8080), 0, PlanKind.LOCAL, ("10.0.1.2", 8080), "srv"),
    ("10.0.1.1", ("10.96.0.1", 80), 0, PlanKind.LOCAL, ("10.0.1.2", 8080), "srv"),
    ("10.0.1.1", ("10.96.0.1", 80), 1, PlanKind.HBONE, ("10.0.2.2", 15008), "srv"),
    ("10.0.1.1", ("10.96.0.2", 80), 0, PlanKind.PASSTHROUGH, ("10.0.2.3", 80), None),
    ("10.0.1.1", ("10.0.2.3", 5432), 0, PlanKind.PASSTHROUGH, ("10.0.2.3", 5432), None),
    ("10.0.1.1", ("1.1.1.1", 443), 0, PlanKind.PASSTHROUGH, ("1.1.1.1", 443), None),
    ("10.0.1.1", ("10.96.0.1", 81), 0, PlanKind.DENY, None, None),  # no such service port
    ("10.0.1.1", ("10.96.0.3", 80), 0, PlanKind.DENY, None, None),  # no endpoints
    ("10.0.1.1", ("10.96.0.4", 80), 0, PlanKind.DENY, None, None),  # only unhealthy ones
    ("10.0.1.1", ("10.0.2.9", 80), 0, PlanKind.HBONE, ("10.0.2.9", 15008), "default"),
    ("10.0.9.9", ("10.0.2.2", 8080), 0, PlanKind.DENY, None, None),  # unknown source
    ("10.0.2.4", ("10.0.2.2", 8080), 0, PlanKind.DENY, None, None),  # source on other node
    ("10.0.1.9", ("10.0.2.2", 8080), 0, PlanKind.DENY, None, None),  # source not enrolled
    # The node itself is never dialled for a pod: loopback and unspecified addresses, whatever
    # the port (0.0.0.0 and :: are the node to the kernel; ::ffff:127.0.0.1 is 127.0.0.1) ...
    ("10.0.1.1", ("127.0.0.1", 15000), 0, PlanKind.DENY, None, None),
    ("10.0.1.1", ("127.0.0.1", 8080), 0, PlanKind.DENY, None, None),
    ("10.0.1.1", ("127.3.2.1", 10248), 0, PlanKind.DENY, None, None),  # all of 127/8
    ("10.0.1.1", ("::1", 15000), 0, PlanKind.DENY, None, None),
    ("10.0.1.1", ("::ffff:127.0.0.1", 15020), 0, PlanKind.DENY, None, None),
    ("10.0.1.1", ("0.0.0.0", 15000), 0, PlanKind.DENY, None, None),
    ("10.0.1.1", ("0.0.0.0", 80), 0, PlanKind.DENY, None, None),
    ("10.0.1.1", ("::", 15021), 0, PlanKind.DENY, None, None),
    # ... nor the mesh's own ports on one of the node's addresses ...
    ("10.0.1.1", ("192.0.2.10", 15000), 0, PlanKind.DENY, None, None),  # ztunnel admin
    ("10.0.1.1", ("192.0.2.10", 15008), 0, PlanKind.DENY, None, None),  # HBONE into itself
    ("10.0.1.1", ("192.0.2.10", 15022), 0, PlanKind.DENY, None, None),  # agent
    ("10.0.1.1", ("192.0.2.10", 15012), 0, PlanKind.DENY, None, None),  # controller
    ("10.0.1.1", ("fd00::10", 15020), 0, PlanKind.DENY, None, None),
    ("10.0.1.1", ("::ffff:192.0.2.10", 15021), 0, PlanKind.DENY, None, None),
    ("10.0.1.1", ("192.0.2.10", 16000), 0, PlanKind.DENY, None, None),  # configured port
    # ... while its other ports pass through, as for any address outside the mesh (ssh here),
    ("10.0.1.1", ("192.0.2.10", 22), 0, PlanKind.PASSTHROUGH, ("192.0.2.10", 22), None),
    # another node's address on the same port is not this node,
    ("10.0.1.1", ("192.0.2.11", 15000), 0, PlanKind.PASSTHROUGH, ("192.0.2.11", 15000), None),
    # and a pod's own service on 15000 is the pod's: only the node's addresses are protected.
    ("10.0.1.1", ("10.0.1.2", 15000), 0, PlanKind.LOCAL, ("10.0.1.2", 15000), "srv"),
    ("10.0.1.1", ("10.0.2.2", 15000), 0, PlanKind.HBONE, ("10.0.2.2", 15008), "srv"),
    ("10.0.1.1", ("10.0.2.3", 15000), 0, PlanKind.PASSTHROUGH, ("10.0.2.3", 15000), None),
]

# Node "a": its interface addresses (as the ztunnel learns them) and the mesh's own ports plus
# one the ztunnel was configured with.
NODE_A = OwnEndpoints(
    addresses=frozenset(ip(a) for a in ("127.0.0.1", "::1", "192.0.2.10", "fd00::10")),
    ports=OwnEndpoints().ports | {16000})


@pytest.mark.parametrize(("src", "dst", "pick", "kind", "address", "sa"), CASES)
def test_plan_outbound(src: str, dst: tuple[str, int], pick: int, kind: PlanKind,
                       address: tuple[str, int] | None, sa: str | None) -> None:
    plan = plan_outbound(SNAP, "a", ip(src), (ip(dst[0]), dst[1]), lambda n: pick, own=NODE_A)
    assert plan.kind is kind, reason_of(plan)
    if address is None:
        assert address_of(plan) is None and reason_of(plan)
    else:
        assert address_of(plan) == (ip(address[0]), address[1])
    if sa is None:
        assert identity_of(plan) is None
    else:
        assert identity_of(plan) is not None
        assert str(identity_of(plan)) == f"spiffe://cluster.local/ns/default/sa/{sa}"


def test_the_node_itself_is_a_denial_with_the_reason_in_words() -> None:
    def plan(dst: str, port: int) -> OutboundPlan:
        return plan_outbound(SNAP, "a", ip("10.0.1.1"), (ip(dst), port), own=NODE_A)

    cases = {("127.0.0.1", 15000): "127.0.0.1:15000 is a loopback address and 15000 one of",
             ("127.0.0.1", 8080): "127.0.0.1:8080 is a loopback address, i.e. the node itself",
             ("::", 80): ":::80 is an unspecified address",
             ("192.0.2.10", 15008): "192.0.2.10:15008 is this node's own address and 15008"}
    for (dst, port), words in cases.items():
        p = plan(dst, port)
        # A denial (SOCKS5 0x02, DENY), not a missing route; the source is still reported.
        assert isinstance(p, DenyPlan) and p.protected, p
        assert p.reason.startswith(words), p.reason
        assert p.source is not None and p.source.name == "client"
    # Other refusals are missing routes, as before.
    p = plan_outbound(SNAP, "a", ip("10.0.1.1"), (ip("10.96.0.3"), 80), own=NODE_A)
    assert isinstance(p, DenyPlan) and not p.protected
    # Without the node's addresses (the default), loopback is still refused.
    p = plan_outbound(SNAP, "a", ip("10.0.1.1"), (ip("127.0.0.1"), 15000))
    assert isinstance(p, DenyPlan) and p.protected


# Workloads on loopback addresses: what a registry entry could claim, and what the component
# tests' one-machine topology really has.
LOOP_DOC = copy.deepcopy(DOC)
LOOP_DOC["workloads"] += [
    {"name": "loop-pod", "namespace": "default", "serviceAccount": "srv", "node": "a",
     "addresses": ["127.0.5.2"], "labels": {"app": "loop"}},
    {"name": "loop-remote", "namespace": "default", "serviceAccount": "srv", "node": "b",
     "addresses": ["127.0.6.2"], "labels": {"app": "loop-remote"}},
    {"name": "at-node-lo", "namespace": "default", "serviceAccount": "srv", "node": "a",
     "addresses": ["127.0.0.1"], "labels": {"app": "node-lo"}},
    {"name": "at-node-ip", "namespace": "default", "node": "a", "protocol": "TCP",
     "addresses": ["192.0.2.10"], "labels": {"app": "node-ip"}},
]
LOOP_DOC["services"] += [
    {"name": "loop", "namespace": "default", "vips": ["10.96.0.20"],
     "selector": {"app": "loop"}, "ports": [{"port": 80, "targetPort": 8080}]},
    {"name": "node-ip", "namespace": "default", "vips": ["10.96.0.21"],
     "selector": {"app": "node-ip"}, "ports": [{"port": 80, "targetPort": 15000}]},
]
LOOP_SNAP = StateSnapshot.build(parse_state(LOOP_DOC))


@pytest.mark.parametrize(("dst", "loopback_pods", "kind", "address"), [
    # A loopback pod is the node itself in a cluster, directly or behind a VIP ...
    (("127.0.5.2", 8080), False, PlanKind.DENY, None),
    (("10.96.0.20", 80), False, PlanKind.DENY, None),
    (("127.0.6.2", 8080), False, PlanKind.DENY, None),  # HBONE to 127.0.6.2:15008
    # ... unless pods live on loopback (component tests): then judged like a pod address,
    (("127.0.5.2", 8080), True, PlanKind.LOCAL, ("127.0.5.2", 8080)),
    (("10.96.0.20", 80), True, PlanKind.LOCAL, ("127.0.5.2", 8080)),
    (("127.0.6.2", 8080), True, PlanKind.HBONE, ("127.0.6.2", 15008)),
    (("127.0.5.2", 15000), True, PlanKind.LOCAL, ("127.0.5.2", 15000)),
    # with the node's own addresses still protected on the own ports,
    (("127.0.0.1", 15000), True, PlanKind.DENY, None),
    (("127.0.0.1", 8080), True, PlanKind.LOCAL, ("127.0.0.1", 8080)),
    # and other loopback addresses still refused.
    (("127.0.9.9", 8080), True, PlanKind.DENY, None),
    # A service whose endpoint is the node's address on an own port: checked after resolution.
    (("10.96.0.21", 80), False, PlanKind.DENY, None),
    (("192.0.2.10", 15000), False, PlanKind.DENY, None),
    (("192.0.2.10", 8080), False, PlanKind.PASSTHROUGH, ("192.0.2.10", 8080)),
])
def test_workloads_on_loopback(dst: tuple[str, int], loopback_pods: bool, kind: PlanKind,
                               address: tuple[str, int] | None) -> None:
    own = OwnEndpoints(NODE_A.addresses, NODE_A.ports, loopback_pods=loopback_pods)
    plan = plan_outbound(LOOP_SNAP, "a", ip("10.0.1.1"), (ip(dst[0]), dst[1]), own=own)
    assert plan.kind is kind, reason_of(plan)
    assert address_of(plan) == (None if address is None else (ip(address[0]), address[1]))
    assert not isinstance(plan, DenyPlan) or plan.protected


def test_service_plan_keeps_original_target_for_authority() -> None:
    plan = plan_outbound(SNAP, "a", ip("10.0.1.1"), (ip("10.96.0.1"), 80), lambda n: 1)
    assert isinstance(plan, HbonePlan)
    assert plan.target == (ip("10.0.2.2"), 8080)
    assert plan.service is not None and plan.service.name == "srv"


@pytest.mark.parametrize(("dst", "node", "ok"), [
    (("10.0.2.2", 8080), "b", True),
    (("10.0.2.2", 8080), "a", False),  # pod is not on this node
    (("10.0.2.3", 80), "b", False),  # not enrolled
    (("10.0.7.7", 80), "b", False),  # unknown
    (("10.0.2.2", 15008), "b", False),  # would loop into our own listener
])
def test_resolve_inbound(dst: tuple[str, int], node: str, ok: bool) -> None:
    target = resolve_inbound(SNAP, node, (ip(dst[0]), dst[1]), frozenset({15001, 15006, 15008}))
    assert (target.address is not None) is ok
    assert ok or target.reason
    assert not target.protected


@pytest.mark.parametrize(("dst", "ok", "words"), [
    # A peer must not use our HBONE listener to reach the node: loopback, unspecified, or the
    # mesh's own ports on the node's address (each a denial naming the node) ...
    (("127.0.0.1", 15000), False, "127.0.0.1:15000 is a loopback address and 15000"),
    (("127.0.0.1", 22), False, "127.0.0.1:22 is a loopback address, i.e. the node itself"),
    (("::1", 15020), False, "::1:15020 is a loopback address"),
    (("0.0.0.0", 15000), False, "0.0.0.0:15000 is an unspecified address"),
    (("192.0.2.10", 15000), False, "192.0.2.10:15000 is this node's own address"),
    (("127.0.5.2", 8080), False, "127.0.5.2:8080 is a loopback address"),  # a loopback pod
    # ... while a pod's own port 15000 is the pod's.
    (("10.0.1.2", 15000), True, ""),
])
def test_resolve_inbound_never_reaches_the_node(dst: tuple[str, int], ok: bool,
                                                words: str) -> None:
    target = resolve_inbound(LOOP_SNAP, "a", (ip(dst[0]), dst[1]),
                             frozenset({15001, 15006, 15008}), NODE_A)
    assert (target.address is not None) is ok
    assert target.protected is not ok
    assert target.reason.startswith(words), target.reason


# -- services bound to a waypoint ----------------------------------------------------------------


def _waypoint_pod(name: str, ns: str, gateway: str, node: str, ip: str,
                  **extra: Any) -> dict[str, Any]:
    # Waypoint pods are not captured: protocol TCP, as the controller lists them.
    return {"name": name, "namespace": ns, "serviceAccount": gateway, "node": node,
            "addresses": [ip], "labels": {GATEWAY_NAME_LABEL: gateway}, "protocol": "TCP",
            **extra}


def _bound(name: str, vip: str, waypoint: dict[str, str], selector: str = "srv") \
        -> dict[str, Any]:
    return {"name": name, "namespace": "default", "vips": [vip], "selector": {"app": selector},
            "ports": [{"port": 80, "targetPort": 8080}], "waypoint": waypoint}


WP_DOC = copy.deepcopy(DOC)
WP_DOC["workloads"] += [
    _waypoint_pod("wp-1", "default", "wp", "b", "10.0.3.1"),
    # An instance on the source's own node, and one in the mesh (for the loop rows).
    _waypoint_pod("wp-2", "default", "wp", "a", "10.0.3.2", protocol="HBONE"),
    _waypoint_pod("wp-sick", "default", "wp", "b", "10.0.3.3", status="Unhealthy"),
    _waypoint_pod("shared-1", "gw", "shared", "b", "10.0.3.4"),
    _waypoint_pod("only-sick", "default", "sickwp", "b", "10.0.3.5", status="Unhealthy"),
    # Same gateway name, other namespace: an instance of gw/wp, not of default/wp.
    _waypoint_pod("gw-wp", "gw", "wp", "a", "10.0.1.20", protocol="HBONE"),
]
WP_DOC["services"] += [
    _bound("bound", "10.96.0.10", {"name": "wp"}),
    _bound("bound-idle", "10.96.0.11", {"name": "idle"}),
    _bound("bound-x", "10.96.0.12", {"namespace": "gw", "name": "shared"}),
    _bound("bound-empty", "10.96.0.13", {"name": "wp"}, selector="nothing"),
    _bound("bound-sick", "10.96.0.14", {"name": "sickwp"}),
]
WP_SNAP = StateSnapshot.build(parse_state(WP_DOC))

NO_INSTANCE = "service default/{} is bound to waypoint {}, which has no ready instance"

# source, destination, pick -> kind, connect address, expected identity (ns/sa), destination
# workload, waypoint key (None: no waypoint involved), reason (DENY rows)
WAYPOINT_CASES: list[tuple[Any, ...]] = [
    # Bound VIP: HBONE to an instance's 15008, whichever node it runs on.
    ("10.0.1.1", ("10.96.0.10", 80), 0, PlanKind.WAYPOINT, ("10.0.3.1", 15008), "default/wp",
     "wp-1", "default/wp", None),
    ("10.0.1.1", ("10.96.0.10", 80), 1, PlanKind.WAYPOINT, ("10.0.3.2", 15008), "default/wp",
     "wp-2", "default/wp", None),
    # Unready instances are not candidates (pick 2 wraps around the two ready ones).
    ("10.0.1.1", ("10.96.0.10", 80), 2, PlanKind.WAYPOINT, ("10.0.3.1", 15008), "default/wp",
     "wp-1", "default/wp", None),
    # Waypoint in another namespace.
    ("10.0.1.1", ("10.96.0.12", 80), 0, PlanKind.WAYPOINT, ("10.0.3.4", 15008), "gw/shared",
     "shared-1", "gw/shared", None),
    # The waypoint resolves endpoints, so a bound service without endpoints still goes there.
    ("10.0.1.1", ("10.96.0.13", 80), 0, PlanKind.WAYPOINT, ("10.0.3.1", 15008), "default/wp",
     "wp-1", "default/wp", None),
    # The port is checked first, as for any service.
    ("10.0.1.1", ("10.96.0.10", 81), 0, PlanKind.DENY, None, None, None, None,
     "service default/bound has no port 81"),
    # No instance, or none ready: fail closed, naming the waypoint.
    ("10.0.1.1", ("10.96.0.11", 80), 0, PlanKind.DENY, None, None, None, "default/idle",
     NO_INSTANCE.format("bound-idle", "default/idle")),
    ("10.0.1.1", ("10.96.0.14", 80), 0, PlanKind.DENY, None, None, None, "default/sickwp",
     NO_INSTANCE.format("bound-sick", "default/sickwp")),
    # The waypoint's own connection to the service goes to an endpoint, as without a waypoint.
    ("10.0.3.2", ("10.96.0.10", 80), 0, PlanKind.LOCAL, ("10.0.1.2", 8080), "default/srv",
     "local-srv", None, None),
    ("10.0.3.2", ("10.96.0.10", 80), 1, PlanKind.HBONE, ("10.0.2.2", 15008), "default/srv",
     "remote-srv", None, None),
    # ... but an instance of another waypoint (same name, other namespace) is just a client.
    ("10.0.1.20", ("10.96.0.10", 80), 0, PlanKind.WAYPOINT, ("10.0.3.1", 15008), "default/wp",
     "wp-1", "default/wp", None),
    # Pod IPs are not redirected (waypoint-for=service), even an endpoint of a bound service.
    ("10.0.1.1", ("10.0.2.2", 8080), 0, PlanKind.HBONE, ("10.0.2.2", 15008), "default/srv",
     "remote-srv", None, None),
    # A waypoint pod's own IP: it is not captured, so plain TCP.
    ("10.0.1.1", ("10.0.3.1", 15008), 0, PlanKind.PASSTHROUGH, ("10.0.3.1", 15008), None,
     "wp-1", None, None),
    # Unbound services are unchanged next to bound ones.
    ("10.0.1.1", ("10.96.0.1", 80), 1, PlanKind.HBONE, ("10.0.2.2", 15008), "default/srv",
     "remote-srv", None, None),
]


@pytest.mark.parametrize(
    ("src", "dst", "pick", "kind", "address", "identity", "dest", "waypoint", "reason"),
    WAYPOINT_CASES)
def test_plan_outbound_with_waypoints(
        src: str, dst: tuple[str, int], pick: int, kind: PlanKind,
        address: tuple[str, int] | None, identity: str | None, dest: str | None,
        waypoint: str | None, reason: str | None) -> None:
    plan = plan_outbound(WP_SNAP, "a", ip(src), (ip(dst[0]), dst[1]), lambda n: pick)
    assert plan.kind is kind, reason_of(plan)
    assert address_of(plan) == (None if address is None else (ip(address[0]), address[1]))
    if identity is None:
        assert identity_of(plan) is None
    else:
        assert str(identity_of(plan)) == "spiffe://cluster.local/ns/{}/sa/{}".format(
            *identity.split("/"))
    plan_dest, plan_waypoint = destination_of(plan), waypoint_of(plan)
    assert (plan_dest.name if plan_dest else None) == dest
    assert (plan_waypoint.key if plan_waypoint else None) == waypoint
    if reason is not None:
        assert reason_of(plan) == reason
    if kind is PlanKind.WAYPOINT:
        assert isinstance(plan, WaypointPlan)
        # :authority is the address the client dialled; the service is reported as such and
        # the instance is the workload connected to (and whose identity is checked).
        assert plan.target == (ip(dst[0]), dst[1])
        assert plan.service is not None and plan.service.waypoint == plan.waypoint
        assert plan.destination is not None
        assert plan.expected_identity == plan.destination.identity
        assert plan.source is not None and plan.source.addresses[0] == ip(src)
    if waypoint is not None and kind is PlanKind.DENY:
        assert plan.service is not None and address_of(plan) is None


def test_waypoint_port_is_not_the_ztunnels_inbound_port() -> None:
    vip = (ip("10.96.0.10"), 80)
    plan = plan_outbound(WP_SNAP, "a", ip("10.0.1.1"), vip, hbone_port=16008)
    assert plan.kind is PlanKind.WAYPOINT and address_of(plan) == (ip("10.0.3.1"), 15008)
    plan = plan_outbound(WP_SNAP, "a", ip("10.0.1.1"), vip, waypoint_port=25008)
    assert address_of(plan) == (ip("10.0.3.1"), 25008)


def test_unbinding_restores_direct_routing() -> None:
    doc = copy.deepcopy(WP_DOC)
    for svc in doc["services"]:
        svc.pop("waypoint", None)
    snap = StateSnapshot.build(parse_state(doc))
    plan = plan_outbound(snap, "a", ip("10.0.1.1"), (ip("10.96.0.10"), 80), lambda n: 1)
    assert plan.kind is PlanKind.HBONE and waypoint_of(plan) is None
    assert isinstance(plan, HbonePlan)
    assert plan.target == (ip("10.0.2.2"), 8080)
    assert plan.destination is not None and plan.destination.name == "remote-srv"


def test_source_checks_come_before_the_waypoint() -> None:
    # An unknown or unenrolled source is refused as before, without a waypoint in the plan.
    for src in ("10.0.9.9", "10.0.1.9"):
        plan = plan_outbound(WP_SNAP, "a", ip(src), (ip("10.96.0.10"), 80))
        assert plan.kind is PlanKind.DENY and waypoint_of(plan) is None


def test_waypoint_ref_key() -> None:
    assert WaypointRef("gw", "shared").key == "gw/shared"


# --- one IP, two workloads (issue 19 item 3) --------------------------------------------------
# A deleted pod the registry still lists and the new pod the CNI gave its IP: until the state
# settles the address is nobody's, so no connection is carried under either identity.

def _w(name: str, sa: str, node: str, address: str) -> Workload:
    return Workload(f"default/{name}", name, "default", sa, node, (ip(address),),
                    "cluster.local", labels=(("app", "srv"),))


REUSED = StateSnapshot.build(dataclasses.replace(STATE, workloads=(
    *STATE.workloads,
    _w("old", "old-sa", "a", "10.0.1.50"), _w("new", "new-sa", "a", "10.0.1.50"),
    _w("old-b", "old-sa", "b", "10.0.2.50"), _w("new-b", "new-sa", "b", "10.0.2.50"))))
SETTLED = StateSnapshot.build(dataclasses.replace(STATE, workloads=(
    *STATE.workloads, _w("new", "new-sa", "a", "10.0.1.50"))))
CLAIMED = "claimed by 2 workloads (default/new, default/old)"


# source, destination, pick -> kind, words in the reason (the plan never names an identity)
REUSE_CASES = [
    # from the reused address: an unknown source, refused (neither old-sa nor new-sa)
    ("10.0.1.50", ("10.0.2.2", 8080), 0, PlanKind.DENY, f"unknown source 10.0.1.50: the "
                                                         f"address is {CLAIMED}"),
    ("10.0.1.50", ("1.1.1.1", 443), 0, PlanKind.DENY, "unknown source 10.0.1.50"),
    ("10.0.1.50", ("10.96.0.1", 80), 0, PlanKind.DENY, "unknown source 10.0.1.50"),
    # to it, same node or another: refused, not passed through in plaintext nor sent to one
    ("10.0.1.1", ("10.0.1.50", 8080), 0, PlanKind.DENY, f"destination 10.0.1.50: the "
                                                        f"address is {CLAIMED}"),
    ("10.0.1.1", ("10.0.2.50", 8080), 0, PlanKind.DENY, "claimed by 2 workloads "
                                                        "(default/new-b, default/old-b)"),
    # a service they both match: neither is an endpoint meanwhile (local-srv, remote-srv are)
    ("10.0.1.1", ("10.96.0.1", 80), 0, PlanKind.LOCAL, ""),
    ("10.0.1.1", ("10.96.0.1", 80), 1, PlanKind.HBONE, ""),
    ("10.0.1.1", ("10.96.0.1", 80), 2, PlanKind.LOCAL, ""),
    ("10.0.1.1", ("10.96.0.1", 80), 3, PlanKind.HBONE, ""),
]


@pytest.mark.parametrize(("src", "dst", "pick", "kind", "words"), REUSE_CASES)
def test_one_ip_two_workloads_is_nobodys(src: str, dst: tuple[str, int], pick: int,
                                         kind: PlanKind, words: str) -> None:
    plan = plan_outbound(REUSED, "a", ip(src), (ip(dst[0]), dst[1]), lambda n: pick)
    assert plan.kind is kind, reason_of(plan)
    assert words in reason_of(plan)
    reused = {ip("10.0.1.50"), ip("10.0.2.50")}
    assert plan.source is None or plan.source.addresses[0] not in reused
    dest = destination_of(plan)
    assert dest is None or dest.addresses[0] not in reused
    if isinstance(plan, LocalPlan | HbonePlan):
        assert plan.expected_identity.service_account == "srv"


def test_one_ip_two_workloads_in_the_store_and_inbound() -> None:
    assert REUSED.workload_by_ip(ip("10.0.1.50")) is None
    assert REUSED.claimants(ip("10.0.1.50")) == ("default/new", "default/old")
    assert REUSED.claimants(ip("10.0.1.1")) == () and REUSED.by_uid["default/new"].node == "a"
    assert {w.name for w in REUSED.local_workloads("a")} >= {"old", "new"}
    target = resolve_inbound(REUSED, "a", (ip("10.0.1.50"), 8080), frozenset({15008}))
    assert target.destination is None and target.address is None
    assert CLAIMED in target.reason
    # Once the state settles (the old pod gone), the new pod is served as itself at once.
    plan = plan_outbound(SETTLED, "a", ip("10.0.1.50"), (ip("10.0.2.2"), 8080))
    assert isinstance(plan, HbonePlan) and plan.source.service_account == "new-sa"
    target = resolve_inbound(SETTLED, "a", (ip("10.0.1.50"), 8080), frozenset({15008}))
    assert target.destination is not None and target.destination.service_account == "new-sa"
    assert {w.name for w in SETTLED.service_endpoints(SETTLED.by_vip[ip("10.96.0.1")])} == {
        "local-srv", "remote-srv", "new"}

"""Routing decisions as a table: (source IP, destination) -> plan."""

from __future__ import annotations

import ipaddress

import pytest

from ztunnel.routing import PlanKind, plan_outbound, resolve_inbound
from ztunnel.state.parse import parse_state
from ztunnel.state.store import StateSnapshot

STATE = parse_state({
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
})
SNAP = StateSnapshot.build(STATE)
ip = ipaddress.ip_address

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
]


@pytest.mark.parametrize(("src", "dst", "pick", "kind", "address", "sa"), CASES)
def test_plan_outbound(src: str, dst: tuple[str, int], pick: int, kind: PlanKind,
                       address: tuple[str, int] | None, sa: str | None) -> None:
    plan = plan_outbound(SNAP, "a", ip(src), (ip(dst[0]), dst[1]), lambda n: pick)
    assert plan.kind is kind, plan.reason
    if address is None:
        assert plan.address is None and plan.reason
    else:
        assert plan.address == (ip(address[0]), address[1])
    if sa is None:
        assert plan.expected_identity is None
    else:
        assert plan.expected_identity is not None
        assert str(plan.expected_identity) == f"spiffe://cluster.local/ns/default/sa/{sa}"


def test_service_plan_keeps_original_target_for_authority() -> None:
    plan = plan_outbound(SNAP, "a", ip("10.0.1.1"), (ip("10.96.0.1"), 80), lambda n: 1)
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

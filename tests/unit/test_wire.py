"""Config push encoding: full snapshots and deltas round-trip exactly; bad updates are
rejected whole with the field named."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mesh.api.ambit.v1 import state_pb2
from mesh.state.model import MeshConfig, WaypointRef
from mesh.state.parse import (
    StateError,
    parse_authorization_spec,
    parse_peer_authentication_spec,
    parse_state,
)
from mesh.state.wire import (
    apply_update,
    authorization_spec,
    delta_update,
    full_update,
    peer_authentication_spec,
)
from tests.unit.test_state import GOOD


def canon(c: MeshConfig) -> tuple[Any, ...]:
    return (c.trust_domain, sorted(c.workloads, key=lambda w: w.uid),
            sorted(c.services, key=lambda s: s.key), sorted(c.policies, key=lambda p: p.key),
            sorted(c.peer_authentications, key=lambda p: p.key), c.version)


def test_policy_specs_round_trip() -> None:
    cfg = parse_state(GOOD)
    for p in cfg.policies:
        assert parse_authorization_spec(p.name, p.namespace, authorization_spec(p), "s") == p
    for pa in cfg.peer_authentications:
        assert parse_peer_authentication_spec(
            pa.name, pa.namespace, peer_authentication_spec(pa), "s") == pa


def test_full_snapshot_round_trip_through_bytes() -> None:
    cfg = parse_state({**GOOD, "version": "7"})
    wire = state_pb2.StateUpdate.FromString(full_update(cfg).SerializeToString())
    assert canon(apply_update(MeshConfig(), wire)) == canon(cfg)


def test_delta_carries_only_changes() -> None:
    old = parse_state({**GOOD, "version": "1"})
    doc = copy.deepcopy(GOOD)
    doc["version"] = "2"
    doc["workloads"][0]["labels"] = {"app": "a", "new": "label"}
    del doc["workloads"][1]
    doc["authorizationPolicies"][0]["spec"]["action"] = "DENY"
    new = parse_state(doc)
    delta = delta_update(old, new)
    assert delta is not None and not delta.full
    assert [w.name for w in delta.workloads] == ["a"]
    assert list(delta.removed_workloads) == ["ns1/b"]
    assert [p.name for p in delta.authorization_policies] == ["p1"]
    assert not delta.services and not delta.peer_authentications
    assert canon(apply_update(old, delta)) == canon(new)
    assert delta_update(new, new) is None


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda u: u.workloads[0].addresses.append("nope"), "workloads[0].addresses[1]"),
    (lambda u: setattr(u.authorization_policies[0], "spec_json", "{bad"),
     "authorization_policies[0].spec_json"),
    (lambda u: setattr(u.authorization_policies[0], "spec_json", '{"action": "MAYBE"}'),
     "authorization_policies[0].spec.action"),
    (lambda u: u.workloads[1].addresses.append("10.0.0.1"), "workloads"),
    # Validated by the same parser as the state file, service-account rule included.
    (lambda u: setattr(u.workloads[0], "service_account", "a/b"),
     "workloads[0].serviceAccount"),
    (lambda u: setattr(u.services[0].ports[0], "port", 0), "services[0].ports[0].port"),
])
def test_bad_update_is_rejected_whole(mutate: Any, field: str) -> None:
    current = parse_state(GOOD)
    u = full_update(current)
    mutate(u)
    with pytest.raises(StateError) as err:
        apply_update(current, u)
    assert err.value.path == field


def _bound_doc(waypoint: dict[str, str] | None) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    if waypoint is not None:
        doc["services"][0]["waypoint"] = waypoint
    doc["services"].append({"name": "other", "namespace": "ns1", "vips": ["10.96.0.2"],
                            "ports": [{"port": 80}],
                            "waypoint": {"namespace": "gw", "name": "shared"}})
    return doc


def test_waypoint_binding_round_trips_and_travels_in_deltas() -> None:
    unbound = parse_state({**_bound_doc(None), "version": "1"})
    bound = parse_state({**_bound_doc({"name": "wp"}), "version": "2"})
    assert bound.services[0].waypoint == WaypointRef("ns1", "wp")
    assert bound.services[1].waypoint == WaypointRef("gw", "shared")
    wire = state_pb2.StateUpdate.FromString(full_update(bound).SerializeToString())
    assert canon(apply_update(MeshConfig(), wire)) == canon(bound)
    # Binding and unbinding are service upserts.
    for old, new in ((unbound, bound), (bound, unbound)):
        delta = delta_update(old, new)
        assert delta is not None and [m.name for m in delta.services] == ["svc"]
        delta = state_pb2.StateUpdate.FromString(delta.SerializeToString())
        assert canon(apply_update(old, delta)) == canon(new)


@pytest.mark.parametrize(("name", "namespace", "field"), [
    ("", "gw", "services[1].waypoint.name"),
    ("a/b", "gw", "services[1].waypoint.name"),
    ("shared", "Not_A_Namespace", "services[1].waypoint.namespace"),
])
def test_bad_waypoint_on_the_wire_is_rejected(name: str, namespace: str, field: str) -> None:
    current = parse_state(_bound_doc(None))
    u = full_update(current)
    u.services[1].waypoint.name, u.services[1].waypoint.namespace = name, namespace
    with pytest.raises(StateError) as err:
        apply_update(current, u)
    assert err.value.path == field



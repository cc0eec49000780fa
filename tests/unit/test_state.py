"""State documents: what parses, what is rejected (naming the field), and the indexes."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

from mesh.state.model import (
    MeshConfig,
    MtlsMode,
    Protocol,
    Service,
    ServicePort,
    WaypointRef,
    Workload,
)
from mesh.state.parse import StateError, load_state_text, parse_state
from mesh.state.store import GATEWAY_NAME_LABEL, StateSnapshot, StateStore

GOOD: dict[str, Any] = {
    "trustDomain": "example.org",
    "workloads": [
        {"name": "a", "namespace": "ns1", "serviceAccount": "sa-a", "node": "n1",
         "addresses": ["10.0.0.1"], "labels": {"app": "a"}, "workloadName": "a-deploy"},
        {"name": "b", "namespace": "ns1", "node": "n2", "addresses": ["10.0.0.2", "fd00::2"],
         "labels": {"app": "b", "tier": "x"}, "protocol": "tcp"},
    ],
    "services": [{"name": "svc", "namespace": "ns1", "vips": ["10.96.0.1"],
                  "selector": {"app": "a"}, "ports": [{"port": 80, "targetPort": "8080"}]}],
    "authorizationPolicies": [
        {"name": "p1", "namespace": "ns1", "spec": {"selector": {"matchLabels": {"app": "a"}},
                                                    "rules": [{}]}},
        {"name": "mesh", "namespace": "ambit-system", "spec": {"action": "DENY", "rules": [
            {"from": [{"source": {"ipBlocks": ["192.168.0.0/16"]}}]}]}},
        {"name": "other-ns", "namespace": "ns2", "spec": {"rules": [{}]}},
    ],
    "peerAuthentications": [
        {"name": "ns", "namespace": "ns1", "spec": {"mtls": {"mode": "STRICT"}}},
        {"name": "wl", "namespace": "ns1", "spec": {
            "selector": {"matchLabels": {"app": "a"}}, "mtls": {"mode": "UNSET"},
            "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}},
    ],
}


def test_good_document() -> None:
    cfg = parse_state(GOOD)
    assert cfg.trust_domain == "example.org"
    a, b = cfg.workloads
    assert a.uid == "ns1/a" and a.owner_name == "a-deploy"
    assert str(a.identity) == "spiffe://example.org/ns/ns1/sa/sa-a"
    assert b.service_account == "default" and b.protocol is Protocol.TCP
    assert cfg.services[0].target_port(80) == 8080
    assert cfg.services[0].hostname == "svc.ns1.svc.cluster.local"


def test_indexes_and_policy_selection() -> None:
    snap = StateSnapshot.build(parse_state(GOOD))
    a = snap.workload_by_ip(ipaddress.ip_address("10.0.0.1"))
    b = snap.workload_by_ip(ipaddress.ip_address("fd00::2"))
    assert a is not None and b is not None
    assert [w.name for w in snap.service_endpoints(snap.config.services[0])] == ["a"]
    assert [p.name for p in snap.policies_for(a)] == ["p1", "mesh"]
    assert [p.name for p in snap.policies_for(b)] == ["mesh"]
    assert snap.local_workloads("n2") == (b,)
    # Workload policy is UNSET, so the namespace STRICT applies, except the port override.
    assert snap.mtls_mode(a, 8080) is MtlsMode.STRICT
    assert snap.mtls_mode(a, 9090) is MtlsMode.PERMISSIVE
    assert snap.mtls_mode(b, 8080) is MtlsMode.STRICT


def test_service_waypoint_namespace_defaults_to_the_services() -> None:
    doc = copy.deepcopy(GOOD)
    doc["services"][0]["waypoint"] = {"name": "wp"}
    doc["services"].append({"name": "svc2", "namespace": "ns1", "vips": ["10.96.0.2"],
                            "ports": [{"port": 80}],
                            "waypoint": {"namespace": "mesh-gw", "name": "shared.wp"}})
    doc["services"].append({"name": "svc3", "namespace": "ns1", "vips": ["10.96.0.3"],
                            "ports": [{"port": 80}]})
    s1, s2, s3 = parse_state(doc).services
    assert s1.waypoint == WaypointRef("ns1", "wp") and s1.waypoint.key == "ns1/wp"
    assert s2.waypoint == WaypointRef("mesh-gw", "shared.wp")
    assert s3.waypoint is None


def test_waypoint_instances_index() -> None:
    def pod(name: str, ns: str, ip: str, gw: str | None, status: str = "Healthy") \
            -> dict[str, Any]:
        labels = {GATEWAY_NAME_LABEL: gw} if gw else {"app": "x"}
        return {"name": name, "namespace": ns, "serviceAccount": gw or "default", "node": "n1",
                "addresses": [ip], "labels": labels, "protocol": "TCP", "status": status}

    snap = StateSnapshot.build(parse_state({"workloads": [
        pod("wp-1", "ns1", "10.1.0.1", "wp"),
        pod("wp-2", "ns1", "10.1.0.2", "wp"),
        pod("wp-sick", "ns1", "10.1.0.3", "wp", "Unhealthy"),
        pod("other-ns", "ns2", "10.1.0.4", "wp"),
        pod("other-gw", "ns1", "10.1.0.5", "wp2"),
        pod("plain", "ns1", "10.1.0.6", None),
    ]}))
    assert [w.name for w in snap.waypoint_instances(WaypointRef("ns1", "wp"))] == \
        ["wp-1", "wp-2"]
    assert [w.name for w in snap.waypoint_instances(WaypointRef("ns2", "wp"))] == ["other-ns"]
    assert snap.waypoint_instances(WaypointRef("ns1", "missing")) == ()
    by_name = {w.name: w for w in snap.config.workloads}
    # Instance-ness (for loop avoidance) ignores readiness; it needs namespace and label.
    assert snap.is_waypoint_instance(by_name["wp-sick"], WaypointRef("ns1", "wp"))
    assert not snap.is_waypoint_instance(by_name["other-ns"], WaypointRef("ns1", "wp"))
    assert not snap.is_waypoint_instance(by_name["plain"], WaypointRef("ns1", "wp"))


def test_default_mtls_mode_is_permissive() -> None:
    snap = StateSnapshot.build(parse_state({"workloads": GOOD["workloads"]}))
    assert snap.mtls_mode(snap.config.workloads[0], 80) is MtlsMode.PERMISSIVE


def _bad(path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    target: Any = doc
    for p in path[:-1]:
        target = target[p]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


REJECTS = [
    (["workloads", 0, "addresses", 0], "10.0.0.300", "workloads[0].addresses[0]"),
    (["workloads", 0, "addresses"], [], "workloads[0].addresses"),
    (["workloads", 0, "node"], KeyError, "workloads[0].node"),
    (["workloads", 1, "protocol"], "QUIC", "workloads[1].protocol"),
    (["workloads", 0, "colour"], "red", "workloads[0].colour"),
    (["workloads", 1, "addresses"], ["10.0.0.1"], "workloads[1].addresses[0]"),
    (["services", 0, "ports", 0, "targetPort"], "http", "services[0].ports[0].targetPort"),
    # Ports are ASCII digits only: int() would read these as 8080 / 80.
    (["services", 0, "ports", 0, "targetPort"], "٨٠٨٠", "services[0].ports[0].targetPort"),
    (["services", 0, "ports", 0, "targetPort"], "+80", "services[0].ports[0].targetPort"),
    (["services", 0, "ports", 0, "targetPort"], "8_0", "services[0].ports[0].targetPort"),
    (["services", 0, "ports", 0, "targetPort"], " 80", "services[0].ports[0].targetPort"),
    (["services", 0, "ports", 0, "port"], 65536, "services[0].ports[0].port"),
    (["services", 0, "ports", 0, "port"], True, "services[0].ports[0].port"),
    (["services", 0, "ports", 0, "port"], 80.0, "services[0].ports[0].port"),
    (["services", 0, "vips", 0], "10.0.0.2", "services[0].vips[0]"),
    (["authorizationPolicies", 0, "spec", "action"], "MAYBE",
     "authorizationPolicies[0].spec.action"),
    (["authorizationPolicies", 0, "spec", "rules"], [{"to": [{"operation": {
        "methods": ["GET"]}}]}], "authorizationPolicies[0].spec.rules[0].to[0].operation.methods"),
    (["authorizationPolicies", 1, "spec", "rules", 0, "from", 0, "source", "ipBlocks"],
     ["nonsense"], "authorizationPolicies[1].spec.rules[0].from[0].source.ipBlocks[0]"),
    (["authorizationPolicies", 0, "spec", "rules"], [{"from": [{"source": {
        "principals": ["a*b"]}}]}], "authorizationPolicies[0].spec.rules[0].from[0].source"
     ".principals[0]"),
    (["authorizationPolicies", 2, "name"], "p1", None),  # different namespace: fine
    (["peerAuthentications", 0, "spec", "mtls", "mode"], "SOMETIMES",
     "peerAuthentications[0].spec.mtls.mode"),
    (["peerAuthentications", 1, "spec", "portLevelMtls"], {"http": {"mode": "STRICT"}},
     "peerAuthentications[1].spec.portLevelMtls.http"),
    (["services"], {"name": "x"}, "services"),
    (["services", 0, "waypoint"], {"namespace": "ns1"}, "services[0].waypoint.name"),
    (["services", 0, "waypoint"], {"name": ""}, "services[0].waypoint.name"),
    (["services", 0, "waypoint"], {"name": "a/b"}, "services[0].waypoint.name"),
    (["services", 0, "waypoint"], {"name": "w" * 64}, "services[0].waypoint.name"),
    (["services", 0, "waypoint"], {"name": "w", "namespace": "Big_NS"},
     "services[0].waypoint.namespace"),
    (["services", 0, "waypoint"], {"name": "w", "port": 15008}, "services[0].waypoint.port"),
    (["services", 0, "waypoint"], "w", "services[0].waypoint"),
    (["services", 0, "waypoint"], {"name": "w", "namespace": "other"}, None),
]


@pytest.mark.parametrize(("path", "value", "field"), REJECTS)
def test_rejections_name_the_field(path: list[Any], value: Any, field: str | None) -> None:
    doc = _bad(path, value)
    if field is None:
        parse_state(doc)
        return
    with pytest.raises(StateError) as err:
        parse_state(doc)
    assert err.value.path == field, str(err.value)
    assert str(err.value).startswith(field + ":")


def test_duplicate_policy_rejected() -> None:
    doc = copy.deepcopy(GOOD)
    doc["authorizationPolicies"].append(copy.deepcopy(doc["authorizationPolicies"][0]))
    with pytest.raises(StateError, match=r"authorizationPolicies\[3\]: duplicate policy"):
        parse_state(doc)


def test_yaml_errors_are_state_errors() -> None:
    with pytest.raises(StateError, match="not valid YAML"):
        load_state_text("workloads: [")
    with pytest.raises(StateError, match="expected a mapping"):
        load_state_text("- 1\n- 2\n")


def test_store_swaps_whole_snapshots_and_notifies() -> None:
    store = StateStore()
    seen: list[tuple[int, int]] = []
    store.subscribe(lambda old, new: seen.append((len(old.config.workloads),
                                                  len(new.config.workloads))))
    assert not store.ready
    store.replace(parse_state(GOOD))
    assert store.ready and seen == [(0, 2)]


# Found by fuzz/state_text.py and fuzz/state_wire.py: PyYAML and json recurse per nesting level,
# so a deeply nested document raised RecursionError, which the reload loop does not catch.
@pytest.mark.parametrize("text", ["[" * 5000, "{a: " * 5000, "- " * 5000])
def test_deeply_nested_state_is_a_state_error(text: str) -> None:
    with pytest.raises(StateError, match=r"nested too deeply|not valid YAML"):
        load_state_text(text)


def test_deeply_nested_policy_spec_on_the_wire_is_a_state_error() -> None:
    from mesh.api.ambit.v1 import state_pb2
    from mesh.state.model import MeshConfig
    from mesh.state.wire import apply_update

    update = state_pb2.StateUpdate(authorization_policies=[
        state_pb2.Policy(name="p", namespace="n", spec_json="[" * 5000)])
    with pytest.raises(StateError, match=r"authorization_policies\[0\].spec_json: .*nested"):
        apply_update(MeshConfig(), update)


def test_a_delta_cannot_change_the_trust_domain() -> None:
    # Found by fuzz/state_wire.py: a delta with another trust_domain was applied, leaving the
    # workloads it did not name with identities in the old trust domain.
    from mesh.api.ambit.v1 import state_pb2
    from mesh.state.wire import apply_update, delta_update, full_update

    old = load_state_text("workloads: [{name: a, namespace: n, node: x, addresses: [10.0.0.1]}]")
    new = load_state_text("trustDomain: other.local\n"
                          "workloads: [{name: a, namespace: n, node: x, addresses: [10.0.0.1]}]")
    with pytest.raises(StateError, match=r"trust_domain: 'other\.local' differs"):
        apply_update(old, state_pb2.StateUpdate(trust_domain="other.local"))
    update = delta_update(old, new)
    assert update is not None and update.full  # what the controller sends: a full update
    assert apply_update(old, update) == new
    assert apply_update(old, full_update(new)) == new


def _wl(name: str, address: str, node: str = "n1", app: str = "web") -> Workload:
    return Workload(f"ns1/{name}", name, "ns1", name, node, (ipaddress.ip_address(address),),
                    "cluster.local", labels=(("app", app),))


# workloads -> per address: the owner by IP ("" for none) and the claimants when contested
@pytest.mark.parametrize(("workloads", "expected"), [
    # one owner each: as always
    ((_wl("a", "10.0.0.1"), _wl("b", "10.0.0.2")),
     {"10.0.0.1": ("ns1/a", ()), "10.0.0.2": ("ns1/b", ())}),
    # a deleted pod still listed and the new pod with its IP: nobody's, both named
    ((_wl("old", "10.0.0.1"), _wl("new", "10.0.0.1")),
     {"10.0.0.1": ("", ("ns1/new", "ns1/old"))}),
    # whatever the order in the state
    ((_wl("new", "10.0.0.1"), _wl("old", "10.0.0.1"), _wl("c", "10.0.0.3")),
     {"10.0.0.1": ("", ("ns1/new", "ns1/old")), "10.0.0.3": ("ns1/c", ())}),
    # three claimants, on different nodes
    ((_wl("x", "10.0.0.1"), _wl("y", "10.0.0.1", "n2"), _wl("z", "10.0.0.1")),
     {"10.0.0.1": ("", ("ns1/x", "ns1/y", "ns1/z"))}),
])
def test_one_ip_claimed_twice_has_no_owner(
        workloads: tuple[Workload, ...], expected: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    snap = StateSnapshot.build(MeshConfig(workloads=workloads, services=(Service(
        "web", "ns1", "web.ns1.svc", (ipaddress.ip_address("10.96.0.1"),),
        (ServicePort(80, 80),), (("app", "web"),)),)))
    for address, (owner, claimants) in expected.items():
        a = ipaddress.ip_address(address)
        w = snap.workload_by_ip(a)
        assert (w.uid if w else "") == owner
        assert snap.claimants(a) == claimants
    # every workload stays in the state (by uid, by node), only the address is nobody's
    assert set(snap.by_uid) == {w.uid for w in workloads}
    # and a workload reached at a contested address is no service endpoint meanwhile
    endpoints = {w.uid for w in snap.service_endpoints(snap.by_vip[
        ipaddress.ip_address("10.96.0.1")])}
    assert endpoints == {owner for owner, _ in expected.values() if owner}


@pytest.mark.parametrize("clash", ["service", "workload"])
def test_a_pushed_vip_is_unique_as_in_a_state_file(clash: str) -> None:
    # Found by fuzz/state_wire.py: the push accepted two services with one VIP, or a VIP that is
    # a pod's address, which a state file refuses; the by-VIP index then picked one silently.
    from mesh.api.ambit.v1 import state_pb2
    from mesh.state.model import MeshConfig
    from mesh.state.wire import apply_update

    def svc(name: str) -> state_pb2.Service:
        return state_pb2.Service(name=name, namespace="n", vips=["10.96.0.1"],
                                 ports=[state_pb2.ServicePort(port=80)])

    update = state_pb2.StateUpdate(full=True, services=[svc("a")])
    if clash == "service":
        update.services.append(svc("b"))
    else:
        update.workloads.append(
            state_pb2.Workload(name="w", namespace="n", node="x", addresses=["10.96.0.1"]))
    with pytest.raises(StateError, match=f"10.96.0.1 of service .* is already used by {clash}"):
        apply_update(MeshConfig(), update)
    # Moving a VIP from one service to another in one delta is fine.
    base = apply_update(MeshConfig(), state_pb2.StateUpdate(full=True, services=[svc("a")]))
    moved = apply_update(base, state_pb2.StateUpdate(services=[svc("b")],
                                                     removed_services=["n/a"]))
    assert [s.name for s in moved.services] == ["b"]


def test_pushed_addresses_and_policy_names_follow_the_state_file_rules() -> None:
    # Found by fuzz/state_wire.py: the push accepted a workload listing one address twice and a
    # policy without a name or namespace; a state file refuses both.
    from mesh.api.ambit.v1 import state_pb2
    from mesh.state.model import MeshConfig
    from mesh.state.wire import apply_update

    twice = state_pb2.StateUpdate(workloads=[state_pb2.Workload(
        name="w", namespace="n", node="x", addresses=["10.0.0.1", "10.0.0.1"])])
    with pytest.raises(StateError, match=r"10\.0\.0\.1 is claimed by n/w and n/w"):
        apply_update(MeshConfig(), twice)
    for field in ("authorization_policies", "peer_authentications"):
        for name, namespace, missing in (("", "n", "name"), ("p", "", "namespace")):
            update = state_pb2.StateUpdate()
            getattr(update, field).append(state_pb2.Policy(name=name, namespace=namespace))
            with pytest.raises(StateError, match=rf"{field}\[0\]\.{missing}: is required"):
                apply_update(MeshConfig(), update)

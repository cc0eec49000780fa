"""Pod start (issue 19 item 1), pure parts: the store's provisional overlay, the validation of
the agent's link requests, the hold decision and its settings."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from typing import Any

import pytest

from mesh.state.model import MeshConfig, Protocol, Workload
from mesh.state.store import (
    OverlayStateStore,
    ProvisionalFull,
    ProvisionalWorkloads,
    StateSnapshot,
)
from ztunnel.agent_link import (
    MAX_REQUEST,
    LinkRequestError,
    PodAdded,
    PodDeleted,
    Superseded,
    parse_link_request,
)
from ztunnel.cli import POD_START
from ztunnel.config import ConfigError, ZtunnelConfig
from ztunnel.pod_start import OVER_SOURCE, OVER_TOTAL, hold_refusal

TD = "cluster.local"
NODE = "node-1"


def wl(name: str, ip: str, *, ns: str = "default", sa: str = "", node: str = NODE,
       protocol: Protocol = Protocol.HBONE, healthy: bool = False) -> Workload:
    return Workload(uid=f"{ns}/{name}", name=name, namespace=ns, service_account=sa or name,
                    node=node, addresses=(ipaddress.ip_address(ip),), trust_domain=TD,
                    protocol=protocol, healthy=healthy)


def snap(*workloads: Workload) -> StateSnapshot:
    return StateSnapshot.build(MeshConfig(trust_domain=TD, workloads=workloads), now=1.0)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# -- the overlay ----------------------------------------------------------------------------


def test_a_provisional_workload_is_known_until_the_state_lists_it() -> None:
    o = ProvisionalWorkloads(max_entries=4, max_age=60)
    pod = wl("web", "10.244.1.5")
    assert o.add(pod, now=0) == ()
    merged = o.merged(snap())
    assert merged.workload_by_ip(ip("10.244.1.5")) == pod
    assert merged.local_workloads(NODE) == (pod,)
    # The push lists the pod (same uid and address): confirmed, the controller's record wins.
    pushed = dataclasses.replace(pod, labels=(("app", "web"),), healthy=True)
    assert o.confirm(snap(pushed)) == ("default/web",)
    assert len(o) == 0
    assert o.merged(snap(pushed)).workload_by_ip(ip("10.244.1.5")) == pushed


@pytest.mark.parametrize("base, confirmed", [
    ((), False),  # not listed yet
    ((wl("web", "10.244.1.9"),), False),  # the pod's previous incarnation, another IP
    ((wl("other", "10.244.1.5"),), False),  # another pod's stale record of the address
    ((wl("web", "10.244.1.5", protocol=Protocol.TCP),), True),  # listed (opted out): it wins
])
def test_confirmation_needs_the_uid_with_the_address(base: tuple[Workload, ...],
                                                     confirmed: bool) -> None:
    o = ProvisionalWorkloads()
    o.add(wl("web", "10.244.1.5"), now=0)
    assert bool(o.confirm(snap(*base))) is confirmed


def test_the_provisional_workload_wins_its_address_and_uid_over_stale_records() -> None:
    o = ProvisionalWorkloads()
    pod = wl("web", "10.244.1.5")
    o.add(pod, now=0)
    stale_ip = wl("old", "10.244.1.5")  # deleted pod whose IP the CNI just reused
    stale_uid = wl("web", "10.244.1.9")  # the same pod's previous incarnation
    other = wl("db", "10.244.1.7")
    merged = o.merged(snap(stale_ip, stale_uid, other))
    assert merged.workload_by_ip(ip("10.244.1.5")) == pod
    assert merged.workload_by_ip(ip("10.244.1.9")) is None
    assert merged.by_uid["default/web"] == pod
    assert merged.workload_by_ip(ip("10.244.1.7")) == other
    assert "default/old" not in merged.by_uid


def test_dropped_on_delete_and_on_age() -> None:
    o = ProvisionalWorkloads(max_entries=8, max_age=10)
    o.add(wl("a", "10.0.0.1"), now=0)
    o.add(wl("b", "10.0.0.2"), now=5)
    assert o.remove("default/a") and not o.remove("default/a")
    assert o.expire(now=14.9) == ()
    assert o.expire(now=15) == ("default/b",)
    assert len(o) == 0


def test_bounded_and_the_same_pod_renews_its_entry() -> None:
    o = ProvisionalWorkloads(max_entries=2, max_age=10)
    o.add(wl("a", "10.0.0.1"), now=0)
    o.add(wl("b", "10.0.0.2"), now=0)
    with pytest.raises(ProvisionalFull, match="state push stuck"):
        o.add(wl("c", "10.0.0.3"), now=1)
    o.add(wl("a", "10.0.0.1"), now=2)  # a retried ADD of a pod already there: fine
    o.add(wl("c", "10.0.0.3"), now=10)  # b expired (added at 0), room again
    assert sorted(o.entries) == ["default/a", "default/c"]


def test_an_address_reused_by_another_pod_displaces_the_older_claim() -> None:
    o = ProvisionalWorkloads()
    o.add(wl("a", "10.0.0.1"), now=0)
    assert o.add(wl("b", "10.0.0.1"), now=1) == ("default/a",)
    assert list(o.entries) == ["default/b"]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        ProvisionalWorkloads(max_entries=0)
    with pytest.raises(ValueError):
        ProvisionalWorkloads(max_age=0)


def test_overlay_store_tells_listeners_about_every_change_of_the_merged_view() -> None:
    store = OverlayStateStore()
    seen: list[tuple[int, int]] = []
    store.subscribe(lambda old, new: seen.append((len(old.by_ip), len(new.by_ip))))
    pod = wl("web", "10.244.1.5")
    store.add_provisional(pod, now=0)
    assert store.current.workload_by_ip(ip("10.244.1.5")) == pod
    assert store.base.workload_by_ip(ip("10.244.1.5")) is None
    assert not store.ready  # provisional pods are no state from the controller
    store.replace(MeshConfig(trust_domain=TD, workloads=(wl("db", "10.244.1.7"),)))
    assert store.ready and len(store.overlay) == 1
    assert store.current.workload_by_ip(ip("10.244.1.5")) == pod
    pushed = dataclasses.replace(pod, healthy=True)
    store.replace(MeshConfig(trust_domain=TD, workloads=(pushed,)))
    assert len(store.overlay) == 0 and store.current.workload_by_ip(ip("10.244.1.5")) == pushed
    store.add_provisional(wl("x", "10.244.1.8"), now=0)
    assert store.remove_provisional("default/x") and not store.remove_provisional("default/x")
    store.add_provisional(wl("y", "10.244.1.9"), now=0)
    assert store.expire_provisional(now=1e9) == ("default/y",)
    assert store.expire_provisional(now=1e9) == ()
    assert seen == [(0, 1), (1, 2), (2, 1), (1, 2), (2, 1), (1, 2), (2, 1)]


# -- link requests --------------------------------------------------------------------------


def doc(**workload: Any) -> dict[str, Any]:
    w = {"uid": "default/web", "name": "web", "namespace": "default", "serviceAccount": "web-sa",
         "node": NODE, "addresses": ["10.244.1.5"], "labels": {"app": "web"},
         "workloadName": "web"}
    w.update(workload)
    return {"op": "pod_added", "id": 7, "workload": {k: v for k, v in w.items()
                                                     if v is not None}}


def line(d: Any) -> bytes:
    return json.dumps(d).encode()


def test_a_good_pod_added_becomes_an_enrolled_not_ready_workload() -> None:
    request_id, req = parse_link_request(line(doc()), NODE, TD)
    assert request_id == 7 and isinstance(req, PodAdded)
    w = req.workload
    assert (w.uid, w.name, w.namespace, w.service_account, w.node) == \
        ("default/web", "web", "default", "web-sa", NODE)
    assert w.addresses == (ip("10.244.1.5"),) and w.labels == (("app", "web"),)
    assert w.protocol is Protocol.HBONE and not w.healthy
    assert str(w.identity) == "spiffe://cluster.local/ns/default/sa/web-sa"
    request_id, deleted = parse_link_request(
        line({"op": "pod_deleted", "id": 8, "uid": "default/web"}), NODE, TD)
    assert request_id == 8 and deleted == PodDeleted("default/web")
    request_id, superseded = parse_link_request(
        line({"op": "superseded", "id": 9, "by": 4242}), NODE, TD)
    assert request_id == 9 and superseded == Superseded(4242)


@pytest.mark.parametrize("d, problem", [
    (doc(node="node-2"), "not this ztunnel's node"),
    (doc(uid="default/other"), "namespace/name"),
    (doc(uid=None), "workload.uid: is required"),
    (doc(name="Web"), "workload.name"),
    (doc(namespace="a" * 64, uid="a" * 64 + "/web"), "workload.namespace"),
    (doc(serviceAccount="../x"), "serviceAccount"),
    (doc(workloadName="UPPER"), "workloadName"),
    (doc(addresses=[]), "needs at least one pod IP"),
    (doc(addresses=["10.244.1.5", "10.244.1.6", "fd00::1"]), "1 or 2 distinct"),
    (doc(addresses=["10.244.1.5", "10.244.1.5"]), "1 or 2 distinct"),
    (doc(addresses=["not-an-ip"]), "not an IP address"),
    (doc(addresses=["127.0.0.1"]), "not a pod address"),
    (doc(addresses=["0.0.0.0"]), "not a pod address"),
    (doc(addresses=["224.0.0.1"]), "not a pod address"),
    (doc(addresses=["169.254.1.1"]), "not a pod address"),
    (doc(labels={"a": 1}), "label"),
    (doc(labels={"a": "x" * 64}), "label"),
    (doc(labels={f"k{i}": "v" for i in range(65)}), "at most 64"),
    (doc(labels=["app"]), "mapping"),
    (doc(protocol="TCP"), "unknown field"),
    (doc(status="Healthy"), "unknown field"),
    ({**doc(), "extra": 1}, "unknown field"),
    ({**doc(), "id": "7"}, "id: expected an integer"),
    ({**doc(), "id": True}, "id: expected an integer"),
    ({**doc(), "id": -1}, "id: expected an integer"),
    ({**doc(), "op": "pod_exploded"}, "op: 'pod_exploded' is not one of"),
    ({"op": "pod_added", "id": 1}, "workload.uid: is required"),
    ({"op": "pod_deleted", "id": 1, "uid": "no-slash"}, "uid (name)"),
    ({"op": "pod_deleted", "id": 1, "uid": 5}, "uid (namespace)"),
    ({"op": "superseded", "id": 1}, "by: expected a pid"),
    ({"op": "superseded", "id": 1, "by": 0}, "by: expected a pid"),
    ({"op": "superseded", "id": 1, "by": True}, "by: expected a pid"),
    ({"op": "superseded", "id": 1, "by": 1, "x": 1}, "unknown field"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_requests_are_refused_with_the_reason(d: Any, problem: str) -> None:
    with pytest.raises(LinkRequestError) as e:
        parse_link_request(line(d), NODE, TD)
    assert problem in str(e.value), str(e.value)


def test_the_id_comes_back_with_a_refusal_once_it_was_read() -> None:
    with pytest.raises(LinkRequestError) as e:
        parse_link_request(line(doc(node="elsewhere")), NODE, TD)
    assert e.value.request_id == 7
    with pytest.raises(LinkRequestError) as e:
        parse_link_request(b"{not json", NODE, TD)
    assert e.value.request_id is None and "not a JSON line" in str(e.value)


def test_an_oversize_request_is_refused_before_it_is_parsed() -> None:
    big = line(doc(labels={"a": "b" * 40, "pad": "x" * MAX_REQUEST}))
    with pytest.raises(LinkRequestError, match=f"the limit is {MAX_REQUEST}"):
        parse_link_request(big, NODE, TD)


# -- the hold decision and its settings ------------------------------------------------------


@pytest.mark.parametrize("settings, total, from_source, refusal", [
    ({}, 0, 0, None),
    ({"pod_start_hold": 0}, 0, 0, "disabled"),
    ({"pod_start_hold_max": 2}, 2, 0, OVER_TOTAL),
    ({"pod_start_hold_max": 2}, 1, 0, None),
    ({"pod_start_hold_per_source": 3}, 10, 3, OVER_SOURCE),
    ({"pod_start_hold_per_source": 3}, 10, 2, None),
])
def test_hold_refusal(settings: dict[str, Any], total: int, from_source: int,
                      refusal: str | None) -> None:
    config = ZtunnelConfig.from_mapping({"node": "n", **settings})
    assert hold_refusal(config, total, from_source) == refusal


def test_pod_start_flags_match_the_config_defaults() -> None:
    config = ZtunnelConfig(node="n")
    assert {n for n, _, _, _ in POD_START} == \
        {f.name for f in dataclasses.fields(config) if f.name.startswith("pod_start_")}
    for name, kind, default, _ in POD_START:
        assert getattr(config, name) == default and isinstance(default, kind), name


@pytest.mark.parametrize("settings, problem", [
    ({"pod_start_hold": -1}, "pod_start_hold"),
    ({"pod_start_hold": 61}, "at most 60"),
    ({"pod_start_provisional_max_age": 0}, "pod_start_provisional_max_age"),
    ({"pod_start_hold_max": 0}, "pod_start_hold_max"),
    ({"pod_start_hold_per_source": True}, "pod_start_hold_per_source"),
    ({"pod_start_provisional_max": 0}, "pod_start_provisional_max"),
])
def test_bad_pod_start_settings_are_refused(settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        ZtunnelConfig.from_mapping({"node": "n", **settings})


# Found by fuzz/link_request.py (inputs kept as fuzz/corpus/link_request/crash-*): deep nesting
# raised RecursionError out of the parser, and an unknown field's name of any length came back
# in the refusal (sent to the agent and logged).
def test_deeply_nested_line_is_refused_not_raised() -> None:
    with pytest.raises(LinkRequestError, match="nested too deeply"):
        parse_link_request(b"[" * 5000 + b"]" * 5000, "node-1", "cluster.local")


def test_refusal_of_an_unknown_field_is_bounded() -> None:
    line = json.dumps({"op": "pod_added", "id": 7, "workload": {"x" * 10000: 1}}).encode()
    with pytest.raises(LinkRequestError) as e:
        parse_link_request(line, "node-1", "cluster.local")
    assert "unknown field" in str(e.value) and len(str(e.value)) < 400

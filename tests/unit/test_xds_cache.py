"""XdsCache: snapshots are validated and packed once; watchers of a key are woken on change."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2

from controller.xds import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, XdsCache
from controller.xds.cache import push_order, short_type


def test_set_packs_every_resource_and_get_returns_it() -> None:
    cache = XdsCache()
    cluster = cluster_pb2.Cluster(name="c1")
    snap = cache.set("ns/gw", "7", {CLUSTER_TYPE: {"c1": cluster}})
    assert cache.get("ns/gw") is snap and cache.keys() == ["ns/gw"]
    assert snap.version == "7" and snap.resources[CLUSTER_TYPE]["c1"] == cluster
    packed = snap.packed_of(CLUSTER_TYPE)["c1"]
    assert packed.type_url == CLUSTER_TYPE
    out = cluster_pb2.Cluster()
    assert packed.Unpack(out) and out == cluster
    assert snap.packed_of(LISTENER_TYPE) == {}
    # Serialized at `set`: a later mutation of the caller's message changes nothing served.
    cluster.name = "other"
    assert snap.packed_of(CLUSTER_TYPE)["c1"].Unpack(out) and out.name == "c1"


@pytest.mark.parametrize(("type_url", "name", "message", "error"), [
    (CLUSTER_TYPE, "c1", listener_pb2.Listener(name="c1"), "is a envoy.config.listener"),
    (CLUSTER_TYPE, "c1", cluster_pb2.Cluster(name="c2"), "has name 'c2'"),
    (ENDPOINT_TYPE, "c1", endpoint_pb2.ClusterLoadAssignment(cluster_name="x"),
     "has cluster_name 'x'"),
    ("envoy.config.cluster.v3.Cluster", "c1", cluster_pb2.Cluster(name="c1"),
     "does not start with"),
])
def test_set_refuses_mismatched_resources_and_changes_nothing(
        type_url: str, name: str, message: listener_pb2.Listener, error: str) -> None:
    cache = XdsCache()
    woken: list[int] = []
    cache.watch("k", lambda: woken.append(1))
    with pytest.raises(ValueError, match=error):
        cache.set("k", "1", {type_url: {name: message}})
    assert cache.get("k") is None and woken == []


def test_empty_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        XdsCache().set("k", "", {})


def test_watchers_of_a_key_are_woken_and_can_stop() -> None:
    cache = XdsCache()
    seen: list[str] = []
    stop_a = cache.watch("a", lambda: seen.append("a"))
    cache.watch("b", lambda: seen.append("b"))

    def broken() -> None:
        raise RuntimeError("boom")

    cache.watch("a", broken)  # does not keep the others from being woken
    cache.set("a", "1", {})
    cache.set("b", "1", {})
    assert seen == ["a", "b"]
    cache.remove("a")
    assert seen == ["a", "b", "a"] and cache.get("a") is None
    cache.remove("a")  # unknown key: no wake-up
    assert seen == ["a", "b", "a"]
    stop_a()
    cache.set("a", "2", {})
    assert seen == ["a", "b", "a"]


def test_push_order_and_short_names() -> None:
    other = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
    assert push_order({other, LISTENER_TYPE, ENDPOINT_TYPE, CLUSTER_TYPE}) == [
        CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, other]
    assert [short_type(t) for t in (CLUSTER_TYPE, LISTENER_TYPE, other)] == [
        "cds", "lds", "TypedExtensionConfig"]

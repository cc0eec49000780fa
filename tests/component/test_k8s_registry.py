"""Kubernetes mode against the in-repo API-server double, driven by the real client.

The client is the real ``kubernetes_asyncio`` (configured from a generated kubeconfig, over
loopback HTTP); the double (``tests/k8s_double``) serves the real wire protocol and lets each
test compact history, drop streams, send bookmarks and fail requests. Its request log shows how
the client resumed. No real API server can be installed on our machines (docs/kubernetes.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial

import pytest
from kubernetes_asyncio import client

from controller.kubernetes_feed import KubernetesFeed
from controller.registry.k8s_watch import Backoff
from controller.registry.kubernetes import KubernetesRegistry, TokenReviewAuthenticator
from controller.registry.model import RegistrySnapshot
from controller.registry.translate import mesh_config
from controller.waypoint.parse import resolve_faults
from mesh.spiffe import SpiffeId
from mesh.state.model import Action, MeshConfig, MtlsMode, Protocol, WaypointRef, Workload
from tests.component.waiting import until
from tests.k8s_double import objects as o
from tests.k8s_double.server import ApiServerDouble, ServiceAccountToken

TD = "cluster.local"


def make_registry(api: client.ApiClient) -> KubernetesRegistry:
    return KubernetesRegistry(api, debounce=0.02,
                              backoff=lambda: Backoff(initial=0.05, cap=0.2),
                              watch_timeout=(60, 90))


class Snapshots:
    """The registry's snapshot stream, read with a deadline and a condition."""

    def __init__(self, registry: KubernetesRegistry) -> None:
        self._it = registry.snapshots()
        self.last: RegistrySnapshot | None = None

    async def until(self, cond: Callable[[MeshConfig], bool], within: float = 1.0) \
            -> MeshConfig:
        async with asyncio.timeout(within):
            while True:
                if self.last is not None:
                    cfg = mesh_config(self.last, TD, self.last.revision)
                    if cond(cfg):
                        return cfg
                prev = self.last.revision if self.last else 0
                self.last = await anext(self._it)
                assert self.last.revision > prev

    async def close(self) -> None:
        await self._it.aclose()  # type: ignore[attr-defined]


@pytest.fixture
async def registry(api: client.ApiClient) -> AsyncIterator[KubernetesRegistry]:
    async with make_registry(api) as r:
        yield r


@pytest.fixture
async def snaps(registry: KubernetesRegistry) -> AsyncIterator[Snapshots]:
    s = Snapshots(registry)
    yield s
    await s.close()


eventually = partial(until, limit=1.0)


def wl(cfg: MeshConfig, name: str, ns: str = "shop") -> Workload | None:
    return next((w for w in cfg.workloads if w.name == name and w.namespace == ns), None)


def seed(d: ApiServerDouble) -> None:
    d.apply("namespaces", o.namespace("shop"))
    d.apply("namespaces", o.namespace("legacy", ambient=False))
    d.apply("serviceaccounts", o.service_account("echo", "shop"))
    d.apply("pods", o.pod("echo-6f7d9-abcde", "shop", "10.0.1.5", sa="echo",
                          labels={"app": "echo"}, replicaset="echo-6f7d9",
                          ports={"http": 8080}))
    d.apply("pods", o.pod("client", "shop", "10.0.1.6", node="node-b", sa="client",
                          labels={"app": "client"}))
    d.apply("pods", o.pod("opted-out", "shop", "10.0.1.7",
                          labels={"ambit.dev/dataplane-mode": "none"}))
    d.apply("pods", o.pod("pending", "shop", None, node=None))
    d.apply("pods", o.pod("old", "legacy", "10.0.2.5", ready=False))
    d.apply("services", o.service("echo", "shop", "10.96.0.10", {"app": "echo"}, [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
        {"name": "admin", "port": 9000, "targetPort": 9001, "protocol": "TCP"},
    ]))
    d.apply("authorizationpolicies", o.authorization_policy("allow-client", "shop", {
        "selector": {"matchLabels": {"app": "echo"}}, "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}],
                   "to": [{"operation": {"ports": ["8080"]}}]}]}))
    d.apply("peerauthentications", o.peer_authentication("strict", "shop", {
        "mtls": {"mode": "STRICT"}, "portLevelMtls": {"9001": {"mode": "PERMISSIVE"}}}))


async def test_initial_list_builds_the_mesh_config(double: ApiServerDouble,
                                                  api: client.ApiClient) -> None:
    seed(double)
    async with make_registry(api) as registry:
        snaps = Snapshots(registry)
        cfg = await snaps.until(lambda c: True, within=3)
        await snaps.close()
        for plural in registry.reflectors:
            await asyncio.wait_for(double.wait_for_watches(plural), 2)
    echo = wl(cfg, "echo-6f7d9-abcde")
    assert echo is not None and echo.protocol is Protocol.HBONE
    assert str(echo.identity) == "spiffe://cluster.local/ns/shop/sa/echo"
    assert (echo.node, echo.addresses, echo.healthy) == \
        ("node-a", (ipaddress.ip_address("10.0.1.5"),), True)
    assert echo.workload_name == "echo"  # ReplicaSet hash removed: the Deployment's name
    client_wl = wl(cfg, "client")
    assert client_wl is not None and client_wl.node == "node-b"
    assert client_wl.protocol is Protocol.HBONE
    opted = wl(cfg, "opted-out")
    assert opted is not None and opted.protocol is Protocol.TCP
    old = wl(cfg, "old", "legacy")
    assert old is not None and old.protocol is Protocol.TCP and not old.healthy
    assert wl(cfg, "pending") is None  # no IP, no node: nothing can address it
    (svc,) = cfg.services
    assert (svc.key, svc.hostname) == ("shop/echo", "echo.shop.svc.cluster.local")
    assert svc.target_port(80) == 8080  # named targetPort resolved via the pod's ports
    assert svc.target_port(9000) == 9001
    assert svc.selector == (("app", "echo"),)
    (policy,) = cfg.policies
    assert policy.key == "shop/allow-client" and policy.action is Action.ALLOW
    assert policy.rules[0].operations[0].ports == (8080,)
    (pa,) = cfg.peer_authentications
    assert pa.mode is MtlsMode.STRICT and pa.port_modes == ((9001, MtlsMode.PERMISSIVE),)
    assert registry.service_accounts() == frozenset({("shop", "echo")})
    # One list per kind, then watches from the list's resourceVersion with bookmarks.
    for plural in ("namespaces", "pods", "services", "endpointslices", "serviceaccounts",
                   "authorizationpolicies", "peerauthentications"):
        assert len(double.requests_for(plural, watch=False)) == 1, plural
        w = double.requests_for(plural, watch=True)[0]
        assert w.query["allowWatchBookmarks"] in ("true", "True")  # Go ParseBool
        assert w.resource_version is not None and w.resource_version != "0"


async def test_pod_added_labelled_and_opted_out_shows_up_within_a_second(
        double: ApiServerDouble, snaps: Snapshots) -> None:
    double.apply("namespaces", o.namespace("shop"))
    await snaps.until(lambda c: not c.workloads)
    double.apply("pods", o.pod("web", "shop", "10.0.1.9", labels={"app": "web"}))
    cfg = await snaps.until(lambda c: wl(c, "web") is not None)
    web = wl(cfg, "web")
    assert web is not None and web.protocol is Protocol.HBONE
    double.apply("pods", o.pod("web", "shop", "10.0.1.9", labels={"app": "web", "v": "2"}))
    cfg = await snaps.until(lambda c: ("v", "2") in getattr(wl(c, "web"), "labels", ()))
    double.apply("pods", o.pod("web", "shop", "10.0.1.9",
                               labels={"app": "web", "ambit.dev/dataplane-mode": "none"}))
    await snaps.until(lambda c: getattr(wl(c, "web"), "protocol", None) is Protocol.TCP)
    double.delete("pods", "web", "shop")
    await snaps.until(lambda c: wl(c, "web") is None)


async def test_namespace_enabled_later_brings_its_pods_in(
        double: ApiServerDouble, snaps: Snapshots) -> None:
    double.apply("namespaces", o.namespace("late", ambient=False))
    double.apply("pods", o.pod("a", "late", "10.0.3.1"))
    double.apply("pods", o.pod("b", "late", "10.0.3.2"))
    await snaps.until(lambda c: all(
        getattr(wl(c, n, "late"), "protocol", None) is Protocol.TCP for n in "ab"))
    double.apply("namespaces", o.namespace("late", ambient=True))
    await snaps.until(lambda c: all(
        getattr(wl(c, n, "late"), "protocol", None) is Protocol.HBONE for n in "ab"))


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
async def test_gone_forces_a_relist_and_no_event_is_lost(
        double: ApiServerDouble, registry: KubernetesRegistry, snaps: Snapshots,
        as_http_status: bool) -> None:
    double.gone_as_http_status = as_http_status
    double.apply("namespaces", o.namespace("shop"))
    double.apply("pods", o.pod("stays", "shop", "10.0.1.1"))
    double.apply("pods", o.pod("goes", "shop", "10.0.1.2"))
    await snaps.until(lambda c: wl(c, "goes") is not None)
    await asyncio.wait_for(double.wait_for_watches("pods"), 2)
    pods = registry.reflectors["pods"]
    seen_rv = pods.resource_version
    # While the pods watch is down: changes, then compaction of exactly that history.
    double.hold_watches()
    assert double.disconnect_watches("pods") == 1
    double.delete("pods", "goes", "shop")
    double.apply("pods", o.pod("new", "shop", "10.0.1.3"))
    double.apply("pods", o.pod("stays", "shop", "10.0.1.1", labels={"touched": "yes"}))
    double.compact()
    double.release_watches()
    cfg = await snaps.until(lambda c: wl(c, "new") is not None and wl(c, "goes") is None,
                            within=3)
    stays = wl(cfg, "stays")
    assert stays is not None and ("touched", "yes") in stays.labels
    assert pods.relists_after_gone == 1
    watches = double.requests_for("pods", watch=True)
    lists = double.requests_for("pods", watch=False)
    assert watches[1].resource_version == seen_rv  # tried to resume, was told 410
    assert len(lists) == 2 and lists[1].at > watches[1].at  # then relisted
    # ... and watches again from the new list's version.
    await asyncio.wait_for(double.wait_for_watches("pods"), 2)
    assert double.requests_for("pods", watch=True)[-1].resource_version == pods.resource_version


async def test_a_dropped_watch_resumes_from_the_last_resource_version(
        double: ApiServerDouble, registry: KubernetesRegistry, snaps: Snapshots) -> None:
    double.apply("namespaces", o.namespace("shop"))
    await snaps.until(lambda c: True)
    await asyncio.wait_for(double.wait_for_watches("pods"), 2)
    last = double.apply("pods", o.pod("p", "shop", "10.0.1.1"))
    await snaps.until(lambda c: wl(c, "p") is not None)
    assert registry.reflectors["pods"].resource_version == last["metadata"]["resourceVersion"]
    assert double.disconnect_watches("pods") == 1
    await asyncio.wait_for(double.wait_for_watches("pods"), 2)
    watches = double.requests_for("pods", watch=True)
    assert len(watches) == 2
    assert watches[-1].resource_version == last["metadata"]["resourceVersion"]
    assert len(double.requests_for("pods", watch=False)) == 1  # resumed, not relisted
    # Events after the resume still arrive.
    double.apply("pods", o.pod("q", "shop", "10.0.1.2"))
    await snaps.until(lambda c: wl(c, "q") is not None)


async def test_a_watch_ended_by_its_timeout_is_resumed_at_once(
        double: ApiServerDouble, api: client.ApiClient) -> None:
    double.apply("namespaces", o.namespace("shop"))
    registry = KubernetesRegistry(api, debounce=0.02, watch_timeout=(1, 1),
                                  backoff=lambda: Backoff(initial=5, cap=5))
    async with registry:
        snaps = Snapshots(registry)
        await snaps.until(lambda c: True)
        last = double.apply("pods", o.pod("p", "shop", "10.0.1.1"))
        await snaps.until(lambda c: wl(c, "p") is not None)
        await asyncio.wait_for(double.wait_for_watches("pods"), 1)
        first = double.requests_for("pods", watch=True)[0]
        assert first.query["timeoutSeconds"] == "1"
        # The server ends the stream cleanly after 1 s; the client watches again at once
        # (no 5 s backoff: the watch had news), from the last version, without relisting.
        await eventually(lambda: len(double.requests_for("pods", watch=True)) >= 2, limit=3)
        second = double.requests_for("pods", watch=True)[1]
        assert second.resource_version == last["metadata"]["resourceVersion"]
        assert second.at - first.at < 2
        assert len(double.requests_for("pods", watch=False)) == 1
        await snaps.close()


async def test_bookmarks_advance_the_resource_version(
        double: ApiServerDouble, registry: KubernetesRegistry, snaps: Snapshots) -> None:
    double.apply("namespaces", o.namespace("shop"))
    await snaps.until(lambda c: True)
    ns = registry.reflectors["namespaces"]
    before = ns.resource_version
    for i in range(3):  # other kinds move the global resourceVersion on
        double.apply("pods", o.pod(f"p{i}", "shop", f"10.0.1.{i + 1}"))
    await snaps.until(lambda c: len(c.workloads) == 3)
    assert ns.resource_version == before
    await asyncio.wait_for(double.wait_for_watches("namespaces"), 2)
    rv = double.bookmark("namespaces")
    await eventually(lambda: ns.resource_version == str(rv))
    # A resume now starts from the bookmark, which survives compaction of older history.
    double.compact()
    double.disconnect_watches("namespaces")
    await asyncio.wait_for(double.wait_for_watches("namespaces"), 2)
    assert double.requests_for("namespaces", watch=True)[-1].resource_version == str(rv)
    assert ns.relists_after_gone == 0 and ns.lists == 1


async def test_invalid_authorization_policy_is_logged_with_its_field_path(
        double: ApiServerDouble, snaps: Snapshots, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="controller.registry")
    double.apply("namespaces", o.namespace("shop"))
    double.apply("authorizationpolicies", o.authorization_policy("good", "shop", {
        "action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}))
    double.apply("authorizationpolicies", o.authorization_policy("bad", "shop", {
        "selector": {"matchLabels": {"app": "echo"}},
        "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}))
    cfg = await snaps.until(lambda c: len(c.policies) == 2)
    good = next(p for p in cfg.policies if p.name == "good")
    assert good.action is Action.DENY
    assert good.rules[0].sources[0].namespaces[0].value == "legacy"
    # The invalid one does not apply as written: it fails closed (an ALLOW that matches
    # nothing) for the workloads it selects, rather than being dropped (which fails open).
    bad = next(p for p in cfg.policies if p.name == "bad")
    assert (bad.action, bad.rules, bad.selector) == (Action.ALLOW, (), (("app", "echo"),))
    messages = [r.getMessage() for r in caplog.records]
    assert any("AuthorizationPolicy shop/bad: spec.rules[0].to[0].operation.methods" in m
               for m in messages), messages
    assert not any("shop/good" in m for m in messages)
    # The watch lives on: later changes still arrive, and the problem is not re-logged.
    double.apply("pods", o.pod("later", "shop", "10.0.1.4"))
    await snaps.until(lambda c: wl(c, "later") is not None)
    assert sum("shop/bad" in r.getMessage() for r in caplog.records) == 1


async def test_errors_back_off_and_recover_and_missing_crds_count_as_empty(
        double: ApiServerDouble, api: client.ApiClient) -> None:
    double.apply("namespaces", o.namespace("shop"))
    double.apply("pods", o.pod("p", "shop", "10.0.1.1"))
    double.fail_next("pods", 3, status=500)
    double.unserved.add("peerauthentications")
    async with make_registry(api) as registry:
        snaps = Snapshots(registry)
        cfg = await snaps.until(lambda c: wl(c, "p") is not None, within=5)
        await snaps.close()
        assert cfg.peer_authentications == ()
        assert len(double.requests_for("pods", watch=False)) == 4  # 3 failures, then success
        times = [r.at for r in double.requests_for("pods", watch=False)]
        assert all(b - a >= 0.05 for a, b in itertools.pairwise(times))  # backed off
        # A failing watch backs off and resumes from where it was, without relisting.
        rv = registry.reflectors["pods"].resource_version
        double.fail_next("pods", 2, status=503)
        double.disconnect_watches("pods")
        await asyncio.wait_for(double.wait_for_watches("pods"), 3)
        watches = double.requests_for("pods", watch=True)
        assert [w.resource_version for w in watches[-3:]] == [rv, rv, rv]
        assert len(double.requests_for("pods", watch=False)) == 4


async def test_token_review_maps_a_ztunnel_token_to_its_node(
        double: ApiServerDouble, api: client.ApiClient) -> None:
    double.apply("namespaces", o.namespace("ambit-system", ambient=False))
    zt = double.apply("pods", o.pod("ztunnel-x1", "ambit-system", "10.0.0.11", node="node-b",
                                    sa="ztunnel"))
    double.tokens["node-bound"] = ServiceAccountToken("ambit-system", "ztunnel",
                                                      pod_name="ztunnel-a1", pod_uid="u1",
                                                      node_name="node-a")
    double.tokens["pod-bound"] = ServiceAccountToken("ambit-system", "ztunnel",
                                                     pod_name="ztunnel-x1",
                                                     pod_uid=zt["metadata"]["uid"])
    double.tokens["stale-pod"] = ServiceAccountToken("ambit-system", "ztunnel",
                                                     pod_name="ztunnel-x1", pod_uid="old-uid")
    double.tokens["gone-pod"] = ServiceAccountToken("ambit-system", "ztunnel",
                                                    pod_name="ztunnel-zz", pod_uid="u9")
    double.tokens["unbound"] = ServiceAccountToken("ambit-system", "ztunnel")
    double.tokens["app"] = ServiceAccountToken("shop", "client", pod_name="client",
                                               node_name="node-a")
    auth = TokenReviewAuthenticator(api)
    assert await auth.authenticate("node-bound") == "node-a"
    assert await auth.authenticate("pod-bound") == "node-b"
    for token in ("stale-pod", "gone-pod", "unbound", "app", "no-such-token", ""):
        assert await auth.authenticate(token) is None, token
    reviews = [r for r in double.requests if r.path.endswith("/tokenreviews")]
    assert len(reviews) == 7  # every non-empty token was reviewed by the API server
    # An audience the token was not issued for is rejected by the API server.
    picky = TokenReviewAuthenticator(api, audiences=["ambit-ca"])
    assert await picky.authenticate("node-bound") is None


async def test_feed_translates_snapshots_and_issues_only_for_a_nodes_mesh_pods(
        double: ApiServerDouble, api: client.ApiClient) -> None:
    seed(double)
    double.tokens["zt-a"] = ServiceAccountToken("ambit-system", "ztunnel", pod_name="zt",
                                                node_name="node-a")
    async with make_registry(api) as registry:
        feed = KubernetesFeed(registry, TokenReviewAuthenticator(api), TD)
        states = feed.states()
        cfg = await asyncio.wait_for(anext(states), 3)
        assert wl(cfg, "echo-6f7d9-abcde") is not None and cfg.version == "1"
        assert await feed.authenticate("zt-a") == "node-a"
        assert feed.may_issue("node-a", SpiffeId(TD, "shop", "echo"))
        assert not feed.may_issue("node-b", SpiffeId(TD, "shop", "echo"))  # not its pod
        assert not feed.may_issue("node-a", SpiffeId(TD, "shop", "default"))  # opted out
        assert not feed.may_issue("node-a", SpiffeId(TD, "legacy", "default"))  # not ambient
        assert not feed.may_issue("node-a", SpiffeId("other.td", "shop", "echo"))
        double.apply("pods", o.pod("echo-2", "shop", "10.0.1.50", node="node-b", sa="echo"))
        # The issuance policy sees the change first (it builds the snapshot) ...
        await eventually(lambda: feed.may_issue("node-b", SpiffeId(TD, "shop", "echo")))
        # ... and the state feed still delivers that snapshot.
        cfg = await asyncio.wait_for(anext(states), 1)
        assert cfg.version == "2" and wl(cfg, "echo-2") is not None
        await states.aclose()  # type: ignore[attr-defined]


# --- waypoint kinds (issue 5) ----------------------------------------------------------------

async def test_waypoint_kinds_are_watched_and_translated(
        double: ApiServerDouble, registry: KubernetesRegistry, snaps: Snapshots) -> None:
    double.apply("namespaces", o.namespace("shop"))
    double.apply("services", o.service("reviews", "shop", "10.96.0.30", {"app": "reviews"},
                                       [{"name": "http", "port": 9080, "protocol": "TCP"}],
                                       labels={"ambit.dev/use-waypoint": "waypoint"}))
    double.apply("gateways", o.gateway("waypoint", "shop"))
    double.apply("gateways", o.gateway("public", "shop", gateway_class="other-ingress"))
    double.apply("pods", o.pod("waypoint-7d9f-x1", "shop", "10.0.1.40", sa="waypoint",
                               labels={"gateway.networking.k8s.io/gateway-name": "waypoint"}))
    double.apply("httpfaults", o.http_fault("slow", "shop", {"delay": {"fixedDelay": "1s"}}))
    double.apply("httproutes", o.http_route("reviews", "shop", {
        "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
        "rules": [{"filters": [{"type": "ExtensionRef", "extensionRef": {
            "group": "networking.ambit.dev", "kind": "HTTPFault", "name": "slow"}}],
            "backendRefs": [{"name": "reviews", "port": 9080}]}]}))
    cfg = await snaps.until(lambda c: bool(c.services) and wl(c, "waypoint-7d9f-x1") is not None
                            and bool(snaps.last and snaps.last.http_routes
                                     and snaps.last.http_faults), within=3)
    snap = snaps.last
    assert snap is not None
    assert [g.key for g in snap.gateways] == ["shop/waypoint"]  # the ingress is not ours
    (service,) = cfg.services
    assert service.waypoint == WaypointRef("shop", "waypoint")
    instance = wl(cfg, "waypoint-7d9f-x1")
    assert instance is not None and instance.protocol is Protocol.TCP
    (r,) = resolve_faults(snap.http_routes, snap.http_faults)
    assert r.rules[0].fault is not None and r.rules[0].fault.delay_ms == 1000
    # Changes arrive like any other kind's.
    double.delete("httpfaults", "slow", "shop")
    await snaps.until(lambda c: snaps.last is not None and not snaps.last.http_faults)
    double.apply("services", o.service("reviews", "shop", "10.96.0.30", {"app": "reviews"},
                                       [{"name": "http", "port": 9080, "protocol": "TCP"}],
                                       labels={"ambit.dev/use-waypoint": "none"}))
    await snaps.until(lambda c: c.services[0].waypoint is None)


async def test_grpc_and_tcp_routes_and_app_protocol_come_from_the_api(
        double: ApiServerDouble, registry: KubernetesRegistry, snaps: Snapshots) -> None:
    """Issue 18: GRPCRoutes (v1) and TCPRoutes (v1alpha2) are watched; appProtocol is kept."""
    double.apply("namespaces", o.namespace("shop"))
    double.apply("services", o.service("echo", "shop", "10.96.0.31", {"app": "echo"}, [
        {"name": "grpc", "port": 7070, "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"},
        {"name": "db", "port": 5432, "protocol": "TCP"}]))
    double.apply("grpcroutes", o.http_route("echo-grpc", "shop", {
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 7070}],
        "rules": [{"matches": [{"method": {"service": "grpc.Echo"}}],
                   "backendRefs": [{"name": "echo", "port": 7070}]}]}))
    double.apply("tcproutes", o.http_route("echo-db", "shop", {
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 5432}],
        "rules": [{"backendRefs": [{"name": "echo", "port": 5432}]}]}))
    await snaps.until(lambda c: bool(snaps.last and snaps.last.http_routes
                                     and snaps.last.tcp_routes), within=3)
    snap = snaps.last
    assert snap is not None
    (grpc,) = snap.http_routes
    assert grpc.kind == "GRPCRoute" and grpc.rules[0].matches[0].grpc is not None
    assert [r.key for r in snap.tcp_routes] == ["shop/echo-db"]
    (svc,) = snap.services
    assert [p.app_protocol for p in svc.ports] == ["kubernetes.io/h2c", ""]


async def test_missing_gateway_api_crds_do_not_break_the_mesh_and_are_logged_once(
        double: ApiServerDouble, api: client.ApiClient,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="controller.registry")
    double.unserved.update({"gateways", "httproutes", "httpfaults"})
    double.apply("namespaces", o.namespace("shop"))
    double.apply("pods", o.pod("p", "shop", "10.0.1.1"))
    async with make_registry(api) as registry:
        snaps = Snapshots(registry)
        await snaps.until(lambda c: wl(c, "p") is not None, within=3)
        assert snaps.last is not None and snaps.last.gateways == ()
        # Retried (backoff at least 1 s), but warned about once.
        await eventually(lambda: len(double.requests_for("gateways", watch=False)) >= 2,
                         limit=4)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                    and r.getMessage().startswith("gateways:")]
        assert len(warnings) == 1 and "CRD not installed" in warnings[0].getMessage()
        # Installing the CRD later brings the kind in without a restart.
        double.unserved.discard("gateways")
        double.apply("gateways", o.gateway("waypoint", "shop"))
        await snaps.until(lambda c: bool(snaps.last and snaps.last.gateways), within=5)
        assert registry.reflectors["gateways"].not_served is False
        assert any(r.getMessage() == "gateways: now served by the API server"
                   for r in caplog.records)
        await snaps.close()

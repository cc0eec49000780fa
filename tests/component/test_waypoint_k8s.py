"""Waypoints in Kubernetes mode against the in-repo API-server double, with the real client.

The deployer (``controller/waypoint/k8s_deployer.py``) renders and keeps each waypoint
Gateway's ServiceAccount, Deployment, Service and trust-bundle ConfigMap, and writes the
Gateway's status; ``k8s_apply`` creates and deletes waypoint Gateways for the CLI; the CA
accepts a waypoint pod's own token for its own identity only (``k8s_auth``). No real API server
can be installed on our machines (docs/kubernetes.md): the double serves the wire protocol,
allocates cluster IPs, fills in defaults and answers conflicts as one would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import grpc
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.watch import Watch
from prometheus_client import CollectorRegistry

from controller.ca import CertificateAuthority
from controller.ca_service import CertificateService
from controller.kubernetes_feed import KubernetesFeed
from controller.registry.k8s_auth import (
    WORKLOAD_AUDIENCE,
    TokenReviewAuthenticator,
    WorkloadCaller,
    WorkloadScopedPolicy,
)
from controller.registry.k8s_watch import Backoff
from controller.registry.kubernetes import KubernetesRegistry
from controller.waypoint.deploy import (
    CA_ROOT_CONFIGMAP,
    CA_ROOT_KEY,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    REPLICAS_ANNOTATION,
)
from controller.waypoint.k8s_apply import (
    DEPLOYMENTS,
    GATEWAY_API_INSTALL,
    GATEWAYS,
    SERVICES,
    ApiError,
    Rest,
    WaypointApplyError,
    apply_waypoint,
    delete_waypoint,
)
from controller.waypoint.k8s_deployer import GatewayDeployer
from controller.waypoint.model import WAYPOINT_FOR_LABEL, Gateway
from controller.waypoint.parse import parse_gateway
from mesh.api.ambit.v1 import ca_pb2, ca_pb2_grpc
from mesh.ca_client import make_csr
from mesh.ports import GATEWAY_NAME_LABEL
from mesh.spiffe import SpiffeId
from mesh.state.parse import StateError
from tests.component.waiting import until
from tests.k8s_double import objects as o
from tests.k8s_double.server import ApiServerDouble, ServiceAccountToken

TD = "cluster.local"
ROOT = "-----BEGIN CERTIFICATE-----\nMIIBdGVzdC1yb290\n-----END CERTIFICATE-----\n"
IMAGE = "ghcr.io/ambit/ambit:test"
MANAGED = ("serviceaccounts", "services", "deployments")


@pytest.fixture
async def deployer(api: client.ApiClient) -> AsyncIterator[GatewayDeployer]:
    d = GatewayDeployer(
        api, IMAGE, TD, "ambit-controller.ambit-system.svc:15011",
        ca_address="ambit-controller.ambit-system.svc:15012", root_cert_pem=ROOT.encode(),
        debounce=0.02, resync=30.0,
        backoff=lambda: Backoff(initial=0.05, cap=0.2, jitter=0.0),
        watch_backoff=lambda: Backoff(initial=0.05, cap=0.2), watch_timeout=(60, 90))
    await d.start()
    yield d
    await d.stop()


def served(d: ApiServerDouble) -> list[Gateway]:
    """The waypoints the registry serves: the stored Gateways that parse as waypoints."""
    out: list[Gateway] = []
    for (ns, name), obj in sorted(d.store.objects["gateways"].items()):
        with contextlib.suppress(StateError):
            out.append(parse_gateway(name, ns, (obj["metadata"].get("labels") or {}).items(),
                                     obj["spec"]))
    return out


eventually = partial(until, limit=3.0, interval=0.02)


def get(d: ApiServerDouble, plural: str, name: str, ns: str = "shop") -> dict[str, Any] | None:
    return d.store.get(plural, name, ns)


def condition(d: ApiServerDouble, name: str, kind: str) -> dict[str, Any]:
    gw = get(d, "gateways", name)
    assert gw is not None
    for c in (gw.get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            assert isinstance(c, dict)
            return c
    return {}


def programmed(d: ApiServerDouble, name: str) -> bool:
    return condition(d, name, "Programmed").get("status") == "True"


def writes(d: ApiServerDouble) -> list[Any]:
    return [r for r in d.requests if r.method != "GET"]


def container(dep: dict[str, Any] | None) -> dict[str, Any]:
    assert dep is not None
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert isinstance(c, dict)
    return c


# --- the deployer ---------------------------------------------------------------------------

async def test_a_gateway_gets_its_objects_owner_references_and_status(
        double: ApiServerDouble, deployer: GatewayDeployer) -> None:
    double.apply("namespaces", o.namespace("shop"))
    gw = double.apply("gateways", o.gateway("waypoint", "shop"))
    uid = gw["metadata"]["uid"]
    await deployer.reconcile(served(double))
    for plural in MANAGED:
        obj = get(double, plural, "waypoint")
        assert obj is not None, plural
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "name": "waypoint", "uid": uid, "controller": True}]
        assert obj["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY
    dep = get(double, "deployments", "waypoint")
    assert dep is not None and dep["spec"]["replicas"] == 1  # the API server's default
    assert container(dep)["image"] == IMAGE
    cm = get(double, "configmaps", CA_ROOT_CONFIGMAP)
    assert cm is not None and cm["data"] == {CA_ROOT_KEY: ROOT}
    assert [(r["uid"], r["controller"]) for r in cm["metadata"]["ownerReferences"]] == [
        (uid, False)]
    svc = get(double, "services", "waypoint")
    assert svc is not None
    ip = svc["spec"]["clusterIP"]  # allocated by the API server
    status = (get(double, "gateways", "waypoint") or {})["status"]
    assert status["addresses"] == [{"type": "IPAddress", "value": ip}]
    conds = {c["type"]: c for c in status["conditions"]}
    assert (conds["Accepted"]["status"], conds["Accepted"]["reason"]) == ("True", "Accepted")
    assert (conds["Programmed"]["status"], conds["Programmed"]["reason"]) == ("True",
                                                                              "Programmed")
    assert conds["Programmed"]["observedGeneration"] == gw["metadata"]["generation"]
    done = writes(double)
    assert {(r.method, r.path.rsplit("/", 1)[-1]) for r in done} == {
        ("POST", "configmaps"), ("POST", "serviceaccounts"), ("POST", "services"),
        ("POST", "deployments"), ("PATCH", "status")}
    assert all(r.query.get("fieldManager") == "ambit-controller" for r in done)
    # Steady state: the events of our own writes wake passes that write nothing.
    passes = deployer.passes
    await eventually(lambda: deployer.passes > passes)
    await asyncio.sleep(0.3)
    assert writes(double) == done
    assert deployer.problems == {}


async def test_drift_is_repaired_from_watch_events_alone(
        double: ApiServerDouble, deployer: GatewayDeployer) -> None:
    double.apply("namespaces", o.namespace("shop"))
    double.apply("gateways", o.gateway("waypoint", "shop"))
    await deployer.reconcile(served(double))
    first_ip = (get(double, "services", "waypoint") or {})["spec"]["clusterIP"]
    # Someone edits the Deployment (image, an added capability, a label of theirs) and
    # deletes the Service; no registry change follows, only watch events.
    dep = get(double, "deployments", "waypoint")
    assert dep is not None
    c = container(dep)
    c["image"] = "evil/image:1"
    c["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]
    dep["metadata"]["labels"]["team"] = "payments"
    double.apply("deployments", dep)
    double.delete("services", "waypoint", "shop")
    await eventually(lambda: get(double, "services", "waypoint") is not None
                     and container(get(double, "deployments", "waypoint"))["image"] == IMAGE)
    fixed = get(double, "deployments", "waypoint")
    assert fixed is not None
    assert container(fixed)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert fixed["metadata"]["labels"]["team"] == "payments"  # theirs, kept
    new_ip = (get(double, "services", "waypoint") or {})["spec"]["clusterIP"]
    assert new_ip != first_ip
    await eventually(lambda: (get(double, "gateways", "waypoint") or {})["status"][
        "addresses"] == [{"type": "IPAddress", "value": new_ip}])
    # Our label removed: the watch sees the object leave; it is taken back (owner reference).
    sa = get(double, "serviceaccounts", "waypoint")
    assert sa is not None
    del sa["metadata"]["labels"][MANAGED_BY_LABEL]
    double.apply("serviceaccounts", sa)
    await eventually(lambda: (get(double, "serviceaccounts", "waypoint") or {})["metadata"][
        "labels"].get(MANAGED_BY_LABEL) == MANAGED_BY)
    # An immutable field (the selector) drifted: the Deployment is replaced.
    dep = get(double, "deployments", "waypoint")
    assert dep is not None
    old_uid = dep["metadata"]["uid"]
    dep["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    double.apply("deployments", dep)
    await eventually(lambda: (get(double, "deployments", "waypoint") or {}).get(
        "metadata", {}).get("uid", old_uid) != old_uid)
    await eventually(lambda: programmed(double, "waypoint"))
    # The Gateway deleted and created again (a new uid): its objects follow the new owner.
    double.delete("gateways", "waypoint", "shop")
    new_uid = double.apply("gateways", o.gateway("waypoint", "shop"))["metadata"]["uid"]
    await deployer.reconcile(served(double))
    await eventually(lambda: all(
        [r["uid"] for r in (get(double, p, "waypoint") or {"metadata": {}})["metadata"].get(
            "ownerReferences", [])] == [new_uid] for p in MANAGED))
    assert deployer.problems == {}


async def test_objects_go_with_their_gateway_and_nothing_else_is_touched(
        double: ApiServerDouble, deployer: GatewayDeployer) -> None:
    double.apply("namespaces", o.namespace("shop"))
    double.apply("gateways", o.gateway("waypoint", "shop"))
    double.apply("gateways", o.gateway("stays", "shop"))
    # Labelled as ours but owned by no Gateway, and not labelled at all: never deleted.
    double.apply("configmaps", {"metadata": {"name": "labelled", "namespace": "shop",
                                             "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
                                "data": {}})
    double.apply("deployments", o.deployment("app", "shop", {"app": "app"}))
    await deployer.reconcile(served(double))
    assert all(get(double, p, n) is not None for p in MANAGED for n in ("waypoint", "stays"))
    double.delete("gateways", "waypoint", "shop")
    await deployer.reconcile(served(double))
    await eventually(lambda: all(get(double, p, "waypoint") is None for p in MANAGED))
    assert all(get(double, p, "stays") is not None for p in MANAGED)
    cm = get(double, "configmaps", CA_ROOT_CONFIGMAP)
    assert cm is not None  # still used by "stays"
    # The last waypoint of the namespace goes: so does its trust bundle.
    double.delete("gateways", "stays", "shop")
    await deployer.reconcile(served(double))
    await eventually(lambda: get(double, "configmaps", CA_ROOT_CONFIGMAP) is None
                     and all(get(double, p, "stays") is None for p in MANAGED))
    assert get(double, "configmaps", "labelled") is not None
    assert get(double, "deployments", "app") is not None
    deletes = [r for r in double.requests if r.method == "DELETE"]
    assert len(deletes) == 7


async def test_a_failing_gateway_does_not_block_the_others(
        double: ApiServerDouble, deployer: GatewayDeployer) -> None:
    double.apply("namespaces", o.namespace("shop"))
    # Someone else's Deployment has the name the "broken" waypoint needs.
    double.apply("deployments", o.deployment("broken", "shop", {"app": "broken"}))
    for name in ("broken", "good", "flaky"):
        double.apply("gateways", o.gateway(name, "shop"))
    double.fail_writes("serviceaccounts", 2, status=500, name="flaky")
    await deployer.reconcile(served(double))
    assert programmed(double, "good")
    assert all(get(double, p, "good") is not None for p in MANAGED)
    broken = condition(double, "broken", "Programmed")
    assert (broken["status"], broken["reason"]) == ("False", "Invalid")
    assert "Deployment shop/broken already exists and is not managed by Ambit" in \
        broken["message"]
    foreign = get(double, "deployments", "broken")
    assert foreign is not None and container(foreign)["image"] == "example/app:1"
    assert MANAGED_BY_LABEL not in foreign["metadata"]["labels"]
    flaky = condition(double, "flaky", "Programmed")
    assert (flaky["status"], flaky["reason"]) == ("False", "Pending")
    assert "cannot create ServiceAccount shop/flaky" in flaky["message"]
    # Retried with backoff: the injected faults run out and "flaky" gets everything.
    await eventually(lambda: programmed(double, "flaky"))
    # Once the obstacle is gone, "broken" recovers on its own retries.
    double.delete("deployments", "broken", "shop")
    await eventually(lambda: programmed(double, "broken"))
    dep = get(double, "deployments", "broken")
    assert dep is not None and container(dep)["image"] == IMAGE
    await eventually(lambda: deployer.problems == {})


async def test_invalid_gateways_and_annotations_are_reported_in_status(
        double: ApiServerDouble, deployer: GatewayDeployer) -> None:
    double.apply("namespaces", o.namespace("shop"))
    double.apply("gateways", o.gateway("http", "shop", port=80))
    double.apply("gateways", o.gateway("typo", "shop",
                                       annotations={REPLICAS_ANNOTATION: "many"}))
    double.apply("gateways", o.gateway("scaled", "shop",
                                       annotations={REPLICAS_ANNOTATION: "3"}))
    public = double.apply("gateways", o.gateway("public", "shop", gateway_class="other"))
    await deployer.reconcile(served(double))
    http = condition(double, "http", "Accepted")
    assert (http["status"], http["reason"]) == ("False", "ListenersNotValid")
    assert "spec.listeners[0].port" in http["message"]
    typo = condition(double, "typo", "Accepted")
    assert (typo["status"], typo["reason"]) == ("False", "InvalidParameters")
    assert REPLICAS_ANNOTATION in typo["message"]
    assert all(get(double, p, n) is None for p in MANAGED for n in ("http", "typo", "public"))
    assert (get(double, "deployments", "scaled") or {})["spec"]["replicas"] == 3
    assert get(double, "gateways", "public") == public  # another class: not ours to touch
    # Fixing the annotation needs no registry change (annotations are not in the model):
    # the deployer's own Gateway watch picks it up.
    fixed = get(double, "gateways", "typo")
    assert fixed is not None
    fixed["metadata"]["annotations"][REPLICAS_ANNOTATION] = "2"
    double.apply("gateways", fixed)
    await eventually(lambda: (get(double, "deployments", "typo") or {}).get(
        "spec", {}).get("replicas") == 2 and programmed(double, "typo"))
    # Scaling a waypoint whose Gateway sets no count is left alone.
    double.apply("gateways", o.gateway("free", "shop"))
    # The registry may be ahead of the deployer's own Gateway watch: its event then runs
    # the pass that deploys.
    await deployer.reconcile(served(double))
    await eventually(lambda: programmed(double, "free"))
    dep = get(double, "deployments", "free")
    assert dep is not None
    dep["spec"]["replicas"] = 4
    double.apply("deployments", dep)
    await asyncio.sleep(0.3)
    assert (get(double, "deployments", "free") or {})["spec"]["replicas"] == 4


async def test_the_gateway_api_not_installed_leaves_the_deployer_idle(
        double: ApiServerDouble, deployer: GatewayDeployer) -> None:
    double.unserved.add("gateways")
    double.apply("namespaces", o.namespace("shop"))
    await deployer.reconcile([])
    assert writes(double) == []


# --- ambit waypoint apply/delete ------------------------------------------------------------

async def test_apply_and_delete_waypoint_round_trip(
        double: ApiServerDouble, api: client.ApiClient, deployer: GatewayDeployer) -> None:
    with pytest.raises(WaypointApplyError, match="kubectl create namespace shop"):
        await apply_waypoint(api, "shop", "waypoint")
    double.apply("namespaces", o.namespace("shop"))
    summary = await apply_waypoint(api, "shop", "waypoint")
    assert summary.startswith("Gateway shop/waypoint created")
    stored = get(double, "gateways", "waypoint")
    assert stored is not None
    assert stored["metadata"]["labels"] == {WAYPOINT_FOR_LABEL: "service"}
    assert stored["spec"]["gatewayClassName"] == "ambit-waypoint"
    assert [(x["name"], x["port"], x["protocol"]) for x in stored["spec"]["listeners"]] == [
        ("mesh", 15008, "HBONE")]
    assert stored["status"]["conditions"][0]["reason"] == "Pending"  # the CRD's default
    (model,) = served(double)
    assert (model.key, model.waypoint_for) == ("shop/waypoint", "service")
    assert "unchanged" in await apply_waypoint(api, "shop", "waypoint")
    assert "configured" in await apply_waypoint(api, "shop", "waypoint", waypoint_for="all")
    assert (get(double, "gateways", "waypoint") or {})["metadata"]["labels"][
        WAYPOINT_FOR_LABEL] == "all"
    await deployer.reconcile(served(double))
    assert programmed(double, "waypoint")
    summary = await delete_waypoint(api, "shop", "waypoint")
    assert summary.startswith("Gateway shop/waypoint deleted")
    await deployer.reconcile(served(double))
    await eventually(lambda: all(get(double, p, "waypoint") is None for p in MANAGED))
    with pytest.raises(WaypointApplyError, match="does not exist"):
        await delete_waypoint(api, "shop", "waypoint")
    assert "not found" in await delete_waypoint(api, "shop", "waypoint", missing_ok=True)


async def test_apply_and_delete_refuse_what_is_not_theirs_and_say_what_to_do(
        double: ApiServerDouble, api: client.ApiClient) -> None:
    double.apply("namespaces", o.namespace("shop"))
    ingress = double.apply("gateways", o.gateway("public", "shop", gateway_class="nginx"))
    with pytest.raises(WaypointApplyError, match="another implementation"):
        await apply_waypoint(api, "shop", "public")
    with pytest.raises(WaypointApplyError, match="not a waypoint"):
        await delete_waypoint(api, "shop", "public")
    assert get(double, "gateways", "public") == ingress
    with pytest.raises(WaypointApplyError, match="waypoint-for 'everything'"):
        await apply_waypoint(api, "shop", "w", waypoint_for="everything")
    double.unserved.add("gateways")
    with pytest.raises(WaypointApplyError) as err:
        await apply_waypoint(api, "shop", "waypoint")
    assert "Gateway API CRDs are not installed" in str(err.value)
    assert GATEWAY_API_INSTALL in str(err.value)
    assert "standard-install.yaml" in GATEWAY_API_INSTALL


# --- the CA and waypoint tokens -------------------------------------------------------------

async def test_a_waypoint_pods_own_token_obtains_only_its_own_identity(
        double: ApiServerDouble, api: client.ApiClient) -> None:
    double.apply("namespaces", o.namespace("shop"))
    wp_labels = {GATEWAY_NAME_LABEL: "waypoint", "ambit.dev/dataplane-mode": "none"}
    wp = double.apply("pods", o.pod("waypoint-5f6-abc", "shop", "10.0.1.40", node="node-a",
                                    sa="waypoint", labels=wp_labels))
    double.apply("pods", o.pod("app-1", "shop", "10.0.1.41", node="node-a", sa="app"))
    aud = (WORKLOAD_AUDIENCE,)
    double.tokens.update({
        "wp": ServiceAccountToken("shop", "waypoint", pod_name="waypoint-5f6-abc",
                                  pod_uid=wp["metadata"]["uid"], node_name="node-a",
                                  audiences=aud),
        "wp-pod-bound": ServiceAccountToken("shop", "waypoint", pod_name="waypoint-5f6-abc",
                                            pod_uid=wp["metadata"]["uid"], audiences=aud),
        "wp-api-token": ServiceAccountToken("shop", "waypoint", pod_name="waypoint-5f6-abc",
                                            node_name="node-a"),  # the automounted kind
        "wp-unbound": ServiceAccountToken("shop", "waypoint", audiences=aud),
        "app": ServiceAccountToken("shop", "app", pod_name="app-1", node_name="node-a",
                                   audiences=aud),
        "zt": ServiceAccountToken("ambit-system", "ztunnel", pod_name="zt-a",
                                  node_name="node-a"),
    })
    auth = TokenReviewAuthenticator(api, workload_audiences=[WORKLOAD_AUDIENCE])
    caller = await auth.authenticate("wp")
    assert isinstance(caller, WorkloadCaller)
    assert (caller.node, caller.namespace, caller.service_account, caller.pod) == (
        "node-a", "shop", "waypoint", "waypoint-5f6-abc")
    by_pod = await auth.authenticate("wp-pod-bound")  # no node-name extra: read the pod
    assert isinstance(by_pod, WorkloadCaller) and by_pod.node == "node-a"
    assert await auth.authenticate("wp-api-token") is None  # not issued for the CA
    assert await auth.authenticate("wp-unbound") is None  # not bound to a pod
    zt = await auth.authenticate("zt")
    assert zt == "node-a" and not isinstance(zt, WorkloadCaller)
    # Off unless asked for: the ztunnel-only authenticator refuses the waypoint's token.
    assert await TokenReviewAuthenticator(api).authenticate("wp") is None

    registry = KubernetesRegistry(api, debounce=0.02,
                                  backoff=lambda: Backoff(initial=0.05, cap=0.2),
                                  watch_timeout=(60, 90))
    async with registry:
        await asyncio.wait_for(registry.wait_synced(), 3)
        feed = KubernetesFeed(registry, auth, TD)
        ca = CertificateAuthority.generate(TD)
        scoped = CertificateService(ca, TD, feed, WorkloadScopedPolicy(feed, registry.snapshot,
                                                                       TD), CollectorRegistry())
        unscoped = CertificateService(ca, TD, feed, feed, CollectorRegistry())
        async with serve_ca(scoped) as ask, serve_ca(unscoped) as ask_unscoped:
            waypoint, app = SpiffeId(TD, "shop", "waypoint"), SpiffeId(TD, "shop", "app")
            assert await ask("wp", waypoint) == grpc.StatusCode.OK
            assert await ask("wp-pod-bound", waypoint) == grpc.StatusCode.OK
            # Another identity on the same node: only the ztunnel may have it.
            assert await ask("wp", app) == grpc.StatusCode.PERMISSION_DENIED
            assert await ask("zt", app) == grpc.StatusCode.OK
            # A mesh app's own CA token: it is not a waypoint pod.
            assert await ask("app", app) == grpc.StatusCode.PERMISSION_DENIED
            assert await ask("wp-api-token", waypoint) == grpc.StatusCode.UNAUTHENTICATED
            # Without the scoped policy a waypoint token matches nothing (fail closed).
            assert await ask_unscoped("wp", waypoint) == grpc.StatusCode.PERMISSION_DENIED
            assert await ask_unscoped("zt", app) == grpc.StatusCode.OK
            # The pod rescheduled elsewhere: its old token (node-a) no longer fits.
            double.apply("pods", o.pod("waypoint-5f6-abc", "shop", "10.0.2.40", node="node-b",
                                       sa="waypoint", labels=wp_labels))
            await eventually(lambda: any(p.node == "node-b" for p in registry.snapshot().pods))
            assert await ask("wp", waypoint) == grpc.StatusCode.PERMISSION_DENIED


class serve_ca:
    """A CertificateService on loopback; yields ``ask(token, identity) -> status code``."""

    def __init__(self, service: CertificateService) -> None:
        self.service = service
        self.server = grpc.aio.server()
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Callable[[str, SpiffeId], Any]:
        self.service.add_to_server(self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = ca_pb2_grpc.CertificateServiceStub(self.channel)

        async def ask(token: str, identity: SpiffeId) -> grpc.StatusCode:
            _, csr = make_csr(identity)
            try:
                await stub.CreateCertificate(
                    ca_pb2.CreateCertificateRequest(csr_pem=csr),
                    metadata=(("authorization", f"Bearer {token}"),), timeout=5)
            except grpc.aio.AioRpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        return ask

    async def __aexit__(self, *exc: object) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.server.stop(None)


def test_timestamps_are_rfc3339() -> None:
    from controller.waypoint.k8s_deployer import _rfc3339

    assert _rfc3339(dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)) == "2024-05-01T12:00:00Z"


# --- the double answers writes as an API server does ----------------------------------------

async def test_the_double_answers_writes_like_an_api_server(
        double: ApiServerDouble, api: client.ApiClient) -> None:
    rest = Rest(api)
    with pytest.raises(ApiError) as err:
        await rest.create(SERVICES, "shop", {"metadata": {"name": "s"}, "spec": {}}, "t")
    assert (err.value.status, err.value.message) == (404, 'namespaces "shop" not found')
    double.apply("namespaces", o.namespace("shop"))
    svc = await rest.create(SERVICES, "shop", {"metadata": {"name": "s", "labels": {"a": "1"}},
                                               "spec": {"ports": [{"port": 80}]},
                                               "status": {"x": 1}}, "t")
    meta, spec = svc["metadata"], svc["spec"]
    assert meta["uid"] and meta["resourceVersion"] and meta["generation"] == 1
    assert spec["clusterIP"].startswith("10.96.") and spec["clusterIPs"] == [spec["clusterIP"]]
    assert spec["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    assert "status" not in svc  # a subresource: not written on create
    with pytest.raises(ApiError) as err:
        await rest.create(SERVICES, "shop", {"metadata": {"name": "s"}, "spec": {}}, "t")
    assert err.value.already_exists and err.value.details["name"] == "s"
    changed = {**svc, "spec": {**spec, "clusterIP": "10.96.9.9", "clusterIPs": ["10.96.9.9"]}}
    with pytest.raises(ApiError) as err:
        await rest.replace(SERVICES, "shop", "s", changed, "t")
    assert err.value.status == 422 and "may not change once set" in err.value.message
    relabelled = {**svc, "metadata": {**meta, "labels": {"a": "2"}}}
    newer = await rest.replace(SERVICES, "shop", "s", relabelled, "t")
    assert newer["metadata"]["generation"] == 1  # the spec did not change
    with pytest.raises(ApiError) as err:  # the version read before that write: stale
        await rest.replace(SERVICES, "shop", "s", relabelled, "t")
    assert (err.value.status, err.value.reason) == (409, "Conflict")
    # Label selectors on lists; preconditions on delete.
    listed = await rest.request("GET", "/api/v1/services", query=[("labelSelector", "a in (2)")])
    assert [i["metadata"]["name"] for i in listed["items"]] == ["s"]
    listed = await rest.request("GET", "/api/v1/services", query=[("labelSelector", "a!=2")])
    assert listed["items"] == []
    with pytest.raises(ApiError) as err:
        await rest.delete(SERVICES, "shop", "s", uid="someone-else")
    assert err.value.status == 409 and "Precondition failed" in err.value.message
    assert await rest.delete(SERVICES, "shop", "s", uid=meta["uid"]) is True
    assert await rest.delete(SERVICES, "shop", "s") is False
    # Deployments: the selector must match the template and cannot change.
    dep = o.deployment("d", "shop", {"app": "d"})
    created = await rest.create(DEPLOYMENTS, "shop", dep, "t")
    pod = created["spec"]["template"]["spec"]
    assert (pod["restartPolicy"], pod["containers"][0]["imagePullPolicy"]) == ("Always",
                                                                              "IfNotPresent")
    created["spec"]["selector"] = {"matchLabels": {"app": "e"}}
    created["spec"]["template"]["metadata"]["labels"] = {"app": "e"}
    with pytest.raises(ApiError) as err:
        await rest.replace(DEPLOYMENTS, "shop", "d", created, "t")
    assert err.value.status == 422 and "field is immutable" in err.value.message
    # Gateways (a CRD): status subresource, generation, resourceVersion required on PUT,
    # no strategic merge.
    gw = await rest.create(GATEWAYS, "shop", o.gateway("g", "shop"), "t")
    assert gw["metadata"]["generation"] == 1
    patched = await rest.patch_status(GATEWAYS, "shop", "g", {
        "status": {"addresses": [{"type": "IPAddress", "value": "10.0.0.1"}]},
        "spec": {"gatewayClassName": "ignored"}}, "t")
    assert patched["spec"]["gatewayClassName"] == "ambit-waypoint"
    assert patched["status"]["addresses"] == [{"type": "IPAddress", "value": "10.0.0.1"}]
    assert patched["metadata"]["generation"] == 1
    body = {**patched, "spec": {**patched["spec"], "listeners": []}, "status": {}}
    updated = await rest.replace(GATEWAYS, "shop", "g", body, "t")
    assert updated["metadata"]["generation"] == 2 and updated["status"] == patched["status"]
    body["metadata"] = {k: v for k, v in body["metadata"].items() if k != "resourceVersion"}
    with pytest.raises(ApiError) as err:
        await rest.replace(GATEWAYS, "shop", "g", body, "t")
    assert err.value.status == 422 and "must be specified for an update" in err.value.message
    with pytest.raises(ApiError) as err:
        await rest.request("PATCH", GATEWAYS.path("shop", "g"), body={},
                           content_type="application/strategic-merge-patch+json")
    assert err.value.status == 415
    assert await rest.served(GATEWAYS) and await rest.served(DEPLOYMENTS)
    double.unserved.add("gateways")
    assert not await rest.served(GATEWAYS)


async def test_label_selector_watches_see_objects_enter_and_leave(
        double: ApiServerDouble, api: client.ApiClient) -> None:
    double.apply("namespaces", o.namespace("shop"))
    seen: list[tuple[str, str]] = []
    watch = Watch(return_type="object")
    stream = watch.stream(client.CoreV1Api(api).list_config_map_for_all_namespaces,
                          label_selector="team=a", resource_version="1", timeout_seconds=5)

    async def read() -> None:
        async for event in stream:
            seen.append((event["type"], event["object"]["metadata"]["name"]))
            if len(seen) == 3:
                return

    reader = asyncio.create_task(read())
    await asyncio.wait_for(double.wait_for_watches("configmaps"), 2)
    cm = {"metadata": {"name": "c", "namespace": "shop", "labels": {"team": "b"}}}
    double.apply("configmaps", cm)  # not selected
    cm["metadata"]["labels"]["team"] = "a"
    double.apply("configmaps", cm)  # starts matching: ADDED
    cm["metadata"]["labels"]["extra"] = "x"
    double.apply("configmaps", cm)  # still matching: MODIFIED
    cm["metadata"]["labels"]["team"] = "c"
    double.apply("configmaps", cm)  # stops matching: DELETED
    await asyncio.wait_for(reader, 3)
    await watch.close()
    assert seen == [("ADDED", "c"), ("MODIFIED", "c"), ("DELETED", "c")]

"""``ambit install``, ``ambit uninstall`` and ``ambit status`` against the API-server double,
through the real ``kubernetes_asyncio`` client.

No real API server can run on our machines (docs/kubernetes.md), so what a cluster's
controllers would do is done here by the test: it writes the Deployment and DaemonSet status
(``set_status``), creates the DaemonSet's pods, and the double's garbage collector and
namespace controller remove dependents and namespace contents (``gc_delay``). The node agent's
``/debug/pods`` is a small HTTP server reached through the double's pod proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ambit.install.apply import InstallError, InstallResult, install
from ambit.install.kube import ApiError, Cluster
from ambit.install.names import INSTALL_LABELS
from ambit.install.render import Overrides, Rendered, render_dir
from ambit.install.status import collect, status
from ambit.install.uninstall import UninstallError, uninstall
from controller.registry.kubernetes import api_client
from controller.waypoint.deploy import render as render_waypoint
from controller.waypoint.deploy import render_ca_root
from controller.waypoint.model import Gateway
from tests.component.waiting import until
from tests.k8s_double import objects as o
from tests.k8s_double.manifests import REPO, write_manifests
from tests.k8s_double.server import ApiServerDouble

NS = "ambit-system"
# An upgrade: every component image moved to a registry and a new tag (one image per component).
UPGRADE = Overrides(image_prefix="registry.example.com/ambit-", tag="0.2.0")
NEW = {c: f"registry.example.com/ambit-{c}:0.2.0" for c in ("agent", "ztunnel", "waypoint")}
REAL_MANIFESTS = (REPO / "deploy" / "daemonset" / "kustomization.yaml").is_file()
FAST: dict[str, Any] = {"poll": 0.02, "heartbeat": 60.0}


@pytest.fixture
def kubeconfig(double: ApiServerDouble, tmp_path: Path) -> Path:
    return double.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
async def cluster(kubeconfig: Path) -> AsyncIterator[Cluster]:
    api = await api_client(str(kubeconfig))
    yield Cluster(api)
    await api.close()


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    return write_manifests(tmp_path / "manifests")


@pytest.fixture
def rendered(manifests: Path) -> Rendered:
    return render_dir(manifests, Overrides())


class Lines(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)

    def has(self, fragment: str) -> bool:
        return any(fragment in line for line in self)

    def index_of(self, fragment: str) -> int:
        return next(i for i, line in enumerate(self) if fragment in line)


eventually = partial(until, limit=5.0, interval=0.02)


def get(d: ApiServerDouble, plural: str, name: str, ns: str = NS) -> dict[str, Any]:
    obj = d.store.get(plural, name, ns)
    assert obj is not None, f"{plural} {ns}/{name} missing"
    return obj


def versions(d: ApiServerDouble) -> dict[tuple[str, str, str], str]:
    return {(plural, ns, name): obj["metadata"]["resourceVersion"]
            for plural, objs in d.store.objects.items() for (ns, name), obj in objs.items()}


def ambit_objects(d: ApiServerDouble) -> list[tuple[str, str, str]]:
    return [(plural, ns, name) for plural, objs in d.store.objects.items()
            for (ns, name), obj in objs.items()
            if (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/part-of") == "ambit"]


def roll_out(d: ApiServerDouble, nodes: int = 2) -> None:
    dep = get(d, "deployments", "ambit-controller")
    d.set_status("deployments", "ambit-controller", NS, o.deployment_status(dep))
    ds = get(d, "daemonsets", "ambit-node")
    d.set_status("daemonsets", "ambit-node", NS, o.daemonset_status(ds, nodes))


def node_pods(d: ApiServerDouble, nodes: tuple[str, ...] = ("node-a", "node-b"),
              **kw: Any) -> list[str]:
    ds = get(d, "daemonsets", "ambit-node")
    names = []
    for i, node in enumerate(nodes):
        name = f"ambit-node-{node[-1]}"
        d.apply("pods", o.daemonset_pod(ds, name, node, f"192.168.0.{10 + i}", **kw))
        names.append(name)
    return names


async def quick_install(cluster: Cluster, rendered: Rendered, **kw: Any) -> InstallResult:
    return await install(cluster, rendered, wait=False, out=Lines(), **{**FAST, **kw})


# ----- install -----

async def test_install_creates_every_object_with_its_labels(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    lines = Lines()
    result = await install(cluster, rendered, wait=False, out=lines, **FAST)
    assert len(result.applied) == len(rendered.manifests) + 1  # + the GatewayClass
    assert all(outcome == "created" for _, outcome in result.applied)
    for m in rendered.manifests:
        obj = get(double, m.kind.lower() + "s", m.name, m.namespace or "")
        assert INSTALL_LABELS.items() <= obj["metadata"]["labels"].items(), m.describe()
    assert lines.has("namespace/ambit-system created")
    assert lines.has("daemonset.apps/ambit-node created")
    cm = get(double, "configmaps", "ambit-config")
    assert cm["data"] == {"trustDomain": "cluster.local", "redirectMode": "auto",
                          "uplinks": "auto"}
    ds = get(double, "daemonsets", "ambit-node")
    assert ds["spec"]["template"]["metadata"]["annotations"]["ambit.dev/config-hash"] \
        == rendered.config_hash
    assert get(double, "services", "ambit-controller")["spec"]["clusterIP"].startswith("10.96.")
    # the GatewayClass, because this cluster serves the Gateway API
    gc = get(double, "gatewayclasses", "ambit-waypoint", "")
    assert gc["spec"]["controllerName"] == "ambit.dev/waypoint-controller"
    assert INSTALL_LABELS.items() <= gc["metadata"]["labels"].items()
    assert result.gateway_class == "created"
    # every write was a server-side apply by the field manager "ambit"
    writes = [r for r in double.requests if r.method not in ("GET",)]
    assert writes and all(r.method == "PATCH" and r.query == {"fieldManager": "ambit",
                                                              "force": "true"} for r in writes)
    assert lines.has("Next:") and lines.has("ambit.dev/dataplane-mode=ambient")


async def test_the_repository_manifests_install_and_uninstall(
        double: ApiServerDouble, cluster: Cluster) -> None:
    """deploy/daemonset as shipped goes in, rolls out, and comes out again."""
    directory = REPO / "deploy" / "daemonset"
    if not REAL_MANIFESTS:
        pytest.skip("deploy/daemonset/kustomization.yaml is not written yet")
    real = render_dir(directory, UPGRADE)
    lines = Lines()
    task = asyncio.create_task(install(cluster, real, wait_timeout=20, out=lines, **FAST))
    await eventually(lambda: lines.has("to roll out"))
    roll_out(double, nodes=1)
    result = await asyncio.wait_for(task, 5)
    assert {outcome for _, outcome in result.applied} == {"created"}
    assert len(ambit_objects(double)) == len(real.manifests) + 1
    double.gc_delay = 0.05
    await uninstall(cluster, real.manifests, wait_timeout=20, out=Lines(), **FAST)
    assert ambit_objects(double) == []


async def test_reinstall_changes_nothing(double: ApiServerDouble, cluster: Cluster,
                                         rendered: Rendered) -> None:
    await quick_install(cluster, rendered)
    before, rv = versions(double), double.store.rv
    again = await quick_install(cluster, rendered)
    assert {outcome for _, outcome in again.applied} == {"unchanged"}
    assert versions(double) == before and double.store.rv == rv


async def test_upgrade_with_a_new_image_and_settings_rolls_the_workloads(
        double: ApiServerDouble, cluster: Cluster, manifests: Path, rendered: Rendered) -> None:
    await quick_install(cluster, rendered)
    ip = get(double, "services", "ambit-controller")["spec"]["clusterIP"]
    ds_generation = get(double, "daemonsets", "ambit-node")["metadata"]["generation"]
    upgrade = render_dir(manifests, dataclasses.replace(UPGRADE, trust_domain="prod.example.com"))
    result = await quick_install(cluster, upgrade)
    outcomes = dict(result.applied)
    assert outcomes["daemonset.apps/ambit-node"] == "configured"
    assert outcomes["deployment.apps/ambit-controller"] == "configured"
    assert outcomes["configmap/ambit-config"] == "configured"
    assert outcomes["service/ambit-controller"] == "unchanged"
    assert outcomes["namespace/ambit-system"] == "unchanged"
    ds = get(double, "daemonsets", "ambit-node")
    spec = ds["spec"]["template"]["spec"]
    assert {c["image"] for c in spec["containers"] + spec["initContainers"]} \
        == {NEW["agent"], NEW["ztunnel"]}
    assert ds["metadata"]["generation"] == ds_generation + 1
    assert ds["spec"]["template"]["metadata"]["annotations"]["ambit.dev/config-hash"] \
        == upgrade.config_hash != ""
    args = get(double, "deployments", "ambit-controller")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert args[args.index("--waypoint-image") + 1] == NEW["waypoint"]
    assert get(double, "configmaps", "ambit-config")["data"]["trustDomain"] == "prod.example.com"
    # server-side apply kept what the API server allocated
    assert get(double, "services", "ambit-controller")["spec"]["clusterIP"] == ip


async def test_gateway_class_only_when_the_gateway_api_is_served(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    double.unserved |= {"gatewayclasses", "gateways", "httproutes"}
    lines = Lines()
    result = await install(cluster, rendered, wait=False, out=lines, **FAST)
    assert result.gateway_class == "skipped"
    assert double.store.objects["gatewayclasses"] == {}
    assert lines.has("does not serve the Gateway API: GatewayClass ambit-waypoint not created")
    assert lines.has("standard-install.yaml")
    assert lines.has("waypoints: GatewayClass ambit-waypoint not created")


async def test_a_gateway_class_of_another_controller_is_left_alone(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    double.apply("gatewayclasses", {"metadata": {"name": "ambit-waypoint"},
                                    "spec": {"controllerName": "example.com/other"}})
    rv = get(double, "gatewayclasses", "ambit-waypoint", "")["metadata"]["resourceVersion"]
    lines = Lines()
    result = await install(cluster, rendered, wait=False, out=lines, **FAST)
    assert result.gateway_class == "foreign" and lines.has("left alone")
    assert get(double, "gatewayclasses", "ambit-waypoint", "")["metadata"][
        "resourceVersion"] == rv
    un = Lines()
    double.gc_delay = 0.05
    await uninstall(cluster, rendered.manifests, out=un, wait_timeout=10, **FAST)
    assert double.store.get("gatewayclasses", "ambit-waypoint") is not None
    assert un.has("left alone: its controllerName is example.com/other")


async def test_wait_follows_the_rollout_until_everything_runs(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    lines = Lines()
    task = asyncio.create_task(install(cluster, rendered, wait=True, wait_timeout=20,
                                       out=lines, **FAST))
    await eventually(lambda: lines.has("daemonset.apps/ambit-node: waiting for its "
                                       "controller to observe the new spec"))
    assert lines.has("deployment.apps/ambit-controller: waiting for its controller")
    dep, ds = get(double, "deployments", "ambit-controller"), get(double, "daemonsets",
                                                                  "ambit-node")
    double.set_status("deployments", "ambit-controller", NS,
                      o.deployment_status(dep, available=1))
    double.set_status("daemonsets", "ambit-node", NS, o.daemonset_status(ds, 3, ready=1))
    await eventually(lambda: lines.has("1 of 3 updated node pods available"))
    assert lines.has("1 of 2 updated replicas available")
    await asyncio.sleep(0.1)
    assert not task.done()
    roll_out(double, nodes=3)
    result = await asyncio.wait_for(task, 5)
    assert result.rollouts == {"deployment.apps/ambit-controller": "2 of 2 replicas available",
                               "daemonset.apps/ambit-node": "3 of 3 node pods available"}
    assert lines.has("is running")
    assert lines.has("Service ambit-controller.ambit-system.svc: grpc 15012, xds 15011, "
                     "monitoring 15014")


async def test_wait_times_out_saying_why_the_pods_are_not_ready(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    await quick_install(cluster, rendered)
    dep, ds = get(double, "deployments", "ambit-controller"), get(double, "daemonsets",
                                                                  "ambit-node")
    double.set_status("deployments", "ambit-controller", NS, o.deployment_status(dep))
    double.set_status("daemonsets", "ambit-node", NS, o.daemonset_status(ds, 2, ready=1))
    node_pods(double, ("node-a",))
    node_pods(double, ("node-b",), ready=False, waiting="ImagePullBackOff")
    lines = Lines()
    with pytest.raises(InstallError, match=r"timed out after 1 s waiting for "
                       r"daemonset.apps/ambit-node \(1 of 2 updated node pods available\)"):
        await install(cluster, rendered, wait=True, wait_timeout=1.0, out=lines, **FAST)
    assert lines.has("pod ambit-node-b on node-b: Pending; agent: ImagePullBackOff")
    assert not lines.has("pod ambit-node-a")  # ready pods are not listed


async def test_a_deployment_past_its_progress_deadline_fails_at_once(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    await quick_install(cluster, rendered)
    dep = get(double, "deployments", "ambit-controller")
    st = o.deployment_status(dep, available=0)
    st["conditions"][1] = {"type": "Progressing", "status": "False",
                           "reason": "ProgressDeadlineExceeded",
                           "message": 'ReplicaSet "x" has timed out progressing.'}
    double.set_status("deployments", "ambit-controller", NS, st)
    with pytest.raises(InstallError, match=r"failed to roll out: ReplicaSet .* timed out"):
        await install(cluster, rendered, wait=True, wait_timeout=30, out=Lines(), **FAST)


async def test_objects_of_a_new_crd_wait_until_it_is_established(
        double: ApiServerDouble, cluster: Cluster, manifests: Path) -> None:
    (manifests / "policy.yaml").write_text(
        "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-nothing, namespace: ambit-system}\nspec: {}\n")
    k = manifests / "kustomization.yaml"
    k.write_text(k.read_text().replace("  - 00-ns.yaml\n", "  - 00-ns.yaml\n  - policy.yaml\n"))
    rendered = render_dir(manifests, Overrides())
    double.unserved.add("authorizationpolicies")  # its CRD is not installed yet
    double.establish_crds = False
    lines = Lines()
    task = asyncio.create_task(install(cluster, rendered, wait=False, wait_timeout=10,
                                       out=lines, **FAST))
    crd = "authorizationpolicies.security.ambit.dev"
    await eventually(lambda: lines.has(f"waiting for customresourcedefinition."
                                       f"apiextensions.k8s.io/{crd} to be established"))
    await asyncio.sleep(0.1)
    assert double.store.get("authorizationpolicies", "deny-nothing", NS) is None
    assert not task.done()
    double.establish_crd(crd)
    result = await asyncio.wait_for(task, 5)
    assert ("authorizationpolicy.security.ambit.dev/deny-nothing", "created") in result.applied
    assert get(double, "authorizationpolicies", "deny-nothing")["spec"] == {}


async def test_a_crd_that_is_never_established_times_out(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    double.establish_crds = False
    with pytest.raises(InstallError, match=r"timed out after 1 s waiting for "
                       r"CustomResourceDefinition authorizationpolicies\.security\.ambit\.dev "
                       r"to be established; check `kubectl get crd"):
        await install(cluster, rendered, wait=True, wait_timeout=1.0, out=Lines(), **FAST)


# ----- install errors -----

async def test_unreachable_api_server_is_one_clear_error(rendered: Rendered,
                                                         tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    d = ApiServerDouble()
    d.url = f"http://127.0.0.1:{port}"
    api = await api_client(str(d.write_kubeconfig(tmp_path / "dead")))
    try:
        with pytest.raises(InstallError, match=f"cannot reach http://127.0.0.1:{port}.*check "
                           "the kubeconfig's server address.*nothing was applied"):
            await quick_install(Cluster(api), rendered)
    finally:
        await api.close()


async def test_forbidden_names_the_object_and_what_was_applied(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    double.fail_writes("clusterroles", 1, status=403)
    with pytest.raises(InstallError) as e:
        await quick_install(cluster, rendered)
    text = str(e.value)
    assert text.startswith("applying ClusterRole ambit-controller (rbac.yaml (document 3)): "
                           "forbidden")
    assert "cluster-admin" in text
    assert ("applied before this failure: namespace/ambit-system, customresourcedefinition."
            "apiextensions.k8s.io/authorizationpolicies.security.ambit.dev") in text
    assert "run `ambit install` again" in text
    assert double.store.get("configmaps", "ambit-config", NS) is None  # stopped there
    again = await quick_install(cluster, rendered)  # and continues where it stopped
    outcomes = dict(again.applied)
    assert outcomes["namespace/ambit-system"] == "unchanged"
    assert outcomes["clusterrole.rbac.authorization.k8s.io/ambit-controller"] == "created"


async def test_an_unserved_kind_stops_before_anything_is_applied(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    double.unserved.add("poddisruptionbudgets")
    with pytest.raises(InstallError, match=r"control-plane.yaml \(document 3\): "
                       "PodDisruptionBudget ambit-system/ambit-controller: the cluster does not "
                       "serve PodDisruptionBudget in policy/v1.*nothing was applied"):
        await quick_install(cluster, rendered)
    assert not any(r.method != "GET" for r in double.requests)


async def test_install_refuses_while_the_namespace_is_being_deleted(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    await quick_install(cluster, rendered)
    await cluster.rest.request("DELETE", f"/api/v1/namespaces/{NS}")  # no collector runs
    rv = double.store.rv
    with pytest.raises(InstallError, match=f"namespace {NS} is being deleted .*nothing was "
                       "applied"):
        await quick_install(cluster, rendered)
    assert double.store.rv == rv


async def test_an_invalid_object_is_named_with_the_api_servers_reason(
        double: ApiServerDouble, cluster: Cluster, manifests: Path) -> None:
    f = manifests / "control-plane.yaml"
    f.write_text(f.read_text().replace("      labels: {app: ambit-controller}",
                                       "      labels: {app: other}", 1))
    with pytest.raises(InstallError, match=r"applying Deployment ambit-system/ambit-controller "
                       r"\(control-plane.yaml \(document 1\)\): the API server rejected it as "
                       "invalid: .*selector` does not match template `labels`"):
        await quick_install(cluster, render_dir(manifests, Overrides()))


# ----- uninstall -----

async def populate(double: ApiServerDouble) -> None:
    """What a running mesh adds: node pods, the controller's Lease and Secret, a waypoint in
    namespace shop (the deployer's objects), and the user's own objects and policies."""
    roll_out(double)
    node_pods(double)
    double.apply("leases", {"metadata": {"name": "ambit-controller", "namespace": NS},
                            "spec": {"holderIdentity": "ambit-controller-0"}})
    double.apply("secrets", {"metadata": {"name": "ambit-ca", "namespace": NS},
                             "type": "Opaque", "data": {}})
    double.apply("namespaces", o.namespace("shop"))
    gw = double.apply("gateways", o.gateway("waypoint", "shop"))
    model = Gateway(name="waypoint", namespace="shop")
    for obj in render_waypoint(model, uid=gw["metadata"]["uid"], image="x:1",
                               trust_domain="cluster.local",
                               controller_address="ambit-controller.ambit-system.svc:15011"):
        double.apply(obj["kind"].lower() + "s", obj)
    double.apply("configmaps", render_ca_root("shop", "PEM", [(model, gw["metadata"]["uid"])]))
    double.apply("deployments", o.deployment("web", "shop", {"app": "web"}))
    double.apply("configmaps", {"metadata": {"name": "mine", "namespace": "shop"}, "data": {}})
    double.apply("authorizationpolicies", o.authorization_policy("deny", "shop", {}))
    double.apply("httproutes", o.http_route("r", "shop", {}))


def names(double: ApiServerDouble, plural: str, ns: str | None = "shop") -> list[str]:
    return sorted(n for (s, n) in double.store.objects[plural] if ns is None or s == ns)


async def test_uninstall_removes_everything_in_order_and_leaves_the_users_objects(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    await quick_install(cluster, rendered)
    await populate(double)
    double.gc_delay = 0.3  # the garbage collector and the namespace controller
    lines = Lines()
    result = await uninstall(cluster, rendered.manifests, wait_timeout=20, out=lines, **FAST)
    assert ambit_objects(double) == []
    assert double.store.get("namespaces", NS) is None
    assert names(double, "pods", NS) == [] and names(double, "leases", NS) == []
    # the controller's waypoint objects went, the user's objects stayed
    assert names(double, "deployments") == ["web"]
    assert names(double, "configmaps") == ["mine"]
    assert names(double, "services") == [] and names(double, "serviceaccounts") == []
    assert names(double, "gateways") == ["waypoint"] and names(double, "httproutes") == ["r"]
    assert double.store.get("namespaces", "shop") is not None
    # CRDs, and the custom resources with them
    assert double.store.objects["customresourcedefinitions"] == {}
    assert double.store.objects["authorizationpolicies"] == {}
    assert "authorizationpolicies" in double.unserved
    assert lines.has("customresourcedefinition.apiextensions.k8s.io/authorizationpolicies."
                     "security.ambit.dev deleted with its 1 custom resource")
    assert double.store.objects["gatewayclasses"] == {}
    # the order: the DaemonSet first, waiting for its pods; the namespace last
    deletes = [r.path for r in double.requests if r.method == "DELETE"]
    assert deletes[0] == f"/apis/apps/v1/namespaces/{NS}/daemonsets/ambit-node"
    assert deletes[-1] == f"/api/v1/namespaces/{NS}"
    # the rest of the manifests in reverse order (the PDB, Service, Deployment of the
    # controller, then its config and RBAC)
    manifest_deletes = [p.rsplit("/", 2)[-2:] for p in deletes[1:11]]
    assert manifest_deletes == [
        ["poddisruptionbudgets", "ambit-controller"], ["services", "ambit-controller"],
        ["deployments", "ambit-controller"], ["configmaps", "ambit-config"],
        ["rolebindings", "ambit-node"], ["roles", "ambit-node"],
        ["clusterrolebindings", "ambit-controller"], ["clusterroles", "ambit-controller"],
        ["serviceaccounts", "ztunnel"], ["serviceaccounts", "ambit-controller"]]
    assert lines.has("daemonset.apps/ambit-node: 2 pods left on node-a, node-b; each agent "
                     "removes the CNI configuration")
    assert lines.index_of("daemonset.apps/ambit-node and its pods are gone") \
        < lines.index_of("deployment.apps/ambit-controller deleted")
    assert lines.index_of("deployment.apps/waypoint -n shop deleted") \
        > lines.index_of("deployment.apps/ambit-controller and its pods are gone")
    assert lines.has("note: the mesh root (Secret ambit-system/ambit-ca) goes with the namespace")
    assert lines.has("namespace/ambit-system is gone")
    assert lines.has("namespaces still labelled ambit.dev/dataplane-mode=ambient (harmless "
                     "without Ambit): shop")
    assert "gatewayclass.gateway.networking.k8s.io/ambit-waypoint" in result.deleted
    assert "configmap/ambit-ca-root -n shop" in result.deleted
    # and again: everything is already gone, nothing fails
    again = Lines()
    second = await uninstall(cluster, rendered.manifests, wait_timeout=5, out=again, **FAST)
    assert second.deleted == [] and again.has("namespace/ambit-system already gone")


async def test_uninstall_keep_crds_keeps_them_and_their_resources(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    await quick_install(cluster, rendered)
    await populate(double)
    double.gc_delay = 0.05
    lines = Lines()
    result = await uninstall(cluster, rendered.manifests, keep_crds=True, wait_timeout=20,
                             out=lines, **FAST)
    assert sorted(n for _, n in double.store.objects["customresourcedefinitions"]) == [
        "authorizationpolicies.security.ambit.dev", "httpfaults.networking.ambit.dev",
        "peerauthentications.security.ambit.dev"]
    assert names(double, "authorizationpolicies") == ["deny"]
    assert lines.has("authorizationpolicies.security.ambit.dev kept (--keep-crds) "
                     "(1 custom resource)")
    assert len(result.kept) == 3
    assert double.store.get("namespaces", NS) is None


async def test_uninstall_dry_run_lists_and_changes_nothing(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    await quick_install(cluster, rendered)
    await populate(double)
    rv = double.store.rv
    lines = Lines()
    result = await uninstall(cluster, rendered.manifests, dry_run=True, out=lines, **FAST)
    assert double.store.rv == rv
    assert not any(r.method == "DELETE" for r in double.requests)
    assert lines.has("would delete daemonset.apps/ambit-node")
    assert lines.has("would delete deployment.apps/waypoint -n shop")
    assert lines.has("would delete customresourcedefinition.apiextensions.k8s.io/"
                     "authorizationpolicies.security.ambit.dev with its 1 custom resource")
    assert lines[-1].startswith(f"dry run: {len(result.would_delete)} objects would be deleted")
    assert len(result.would_delete) == len(rendered.manifests) + 5  # + waypoint objs, class


async def test_uninstall_times_out_while_node_pods_remain(
        double: ApiServerDouble, cluster: Cluster, rendered: Rendered) -> None:
    await quick_install(cluster, rendered)
    roll_out(double)
    node_pods(double)  # no garbage collector runs: the pods never go
    with pytest.raises(UninstallError, match=r"timed out after 1 s waiting for "
                       r"daemonset.apps/ambit-node to be deleted: 2 pods left on node-a, node-b"):
        await uninstall(cluster, rendered.manifests, wait_timeout=1.0, out=Lines(), **FAST)
    ds = get(double, "daemonsets", "ambit-node")
    assert ds["metadata"]["deletionTimestamp"]
    assert ds["metadata"]["finalizers"] == ["foregroundDeletion"]
    # the rest was not touched yet
    assert double.store.get("configmaps", "ambit-config", NS) is not None


# ----- status -----

def agent_doc(node: str, *, wrong: bool = False) -> dict[str, Any]:
    pods = [{"pod": f"uid-{node}-1", "ips": ["10.244.1.5"], "hostIface": "veth1", "netns": "",
             "captured": True, "shouldCapture": True, "reason": "namespace shop is ambient"},
            {"pod": f"uid-{node}-2", "ips": ["10.244.1.6"], "hostIface": "veth2", "netns": "",
             "captured": wrong, "shouldCapture": False, "reason": "not in the mesh"}]
    return {"node": node, "redirectMode": "ebpf",
            "redirectModeReason": "auto: the kernel supports it", "ready": "ready",
            "registryVersion": "7", "ztunnelPid": 42, "lastReconcile": 1.0, "lastError": None,
            "uplinks": ["eth0", "flannel.1"], "cni": "chained into 10-flannel.conflist",
            "capture": {"programs": 2}, "pods": pods}


@pytest.fixture
async def agents() -> AsyncIterator[tuple[str, dict[str, dict[str, Any]]]]:
    """A fake agent endpoint: /<node>/debug/pods answers docs[node]."""
    docs: dict[str, dict[str, Any]] = {}
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response(docs[request.match_info["node"]])

    app = web.Application()
    app.router.add_get("/{node}/debug/pods", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", docs
    await runner.cleanup()


async def running_mesh(double: ApiServerDouble, cluster: Cluster, rendered: Rendered,
                       agents: tuple[str, dict[str, dict[str, Any]]]) -> None:
    await quick_install(cluster, rendered)
    roll_out(double)
    url, docs = agents
    for pod, node in zip(node_pods(double), ("node-a", "node-b"), strict=True):
        docs[node] = agent_doc(node)
        double.register_pod_proxy(NS, pod, 15022, f"{url}/{node}")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    double.apply("leases", {"metadata": {"name": "ambit-controller", "namespace": NS},
                            "spec": {"holderIdentity": "ambit-controller-7d9f-abcde",
                                     "leaseDurationSeconds": 15, "renewTime": now}})
    double.apply("namespaces", o.namespace("shop"))
    double.apply("namespaces", o.namespace("legacy", ambient=False))


async def test_status_of_a_healthy_mesh(double: ApiServerDouble, cluster: Cluster,
                                        rendered: Rendered,
                                        agents: tuple[str, dict[str, dict[str, Any]]]) -> None:
    await running_mesh(double, cluster, rendered, agents)
    lines = Lines()
    assert await status(cluster, out=lines) == 0
    text = "\n".join(lines)
    assert "Ambit in namespace ambit-system (redirectMode=auto, trustDomain=cluster.local, " \
           "uplinks=auto)" in text
    assert "Deployment ambit-controller 2/2 ready, image localhost/ambit:0.1.0; leader " \
           "ambit-controller-7d9f-abcde (renewed" in text
    assert "nodes: DaemonSet ambit-node 2 desired, 2 ready, 2 up to date, 2 available" in text
    row = next(line for line in lines if line.strip().startswith("ambit-node-b"))
    assert "node-b" in row and "yes" in row and "ebpf (auto: the kernel supports it); ready; " \
        "2 pods, 1 captured" in row
    assert "mesh namespaces (ambit.dev/dataplane-mode=ambient): shop" in text
    assert "waypoints: GatewayClass ambit-waypoint ready" in text
    assert lines[-1] == "no problems found"
    assert "uid-node-a-1" not in text  # the per-pod tables only with --pods
    proxied = [r for r in double.requests if "/proxy/" in r.path]
    assert sorted(r.path for r in proxied) == [
        f"/api/v1/namespaces/{NS}/pods/ambit-node-a:15022/proxy/debug/pods",
        f"/api/v1/namespaces/{NS}/pods/ambit-node-b:15022/proxy/debug/pods"]

    pods = Lines()
    assert await status(cluster, pods=True, out=pods) == 0
    assert pods.has("node node-a: redirect mode ebpf (auto: the kernel supports it); ready")
    assert pods.has("  programs: 2")
    assert pods.has("  uplinks: eth0, flannel.1") and pods.has("  cni: chained into 10-flannel")
    table = next(line for line in pods if line.startswith("uid-node-b-1"))
    assert table.split()[1:4] == ["10.244.1.5", "veth1", "yes"]

    as_json = Lines()
    assert await status(cluster, as_json=True, out=as_json) == 0
    doc = json.loads("\n".join(as_json))
    assert doc["healthy"] is True and doc["meshNamespaces"] == ["shop"]
    assert [p["agent"]["node"] for p in doc["nodes"]["pods"]] == ["node-a", "node-b"]
    assert doc["controller"]["leader"]["holder"] == "ambit-controller-7d9f-abcde"


async def test_status_lists_the_problems(double: ApiServerDouble, cluster: Cluster,
                                         rendered: Rendered,
                                         agents: tuple[str, dict[str, dict[str, Any]]]) -> None:
    await running_mesh(double, cluster, rendered, agents)
    del double.pod_proxies[(NS, "ambit-node-b", 15022)]  # its agent does not answer
    agents[1]["node-a"] = agent_doc("node-a", wrong=True)
    ds = get(double, "daemonsets", "ambit-node")
    double.apply("pods", o.daemonset_pod(ds, "ambit-node-c", "node-c", "192.168.0.30",
                                         ready=False, restarts=4, waiting="CrashLoopBackOff"))
    double.set_status("daemonsets", "ambit-node", NS, o.daemonset_status(ds, 3, ready=2))
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).isoformat()
    lease = get(double, "leases", "ambit-controller")
    lease["spec"]["renewTime"] = old
    double.apply("leases", lease)
    lines = Lines()
    assert await status(cluster, pods=True, out=lines) == 1
    problems = lines[lines.index("problems:") + 1:]
    assert "  - nodes: 2 of 3 node pods ready" in problems
    assert any(p.startswith("  - no controller leader (the Lease is expired); the controller "
                            "may still be starting") for p in problems)
    assert any(p.startswith("  - node node-b: cannot read the agent through the API server's "
                            "pod proxy: 503 error trying to reach service") for p in problems)
    assert "  - node node-a: 1 pod(s) not captured as they should be (ambit status --pods " \
           "shows them)" in problems
    assert any("pod ambit-node-c on node-c: Pending; agent: CrashLoopBackOff" in p
               for p in problems)
    row = next(line for line in lines if line.strip().startswith("ambit-node-c"))
    assert row.split()[1:5] == ["node-c", "no", "8", "CrashLoopBackOff"]  # 2 containers x 4
    flagged = next(line for line in lines if line.startswith("uid-node-a-2"))
    assert flagged.split()[3] == "yes!"


async def test_status_when_ambit_is_not_installed(cluster: Cluster) -> None:
    lines = Lines()
    assert await status(cluster, out=lines) == 1
    assert lines == ["Ambit is not installed in this cluster (no namespace ambit-system); run "
                     "ambit install"]
    assert (await collect(cluster))["installed"] is False


# ----- the double's behaviours these rely on -----

async def test_double_apply_patch_rules(double: ApiServerDouble, cluster: Cluster) -> None:
    rest = cluster.rest
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": "c", "namespace": "default"}, "data": {"a": "1"}}
    double.apply("namespaces", o.namespace("default", ambient=False))
    path = "/api/v1/namespaces/default/configmaps/c"
    with pytest.raises(ApiError, match="fieldManager: Required value") as e:
        await rest.request("PATCH", path, body=cm, content_type="application/apply-patch+yaml")
    assert e.value.status == 422
    with pytest.raises(ApiError, match="force: Forbidden") as e:
        await rest.request("PATCH", path, body=cm, query=[("force", "true")],
                           content_type="application/merge-patch+json")
    created = await rest.request("PATCH", path, body=cm, query=[("fieldManager", "t")],
                                 content_type="application/apply-patch+yaml")
    merged = await rest.request("PATCH", path, body={**cm, "data": {"b": "2"}},
                                query=[("fieldManager", "t"), ("force", "true")],
                                content_type="application/apply-patch+yaml")
    assert merged["data"] == {"a": "1", "b": "2"}  # create-or-merge (documented)
    assert merged["metadata"]["uid"] == created["metadata"]["uid"]
    # a no-op write keeps the resourceVersion
    same = await rest.request("PUT", path, body=merged)
    assert same["metadata"]["resourceVersion"] == merged["metadata"]["resourceVersion"]


async def test_double_deletion_finalizers_and_namespaces(double: ApiServerDouble,
                                                         cluster: Cluster) -> None:
    rest = cluster.rest
    double.apply("namespaces", o.namespace("app", ambient=False))
    double.apply("configmaps", {"metadata": {"name": "held", "namespace": "app",
                                             "finalizers": ["example.com/hold"]}})
    await rest.request("DELETE", "/api/v1/namespaces/app/configmaps/held")
    held = get(double, "configmaps", "held", "app")
    assert held["metadata"]["deletionTimestamp"]
    held["metadata"]["finalizers"] = []
    await rest.request("PUT", "/api/v1/namespaces/app/configmaps/held", body=held)
    assert double.store.get("configmaps", "held", "app") is None
    assert double.store.history["configmaps"][-1].type == "DELETED"

    double.apply("configmaps", {"metadata": {"name": "x", "namespace": "app"}})
    ns = await rest.request("DELETE", "/api/v1/namespaces/app")
    assert ns["status"]["phase"] == "Terminating"
    with pytest.raises(ApiError, match="being terminated") as e:
        await rest.request("POST", "/api/v1/namespaces/app/configmaps",
                           body={"metadata": {"name": "y"}})
    assert e.value.status == 403
    assert double.collect_garbage() == 2  # the ConfigMap, then the namespace
    assert double.store.get("namespaces", "app") is None


async def test_double_pod_proxy(double: ApiServerDouble, cluster: Cluster,
                                agents: tuple[str, dict[str, dict[str, Any]]]) -> None:
    double.apply("pods", o.pod("p", NS, "10.0.0.9"))
    with pytest.raises(ApiError, match='pods "nope" not found'):
        await cluster.proxy_get(NS, "nope", 15022, "debug/pods")
    with pytest.raises(ApiError, match=r"dial tcp 10\.0\.0\.9:15022: connect: connection refused"):
        await cluster.proxy_get(NS, "p", 15022, "debug/pods")
    agents[1]["n"] = {"node": "n"}
    double.register_pod_proxy(NS, "p", 15022, f"{agents[0]}/n")
    assert await cluster.proxy_get(NS, "p", 15022, "/debug/pods",
                                   query=[("verbose", "1")]) == {"node": "n"}


# ----- the command line, end to end -----

async def run_cli(*argv: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ambit.cli", *argv, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_install_status_uninstall(double: ApiServerDouble, kubeconfig: Path,
                                            manifests: Path, tmp_path: Path) -> None:
    rc, out, err = await run_cli("install", "--kubeconfig", str(kubeconfig), "--manifests",
                                 str(manifests), "--no-wait", "--trust-domain", "prod.example")
    assert rc == 0, err
    assert "daemonset.apps/ambit-node created" in out and "Traceback" not in err
    assert get(double, "configmaps", "ambit-config")["data"]["trustDomain"] == "prod.example"
    rc, out, err = await run_cli("status", "--kubeconfig", str(kubeconfig))
    assert rc == 1 and "problems:" in out and "no controller leader" in out
    double.gc_delay = 0.05
    rc, out, err = await run_cli("uninstall", "--kubeconfig", str(kubeconfig), "--manifests",
                                 str(manifests), "--timeout", "20")
    assert rc == 0, err
    assert "Ambit removed:" in out and double.store.get("namespaces", NS) is None
    nowhere = ApiServerDouble()
    nowhere.url = "http://127.0.0.1:9"
    dead = nowhere.write_kubeconfig(tmp_path / "dead")
    rc, out, err = await run_cli("status", "--kubeconfig", str(dead))
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("ambit status: error: reading Ambit's status: cannot reach "
                          "http://127.0.0.1:9")
    assert len(err.strip().splitlines()) == 1

"""Rendering of a waypoint's Kubernetes objects and status (``deploy``), and the deployer's pure
diff logic (``k8s_deployer.drift/merged/plan_object``)."""

from __future__ import annotations

import argparse
import copy
from typing import Any

import pytest

from ambit.waypoint_cli import add_parser
from controller.waypoint.deploy import (
    CA_AUDIENCE,
    CA_ROOT_CONFIGMAP,
    CA_ROOT_KEY,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    REPLICAS_ANNOTATION,
    Problem,
    RenderError,
    Resources,
    gateway_conditions,
    gateway_status,
    render,
    render_ca_root,
    status_differs,
)
from controller.waypoint.k8s_apply import DEPLOYMENTS, SERVICES
from controller.waypoint.k8s_deployer import drift, merged, owner_gateway, plan_object
from controller.waypoint.model import Gateway
from mesh.ports import GATEWAY_NAME_LABEL

GW = Gateway(name="waypoint", namespace="shop")
UID = "7d0e4c1a-uid"
ADDR = "ambit-controller.ambit-system.svc:15011"
CA_ADDR = "ambit-controller.ambit-system.svc:15012"


def objects(**kw: Any) -> dict[str, dict[str, Any]]:
    args: dict[str, Any] = {"uid": UID, "image": "ghcr.io/ambit/ambit:0.1.0",
                            "trust_domain": "cluster.local", "controller_address": ADDR,
                            "ca_address": CA_ADDR}
    args.update(kw)
    return {o["kind"]: o for o in render(GW, **args)}


def pod_spec(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objs["Deployment"]["spec"]["template"]["spec"]
    return spec


def container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = pod_spec(objs)["containers"]
    assert isinstance(c, dict)
    return c


# --- rendering ------------------------------------------------------------------------------

def test_renders_service_account_service_and_deployment_owned_by_the_gateway() -> None:
    rendered = render(GW, uid=UID, image="img:1", trust_domain="td", controller_address=ADDR)
    assert [o["kind"] for o in rendered] == ["ServiceAccount", "Service", "Deployment"]
    for obj in rendered:
        meta = obj["metadata"]
        assert (meta["name"], meta["namespace"]) == ("waypoint", "shop")
        assert meta["labels"][MANAGED_BY_LABEL] == MANAGED_BY
        assert meta["labels"][GATEWAY_NAME_LABEL] == "waypoint"
        assert meta["ownerReferences"] == [{
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "name": "waypoint", "uid": UID, "controller": True}]
        assert owner_gateway(obj) == ["shop/waypoint"]
    assert render(GW, uid=UID, image="img:1", trust_domain="td",
                  controller_address=ADDR) == rendered  # pure


def test_deployment_labels_keep_its_pods_out_of_capture() -> None:
    d = objects()["Deployment"]
    assert d["metadata"]["labels"]["ambit.dev/dataplane-mode"] == "none"
    assert d["spec"]["selector"] == {"matchLabels": {GATEWAY_NAME_LABEL: "waypoint"}}
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert labels[GATEWAY_NAME_LABEL] == "waypoint"
    assert labels["ambit.dev/dataplane-mode"] == "none"
    assert "replicas" not in d["spec"]  # Kubernetes' default (1), left to kubectl scale/HPA


def test_the_container_command_is_what_ambit_waypoint_run_accepts() -> None:
    c = container(objects())
    assert c["command"] == ["ambit"]
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(c["args"])
    assert (args.command, args.waypoint_command) == ("waypoint", "run")
    assert (args.namespace, args.gateway, args.service_account) == ("shop", "waypoint",
                                                                    "waypoint")
    assert (args.pod_name, args.pod_ip) == ("$(POD_NAME)", "$(POD_IP)")
    assert (args.controller, args.ca_address) == (ADDR, CA_ADDR)
    assert str(args.token_file) == "/var/run/secrets/ambit/token"
    assert str(args.ca_root_cert) == "/var/run/ambit/ca/root-cert.pem"
    assert str(args.run_dir) == "/var/run/ambit/waypoint"
    assert (args.metrics_port, args.readiness_port, args.drain_seconds) == (15020, 15021, 5.0)
    assert args.trust_domain == "cluster.local"
    # The $(VAR) references resolve from the downward API.
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                   "POD_IP": "status.podIP"}
    # One address for both: no --ca-address.
    same = container(objects(ca_address=ADDR))["args"]
    assert "--ca-address" not in same


def test_token_trust_bundle_and_run_dir_volumes() -> None:
    objs = objects()
    spec, c = pod_spec(objs), container(objs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    (source,) = volumes["ambit-token"]["projected"]["sources"]
    assert source["serviceAccountToken"] == {"path": "token", "audience": CA_AUDIENCE,
                                             "expirationSeconds": 3600}
    assert mounts["/var/run/secrets/ambit"] == {"name": "ambit-token",
                                                "mountPath": "/var/run/secrets/ambit",
                                                "readOnly": True}
    assert volumes["ambit-ca"]["configMap"] == {
        "name": CA_ROOT_CONFIGMAP, "items": [{"key": CA_ROOT_KEY, "path": CA_ROOT_KEY}]}
    assert mounts["/var/run/ambit/ca"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/var/run/ambit/waypoint"]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert spec["serviceAccountName"] == "waypoint"
    assert spec["automountServiceAccountToken"] is False  # no API token: it never calls the API


def test_ports_probe_and_scrape_annotations() -> None:
    objs = objects()
    c = container(objs)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "hbone": 15008, "metrics": 15020, "readiness": 15021}
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"], probe["scheme"]) == ("/healthz/ready", 15021, "HTTP")
    annotations = objs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "15020",
                           "prometheus.io/path": "/metrics"}
    svc = objs["Service"]["spec"]
    assert svc["type"] == "ClusterIP"
    assert svc["selector"] == {GATEWAY_NAME_LABEL: "waypoint"}
    assert svc["ports"] == [{"name": "mesh", "port": 15008, "targetPort": 15008,
                             "protocol": "TCP", "appProtocol": "all"}]


def test_hardened_non_root_no_capabilities_read_only_with_limits() -> None:
    objs = objects(drain_seconds=7.5, resources=Resources(cpu_limit="1", memory_limit="512Mi"))
    spec, c = pod_spec(objs), container(objs)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}  # nothing added
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                              "limits": {"cpu": "1", "memory": "512Mi"}}
    assert spec["terminationGracePeriodSeconds"] > 7.5
    assert c["args"][c["args"].index("--drain-seconds") + 1] == "7.5"


def test_replicas_annotation() -> None:
    assert objects(annotations={REPLICAS_ANNOTATION: "3"})["Deployment"]["spec"]["replicas"] == 3
    assert objects(annotations={REPLICAS_ANNOTATION: "0"})["Deployment"]["spec"]["replicas"] == 0
    for bad in ("three", "-1", "1.5", "100000"):
        with pytest.raises(RenderError, match=REPLICAS_ANNOTATION):
            objects(annotations={REPLICAS_ANNOTATION: bad})


def test_names_a_service_cannot_have_are_refused() -> None:
    with pytest.raises(RenderError, match="rename the Gateway"):
        render(Gateway(name="1st", namespace="shop"), uid=UID, image="i", trust_domain="td",
               controller_address=ADDR)
    with pytest.raises(RenderError, match="uid"):
        render(GW, uid="", image="i", trust_domain="td", controller_address=ADDR)


def test_ca_root_config_map_is_owned_by_every_waypoint_of_the_namespace() -> None:
    other = Gateway(name="another", namespace="shop")
    cm = render_ca_root("shop", "PEM", [(GW, "u1"), (other, "u2")])
    assert cm["metadata"]["name"] == CA_ROOT_CONFIGMAP
    assert cm["data"] == {CA_ROOT_KEY: "PEM"}
    assert cm["metadata"]["labels"] == {MANAGED_BY_LABEL: MANAGED_BY}
    assert [(r["name"], r["uid"], r["controller"]) for r in cm["metadata"]["ownerReferences"]] \
        == [("another", "u2", False), ("waypoint", "u1", False)]


# --- status ---------------------------------------------------------------------------------

def test_status_conditions_and_addresses() -> None:
    acc, prog = gateway_conditions("shop/waypoint", addresses=["10.96.0.7"])
    assert (acc.status, acc.reason, prog.status, prog.reason) == (True, "Accepted", True,
                                                                  "Programmed")
    body = gateway_status(generation=3, conditions=(acc, prog), addresses=["10.96.0.7"],
                          now="2024-05-01T12:00:00Z")
    status = body["status"]
    assert status["addresses"] == [{"type": "IPAddress", "value": "10.96.0.7"}]
    assert [(c["type"], c["status"], c["observedGeneration"]) for c in status["conditions"]] \
        == [("Accepted", "True", 3), ("Programmed", "True", 3)]
    _, prog = gateway_conditions("shop/waypoint", addresses=[])
    assert (prog.status, prog.reason) == (False, "AddressNotAssigned")
    _, prog = gateway_conditions("shop/waypoint", addresses=["10.96.0.7"],
                                 problem=Problem("in the way", programmed_reason="Invalid"))
    assert (prog.status, prog.reason, prog.message) == (False, "Invalid", "in the way")
    acc, prog = gateway_conditions("shop/waypoint", addresses=[], problem=Problem(
        "spec.listeners[0].port: ...", accepted_reason="ListenersNotValid"))
    assert (acc.status, acc.reason, prog.status) == (False, "ListenersNotValid", False)


def test_transition_times_survive_unchanged_status_and_equal_status_is_not_rewritten() -> None:
    conds = gateway_conditions("shop/waypoint", addresses=["10.96.0.7"])
    first = gateway_status(generation=1, conditions=conds, addresses=["10.96.0.7"],
                           now="2024-05-01T12:00:00Z")["status"]
    again = gateway_status(generation=1, conditions=conds, addresses=["10.96.0.7"],
                           previous=first, now="2024-05-01T13:00:00Z")
    assert {c["lastTransitionTime"] for c in again["status"]["conditions"]} == {
        "2024-05-01T12:00:00Z"}
    assert not status_differs(first, again)
    broken = gateway_conditions("shop/waypoint", addresses=["10.96.0.7"],
                                problem=Problem("API down"))
    later = gateway_status(generation=1, conditions=broken, addresses=["10.96.0.7"],
                           previous=first, now="2024-05-01T14:00:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in later["status"]["conditions"]}
    assert times == {"Accepted": "2024-05-01T12:00:00Z", "Programmed": "2024-05-01T14:00:00Z"}
    assert status_differs(first, later)
    # The CRD's default status (Unknown, "Waiting for controller") is replaced.
    default = {"conditions": [{"type": "Accepted", "status": "Unknown", "reason": "Pending",
                               "message": "Waiting for controller",
                               "lastTransitionTime": "1970-01-01T00:00:00Z"}]}
    assert status_differs(default, again)
    assert status_differs(None, again)


# --- diffing --------------------------------------------------------------------------------

def as_served(obj: dict[str, Any], rv: str = "42") -> dict[str, Any]:
    """``obj`` with what an API server adds: identity, version and defaults."""
    live = copy.deepcopy(obj)
    live["metadata"].update(uid="obj-uid", resourceVersion=rv, generation=1,
                            creationTimestamp="2024-05-01T12:00:00Z")
    if obj["kind"] == "Deployment":
        spec = live["spec"]
        spec.setdefault("replicas", 1)
        spec["strategy"] = {"type": "RollingUpdate"}
        pod = spec["template"]["spec"]
        pod["dnsPolicy"] = "ClusterFirst"
        for c in pod["containers"]:
            c["terminationMessagePath"] = "/dev/termination-log"
            c["readinessProbe"]["periodSeconds"] = c["readinessProbe"].get("periodSeconds", 10)
        pod["volumes"][1]["configMap"]["defaultMode"] = 420
    if obj["kind"] == "Service":
        live["spec"].update(clusterIP="10.96.0.7", clusterIPs=["10.96.0.7"],
                            sessionAffinity="None", ipFamilies=["IPv4"])
    live["status"] = {"observedGeneration": 1}
    return live


def test_no_drift_against_what_the_api_server_added() -> None:
    for obj in objects().values():
        assert drift(obj, as_served(obj)) == [], obj["kind"]
        assert plan_object(obj, as_served(obj)) is None


def test_changed_and_missing_fields_are_drift_with_their_paths() -> None:
    d = objects()["Deployment"]
    live = as_served(d)
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    del live["metadata"]["labels"][MANAGED_BY_LABEL]
    live["spec"]["template"]["spec"]["volumes"].pop()
    assert drift(d, live) == [
        f"metadata.labels.{MANAGED_BY_LABEL}",
        "spec.template.spec.containers[0].image",
        "spec.template.spec.volumes",
    ]


def test_security_contexts_are_compared_exactly() -> None:
    d = objects()["Deployment"]
    live = as_served(d)
    live["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"][
        "add"] = ["NET_ADMIN"]
    live["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    paths = drift(d, live)
    assert "spec.template.spec.containers[0].securityContext.capabilities (unexpected add)" \
        in paths
    assert "spec.template.spec.securityContext.runAsUser" in paths
    action = plan_object(d, live)
    assert action is not None and action.verb == "update"
    assert action.body is not None
    fixed = action.body["spec"]["template"]["spec"]
    assert fixed["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert drift(d, action.body) == []


def test_merged_keeps_what_others_added_and_the_resource_version() -> None:
    svc = objects()["Service"]
    live = as_served(svc, rv="77")
    live["metadata"]["labels"]["team"] = "payments"
    live["metadata"]["annotations"] = {"note": "kept"}
    live["metadata"]["ownerReferences"] = [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": "waypoint",
         "uid": "old-uid", "controller": True},
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "cm"}]
    live["spec"]["ports"][0]["port"] = 80
    live["spec"]["selector"]["extra"] = "label"
    assert drift(svc, live) == [
        "metadata.ownerReferences",
        "spec.selector (unexpected extra)",
        "spec.ports[0].port",
    ]
    out = merged(live, svc)
    meta = out["metadata"]
    assert meta["resourceVersion"] == "77" and meta["uid"] == "obj-uid"
    assert meta["labels"]["team"] == "payments" and meta["annotations"] == {"note": "kept"}
    assert [r["uid"] for r in meta["ownerReferences"]] == ["cm", UID]  # the Gateway's: ours
    assert out["spec"]["clusterIP"] == "10.96.0.7"  # immutable, kept
    assert out["spec"]["selector"] == {GATEWAY_NAME_LABEL: "waypoint"}  # exact: replaced
    assert out["spec"]["ports"][0]["port"] == 15008
    assert "status" not in out
    assert drift(svc, out) == []


def test_plan_create_update_and_recreate_for_an_immutable_selector() -> None:
    objs = objects()
    create = plan_object(objs["Service"], None)
    assert create is not None and (create.verb, create.resource, create.why) == (
        "create", SERVICES, "missing")
    d = objs["Deployment"]
    live = as_served(d)
    live["spec"]["selector"] = {"matchLabels": {"app": "something-else"}}
    recreate = plan_object(d, live)
    assert recreate is not None
    assert (recreate.verb, recreate.resource, recreate.uid) == ("delete", DEPLOYMENTS,
                                                                "obj-uid")
    assert "spec.selector" in recreate.why
    scaled = as_served(d)
    scaled["spec"]["replicas"] = 5  # no annotation: replicas are not ours
    assert plan_object(d, scaled) is None
    wanted = objects(annotations={REPLICAS_ANNOTATION: "2"})["Deployment"]
    update = plan_object(wanted, scaled)
    assert update is not None and update.verb == "update" and "spec.replicas" in update.why
    assert update.body is not None and update.body["spec"]["replicas"] == 2

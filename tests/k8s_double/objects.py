"""Builders for the Kubernetes objects tests put into the double, shaped as the API serves them."""

from __future__ import annotations

import copy
from typing import Any

from controller.registry.model import AMBIENT, DATAPLANE_MODE_LABEL


def namespace(name: str, *, ambient: bool = True, labels: dict[str, str] | None = None) \
        -> dict[str, Any]:
    all_labels = {"kubernetes.io/metadata.name": name, **(labels or {})}
    if ambient:
        all_labels[DATAPLANE_MODE_LABEL] = AMBIENT
    return {"metadata": {"name": name, "labels": all_labels}}


def pod(name: str, ns: str, ip: str | None, *, node: str | None = "node-a",
        sa: str = "default", labels: dict[str, str] | None = None, ready: bool = True,
        replicaset: str | None = None, ports: dict[str, int] | None = None,
        phase: str = "Running", host_network: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": dict(labels or {})}
    if replicaset:
        pod_hash = replicaset.rsplit("-", 1)[1]
        meta["labels"]["pod-template-hash"] = pod_hash
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                    "name": replicaset, "uid": f"uid-{replicaset}",
                                    "controller": True, "blockOwnerDeletion": True}]
    container: dict[str, Any] = {"name": "main", "image": "example/app:1"}
    if ports:
        container["ports"] = [{"name": n, "containerPort": p, "protocol": "TCP"}
                              for n, p in ports.items()]
    spec: dict[str, Any] = {"serviceAccountName": sa, "containers": [container]}
    if node:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"metadata": meta, "spec": spec, "status": status}


def service(name: str, ns: str, cluster_ip: str, selector: dict[str, str],
            ports: list[dict[str, Any]], *, labels: dict[str, str] | None = None) \
        -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if labels:
        meta["labels"] = dict(labels)
    return {"metadata": meta,
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                     "selector": selector, "ports": ports}}


def endpoint_slice(name: str, ns: str, service_name: str, ports: dict[str, int],
                   addresses: list[str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()]}


def service_account(name: str, ns: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}}


def authorization_policy(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def peer_authentication(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def gateway(name: str, ns: str, *, gateway_class: str = "ambit-waypoint",
            labels: dict[str, str] | None = None,
            annotations: dict[str, str] | None = None, port: int = 15008) -> dict[str, Any]:
    """A waypoint Gateway as the API server stores it (listener defaults filled in)."""
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": dict(labels or {})}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"metadata": meta,
            "spec": {"gatewayClassName": gateway_class,
                     "listeners": [{"name": "mesh", "port": port, "protocol": "HBONE",
                                    "allowedRoutes": {"namespaces": {"from": "Same"}}}]}}


def deployment(name: str, ns: str, labels: dict[str, str], *,
               image: str = "example/app:1") -> dict[str, Any]:
    """A Deployment as someone other than Ambit writes it (the API server's defaults left
    out: tests put it into the store directly)."""
    return {"metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
            "spec": {"replicas": 1, "selector": {"matchLabels": dict(labels)},
                     "template": {"metadata": {"labels": dict(labels)},
                                  "spec": {"containers": [{"name": "main", "image": image}]}}}}


def http_route(name: str, ns: str, spec: dict[str, Any], *,
               created: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    return {"metadata": meta, "spec": spec}


def http_fault(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


# ----- what controllers and the kubelet write (the double runs none of them) -----

def deployment_status(obj: dict[str, Any], *, available: int | None = None) -> dict[str, Any]:
    """The status the Deployment controller writes once ``available`` replicas (default: all)
    of the current spec run."""
    want = int(obj["spec"].get("replicas", 1))
    ready = want if available is None else available
    done = ready >= want
    return {
        "observedGeneration": obj["metadata"].get("generation", 1),
        "replicas": want, "updatedReplicas": want, "readyReplicas": ready,
        "availableReplicas": ready, "unavailableReplicas": want - ready,
        "conditions": [
            {"type": "Available", "status": "True" if ready else "False",
             "reason": "MinimumReplicasAvailable" if ready else "MinimumReplicasUnavailable"},
            {"type": "Progressing", "status": "True",
             "reason": "NewReplicaSetAvailable" if done else "ReplicaSetUpdated"},
        ],
    }


def daemonset_status(obj: dict[str, Any], nodes: int, *, ready: int | None = None,
                     updated: int | None = None) -> dict[str, Any]:
    """The status the DaemonSet controller writes for ``nodes`` nodes, ``ready`` of them
    ready (default all) and ``updated`` of them on the current template (default all)."""
    ready = nodes if ready is None else ready
    return {
        "observedGeneration": obj["metadata"].get("generation", 1),
        "desiredNumberScheduled": nodes, "currentNumberScheduled": nodes,
        "numberMisscheduled": 0, "numberReady": ready, "numberAvailable": ready,
        "numberUnavailable": nodes - ready,
        "updatedNumberScheduled": nodes if updated is None else updated,
    }


def daemonset_pod(ds: dict[str, Any], name: str, node: str, ip: str, *,
                  ready: bool = True, restarts: int = 0,
                  waiting: str | None = None) -> dict[str, Any]:
    """A pod of DaemonSet ``ds`` on ``node``, owned by it as the DaemonSet controller does
    (so foreground deletion and the garbage collector find it)."""
    template = ds["spec"]["template"]
    meta = {"name": name, "namespace": ds["metadata"]["namespace"],
            "labels": dict(template["metadata"].get("labels") or {}),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                 "name": ds["metadata"]["name"], "uid": ds["metadata"]["uid"],
                                 "controller": True, "blockOwnerDeletion": True}]}
    statuses = []
    for c in template["spec"].get("containers") or []:
        state: dict[str, Any] = {"running": {"startedAt": "2025-01-01T00:00:00Z"}}
        if waiting:
            state = {"waiting": {"reason": waiting, "message": f"{waiting} for {c['image']}"}}
        statuses.append({"name": c["name"], "image": c["image"], "ready": ready,
                         "restartCount": restarts, "state": state})
    return {"metadata": meta,
            "spec": {"nodeName": node, "hostNetwork": True,
                     "containers": copy.deepcopy(template["spec"].get("containers") or [])},
            "status": {"phase": "Pending" if waiting else "Running", "podIP": ip,
                       "podIPs": [{"ip": ip}], "containerStatuses": statuses,
                       "conditions": [{"type": "Ready",
                                       "status": "True" if ready else "False"}]}}

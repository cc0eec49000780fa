"""``ambit waypoint apply|delete|list``: declare waypoints where the mesh keeps its config.

Why one module for three places: a waypoint is always a Gateway of class ``ambit-waypoint``,
but what runs it differs. In Kubernetes the controller renders its Deployment and Service; in
a local dev cluster (``--cluster``) this command also starts its pod, as the Deployment would;
with the embedded registry alone (``--db``) it records the Gateway and says how to start an
instance (``ambit waypoint run`` on a node). The user types the same command in all three.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.waypoint.model import USE_WAYPOINT_LABEL, WAYPOINT_CLASS, WAYPOINT_FOR_LABEL
from controller.waypoint.parse import HBONE_LISTENER
from mesh.ports import GATEWAY_NAME_LABEL, GRPC_PORT, HBONE_PORT, METRICS_PORT, XDS_PORT

Out = Callable[[str], None]


class ManageError(Exception):
    """A waypoint command that cannot be carried out; the message says what to do."""


def gateway_document(namespace: str, name: str, waypoint_for: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {WAYPOINT_FOR_LABEL: waypoint_for}},
        "spec": {"gatewayClassName": WAYPOINT_CLASS,
                 "listeners": [HBONE_LISTENER]},
    }


def _where(cluster: str | None, db: Path | None, kubeconfig: str | None) -> str:
    if cluster:
        return "cluster"
    if kubeconfig or (db is None and os.environ.get("KUBECONFIG")):
        return "kubernetes"
    return "embedded"


def _bind_hint(namespace: str, name: str) -> str:
    return (f"bind a service: label it {USE_WAYPOINT_LABEL}={name} (or the namespace "
            f"{namespace}, for all its services)")


def apply(namespace: str, name: str, waypoint_for: str, out: Out, *, cluster: str | None = None,
          node: str | None = None, db: Path | None = None,
          kubeconfig: str | None = None) -> None:
    where = _where(cluster, db, kubeconfig)
    if where == "cluster":
        from ambit.dev.cluster import ClusterError, DevCluster
        from controller.registry.documents import DocumentError

        try:
            c = DevCluster.load(cluster or "dev", out=out)
            existing = c.waypoint_pod(name, namespace)
            if existing in c.pods:
                c.apply([gateway_document(namespace, name, waypoint_for)])
                out(f"waypoint {namespace}/{name} updated (pod {existing} keeps running)")
                return
            out(f"waypoint {namespace}/{name}: starting Envoy in a pod (certificate, then "
                "config from the controller over xDS) ...")
            pod = c.add_waypoint(name, namespace, node, waypoint_for)
        except (ClusterError, DocumentError) as e:
            raise ManageError(str(e)) from None
        out(f"waypoint {namespace}/{name} ready: pod {pod.name} {pod.ip} on {pod.node}, "
            f"identity spiffe://cluster.local/ns/{namespace}/sa/{name}, HBONE on "
            f"{pod.ip}:{HBONE_PORT}, metrics on {pod.ip}:{METRICS_PORT}")
        out(_bind_hint(namespace, name))
        return
    if where == "kubernetes":
        from controller.waypoint.k8s_apply import apply_waypoint

        out(asyncio.run(_with_api(kubeconfig, lambda api: apply_waypoint(
            api, namespace, name, waypoint_for))))
        out(_bind_hint(namespace, name))
        return
    from ambit.registry_cli import db_path
    from controller.registry.documents import DocumentError
    from controller.registry.sqlite import EmbeddedRegistry, RegistryError

    path = db_path(db)
    try:
        with EmbeddedRegistry(path) as registry:
            registry.apply([gateway_document(namespace, name, waypoint_for)])
    except (RegistryError, DocumentError) as e:
        raise ManageError(f"registry {path}: {e}") from None
    out(f"waypoint {namespace}/{name} recorded in {path}")
    out(f"start an instance on a node: ambit waypoint run --namespace {namespace} --gateway "
        f"{name} --pod-name NAME --pod-ip IP --controller CONTROLLER:{XDS_PORT} --ca-address "
        f"CONTROLLER:{GRPC_PORT} --token-file NODE_TOKEN --ca-root-cert TRUST_BUNDLE (register it "
        f"as a workload labelled {GATEWAY_NAME_LABEL}={name}, service account {name})")
    out(_bind_hint(namespace, name))


def delete(namespace: str, name: str, out: Out, *, cluster: str | None = None,
           db: Path | None = None, kubeconfig: str | None = None) -> None:
    where = _where(cluster, db, kubeconfig)
    if where == "cluster":
        from ambit.dev.cluster import ClusterError, DevCluster

        try:
            DevCluster.load(cluster or "dev", out=out).delete_waypoint(name, namespace)
        except ClusterError as e:
            raise ManageError(str(e)) from None
    elif where == "kubernetes":
        from controller.waypoint.k8s_apply import delete_waypoint

        out(asyncio.run(_with_api(kubeconfig, lambda api: delete_waypoint(
            api, namespace, name))))
        return
    else:
        from ambit.registry_cli import db_path
        from controller.registry.sqlite import EmbeddedRegistry, RegistryError

        path = db_path(db)
        try:
            with EmbeddedRegistry(path) as registry:
                registry.delete("Gateway", namespace, name)
        except RegistryError as e:
            raise ManageError(str(e)) from None
    out(f"waypoint {namespace}/{name} deleted; services still labelled "
        f"{USE_WAYPOINT_LABEL}={name} now refuse traffic until unlabelled (fail closed)")


def list_lines(*, cluster: str | None = None, db: Path | None = None) -> list[str]:
    """Waypoints of the embedded registry (or a dev cluster's) and what is bound to them."""
    from ambit.registry_cli import db_path
    from controller.registry.sqlite import EmbeddedRegistry
    from controller.registry.translate import translate

    if cluster:
        from ambit.dev.cluster import ClusterError, DevCluster

        try:
            path = DevCluster.load(cluster).db
        except ClusterError as e:
            raise ManageError(str(e)) from None
    else:
        path = db_path(db)
    if not path.exists():
        raise ManageError(f"no registry at {path} (pass --db, set AMBIT_DB, or --cluster)")
    with EmbeddedRegistry(path) as registry:
        snap = registry.snapshot()
    config = translate(snap, "cluster.local", snap.revision).config
    lines = [f"{'NAMESPACE':<14} {'NAME':<16} {'FOR':<9} {'INSTANCES':<22} BOUND SERVICES"]
    for gw in sorted(snap.gateways, key=lambda g: g.key):
        pods = [p for p in snap.pods if p.namespace == gw.namespace
                and dict(p.labels).get(GATEWAY_NAME_LABEL) == gw.name]
        inst = ",".join(f"{p.name}({p.ips[0] if p.ips else 'no IP'})" for p in pods) or "none"
        bound = ",".join(s.key for s in config.services
                         if s.waypoint is not None and s.waypoint.key == gw.key) or "-"
        lines.append(f"{gw.namespace:<14} {gw.name:<16} {gw.waypoint_for:<9} {inst:<22} {bound}")
    return lines


async def _with_api(kubeconfig: str | None, action: Callable[[Any], Any]) -> str:
    from controller.registry.kubernetes import api_client

    try:
        api = await api_client(kubeconfig)
    except Exception as e:  # kubernetes_asyncio raises several unrelated types here
        raise ManageError(f"cannot load Kubernetes credentials ({kubeconfig or 'in-cluster'}):"
                          f" {e}") from None
    from controller.waypoint.k8s_apply import WaypointApplyError

    try:
        result: str = await action(api)
        return result
    except WaypointApplyError as e:
        raise ManageError(str(e)) from None
    finally:
        await api.close()

"""The dev cluster's waypoints: a Gateway declared and its Envoy run in a pod.

Why it exists: on Kubernetes, the Gateway controller and the kubelet turn a Gateway of class
``ambit-waypoint`` into a running waypoint; the dev cluster has neither, so this module does
their part: it applies the Gateway, adds a pod labelled with the gateway's name (which the
agent never captures) and runs ``ambit waypoint run`` in it, which gets a certificate from
the controller's CA and its Envoy configuration over xDS. ``ambit waypoint apply --cluster``
and the waypoint e2e tests drive it.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from ambit.dev import mesh
from ambit.dev.cluster_pods import ClusterPods
from ambit.dev.cluster_state import CONTROL_PLANE_IP, ClusterError, PodInfo
from controller.waypoint.parse import HBONE_LISTENER
from mesh.ports import METRICS_PORT, READINESS_PORT, XDS_PORT

WAYPOINT_RUN_ROOT = Path("/var/run/ambit-dev-wp")


class ClusterWaypoints(ClusterPods):
    """Add, delete and query waypoints (one pod each)."""

    def waypoint_run_dir(self, name: str, namespace: str = "default") -> Path:
        """The waypoint agent's directory. Short and outside ``self.dir`` (which may be
        deep, e.g. under pytest's tmp) because it holds a unix socket (108-byte limit)."""
        return WAYPOINT_RUN_ROOT / f"{self.name}-{namespace}-{name}"

    @staticmethod
    def waypoint_pod(name: str, namespace: str = "default") -> str:
        """The waypoint's pod name (pods are named cluster-wide here)."""
        return f"{name}-wp" if namespace == "default" else f"{namespace}-{name}-wp"

    def add_waypoint(self, name: str, namespace: str = "default",
                     node_ref: str | int | None = None, waypoint_for: str = "service",
                     timeout: float = 60.0) -> PodInfo:
        """Declare a waypoint (a Gateway of class ambit-waypoint) and run it, as Kubernetes'
        Gateway controller and kubelet would: a pod labelled with the gateway's name (never
        captured), running ``ambit waypoint run`` (certificate from the CA, then Envoy
        configured by the controller over xDS). Ready when Envoy has its listeners."""
        from controller.waypoint.model import WAYPOINT_CLASS
        from mesh.ports import GATEWAY_NAME_LABEL

        node = self.node(node_ref) if node_ref is not None else min(
            self.nodes, key=lambda n: sum(1 for p in self.pods.values() if p.node == n.name))
        self.apply([{
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"ambit.dev/waypoint-for": waypoint_for}},
            "spec": {"gatewayClassName": WAYPOINT_CLASS,
                     "listeners": [HBONE_LISTENER]},
        }])
        pod_name = self.waypoint_pod(name, namespace)
        pod = self.add_pod(pod_name, node.name, namespace=namespace, service_account=name,
                           labels={GATEWAY_NAME_LABEL: name, "app": name})
        run_dir = self.waypoint_run_dir(name, namespace)
        run_dir.mkdir(parents=True, exist_ok=True)
        role = f"pod/{pod_name}/waypoint"
        self.spawn(role, pod.netns, self._ambit(
            "waypoint", "run", "--namespace", namespace, "--gateway", name,
            "--pod-name", pod_name, "--pod-ip", pod.ip, "--service-account", name,
            "--controller", f"{CONTROL_PLANE_IP}:{XDS_PORT}",
            "--ca-address", self.controller_address,
            "--token-file", str(Path(node.run_dir) / "node.token"),
            "--ca-root-cert", str(self.trust_bundle), "--run-dir", str(run_dir)),
            cgroup=Path(pod.cgroup))
        self._wait_http(role, pod.netns, f"http://127.0.0.1:{READINESS_PORT}/healthz/ready",
                        timeout)
        self.save()
        return pod

    def delete_waypoint(self, name: str, namespace: str = "default") -> None:
        pod_name = self.waypoint_pod(name, namespace)
        if pod_name in self.pods:
            self.delete_pod(pod_name)
        with contextlib.suppress(Exception):
            self.delete("Gateway", namespace, name)
        shutil.rmtree(self.waypoint_run_dir(name, namespace), ignore_errors=True)

    def _remove_waypoint_dirs(self) -> None:
        """Remove every waypoint directory of this cluster (``down``), pods already gone."""
        for wp_dir in WAYPOINT_RUN_ROOT.glob(f"{self.name}-*"):
            shutil.rmtree(wp_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            WAYPOINT_RUN_ROOT.rmdir()  # only when no other cluster has waypoints

    def waypoint_metrics(self, name: str, namespace: str = "default") -> str:
        pod = self.pod(self.waypoint_pod(name, namespace))
        status, body = mesh.http_get(pod.netns, f"http://127.0.0.1:{METRICS_PORT}/metrics")
        if status != 200:
            raise ClusterError(f"waypoint {namespace}/{name} metrics: {status} {body[:200]}")
        return body

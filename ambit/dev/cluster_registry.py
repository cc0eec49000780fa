"""The dev cluster's registry edits: documents written as the API server would hold them.

Why it exists: in the dev cluster the embedded registry (``registry.db``) plays the API
server's part, and the other parts write to it the way Kubernetes' own components would:
namespaces and policies as a user applies them, a pod's Workload as the scheduler and the
kubelet record it, a waypoint's Gateway, the node tokens an installer issues. One place opens
the registry, so what the cluster writes there is easy to see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ambit.dev.cluster_state import ClusterState, PodInfo


class ClusterRegistry(ClusterState):
    """Write to and delete from the cluster's embedded registry."""

    def apply(self, documents: Sequence[Mapping[str, Any]]) -> None:
        """Write documents to the embedded registry, as ``ambit apply`` would."""
        from controller.registry.sqlite import EmbeddedRegistry

        with EmbeddedRegistry(self.db) as registry:
            registry.apply(list(documents))

    def delete(self, kind: str, namespace: str, name: str, missing_ok: bool = False) -> None:
        from controller.registry.sqlite import EmbeddedRegistry, NotFoundError

        with EmbeddedRegistry(self.db) as registry:
            try:
                registry.delete(kind, namespace, name)
            except NotFoundError:
                if not missing_ok:
                    raise

    def set_namespace(self, name: str, ambient: bool,
                      labels: Mapping[str, str] | None = None) -> None:
        all_labels = dict(labels or {})
        if ambient:
            all_labels["ambit.dev/dataplane-mode"] = "ambient"
        self.apply([{"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": name, "labels": all_labels}}])

    def _issue_node_token(self, node_name: str) -> str:
        """A node's credential for the controller, as an installer would issue it."""
        from controller.registry.sqlite import EmbeddedRegistry

        with EmbeddedRegistry(self.db) as registry:
            return registry.issue_node_token(node_name)

    def _workload_doc(self, pod: PodInfo, addresses: Sequence[str]) -> dict[str, Any]:
        return {"apiVersion": "ambit.dev/v1", "kind": "Workload",
                "metadata": {"name": pod.name, "namespace": pod.namespace,
                             "labels": dict(pod.labels)},
                "spec": {"serviceAccount": pod.service_account, "node": pod.node,
                         "addresses": list(addresses)}}

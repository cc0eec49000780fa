"""The names, labels and ports of an installation, as pinned by the install contract.

Why one module: ``ambit install`` writes these, ``ambit uninstall`` removes them and
``ambit status`` reads them back; the manifests in ``deploy/daemonset`` spell the same names
(the renderer does not depend on file names, only on these kinds and names).
"""

from __future__ import annotations

from controller.registry.model import AMBIENT, DATAPLANE_MODE_LABEL
from controller.waypoint.deploy import MANAGED_BY, MANAGED_BY_LABEL
from controller.waypoint.model import WAYPOINT_CLASS
from mesh.ports import NODE_METRICS_PORT as AGENT_PORT

__all__ = [
    "AGENT_PORT", "AMBIENT", "CONFIG_HASH_ANNOTATION", "CONFIG_MAP", "CONTROLLER",
    "DATAPLANE_MODE_LABEL", "DEFAULT_CONFIG", "FIELD_MANAGER", "GATEWAY_CLASS", "INSTALL_LABELS",
    "LEASE", "NAMESPACE", "NODE_DAEMONSET", "WAYPOINT_CONTROLLER_NAME", "WAYPOINT_LABEL",
    "WAYPOINT_LABEL_VALUE",
]

NAMESPACE = "ambit-system"
CONTROLLER = "ambit-controller"  # Deployment, Service, PodDisruptionBudget, Lease, RBAC
LEASE = CONTROLLER
NODE_DAEMONSET = "ambit-node"
CONFIG_MAP = "ambit-config"
# The ConfigMap's keys and their defaults (the manifests carry the defaults).
DEFAULT_CONFIG = {"trustDomain": "cluster.local", "redirectMode": "auto", "uplinks": "auto"}
CONFIG_HASH_ANNOTATION = "ambit.dev/config-hash"
# Every object Ambit installs carries both.
INSTALL_LABELS = {"app.kubernetes.io/part-of": "ambit", "app.kubernetes.io/managed-by": "ambit"}
FIELD_MANAGER = "ambit"
GATEWAY_CLASS = WAYPOINT_CLASS
WAYPOINT_CONTROLLER_NAME = "ambit.dev/waypoint-controller"
# What the controller's waypoint deployer puts on the objects it creates.
WAYPOINT_LABEL = MANAGED_BY_LABEL
WAYPOINT_LABEL_VALUE = MANAGED_BY
# The node agent's endpoint: /metrics, /healthz/ready, /debug/pods.

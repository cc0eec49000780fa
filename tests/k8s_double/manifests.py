"""Small manifests shaped like ``deploy/daemonset``, for tests of ``ambit install``.

Why not the real ones: the renderer must not depend on file names, so tests use a different
file layout (a nested directory, several objects per file, an empty document) with the names,
kinds, labels and ConfigMap wiring the install contract pins. The CRDs are the repository's
own (``deploy/daemonset/crds``), so custom resources of those kinds go with them on uninstall.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = "localhost/ambit:0.1.0"
LABELS = """    app.kubernetes.io/part-of: ambit
    app.kubernetes.io/managed-by: ambit"""

NAMESPACE = f"""apiVersion: v1
kind: Namespace
metadata:
  name: ambit-system
  labels:
{LABELS}
"""

RBAC = f"""apiVersion: v1
kind: ServiceAccount
metadata:
  name: ambit-controller
  namespace: ambit-system
  labels:
{LABELS}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: ztunnel
  namespace: ambit-system
  labels:
{LABELS}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: ambit-controller
  labels:
{LABELS}
rules:
  - apiGroups: [""]
    resources: [namespaces, pods, services, serviceaccounts, configmaps]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: ambit-controller
  labels:
{LABELS}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ambit-controller}}
subjects: [{{kind: ServiceAccount, name: ambit-controller, namespace: ambit-system}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: ambit-node
  namespace: ambit-system
  labels:
{LABELS}
rules:
  - apiGroups: [apps]
    resources: [daemonsets]
    resourceNames: [ambit-node]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: ambit-node
  namespace: ambit-system
  labels:
{LABELS}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: ambit-node}}
subjects: [{{kind: ServiceAccount, name: ztunnel, namespace: ambit-system}}]
---
"""

CONFIG = f"""apiVersion: v1
kind: ConfigMap
metadata:
  name: ambit-config
  namespace: ambit-system
  labels:
{LABELS}
data:
  trustDomain: cluster.local
  redirectMode: auto
  uplinks: auto
"""

CONTROLLER = f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: ambit-controller
  namespace: ambit-system
  labels:
{LABELS}
spec:
  replicas: 2
  selector:
    matchLabels: {{app: ambit-controller}}
  template:
    metadata:
      labels: {{app: ambit-controller}}
    spec:
      serviceAccountName: ambit-controller
      containers:
        - name: controller
          image: {DEFAULT_IMAGE}
          imagePullPolicy: IfNotPresent
          args: [controller, --mode, kubernetes, --trust-domain, $(TRUST_DOMAIN),
                 --waypoint-image, {DEFAULT_IMAGE}]
          env:
            - name: TRUST_DOMAIN
              valueFrom: {{configMapKeyRef: {{name: ambit-config, key: trustDomain}}}}
          ports:
            - {{name: grpc, containerPort: 15012}}
---
apiVersion: v1
kind: Service
metadata:
  name: ambit-controller
  namespace: ambit-system
  labels:
{LABELS}
spec:
  selector: {{app: ambit-controller}}
  ports:
    - {{name: grpc, port: 15012}}
    - {{name: xds, port: 15011}}
    - {{name: monitoring, port: 15014}}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: ambit-controller
  namespace: ambit-system
  labels:
{LABELS}
spec:
  minAvailable: 1
  selector:
    matchLabels: {{app: ambit-controller}}
"""

NODE = f"""apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: ambit-node
  namespace: ambit-system
  labels:
{LABELS}
spec:
  selector:
    matchLabels: {{app: ambit-node}}
  updateStrategy:
    type: RollingUpdate
    rollingUpdate: {{maxUnavailable: 1, maxSurge: 0}}
  template:
    metadata:
      labels: {{app: ambit-node}}
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: "15022"
    spec:
      serviceAccountName: ztunnel
      hostNetwork: true
      initContainers:
        - name: install-cni
          image: {DEFAULT_IMAGE}
          args: [agent, cni, install]
      containers:
        - name: agent
          image: {DEFAULT_IMAGE}
          args: [agent, run, --redirect-mode, $(REDIRECT_MODE), --uplink, $(UPLINKS)]
          env:
            - name: REDIRECT_MODE
              valueFrom: {{configMapKeyRef: {{name: ambit-config, key: redirectMode}}}}
            - name: UPLINKS
              valueFrom: {{configMapKeyRef: {{name: ambit-config, key: uplinks}}}}
        - name: ztunnel
          image: {DEFAULT_IMAGE}
          args: [ztunnel, --trust-domain, $(TRUST_DOMAIN)]
          envFrom:
            - configMapRef: {{name: ambit-config}}
"""


def write_manifests(directory: Path) -> Path:
    """A kustomization in ``directory``: namespace, CRDs (nested kustomization), RBAC,
    config, controller, node. Returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    crds = directory / "crd-base"
    crds.mkdir(exist_ok=True)
    names = sorted(p.name for p in (REPO / "deploy" / "daemonset" / "crds").glob("*.yaml"))
    for name in names:
        shutil.copy(REPO / "deploy" / "daemonset" / "crds" / name, crds / name)
    (crds / "kustomization.yaml").write_text(
        "resources:\n" + "".join(f"  - {n}\n" for n in names))
    files = {"00-ns.yaml": NAMESPACE, "rbac.yaml": RBAC, "settings.yaml": CONFIG,
             "control-plane.yaml": CONTROLLER, "nodes.yaml": NODE}
    for name, text in files.items():
        (directory / name).write_text(text)
    (directory / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n"
        "  - 00-ns.yaml\n  - crd-base\n  - rbac.yaml\n  - settings.yaml\n"
        "  - control-plane.yaml\n  - nodes.yaml\n")
    return directory

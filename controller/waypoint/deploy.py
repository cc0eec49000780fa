"""What runs a waypoint in Kubernetes, and what its Gateway's status says: pure rendering.

Why it exists: in Kubernetes mode a waypoint is a Gateway API ``Gateway`` of class
``ambit-waypoint``. As with Istio's gateway deployment controller (and any Gateway API
implementation that provisions its own infrastructure), the user writes only the Gateway and
the controller creates and keeps in place what runs it (``k8s_deployer``). This module says what
those objects are, and nothing else: no I/O, no clock, so every field is tested on its own and
the reconcile loop compares live objects against exactly this.

Per Gateway ``<ns>/<gw>``, all in ``<ns>``, each labelled ``ambit.dev/managed-by=ambit-controller``
and owned by the Gateway (``ownerReferences``, ``controller: true``, so Kubernetes' garbage
collector removes them with it):

* ServiceAccount ``<gw>``: the waypoint's identity, ``spiffe://<td>/ns/<ns>/sa/<gw>``.
* Deployment ``<gw>``: pods labelled ``gateway.networking.k8s.io/gateway-name=<gw>`` (how the
  registry finds a waypoint's instances) and ``ambit.dev/dataplane-mode=none`` (a waypoint
  terminates HBONE itself and is never captured), running ``ambit waypoint run``:

  - the CA credential is the pod's own projected service-account token, audience ``ambit-ca``,
    one hour, at ``/var/run/secrets/ambit/token`` (the CA checks it with TokenReview and issues
    only the pod's own identity, see ``controller/registry/k8s_auth.py``); the default API
    token is not mounted (``automountServiceAccountToken: false``): a waypoint never calls the
    API server;
  - the trust bundle that verifies the controller comes from the ConfigMap ``ambit-ca-root``
    (key ``root-cert.pem``) of the Gateway's namespace, mounted at ``/var/run/ambit/ca``. The
    deployer writes that ConfigMap when it is given the root (``render_ca_root``), as istiod
    writes ``istio-ca-root-cert`` into namespaces; it is shared by the namespace's waypoints,
    so each of them is an owner (none the controller);
  - ports HBONE, 15020 (metrics; Prometheus scrape annotations) and 15021 (readiness,
    ``GET /healthz/ready``, the probe);
  - hardened: non-root (uid/gid 1337), no privilege escalation, every capability dropped and
    none added, read-only root filesystem (the run directory ``/var/run/ambit/waypoint`` and
    ``/tmp`` are ``emptyDir``s), RuntimeDefault seccomp, resource requests and limits;
  - ``terminationGracePeriodSeconds`` = the runner's drain (``--drain-seconds``) + 10 s, so
    the kubelet never kills Envoy mid-drain;
  - replicas: the annotation ``ambit.dev/waypoint-replicas`` on the Gateway sets (and keeps)
    the count; without it the Deployment starts with Kubernetes' default of 1 and the field is
    left to whoever scales it (``kubectl scale``, a HorizontalPodAutoscaler).

* Service ``<gw>``: ClusterIP, the HBONE port named ``mesh`` with ``appProtocol: all``, selecting
  the gateway-name label. Its cluster IP is the Gateway's address in status.

``gateway_status`` is the status patch: ``addresses`` (the Service's cluster IPs) and the
``Accepted`` and ``Programmed`` conditions with Gateway API reasons, each keeping its
``lastTransitionTime`` while its status does not change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.registry.model import DATAPLANE_MODE_LABEL, OPT_OUT
from controller.waypoint.model import Gateway
from controller.waypoint.parse import GATEWAY_API_VERSION, HBONE_PORT
from mesh.ports import GATEWAY_NAME_LABEL, METRICS_PORT, READINESS_PORT

__all__ = [
    "CA_AUDIENCE", "CA_ROOT_CONFIGMAP", "CA_ROOT_KEY", "MANAGED_BY", "MANAGED_BY_LABEL",
    "REPLICAS_ANNOTATION", "Condition", "Problem", "RenderError", "Resources",
    "gateway_conditions", "gateway_status", "managed_labels", "owner_reference", "render",
    "render_ca_root", "replicas", "status_differs",
]

MANAGED_BY_LABEL = "ambit.dev/managed-by"
MANAGED_BY = "ambit-controller"
# On the Gateway: how many waypoint pods (an integer 0..MAX_REPLICAS).
REPLICAS_ANNOTATION = "ambit.dev/waypoint-replicas"
MAX_REPLICAS = 1000
CA_ROOT_CONFIGMAP = "ambit-ca-root"
CA_ROOT_KEY = "root-cert.pem"
CA_AUDIENCE = "ambit-ca"
TOKEN_SECONDS = 3600
TOKEN_DIR = "/var/run/secrets/ambit"
TOKEN_FILE = "token"
CA_DIR = "/var/run/ambit/ca"
RUN_DIR = "/var/run/ambit/waypoint"
CONTAINER = "waypoint"
RUN_AS = 1337
DEFAULT_DRAIN_SECONDS = 5.0
# Grace beyond the drain: the runner stops Envoy and exits after draining.
GRACE_MARGIN_SECONDS = 10
PROMETHEUS_ANNOTATIONS = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                          "prometheus.io/path": "/metrics"}
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class RenderError(ValueError):
    """A Gateway that cannot be rendered (a bad annotation, a name a Service cannot have); the
    message says what to change."""


@dataclass(frozen=True)
class Resources:
    """Requests and limits of the waypoint container, as Kubernetes quantities (canonical form,
    so the API server stores them as written and they never look drifted)."""

    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = "2"
    memory_limit: str = "1Gi"


DEFAULT_RESOURCES = Resources()


def managed_labels(gateway: Gateway) -> dict[str, str]:
    """The labels every object of ``gateway`` carries (the deployer's watches select them)."""
    return {GATEWAY_NAME_LABEL: gateway.name, MANAGED_BY_LABEL: MANAGED_BY}


def owner_reference(gateway: Gateway, uid: str, *, controller: bool = True) -> dict[str, Any]:
    """A reference to ``gateway`` (``uid`` is its ``metadata.uid``). ``blockOwnerDeletion`` is
    left out: setting it needs ``update`` on ``gateways/finalizers`` in clusters that enforce
    owner-reference permissions, and nothing here needs foreground deletion."""
    return {"apiVersion": GATEWAY_API_VERSION, "kind": "Gateway", "name": gateway.name,
            "uid": uid, "controller": controller}


def replicas(annotations: Mapping[str, str]) -> int | None:
    """The replica count the Gateway asks for (``REPLICAS_ANNOTATION``), or None: not set."""
    raw = annotations.get(REPLICAS_ANNOTATION)
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or int(text) > MAX_REPLICAS:
        raise RenderError(f"metadata.annotations.{REPLICAS_ANNOTATION}: {raw!r} is not a number "
                          f"of replicas (0..{MAX_REPLICAS}); fix or remove the annotation")
    return int(text)


def _meta(gateway: Gateway, uid: str, name: str | None = None) -> dict[str, Any]:
    return {"name": name or gateway.name, "namespace": gateway.namespace,
            "labels": managed_labels(gateway),
            "ownerReferences": [owner_reference(gateway, uid)]}


def render(gateway: Gateway, *, uid: str, image: str, trust_domain: str,
           controller_address: str, ca_address: str = "",
           annotations: Mapping[str, str] | None = None,
           image_pull_policy: str = "IfNotPresent",
           drain_seconds: float = DEFAULT_DRAIN_SECONDS,
           resources: Resources = DEFAULT_RESOURCES,
           log_level: str = "info") -> list[dict[str, Any]]:
    """ServiceAccount, Service and Deployment of ``gateway`` (in the order to create them).

    ``uid``: the Gateway's ``metadata.uid`` (owner references need it); ``annotations``: the
    Gateway's (``REPLICAS_ANNOTATION``); ``controller_address``: HOST:PORT of the controller's
    xDS port (``--controller``); ``ca_address``: of its CA port, "" = the same. Raises
    ``RenderError``.
    """
    if not _DNS_1035.match(gateway.name) or len(gateway.name) > 63:
        raise RenderError(f"Gateway name {gateway.name!r} cannot name a Service (at most 63 "
                          "lower-case letters, digits and '-', starting with a letter); rename "
                          "the Gateway")
    if not uid:
        raise RenderError(f"Gateway {gateway.key} has no metadata.uid")
    count = replicas(annotations or {})
    name, ns = gateway.name, gateway.namespace
    selector = {GATEWAY_NAME_LABEL: name}
    service_account = {"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": _meta(gateway, uid)}
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(gateway, uid),
        "spec": {"type": "ClusterIP", "selector": dict(selector),
                 "ports": [{"name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT,
                            "protocol": "TCP", "appProtocol": "all"}]},
    }
    args = ["waypoint", "run", "--namespace", ns, "--gateway", name,
            "--pod-name", "$(POD_NAME)", "--pod-ip", "$(POD_IP)",
            "--service-account", name, "--trust-domain", trust_domain,
            "--controller", controller_address]
    if ca_address and ca_address != controller_address:
        args += ["--ca-address", ca_address]
    args += ["--token-file", f"{TOKEN_DIR}/{TOKEN_FILE}",
             "--ca-root-cert", f"{CA_DIR}/{CA_ROOT_KEY}",
             "--run-dir", RUN_DIR,
             "--metrics-port", str(METRICS_PORT), "--readiness-port", str(READINESS_PORT),
             "--drain-seconds", _seconds(drain_seconds), "--log-level", log_level]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": image_pull_policy,
        "command": ["ambit"],
        "args": args,
        "env": [_field_env("POD_NAME", "metadata.name"),
                _field_env("POD_NAMESPACE", "metadata.namespace"),
                _field_env("POD_IP", "status.podIP")],
        "ports": [{"name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                  {"name": "readiness", "containerPort": READINESS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": READINESS_PORT,
                                       "scheme": "HTTP"},
                           "initialDelaySeconds": 1, "periodSeconds": 2,
                           "timeoutSeconds": 1, "failureThreshold": 3, "successThreshold": 1},
        "resources": {"requests": {"cpu": resources.cpu_request,
                                   "memory": resources.memory_request},
                      "limits": {"cpu": resources.cpu_limit, "memory": resources.memory_limit}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "allowPrivilegeEscalation": False, "privileged": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "ambit-token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "ambit-ca", "mountPath": CA_DIR, "readOnly": True},
            {"name": "waypoint-run", "mountPath": RUN_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_labels = {**selector, DATAPLANE_MODE_LABEL: OPT_OUT, MANAGED_BY_LABEL: MANAGED_BY}
    pod_spec: dict[str, Any] = {
        "serviceAccountName": name,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": math.ceil(drain_seconds) + GRACE_MARGIN_SECONDS,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "ambit-token", "projected": {"sources": [{"serviceAccountToken": {
                "path": TOKEN_FILE, "audience": CA_AUDIENCE,
                "expirationSeconds": TOKEN_SECONDS}}]}},
            {"name": "ambit-ca", "configMap": {"name": CA_ROOT_CONFIGMAP,
                                               "items": [{"key": CA_ROOT_KEY,
                                                          "path": CA_ROOT_KEY}]}},
            {"name": "waypoint-run", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        ],
    }
    deployment_meta = _meta(gateway, uid)
    deployment_meta["labels"][DATAPLANE_MODE_LABEL] = OPT_OUT
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": dict(selector)},
        "template": {"metadata": {"labels": pod_labels,
                                  "annotations": dict(PROMETHEUS_ANNOTATIONS)},
                     "spec": pod_spec},
    }
    if count is not None:
        deployment_spec = {"replicas": count, **deployment_spec}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": deployment_meta,
                  "spec": deployment_spec}
    return [service_account, service, deployment]


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def render_ca_root(namespace: str, root_cert_pem: str,
                   owners: Sequence[tuple[Gateway, str]]) -> dict[str, Any]:
    """The namespace's trust-bundle ConfigMap, owned by each waypoint Gateway ((gateway, uid)
    pairs) of the namespace, none of them its controller: it goes when the last one does."""
    refs = [owner_reference(gw, uid, controller=False)
            for gw, uid in sorted(owners, key=lambda o: o[0].name)]
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CA_ROOT_CONFIGMAP, "namespace": namespace,
                         "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                         "ownerReferences": refs},
            "data": {CA_ROOT_KEY: root_cert_pem}}


# --- status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    type: str  # Accepted | Programmed
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Problem:
    """Why a Gateway is not (fully) served. ``accepted_reason`` set: the Gateway itself is
    refused with that reason (``ListenersNotValid``, ``InvalidParameters``); else it is
    accepted and ``programmed_reason`` says why it is not programmed (``Invalid``: something
    in the way that a person must fix; ``Pending``: the API server failed, being retried)."""

    message: str
    accepted_reason: str | None = None
    programmed_reason: str = "Pending"


def gateway_conditions(gateway_key: str, *, addresses: Sequence[str],
               problem: Problem | None = None) -> tuple[Condition, Condition]:
    """``Accepted`` and ``Programmed`` for a waypoint Gateway."""
    if problem is not None and problem.accepted_reason is not None:
        return (Condition("Accepted", False, problem.accepted_reason, problem.message),
                Condition("Programmed", False, "Invalid",
                          "not programmed: the Gateway is not accepted"))
    accepted = Condition("Accepted", True, "Accepted",
                         "accepted by Ambit: a waypoint (ServiceAccount, Deployment and Service "
                         f"{gateway_key})")
    if problem is not None:
        return accepted, Condition("Programmed", False, problem.programmed_reason,
                                   problem.message)
    if not addresses:
        return accepted, Condition("Programmed", False, "AddressNotAssigned",
                                   f"Service {gateway_key} has no cluster IP yet")
    return accepted, Condition("Programmed", True, "Programmed",
                               f"ServiceAccount, Deployment and Service {gateway_key} are in "
                               f"place; address {', '.join(addresses)}")


def gateway_status(*, generation: int | None, conditions: Sequence[Condition],
                   addresses: Sequence[str] = (), previous: Mapping[str, Any] | None = None,
                   now: str) -> dict[str, Any]:
    """The merge-patch body for ``.../gateways/<gw>/status``.

    ``generation``: the Gateway's ``metadata.generation`` (each condition's
    ``observedGeneration``); ``previous``: its current ``status``, whose
    ``lastTransitionTime`` is kept for every condition whose status did not change; ``now``:
    RFC 3339 (``2024-05-01T12:00:00Z``).
    """
    before = {c.get("type"): c for c in (previous or {}).get("conditions") or []
              if isinstance(c, Mapping)}
    out: list[dict[str, Any]] = []
    for c in conditions:
        status = "True" if c.status else "False"
        old = before.get(c.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else None
        cond: dict[str, Any] = {"type": c.type, "status": status, "reason": c.reason,
                                "message": c.message, "lastTransitionTime": since or now}
        if generation is not None:
            cond["observedGeneration"] = generation
        out.append(cond)
    body: dict[str, Any] = {"conditions": out}
    body["addresses"] = [{"type": "IPAddress", "value": ip} for ip in addresses]
    return {"status": body}


def status_differs(live: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> bool:
    """Whether writing ``patch`` (from ``gateway_status``) would change the live ``status``,
    transition times aside: unchanged status is not written again, so writing it cannot
    wake the reconcile loop forever."""
    def strip(status: Mapping[str, Any] | None) -> tuple[Any, Any]:
        status = status or {}
        conds = sorted(
            tuple(sorted((k, str(v)) for k, v in c.items() if k != "lastTransitionTime"))
            for c in status.get("conditions") or [] if isinstance(c, Mapping))
        return conds, status.get("addresses") or []

    return strip(live) != strip(patch.get("status"))

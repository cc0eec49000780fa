"""The kustomize base in deploy/daemonset, checked offline against Kubernetes and against our code.

Why: no Kubernetes API server can run on the machines this project is built on, so a manifest
mistake would otherwise surface only on a user's cluster. What a real ``kubectl apply -k``
would reject, and what would apply cleanly but not work, are both caught here:

* every document of every file in ``kustomization.yaml`` validates against the bundled OpenAPI
  schemas of real Kubernetes releases (``kubernetes-validate``, strict: an unknown or misspelt
  field fails, as ``kubectl --validate=strict`` would), the CRDs included;
* custom resources validate (or fail) against our CRDs' ``openAPIV3Schema``;
* things Kubernetes accepts silently but that break Ambit: a ``$(VAR)`` with no such env var
  (it stays literal), flags a binary does not have (checked with the real argparse parsers),
  probes and annotations on ports nothing listens on, RBAC that lacks what the controller's
  code calls (or grants more than it needs), a path flag pointing outside every mount.

The contract these follow is issue 6's (names, ports, volumes, RBAC).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from agent.config import DEFAULT_RUN_DIR, NODE_METRICS_PORT
from ambit.cli import build_parser
from ambit.install.images import CONTAINER_COMPONENT
from controller.app import ControllerConfig
from controller.k8s_ca import CA_SECRET, SECRETS
from controller.leader import LEASES
from controller.main import LEASE_NAME
from controller.registry.kubernetes import watched_kinds
from controller.waypoint.deploy import CA_ROOT_CONFIGMAP, CA_ROOT_KEY
from controller.waypoint.k8s_apply import (
    CONFIG_MAPS,
    DEPLOYMENTS,
    GATEWAYS,
    SERVICE_ACCOUNTS,
    SERVICES,
)
from mesh.ports import GRPC_PORT, MONITORING_PORT, XDS_PORT
from ztunnel.config import READINESS_PORT as ZTUNNEL_READINESS_PORT
from ztunnel.config import ZtunnelConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "daemonset"
NAMESPACE = "ambit-system"
# One image per component, as hack/images.sh tags them (ambit/install/images.py maps containers).
TAG = "0.1.0"
LABELS = {"app.kubernetes.io/part-of": "ambit", "app.kubernetes.io/managed-by": "ambit"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
CONFIG_MAP = "ambit-config"
# The oldest Kubernetes we document (pod-bound tokens carry the node name from 1.30) and the
# newest whose schemas the installed kubernetes-validate bundles.
KUBERNETES_VERSIONS = tuple(dict.fromkeys(("1.30", str(kubernetes_validate.latest_version()))))

# --- loading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    file: str  # relative to BASE
    index: int
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind"))

    @property
    def name(self) -> str:
        return str((self.obj.get("metadata") or {}).get("name"))

    @property
    def id(self) -> str:
        return f"{self.file}#{self.index}:{self.kind}/{self.name}"


def kustomization() -> dict[str, Any]:
    doc = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def resource_files() -> list[str]:
    resources = kustomization().get("resources")
    assert isinstance(resources, list) and all(isinstance(r, str) for r in resources)
    return [str(r) for r in resources]


def load_docs() -> list[Doc]:
    out: list[Doc] = []
    for name in resource_files():
        for i, obj in enumerate(yaml.safe_load_all((BASE / name).read_text())):
            if obj is None:
                continue
            assert isinstance(obj, dict), f"{name} document {i} is not a mapping"
            out.append(Doc(name, i, obj))
    return out


DOCS = load_docs()


def find(kind: str, name: str) -> dict[str, Any]:
    found = [d.obj for d in DOCS if d.kind == kind and d.name == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    spec = find(kind, name)["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def controller_pod() -> dict[str, Any]:
    return pod_spec("Deployment", "ambit-controller")


def node_pod() -> dict[str, Any]:
    return pod_spec("DaemonSet", "ambit-node")


def all_containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def container(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in all_containers(spec) if c["name"] == name]
    return found


def workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload in the base."""
    for d in DOCS:
        if d.kind in ("Deployment", "DaemonSet"):
            yield f"{d.kind}/{d.name}", d.obj["spec"]["template"]["spec"]


def every_container() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(id, pod spec, container) for every container and init container of every workload."""
    return [(f"{w}/{c['name']}", spec, c) for w, spec in workloads()
            for c in all_containers(spec)]


CONTAINER_IDS = [cid for cid, _, _ in every_container()]


def container_by_id(cid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    (found,) = [(spec, c) for i, spec, c in every_container() if i == cid]
    return found


# --- the kustomization --------------------------------------------------------------------------

# Apply order: namespace, CRDs, RBAC, config, controller, node (contract; `ambit install` applies
# in list order too).
_RANK = {"Namespace": 0, "CustomResourceDefinition": 1, "ServiceAccount": 2, "ClusterRole": 2,
         "ClusterRoleBinding": 2, "Role": 2, "RoleBinding": 2, "ConfigMap": 3, "Deployment": 4,
         "Service": 4, "PodDisruptionBudget": 4, "DaemonSet": 5}


def test_kustomization_is_a_resources_list_of_existing_files() -> None:
    k = kustomization()
    assert set(k) <= {"apiVersion", "kind", "resources"}, \
        f"only a resources list (no transformers): {sorted(set(k) - {'apiVersion', 'kind'})}"
    files = resource_files()
    assert len(files) == len(set(files)), "a file listed twice"
    for name in files:
        assert (BASE / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"


def test_every_yaml_file_is_listed() -> None:
    on_disk = {p.relative_to(BASE).as_posix() for p in BASE.rglob("*.y*ml")
               if p.name not in ("kustomization.yaml", "kustomization.yml")}
    missing = on_disk - set(resource_files())
    assert not missing, f"YAML files in {BASE} that kustomization.yaml does not list: {missing}"


def test_files_are_in_apply_order() -> None:
    ranks = []
    for d in DOCS:
        assert d.kind in _RANK, f"{d.id}: kind {d.kind} has no place in the apply order yet"
        ranks.append((_RANK[d.kind], d.id))
    for (r1, a), (r2, b) in itertools.pairwise(ranks):
        assert r1 <= r2, f"{b} must be applied before {a} (namespace, CRDs, RBAC, config, " \
            "controller, node)"
    assert DOCS[0].kind == "Namespace"


def test_the_objects_are_the_contracts() -> None:
    assert {(d.kind, d.name) for d in DOCS} == {
        ("Namespace", NAMESPACE),
        ("CustomResourceDefinition", "authorizationpolicies.security.ambit.dev"),
        ("CustomResourceDefinition", "peerauthentications.security.ambit.dev"),
        ("CustomResourceDefinition", "httpfaults.networking.ambit.dev"),
        ("ServiceAccount", "ambit-controller"), ("ClusterRole", "ambit-controller"),
        ("ClusterRoleBinding", "ambit-controller"), ("Role", "ambit-controller"),
        ("RoleBinding", "ambit-controller"),
        ("ServiceAccount", "ztunnel"), ("Role", "ambit-node"), ("RoleBinding", "ambit-node"),
        ("ConfigMap", CONFIG_MAP),
        ("Deployment", "ambit-controller"), ("Service", "ambit-controller"),
        ("PodDisruptionBudget", "ambit-controller"),
        ("DaemonSet", "ambit-node"),
    }


def test_nothing_needs_the_gateway_api() -> None:
    """`kubectl apply -k` must work on a cluster without the Gateway API CRDs: the
    GatewayClass is `ambit install`'s, applied only when the API is served."""
    for d in DOCS:
        assert not str(d.obj.get("apiVersion")).startswith("gateway.networking.k8s.io/"), d.id


# --- Kubernetes' own schemas --------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("doc", DOCS, ids=[d.id for d in DOCS])
def test_valid_kubernetes_object(doc: Doc, version: str) -> None:
    try:
        kubernetes_validate.validate(doc.obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        pytest.fail(f"{doc.id} is not a valid Kubernetes {version} object at {where}: "
                    f"{e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{doc.id}: {e.message}")


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The check above is worth something: strict mode rejects what the API server would."""
    ds = copy.deepcopy(find("DaemonSet", "ambit-node"))
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="hostNetwrok"):
        kubernetes_validate.validate(ds, KUBERNETES_VERSIONS[-1], strict=True)


# --- labels, namespaces, images -----------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=[d.id for d in DOCS])
def test_labels_and_namespace(doc: Doc) -> None:
    meta = doc.obj["metadata"]
    labels = meta.get("labels") or {}
    assert labels.items() >= LABELS.items(), f"{doc.id}: labels {LABELS} (contract)"
    if doc.kind in CLUSTER_SCOPED:
        assert "namespace" not in meta, f"{doc.id} is cluster-scoped"
    else:
        assert meta.get("namespace") == NAMESPACE, f"{doc.id}: namespace {NAMESPACE}"


@pytest.mark.parametrize("kind,name", [("Deployment", "ambit-controller"),
                                       ("DaemonSet", "ambit-node")])
def test_pods_are_labelled_and_selected(kind: str, name: str) -> None:
    obj = find(kind, name)
    template_labels = obj["spec"]["template"]["metadata"]["labels"]
    assert template_labels.items() >= LABELS.items(), "pods Ambit creates carry the labels too"
    selector = obj["spec"]["selector"]["matchLabels"]
    assert template_labels.items() >= selector.items()
    assert obj["metadata"]["labels"].items() >= selector.items()


def test_controller_service_and_pdb_select_the_controller_pods() -> None:
    pods = find("Deployment", "ambit-controller")["spec"]["template"]["metadata"]["labels"]
    service = find("Service", "ambit-controller")["spec"]["selector"]
    pdb = find("PodDisruptionBudget", "ambit-controller")["spec"]["selector"]["matchLabels"]
    assert service and pods.items() >= service.items()
    assert pdb and pods.items() >= pdb.items()
    (term,) = controller_pod()["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert pods.items() >= term["podAffinityTerm"]["labelSelector"]["matchLabels"].items()


@pytest.mark.parametrize("cid", CONTAINER_IDS)
def test_each_container_runs_its_component_image(cid: str) -> None:
    _, c = container_by_id(cid)
    component = CONTAINER_COMPONENT[c["name"]]
    assert c["image"] == f"localhost/ambit-{component}:{TAG}"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == ["ambit"], "the image's entry point, spelt out"
    assert "resources" in c and c["resources"]["requests"] and c["resources"]["limits"]


def test_the_waypoint_image_is_the_waypoint_component_image() -> None:
    args = container(controller_pod(), "controller")["args"]
    assert args[args.index("--waypoint-image") + 1] == f"localhost/ambit-waypoint:{TAG}"


# --- environment variables and flags ------------------------------------------------------------

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# Sample values for the downward API in the argparse check.
_FIELD_VALUES = {"metadata.name": "ambit-xyz12", "metadata.namespace": NAMESPACE,
                 "spec.nodeName": "node-1"}


def config_data() -> dict[str, str]:
    data = find("ConfigMap", CONFIG_MAP)["data"]
    assert isinstance(data, dict)
    return {str(k): str(v) for k, v in data.items()}


def env_values(c: Mapping[str, Any]) -> dict[str, str]:
    """Each env var of ``c`` with the value it has at run time (ConfigMap defaults, sample
    downward-API values)."""
    out: dict[str, str] = {}
    for e in c.get("env") or []:
        if "value" in e:
            out[e["name"]] = str(e["value"])
            continue
        src = e["valueFrom"]
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            assert ref["name"] == CONFIG_MAP, f"env {e['name']}: settings come from {CONFIG_MAP}"
            assert ref["key"] in config_data(), f"env {e['name']}: {CONFIG_MAP} has no key " \
                f"{ref['key']!r}"
            out[e["name"]] = config_data()[ref["key"]]
        elif "fieldRef" in src:
            out[e["name"]] = _FIELD_VALUES[src["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"env {e['name']}: unexpected source {src}")
    return out


@pytest.mark.parametrize("cid", CONTAINER_IDS)
def test_args_reference_only_defined_env_vars(cid: str) -> None:
    """Kubernetes leaves an undefined `$(VAR)` in place, literally: the binary would get the
    text `$(NODE_NAME)` as a node name."""
    _, c = container_by_id(cid)
    defined = set(env_values(c))
    for arg in [*c.get("command", []), *c.get("args", [])]:
        for var in _VAR_REF.findall(arg):
            assert var in defined, f"{cid}: {arg!r} refers to ${var}, which is not in env"
        assert "$" not in _VAR_REF.sub("", arg), \
            f"{cid}: {arg!r}: only $(VAR) is expanded (no shell runs the command)"


def test_every_setting_is_read() -> None:
    used = {e["valueFrom"]["configMapKeyRef"]["key"]
            for _, _, c in every_container() for e in c.get("env") or []
            if "configMapKeyRef" in e.get("valueFrom", {})}
    assert used == set(config_data()), "a ConfigMap key no container reads would be an " \
        "override that does nothing"
    assert config_data() == {"trustDomain": "cluster.local", "redirectMode": "auto",
                             "uplinks": "auto"}


def expanded_args(c: Mapping[str, Any]) -> list[str]:
    values = env_values(c)
    return [_VAR_REF.sub(lambda m: values[m.group(1)], a) for a in c.get("args") or []]


# Which subcommand each container runs (argparse dests of ambit.cli and its subparsers).
_SUBCOMMAND = {"controller": ("controller",), "install-cni": ("agent", "cni", "install"),
               "agent": ("agent", "run"), "ztunnel": ("ztunnel",)}


@pytest.mark.parametrize("cid", CONTAINER_IDS)
def test_the_binary_accepts_its_args(cid: str) -> None:
    """The real parsers: a flag the manifest passes but `ambit` does not have would make the
    pod crash-loop on every node."""
    _, c = container_by_id(cid)
    args = expanded_args(c)
    assert tuple(args[:len(_SUBCOMMAND[c["name"]])]) == _SUBCOMMAND[c["name"]]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{cid}: `ambit {' '.join(args)}` is refused (exit {e.code}): "
                    f"{err.getvalue().strip()}")


def test_the_parser_check_catches_a_bad_flag() -> None:
    c = copy.deepcopy(container(node_pod(), "ztunnel"))
    c["args"].append("--no-such-flag")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_parser().parse_args(expanded_args(c))


def flag(c: Mapping[str, Any], name: str) -> str:
    args = list(c["args"])
    assert args.count(name) == 1, f"{c['name']}: {name} given {args.count(name)} times"
    return str(args[args.index(name) + 1])


def test_controller_args() -> None:
    c = container(controller_pod(), "controller")
    assert flag(c, "--mode") == "kubernetes"
    assert flag(c, "--trust-domain") == "$(TRUST_DOMAIN)"
    assert flag(c, "--ca-secret") == f"{NAMESPACE}/{CA_SECRET}"
    assert flag(c, "--leader-election-namespace") == "$(POD_NAMESPACE)"
    assert flag(c, "--leader-election-id") == "$(POD_NAME)"
    env = {e["name"]: e["valueFrom"] for e in c["env"]}
    assert env["POD_NAME"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["fieldRef"]["fieldPath"] == "metadata.namespace"


@pytest.mark.parametrize("name", ["agent", "ztunnel"])
def test_node_containers_dial_the_controller_by_its_certificate_name(name: str) -> None:
    c = container(node_pod(), name)
    host, _, port = flag(c, "--controller").rpartition(":")
    assert int(port) == GRPC_PORT
    assert host == f"ambit-controller.{NAMESPACE}.svc"
    assert host in ControllerConfig.serving_names, "the controller's TLS certificate must " \
        "name the address the node dials"


def test_node_env() -> None:
    for name in ("agent", "ztunnel"):
        env = {e["name"]: e["valueFrom"] for e in container(node_pod(), name)["env"]}
        assert env["NODE_NAME"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert env["POD_NAME"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["POD_NAMESPACE"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    agent = container(node_pod(), "agent")
    assert flag(agent, "--daemonset") == "ambit-node" == find("DaemonSet", "ambit-node")[
        "metadata"]["name"]
    assert flag(agent, "--redirect-mode") == "$(REDIRECT_MODE)"
    assert flag(agent, "--uplink") == "$(UPLINKS)"
    assert flag(container(node_pod(), "ztunnel"), "--trust-domain") == "$(TRUST_DOMAIN)"


# --- ports --------------------------------------------------------------------------------------


def probes(c: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")
            if k in c}


def test_controller_ports() -> None:
    c = container(controller_pod(), "controller")
    p = probes(c)
    assert {"readinessProbe", "livenessProbe"} <= set(p)
    for probe in p.values():
        assert (probe["path"], probe["port"]) == ("/ready", MONITORING_PORT)
    assert c["livenessProbe"]["failureThreshold"] * c["livenessProbe"]["periodSeconds"] >= 60, \
        "liveness is generous: a slow API server must not restart the control plane"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "grpc": GRPC_PORT, "xds": XDS_PORT, "monitoring": MONITORING_PORT}
    service = find("Service", "ambit-controller")["spec"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]} == {
        "grpc": (GRPC_PORT, GRPC_PORT), "xds": (XDS_PORT, XDS_PORT),
        "monitoring": (MONITORING_PORT, MONITORING_PORT)}
    annotations = find("Deployment", "ambit-controller")["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["prometheus.io/port"] == str(MONITORING_PORT)


def test_node_ports() -> None:
    agent, ztunnel = container(node_pod(), "agent"), container(node_pod(), "ztunnel")
    for c, port in ((agent, NODE_METRICS_PORT), (ztunnel, ZTUNNEL_READINESS_PORT)):
        p = probes(c)
        assert {"readinessProbe", "livenessProbe"} <= set(p)
        for kind, probe in p.items():
            # Liveness asks whether the process answers, never whether it is ready.
            path = "/healthz/live" if kind == "livenessProbe" else "/healthz/ready"
            assert (probe["path"], probe["port"]) == (path, port), c["name"]
    annotations = find("DaemonSet", "ambit-node")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true",
                           "prometheus.io/port": str(NODE_METRICS_PORT),
                           "prometheus.io/path": "/metrics"}
    assert "--metrics-port" not in agent["args"], "the default is what the annotation names"
    assert "--readiness-port" not in ztunnel["args"]
    # The ztunnel's metrics/readiness listen on loopback only (ZtunnelConfig.stats_host): its
    # probes must ask there (the pod is hostNetwork, so the kubelet's 127.0.0.1 is the node's),
    # and the scrape target stays the agent's 15022, which merges them.
    assert node_pod()["hostNetwork"] is True
    assert "--stats-host" not in ztunnel["args"] and "--admin-host" not in ztunnel["args"]
    assert ZtunnelConfig(node="n").stats_host == ZtunnelConfig(node="n").admin_host == "127.0.0.1"
    assert {kind: probe.get("host") for kind, probe in probes(ztunnel).items()} == dict.fromkeys(
        ("startupProbe", "readinessProbe", "livenessProbe"), "127.0.0.1")


# --- RBAC ---------------------------------------------------------------------------------------

Grant = tuple[str, str, str, str]  # (apiGroup, resource, verb, resourceName or "")


def grants(role: Mapping[str, Any]) -> set[Grant]:
    out: set[Grant] = set()
    for rule in role.get("rules") or []:
        assert not rule.get("nonResourceURLs"), "no non-resource URLs"
        names = rule.get("resourceNames") or [""]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in names:
                        out.add((group, resource, verb, name))
    return out


def _read(group: str, *resources: str) -> set[Grant]:
    return {(group, r, v, "") for r in resources for v in ("get", "list", "watch")}


def _write(group: str, *resources: str, verbs: tuple[str, ...] = (
        "create", "update", "patch", "delete")) -> set[Grant]:
    return {(group, r, v, "") for r in resources for v in verbs}


# The contract's RBAC, exactly: anything more fails (least privilege).
CLUSTER_ALLOWED = (
    _read("", "namespaces", "pods", "services", "serviceaccounts", "configmaps")
    | _read("discovery.k8s.io", "endpointslices") | _read("apps", "deployments")
    | _read("security.ambit.dev", "authorizationpolicies", "peerauthentications")
    | _read("networking.ambit.dev", "httpfaults")
    | _read("gateway.networking.k8s.io", "gateways", "httproutes", "grpcroutes", "tcproutes")
    | _write("", "serviceaccounts", "services", "configmaps") | _write("apps", "deployments")
    | _write("gateway.networking.k8s.io", "gateways/status", verbs=("update", "patch"))
    | {("authentication.k8s.io", "tokenreviews", "create", "")}
)
ROLE_ALLOWED = {
    ("coordination.k8s.io", "leases", "create", ""),
    ("coordination.k8s.io", "leases", "get", "ambit-controller"),
    ("coordination.k8s.io", "leases", "update", "ambit-controller"),
    ("", "secrets", "create", ""),
    ("", "secrets", "get", "ambit-ca"),
}
NODE_ALLOWED = {("apps", "daemonsets", "get", "ambit-node")}


@pytest.mark.parametrize("kind,name", [("ClusterRole", "ambit-controller"),
                                       ("Role", "ambit-controller"), ("Role", "ambit-node")])
def test_no_wildcards(kind: str, name: str) -> None:
    for rule in find(kind, name)["rules"]:
        for key in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in (rule.get(key) or []), f"{kind} {name}: wildcard in {key}"
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


@pytest.mark.parametrize("kind,name,allowed", [
    ("ClusterRole", "ambit-controller", CLUSTER_ALLOWED),
    ("Role", "ambit-controller", ROLE_ALLOWED),
    ("Role", "ambit-node", NODE_ALLOWED),
])
def test_rbac_is_exactly_the_allowlist(kind: str, name: str, allowed: set[Grant]) -> None:
    granted = grants(find(kind, name))
    assert not granted - allowed, f"{kind} {name} grants more than needed: " \
        f"{sorted(granted - allowed)}"
    assert not allowed - granted, f"{kind} {name} lacks {sorted(allowed - granted)}"


def test_least_privilege_check_fails_on_a_wildcard() -> None:
    role = copy.deepcopy(find("Role", "ambit-node"))
    role["rules"][0]["verbs"] = ["*"]
    assert grants(role) - NODE_ALLOWED == {("apps", "daemonsets", "*", "ambit-node")}


def test_resource_names_only_where_rbac_can_check_them() -> None:
    """create, list and watch requests carry no object name RBAC could match: a rule limited
    by resourceNames would silently never allow them."""
    roles = [d for d in DOCS if d.kind in ("Role", "ClusterRole")]
    assert roles
    for d in roles:
        for rule in d.obj["rules"]:
            if rule.get("resourceNames"):
                assert not {"create", "list", "watch", "deletecollection"} & set(rule["verbs"]), \
                    f"{d.id}: {rule}"


_API_GROUPS = {"CoreV1Api": "", "DiscoveryV1Api": "discovery.k8s.io", "AppsV1Api": "apps"}


def _kind_group(list_fn: Any) -> str:
    if hasattr(list_fn, "args") and list_fn.args:  # functools.partial(list_cluster_custom_object,
        return str(list_fn.args[0])                # group, version, plural)
    api = type(list_fn.__self__).__name__
    assert api in _API_GROUPS, f"add {api}'s API group to _API_GROUPS"
    return _API_GROUPS[api]


def test_the_cluster_role_covers_what_the_controller_code_calls() -> None:
    """Derived from the code, so a new watched kind or a new deployer write fails here until
    the ClusterRole grants it (a 403 is a silently empty cache on a real cluster)."""
    needed: set[Grant] = set()
    unused_client = cast(Any, object())  # the list functions are only looked at, never called
    for kind in watched_kinds():
        needed |= _read(_kind_group(kind.list_fn(unused_client)), kind.plural)
    for res in (SERVICE_ACCOUNTS, SERVICES, CONFIG_MAPS, DEPLOYMENTS):  # the waypoint deployer
        needed |= _read(res.group, res.plural)
        needed |= _write(res.group, res.plural, verbs=("create", "update", "delete"))
    needed |= _read(GATEWAYS.group, GATEWAYS.plural)
    needed.add((GATEWAYS.group, f"{GATEWAYS.plural}/status", "patch", ""))
    needed.add(("authentication.k8s.io", "tokenreviews", "create", ""))  # k8s_auth
    granted = grants(find("ClusterRole", "ambit-controller"))
    assert not needed - granted, f"the controller calls what it may not: {sorted(needed - granted)}"


def test_the_role_covers_leader_election_and_the_root() -> None:
    needed = {
        (LEASES.group, LEASES.plural, "create", ""),
        (LEASES.group, LEASES.plural, "get", LEASE_NAME),
        (LEASES.group, LEASES.plural, "update", LEASE_NAME),
        (SECRETS.group, SECRETS.plural, "create", ""),
        (SECRETS.group, SECRETS.plural, "get", CA_SECRET),
    }
    granted = grants(find("Role", "ambit-controller"))
    assert not needed - granted, sorted(needed - granted)


@pytest.mark.parametrize("binding,role_kind,sa,workload", [
    ("ClusterRoleBinding", "ClusterRole", "ambit-controller", ("Deployment", "ambit-controller")),
    ("RoleBinding", "Role", "ambit-controller", ("Deployment", "ambit-controller")),
    ("RoleBinding", "Role", "ztunnel", ("DaemonSet", "ambit-node")),
])
def test_bindings_give_the_roles_to_the_workloads(binding: str, role_kind: str, sa: str,
                                                  workload: tuple[str, str]) -> None:
    role_name = "ambit-node" if sa == "ztunnel" else "ambit-controller"
    b = find(binding, role_name)
    assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                            "name": role_name}
    find(role_kind, role_name)
    assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    find("ServiceAccount", sa)
    assert pod_spec(*workload)["serviceAccountName"] == sa


# --- the controller Deployment ------------------------------------------------------------------


def test_controller_deployment() -> None:
    d = find("Deployment", "ambit-controller")
    assert d["spec"]["replicas"] == 2
    spec = controller_pod()
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["automountServiceAccountToken"] is True, "it watches the API server"
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in spec["affinity"][
        "podAntiAffinity"], "one-node clusters must still run both replicas"
    pdb = find("PodDisruptionBudget", "ambit-controller")["spec"]
    assert pdb["minAvailable"] == 1
    assert find("Service", "ambit-controller")["spec"]["type"] == "ClusterIP"


def test_controller_is_hardened() -> None:
    spec = controller_pod()
    c = container(spec, "controller")
    sc = {**spec["securityContext"], **c["securityContext"]}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not spec.get("hostNetwork")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    data_dir = flag(c, "--data-dir")
    assert "emptyDir" in volumes[mounts[data_dir]], "--data-dir is a writable emptyDir"
    assert "emptyDir" in volumes[mounts["/tmp"]]


# --- the node DaemonSet -------------------------------------------------------------------------


def test_node_daemonset() -> None:
    ds = find("DaemonSet", "ambit-node")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    spec = node_pod()
    assert spec["hostNetwork"] is True
    assert spec["shareProcessNamespace"] is True, "the agent checks the ztunnel's cmdline"
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["serviceAccountName"] == "ztunnel"
    assert spec["automountServiceAccountToken"] is True, "the agent reads its DaemonSet"
    assert spec["terminationGracePeriodSeconds"] == 30
    assert [c["name"] for c in spec["initContainers"]] == ["install-cni"]
    assert [c["name"] for c in spec["containers"]] == ["agent", "ztunnel"]


def test_install_cni_args() -> None:
    c = container(node_pod(), "install-cni")
    assert c["args"][:3] == ["agent", "cni", "install"]
    agent = container(node_pod(), "agent")
    for name in ("--cni-bin-dir", "--cni-conf-dir", "--binary"):
        assert flag(c, name) == flag(agent, name), "install and uninstall must agree"
    assert flag(c, "--binary") == "/opt/ambit/cni/ambit-cni"


@pytest.mark.parametrize("name,added", [
    ("install-cni", set()),
    ("agent", {"NET_ADMIN", "SYS_ADMIN", "BPF", "NET_RAW"}),
    ("ztunnel", {"NET_ADMIN", "NET_RAW", "SYS_ADMIN"}),  # SYS_ADMIN: setns, inpod mode
])
def test_node_capabilities(name: str, added: set[str]) -> None:
    sc = container(node_pod(), name)["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"].get("add") or []) == added
    assert len(sc["capabilities"].get("add") or []) == len(added)
    assert sc.get("privileged") is False, "capabilities, never privileged"
    assert sc["runAsUser"] == 0, "added capabilities reach uid 0 only"


def test_only_the_agent_is_unconfined() -> None:
    spec = node_pod()
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in all_containers(spec):
        profile = (c["securityContext"].get("seccompProfile") or {}).get("type")
        assert profile == ("Unconfined" if c["name"] == "agent" else None), c["name"]


def test_read_only_root_where_possible() -> None:
    for name in ("install-cni", "ztunnel"):
        assert container(node_pod(), name)["securityContext"]["readOnlyRootFilesystem"] is True


def test_node_resources() -> None:
    assert container(node_pod(), "agent")["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert container(node_pod(), "ztunnel")["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


# hostPath -> (type, mount path, read-only), as the contract lists them.
HOST_PATHS = {
    "/sys/fs/bpf": ("Directory", "/sys/fs/bpf", False),
    "/opt/cni/bin": ("DirectoryOrCreate", "/host/opt/cni/bin", False),
    "/etc/cni/net.d": ("DirectoryOrCreate", "/host/etc/cni/net.d", False),
    "/var/run/ambit": ("DirectoryOrCreate", "/var/run/ambit", False),
    "/lib/modules": ("Directory", "/host/lib/modules", True),
    "/usr/src": ("Directory", "/host/usr/src", True),
    "/sys/kernel/btf": ("Directory", "/sys/kernel/btf", True),
    "/var/run/netns": ("DirectoryOrCreate", "/var/run/netns", True),  # inpod: pod netns
}


def mounts_of(c: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in c.get("volumeMounts") or []}


def test_node_volumes() -> None:
    spec = node_pod()
    volumes = {v["name"]: v for v in spec["volumes"]}
    agent = mounts_of(container(spec, "agent"))
    host = {v["hostPath"]["path"]: v for v in volumes.values() if "hostPath" in v}
    assert set(host) == set(HOST_PATHS)
    for path, (kind, mount, read_only) in HOST_PATHS.items():
        v = host[path]
        assert v["hostPath"]["type"] == kind, path
        m = agent[v["name"]]
        assert (m["mountPath"], bool(m.get("readOnly"))) == (mount, read_only), path
    for _, _, c in every_container():
        for m in c.get("volumeMounts") or []:
            assert not m["mountPath"].startswith("/sys/fs/cgroup"), \
                "the capture is tc-based; nothing attaches to cgroups"
    token = volumes["ambit-node"]["projected"]["sources"]
    assert token == [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}], \
        "default audience (the controller reviews node tokens against the API server's)"
    assert volumes["ambit-ca"]["configMap"] == {
        "name": CA_ROOT_CONFIGMAP, "items": [{"key": CA_ROOT_KEY, "path": CA_ROOT_KEY}]}
    assert "emptyDir" in volumes["tmp"]


def test_path_flags_point_into_mounts() -> None:
    spec = node_pod()
    volumes = {v["name"]: v for v in spec["volumes"]}
    for name in ("agent", "ztunnel"):
        c = container(spec, name)
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        token = volumes["ambit-node"]["projected"]["sources"][0]["serviceAccountToken"]["path"]
        assert flag(c, "--node-token-file") == f"{mounts['ambit-node']}/{token}"
        assert flag(c, "--ca-root-cert") == f"{mounts['ambit-ca']}/{CA_ROOT_KEY}"
        assert mounts["run"] == str(DEFAULT_RUN_DIR), "agent and ztunnel share the run dir"
    assert flag(container(spec, "ztunnel"), "--agent-socket") == str(DEFAULT_RUN_DIR /
                                                                     "ztunnel.sock")


@pytest.mark.parametrize("cid", CONTAINER_IDS)
def test_every_path_arg_is_mounted_or_in_the_image(cid: str) -> None:
    _, c = container_by_id(cid)
    mounts = [m["mountPath"] for m in c.get("volumeMounts") or []]
    for arg in c.get("args") or []:
        if not arg.startswith("/"):
            continue
        inside = any(arg == m or arg.startswith(m.rstrip("/") + "/") for m in mounts)
        assert inside or arg.startswith("/opt/ambit/"), \
            f"{cid}: {arg} is neither on a volume nor in the image"


# --- custom resources against the CRDs ----------------------------------------------------------


def crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the served version's openAPIV3Schema."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for d in DOCS:
        if d.kind != "CustomResourceDefinition":
            continue
        spec = d.obj["spec"]
        for v in spec["versions"]:
            if v["served"]:
                out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = \
                    v["schema"]["openAPIV3Schema"]
    return out


def strict_schema(node: Any) -> Any:
    """The CRD schema as the API server applies it with strict field validation (kubectl's
    default): unknown fields are errors, except under x-kubernetes-preserve-unknown-fields.
    The other x-kubernetes-* extensions (CEL rules) are left out: jsonschema cannot run them."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in node and "additionalProperties" not in node and \
            not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def cr_errors(obj: Mapping[str, Any]) -> list[str]:
    schema = crds().get((str(obj.get("apiVersion")), str(obj.get("kind"))))
    if schema is None:
        return [f"no CRD serves {obj.get('apiVersion')} {obj.get('kind')}"]
    validator = jsonschema.Draft4Validator(strict_schema(schema))
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(obj)]


def cr(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind,
            "metadata": {"name": "sample", "namespace": "shop"}, "spec": spec}


AP = ("security.ambit.dev/v1", "AuthorizationPolicy")
PA = ("security.ambit.dev/v1", "PeerAuthentication")
HF = ("networking.ambit.dev/v1alpha1", "HTTPFault")

VALID = {
    "allow-frontend": cr(*AP, {
        "selector": {"matchLabels": {"app": "checkout"}}, "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"],
                                        "notIpBlocks": ["10.0.0.0/8"]}}],
                   "to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}]}),
    "deny-namespace": cr(*AP, {"action": "DENY",
                               "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}),
    "waypoint-policy": cr(*AP, {
        "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                        "name": "waypoint"}],
        "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}], "action": "DENY"}),
    "strict-mtls": cr(*PA, {"selector": {"matchLabels": {"app": "db"}},
                            "mtls": {"mode": "STRICT"},
                            "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}),
    "delay-half": cr(*HF, {"delay": {"fixedDelay": "1m30s", "percentage": 50}}),
    "abort": cr(*HF, {"abort": {"httpStatus": 503, "percentage": 12.5}}),
}

INVALID = {
    "unknown action": (cr(*AP, {"action": "MAYBE"}), "spec.action: 'MAYBE' is not one of"),
    "port as a number": (cr(*AP, {"rules": [{"to": [{"operation": {"ports": [8080]}}]}]}),
                         "spec.rules.0.to.0.operation.ports.0: 8080 is not of type 'string'"),
    "unknown source field": (
        cr(*AP, {"rules": [{"from": [{"source": {"users": ["x"]}}]}]}),
        "spec.rules.0.from.0.source: Additional properties are not allowed ('users'"),
    "label value not a string": (cr(*AP, {"selector": {"matchLabels": {"app": 1}}}),
                                 "spec.selector.matchLabels.app: 1 is not of type 'string'"),
    "unknown mTLS mode": (cr(*PA, {"mtls": {"mode": "SOMETIMES"}}),
                          "spec.mtls.mode: 'SOMETIMES' is not one of"),
    "bad port-level mode": (cr(*PA, {"portLevelMtls": {"9090": {"mode": "OFF"}}}),
                            "spec.portLevelMtls.9090.mode: 'OFF' is not one of"),
    "fractional delay": (cr(*HF, {"delay": {"fixedDelay": "1.5s"}}),
                         "spec.delay.fixedDelay: '1.5s' does not match"),
    "status out of range": (cr(*HF, {"abort": {"httpStatus": 700}}),
                            "spec.abort.httpStatus: 700 is greater than the maximum of 599"),
    "percentage over 100": (cr(*HF, {"abort": {"httpStatus": 503, "percentage": 150}}),
                            "spec.abort.percentage: 150 is greater than the maximum of 100"),
    "abort without status": (cr(*HF, {"abort": {"percentage": 10}}),
                             "spec.abort: 'httpStatus' is a required property"),
    "grpc abort": (cr(*HF, {"abort": {"httpStatus": 503, "grpcStatus": 14}}),
                   "spec.abort: Additional properties are not allowed ('grpcStatus'"),
    "wrong version": (cr("security.ambit.dev/v1beta1", "AuthorizationPolicy", {}),
                      "no CRD serves security.ambit.dev/v1beta1"),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_custom_resource_is_accepted(name: str) -> None:
    assert cr_errors(VALID[name]) == []


@pytest.mark.parametrize("name", sorted(INVALID))
def test_custom_resource_is_rejected(name: str) -> None:
    obj, error = INVALID[name]
    errors = cr_errors(obj)
    assert any(e.startswith(error) for e in errors), errors


def test_every_crd_has_samples() -> None:
    assert {(o["apiVersion"], o["kind"]) for o in VALID.values()} == set(crds())

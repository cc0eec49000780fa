"""The manifests ``ambit install`` applies: loaded from the kustomize base, overrides applied.

Why pure and separate from applying: ``ambit install --dry-run`` must print exactly what would
be applied (so a user can review it or pipe it into ``kubectl apply -f -``) without touching a
cluster, and every override is tested field by field without one.

What it does, in order:

* reads ``kustomization.yaml`` in the manifests directory and loads its ``resources:`` in
  list order (each a multi-document YAML file, or a directory with its own kustomization);
  any other kustomize feature is refused, because the contract is "a resources list only" and
  silently ignoring a patch would install something else than ``kubectl apply -k``;
* applies the user's overrides. ``--image-prefix``/``--tag`` change the images of every
  container and init container (each matched to its component by its name: one image per
  component, ``ambit.install.images``) and the controller's ``--waypoint-image`` flag;
  ``--image COMPONENT=IMAGE`` replaces one component's. ``--trust-domain``,
  ``--redirect-mode`` and ``--uplinks`` are written into the ``ambit-config`` ConfigMap, which
  the containers read as environment variables;
* stamps ``ambit.dev/config-hash`` (sha256 of the ConfigMap's data, first 16 hex digits) on the
  pod template of every workload that reads that ConfigMap: environment variables are read at
  container start only, so a changed ConfigMap must change the template to roll the pods. A
  re-install with the same settings renders the same hash, so nothing restarts.

Nothing here knows file names: only the kinds and names pinned in the contract
(``ambit.install.names``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import ambit
from agent.config import REDIRECT_MODES
from ambit.install import images
from ambit.install.names import (
    CONFIG_HASH_ANNOTATION,
    CONFIG_MAP,
    GATEWAY_CLASS,
    INSTALL_LABELS,
    NAMESPACE,
    WAYPOINT_CONTROLLER_NAME,
)

__all__ = [
    "IMAGE_MANIFESTS_DIR", "Manifest", "Overrides", "RenderError", "Rendered", "apply_order",
    "config_hash", "default_manifests_dirs", "find_manifests_dir", "gateway_class",
    "load_manifests", "pod_templates", "render", "render_dir", "to_json", "to_yaml",
]

# Where the controller image keeps the manifests (the Containerfile copies deploy/ there).
IMAGE_MANIFESTS_DIR = Path("/opt/ambit/deploy/daemonset")
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources"}
WAYPOINT_IMAGE_FLAG = "--waypoint-image"
# Kinds whose pod template is at spec.template (CronJob: spec.jobTemplate.spec.template).
_TEMPLATE_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job",
                   "ReplicationController"}

# RFC 1123 subdomain, the shape of a DNS name (what Kubernetes names use too).
_DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_TRUST_DOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
# The agent's rule for an interface name (agent/config.py): at most 15 characters (IFNAMSIZ).
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
# The distribution reference grammar (docker/distribution reference/regexp.go), simplified to
# one pattern: [registry[:port]/]path[:tag][@digest], path in lower case.
_DOMAIN_PART = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$")


class RenderError(Exception):
    """The manifests or the overrides are unusable; the message says what to fix."""


@dataclass(frozen=True)
class Overrides:
    """What the user changes; None keeps the manifests' value."""

    images: Mapping[str, str] = field(default_factory=dict)  # component -> reference
    image_prefix: str | None = None
    tag: str | None = None
    trust_domain: str | None = None
    redirect_mode: str | None = None
    uplinks: str | None = None

    def config_data(self) -> dict[str, str]:
        """The ``ambit-config`` keys these overrides set."""
        out: dict[str, str] = {}
        if self.trust_domain is not None:
            out["trustDomain"] = self.trust_domain
        if self.redirect_mode is not None:
            out["redirectMode"] = self.redirect_mode
        if self.uplinks is not None:
            out["uplinks"] = self.uplinks
        return out

    def describe(self) -> str:
        parts = [f"image prefix {self.image_prefix}"] if self.image_prefix is not None else []
        parts += [f"tag {self.tag}"] if self.tag is not None else []
        parts += [f"image {k}={v}" for k, v in sorted(self.images.items())]
        parts += [f"{k} {v}" for k, v in self.config_data().items()]
        return ", ".join(parts) or "none"


@dataclass
class Manifest:
    """One object to apply and where it came from (for error messages)."""

    obj: dict[str, Any]
    source: str  # "controller.yaml (document 2)"

    @property
    def api_version(self) -> str:
        return str(self.obj["apiVersion"])

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        ns = self.obj["metadata"].get("namespace")
        return str(ns) if ns else None

    def describe(self) -> str:
        """``Deployment ambit-system/ambit-controller``, ``ClusterRole ambit-controller``."""
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"

    def ref(self) -> str:
        """kubectl's short form: ``deployment.apps/ambit-controller``."""
        group = f".{self.group}" if self.group else ""
        return f"{self.kind.lower()}{group}/{self.name}"


@dataclass(frozen=True)
class Rendered:
    manifests: tuple[Manifest, ...]
    config: dict[str, str]  # the ambit-config ConfigMap's data after overrides
    config_hash: str
    source_dir: Path
    overrides: Overrides = field(default_factory=Overrides)


# ----- where the manifests are -----

def default_manifests_dirs() -> tuple[Path, ...]:
    """Candidates, in order: the repository checkout this package runs from, the image's."""
    checkout = Path(ambit.__file__).resolve().parents[1] / "deploy" / "daemonset"
    return (checkout, IMAGE_MANIFESTS_DIR)


def _kustomization(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def find_manifests_dir(explicit: Path | None = None) -> Path:
    """``explicit`` (``--manifests``) or the first default that has a kustomization."""
    if explicit is not None:
        if not explicit.is_dir():
            raise RenderError(f"--manifests {explicit}: no such directory")
        if _kustomization(explicit) is None:
            raise RenderError(f"--manifests {explicit}: no kustomization.yaml in it (expected "
                              "the deploy/daemonset directory of an Ambit checkout or release)")
        return explicit
    candidates = default_manifests_dirs()
    for d in candidates:
        if _kustomization(d) is not None:
            return d
    raise RenderError("cannot find Ambit's manifests (looked for kustomization.yaml in "
                      f"{' and '.join(str(d) for d in candidates)}); pass --manifests DIR "
                      "(the deploy/daemonset directory of an Ambit checkout)")


# ----- loading -----

def _read_yaml_documents(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise RenderError(f"{label}: cannot read: {e.strerror or e}") from None
    try:
        yield from enumerate(yaml.safe_load_all(text), start=1)
    except yaml.YAMLError as e:
        raise RenderError(f"{label}: not valid YAML: {e}") from None


def _load_kustomization(directory: Path, root: Path, seen: set[Path]) -> list[Manifest]:
    path = _kustomization(directory)
    if path is None:
        raise RenderError(f"{directory}: no kustomization.yaml")
    if path.resolve() in seen:
        raise RenderError(f"{path}: included twice (a resources cycle?)")
    seen.add(path.resolve())
    label = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    docs = [d for _, d in _read_yaml_documents(path, label)]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise RenderError(f"{label}: expected one YAML mapping")
    k = docs[0]
    extra = sorted(set(k) - _KUSTOMIZATION_KEYS)
    if extra:
        raise RenderError(f"{label}: ambit install reads only `resources:` from a "
                          f"kustomization, not {', '.join(extra)}; apply this directory with "
                          "`kubectl apply -k` instead, or move those changes into the files")
    resources = k.get("resources")
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        raise RenderError(f"{label}: `resources:` must be a list of file names")
    out: list[Manifest] = []
    for entry in resources:
        if "://" in entry or entry.startswith("github.com/"):
            raise RenderError(f"{label}: remote resource {entry!r} is not supported by "
                              "ambit install")
        target = (directory / entry)
        if target.is_dir():
            out += _load_kustomization(target, root, seen)
            continue
        if not target.is_file():
            raise RenderError(f"{label}: resource {entry!r} does not exist")
        rel = str(target.relative_to(root)) if target.is_relative_to(root) else str(target)
        for index, doc in _read_yaml_documents(target, rel):
            if doc is None:
                continue  # an empty document (a trailing ---)
            source = f"{rel} (document {index})"
            out.append(_check_object(doc, source))
    return out


def _check_object(doc: Any, source: str) -> Manifest:
    if not isinstance(doc, dict):
        raise RenderError(f"{source}: not a Kubernetes object (a YAML mapping)")
    for key in ("apiVersion", "kind"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise RenderError(f"{source}: {key} is missing")
    if doc["kind"].endswith("List"):
        raise RenderError(f"{source}: {doc['kind']}: write the objects as separate YAML "
                          "documents instead of a list")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise RenderError(f"{source}: {doc['kind']} without metadata.name")
    return Manifest(doc, source)


def load_manifests(directory: Path) -> list[Manifest]:
    """Every object of the kustomization in ``directory``, in its ``resources:`` order."""
    manifests = _load_kustomization(directory, directory, set())
    if not manifests:
        raise RenderError(f"{directory}: the kustomization lists no objects")
    seen: dict[tuple[str, str, str, str], str] = {}
    for m in manifests:
        key = (m.group, m.kind, m.namespace or "", m.name)
        if key in seen:
            raise RenderError(f"{m.source}: {m.describe()} is also defined in {seen[key]}")
        seen[key] = m.source
    return manifests


# ----- overrides -----

def _check_trust_domain(value: str, what: str) -> None:
    if value.startswith("spiffe://"):
        raise RenderError(f"{what} {value!r}: give the trust domain alone, without spiffe:// "
                          "(e.g. cluster.local)")
    if len(value) > 253 or not _TRUST_DOMAIN.match(value):
        hint = " (trust domains are lower case)" if value.lower() != value else ""
        raise RenderError(f"{what} {value!r}: not a trust domain{hint}; expected a DNS-like "
                          "name of lower-case letters, digits, '-' and '.', such as "
                          "cluster.local or prod.example.com")


def _check_redirect_mode(value: str, what: str) -> None:
    if value not in REDIRECT_MODES:
        raise RenderError(f"{what} {value!r}: not one of {', '.join(REDIRECT_MODES)}")


def _check_uplinks(value: str, what: str) -> None:
    names = [n.strip() for n in value.split(",")]
    if names == ["auto"]:
        return
    if "auto" in names:
        raise RenderError(f"{what} {value!r}: 'auto' stands alone (every uplink the agent "
                          "finds), or list interface names: eth0,eth1")
    for n in names:
        if not _IFNAME.match(n):
            raise RenderError(f"{what} {value!r}: {n!r} is not an interface name (1-15 "
                              "letters, digits, '_', '.', '-'); give auto or a list like "
                              "eth0,eth1")


_CONFIG_CHECKS = {"trustDomain": _check_trust_domain, "redirectMode": _check_redirect_mode,
                  "uplinks": _check_uplinks}
_CONFIG_FLAGS = {"trustDomain": "--trust-domain", "redirectMode": "--redirect-mode",
                 "uplinks": "--uplinks"}


def validate_overrides(o: Overrides) -> None:
    """Raise ``RenderError`` naming the flag for a value the components would refuse."""
    try:
        images.check(o.images, o.image_prefix, o.tag, _IMAGE)
    except images.ImageError as e:
        raise RenderError(str(e)) from None
    for key, value in o.config_data().items():
        _CONFIG_CHECKS[key](value, _CONFIG_FLAGS[key])


def config_hash(data: Mapping[str, str]) -> str:
    """sha256 of the ConfigMap's data (canonical JSON), first 16 hex digits."""
    canonical = json.dumps(dict(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def pod_templates(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pod templates (``{metadata, spec}``) of a workload; a bare Pod is its own."""
    kind = obj.get("kind")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return []
    template: Any = None
    if kind in _TEMPLATE_KINDS:
        template = spec.get("template")
    elif kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
    elif kind == "Pod":
        return [obj]  # type: ignore[list-item]
    return [template] if isinstance(template, dict) else []


def _containers(pod_spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for key in ("initContainers", "containers"):
        for c in pod_spec.get(key) or []:
            if isinstance(c, dict):
                yield c


def _override_images(c: dict[str, Any], o: Overrides, source: str) -> None:
    """Apply the image flags to one container: its own image by its component, and the
    waypoint image it passes on (the controller's ``--waypoint-image``)."""
    if not o.images and o.image_prefix is None and o.tag is None:
        return
    component = images.CONTAINER_COMPONENT.get(str(c.get("name")))
    if component is None:
        raise RenderError(f"{source}: container {c.get('name')!r} runs no Ambit component "
                          f"known to the image flags ({', '.join(images.CONTAINER_COMPONENT)})")
    new = images.image_for(component, str(c.get("image", "")), o.images, o.image_prefix, o.tag)
    if new is not None:
        c["image"] = new
    for key in ("args", "command"):
        argv = c.get(key)
        if not isinstance(argv, list):
            continue
        for i, arg in enumerate(argv):
            current = None
            if isinstance(arg, str) and arg.startswith(WAYPOINT_IMAGE_FLAG + "="):
                current = arg.partition("=")[2]
            elif arg == WAYPOINT_IMAGE_FLAG and i + 1 < len(argv):
                current = str(argv[i + 1])
            if current is None:
                continue
            waypoint = images.image_for("waypoint", current, o.images, o.image_prefix, o.tag)
            if waypoint is not None:
                _set_flag(argv, WAYPOINT_IMAGE_FLAG, waypoint)
            break


def _set_flag(argv: list[Any], flag: str, value: str) -> bool:
    """Replace ``flag=X`` or ``flag X`` in an argument list; whether it was there."""
    found = False
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):
            continue
        if arg.startswith(flag + "="):
            argv[i] = f"{flag}={value}"
            found = True
        elif arg == flag and i + 1 < len(argv):
            argv[i + 1] = value
            found = True
    return found


def _reads_config_map(node: Any) -> bool:
    """Whether a pod spec refers to the ambit-config ConfigMap (env, envFrom, volumes)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("configMapKeyRef", "configMapRef", "configMap") \
                    and isinstance(value, dict) and value.get("name") == CONFIG_MAP:
                return True
            if _reads_config_map(value):
                return True
    elif isinstance(node, list):
        return any(_reads_config_map(v) for v in node)
    return False


def _is_config_map(m: Manifest) -> bool:
    return (m.api_version, m.kind, m.name) == ("v1", "ConfigMap", CONFIG_MAP) \
        and m.namespace in (None, NAMESPACE)


def render(manifests: list[Manifest], overrides: Overrides,
           source_dir: Path = Path()) -> Rendered:
    """The manifests with ``overrides`` applied (the inputs are not modified)."""
    validate_overrides(overrides)
    out = [Manifest(copy.deepcopy(m.obj), m.source) for m in manifests]
    configs = [m for m in out if _is_config_map(m)]
    if not configs:
        raise RenderError(f"{source_dir}: no ConfigMap {NAMESPACE}/{CONFIG_MAP} in the "
                          "manifests; they are not Ambit's, or are incomplete")
    cm = configs[0].obj
    raw = cm.get("data") or {}
    if not isinstance(raw, dict):
        raise RenderError(f"{configs[0].source}: data must be a mapping")
    data = {str(k): str(v) for k, v in raw.items()}
    data.update(overrides.config_data())
    for key, check in _CONFIG_CHECKS.items():
        if key in data and key not in overrides.config_data():
            check(data[key], f"{configs[0].source}: data.{key}")
    cm["data"] = data
    digest = config_hash(data)
    for m in out:
        meta = m.obj["metadata"]
        meta["labels"] = {**INSTALL_LABELS, **(meta.get("labels") or {})}
        for template in pod_templates(m.obj):
            pod_spec = template.get("spec")
            if not isinstance(pod_spec, dict):
                continue
            for c in _containers(pod_spec):
                _override_images(c, overrides, m.source)
            if m.kind != "Pod" and _reads_config_map(pod_spec):
                tmeta = template.setdefault("metadata", {})
                tmeta["annotations"] = {**(tmeta.get("annotations") or {}),
                                        CONFIG_HASH_ANNOTATION: digest}
    return Rendered(tuple(out), data, digest, source_dir, overrides)


def render_dir(directory: Path | None, overrides: Overrides) -> Rendered:
    """Find (``--manifests`` or the default), load and render."""
    validate_overrides(overrides)  # a bad flag is reported before a missing directory
    found = find_manifests_dir(directory)
    return render(load_manifests(found), overrides, found)


def apply_order(manifests: tuple[Manifest, ...] | list[Manifest]) -> list[Manifest]:
    """Namespaces, then CRDs, then everything else, each in the kustomization's order: what
    the others need exists first (stable, so the list order still decides the rest)."""
    def rank(m: Manifest) -> int:
        if m.kind == "Namespace" and m.api_version == "v1":
            return 0
        return 1 if m.kind == "CustomResourceDefinition" else 2
    return sorted(manifests, key=rank)


def gateway_class() -> dict[str, Any]:
    """The GatewayClass waypoints name, applied only when the Gateway API is served."""
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": GATEWAY_CLASS, "labels": dict(INSTALL_LABELS)},
            "spec": {"controllerName": WAYPOINT_CONTROLLER_NAME,
                     "description": "Ambit waypoints: the controller deploys a waypoint for "
                                    "each Gateway of this class"}}


# ----- output -----

def _header(rendered: Rendered) -> str:
    return (f"# Ambit {ambit.__version__} rendered by `ambit install --dry-run` from "
            f"{rendered.source_dir}\n"
            f"# overrides: {rendered.overrides.describe()}; config-hash {rendered.config_hash}\n"
            f"# Not included: GatewayClass {GATEWAY_CLASS}, which `ambit install` applies only "
            "when the cluster serves the Gateway API.\n")


def to_yaml(rendered: Rendered, *, header: bool = True) -> str:
    """Multi-document YAML in apply order, as ``kubectl apply -f -`` takes it."""
    docs = [yaml.safe_dump(m.obj, sort_keys=False, default_flow_style=False, width=4096)
            for m in apply_order(rendered.manifests)]
    return (_header(rendered) if header else "") + "---\n" + "---\n".join(docs)


def to_json(rendered: Rendered) -> str:
    """A ``v1`` ``List`` of the objects in apply order (``kubectl apply -f`` accepts it)."""
    return json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {},
                       "items": [m.obj for m in apply_order(rendered.manifests)]}, indent=2)

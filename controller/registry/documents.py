"""Kubernetes-shaped YAML documents to registry records and back.

Why: embedded mode is managed with the same YAML people write for Kubernetes (``kind``,
``metadata``, ``spec``; policies exactly as the CRDs take them), so a file moves between the
two modes unchanged. Validation is strict and names the field (``spec.addresses[1]: ...``):
embedded mode has no API server to catch mistakes, and an unnoticed typo in a label or policy
is a silent hole in the mesh. Records are stored as the canonical documents ``to_document``
produces and read back through ``parse_document``, so there is one parser for both.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from controller.registry.fields import dns_name, mapping, string
from controller.registry.model import (
    AMBIENT,
    DATAPLANE_MODE_LABEL,
    OPT_OUT,
    AuthorizationPolicy,
    Labels,
    Namespace,
    PeerAuthentication,
    Pod,
    Record,
    Service,
    ServicePort,
)
from controller.waypoint.model import (
    GRPC_ROUTE,
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_FOR_LABEL,
    Gateway,
    HTTPFault,
    HTTPRoute,
    TCPRoute,
)
from controller.waypoint.parse import (
    FAULT_API_VERSION,
    GATEWAY_API_VERSION,
    GATEWAY_GROUP,
    WAYPOINT_FOR,
    gateway_spec,
    has_target_refs,
    http_fault_spec,
    http_route_spec,
    parse_gateway,
    parse_grpc_route,
    parse_http_fault,
    parse_http_route,
    parse_tcp_route,
    parse_waypoint_policy,
    tcp_route_spec,
)
from mesh.state.model import IPAddress
from mesh.state.parse import StateError, parse_authorization_spec, parse_peer_authentication_spec

DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True)
class Kind:
    name: str
    api_version: str
    namespaced: bool


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("Namespace", "v1", namespaced=False),
    Kind("Workload", "ambit.dev/v1", namespaced=True),
    Kind("Service", "v1", namespaced=True),
    Kind("AuthorizationPolicy", "security.ambit.dev/v1", namespaced=True),
    Kind("PeerAuthentication", "security.ambit.dev/v1", namespaced=True),
    Kind("Gateway", GATEWAY_API_VERSION, namespaced=True),
    Kind("HTTPRoute", GATEWAY_API_VERSION, namespaced=True),
    Kind("GRPCRoute", GATEWAY_API_VERSION, namespaced=True),
    # TCPRoute is still v1alpha2 (experimental channel) upstream.
    Kind("TCPRoute", f"{GATEWAY_GROUP}/v1alpha2", namespaced=True),
    Kind("HTTPFault", FAULT_API_VERSION, namespaced=True),
)}

# Kinds whose labels mean something to the mesh; labels anywhere else are rejected, since
# they would be stored and then silently ignored.
LABELLED_KINDS = ("Namespace", "Workload", "Service", "Gateway")


def kind_of(record: Record) -> str:
    if isinstance(record, HTTPRoute):
        return record.kind  # HTTPRoute or GRPCRoute
    return "Workload" if isinstance(record, Pod) else type(record).__name__


def key_of(record: Record) -> tuple[str, str, str]:
    """(kind, namespace, name): the identity of an object; namespace is "" for a Namespace."""
    if isinstance(record, Namespace):
        return ("Namespace", "", record.name)
    return (kind_of(record), record.namespace, record.name)


def describe(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


class DocumentError(ValueError):
    """A document in a batch that cannot be applied; the message says which one and where."""

    def __init__(self, index: int, what: str, error: StateError) -> None:
        # Documents are counted from 1, as a reader counts the parts of a file.
        super().__init__(f"document {index + 1} ({what}): {error}")
        self.index = index
        self.path = error.path
        self.problem = error.problem


# --- field validation ----------------------------------------------------------------------

_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def _label_key(key: Any, path: str) -> str:
    if not isinstance(key, str) or not key:
        raise StateError(path, f"label name {key!r} must be a non-empty string")
    prefix, _, name = key.rpartition("/")
    if prefix:
        dns_name(prefix, f"{path}.{key}")
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        raise StateError(f"{path}.{key}", "is not a valid label name: at most 63 letters, "
                         "digits, '-', '_' or '.', starting and ending with a letter or digit, "
                         "optionally after a DNS prefix and '/'")
    return key


def labels(value: Any, path: str) -> Labels:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise StateError(path, "expected a mapping of label names to values")
    out: dict[str, str] = {}
    for k, v in value.items():
        key = _label_key(k, path)
        if not isinstance(v, str):
            # YAML reads `version: 1` or `enabled: true` as a number or boolean; Kubernetes
            # rejects those too, and silently stringifying would make `true` and "True" differ.
            raise StateError(f"{path}.{key}", f"label values are strings; quote it: '{v}'")
        if v and (len(v) > 63 or not _LABEL_NAME.fullmatch(v)):
            raise StateError(f"{path}.{key}", f"{v!r} is not a valid label value: at most 63 "
                             "letters, digits, '-', '_' or '.', starting and ending with a "
                             "letter or digit")
        if key == DATAPLANE_MODE_LABEL and v not in (AMBIENT, OPT_OUT):
            raise StateError(f"{path}.{key}", f"{v!r} is not a data-plane mode; use "
                             f"{AMBIENT!r} (in the mesh) or {OPT_OUT!r} (out of it)")
        if key == USE_WAYPOINT_LABEL and v != OPT_OUT:
            dns_name(v, f"{path}.{key}", label=True)  # a Gateway's name, or "none"
        if key == USE_WAYPOINT_NAMESPACE_LABEL:
            dns_name(v, f"{path}.{key}", label=True)
        if key == WAYPOINT_FOR_LABEL and v not in WAYPOINT_FOR:
            raise StateError(f"{path}.{key}", f"{v!r} is not one of {', '.join(WAYPOINT_FOR)}")
        out[key] = v
    return tuple(sorted(out.items()))


def _check_waypoint_labels(kind: str, meta_labels: Labels) -> None:
    """Waypoint labels only where they mean something (see controller/waypoint/model.py)."""
    keys = dict(meta_labels)
    path = "metadata.labels"
    if kind in ("Service", "Namespace"):
        if USE_WAYPOINT_NAMESPACE_LABEL in keys and USE_WAYPOINT_LABEL not in keys:
            raise StateError(f"{path}.{USE_WAYPOINT_NAMESPACE_LABEL}", "has no effect without "
                             f"{USE_WAYPOINT_LABEL} on the same {kind}")
    else:
        for key in (USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL):
            if key in keys:
                raise StateError(f"{path}.{key}", f"has no effect on a {kind}: only Services "
                                 "and Namespaces are bound to waypoints")
    if WAYPOINT_FOR_LABEL in keys and kind != "Gateway":
        raise StateError(f"{path}.{WAYPOINT_FOR_LABEL}", f"has no effect on a {kind}; it "
                         "belongs on a waypoint Gateway")


def _ip(value: Any, path: str) -> IPAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise StateError(path, f"{value!r} is not an IP address") from None


def _ips(value: Any, path: str) -> tuple[IPAddress, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise StateError(path, f"expected a list of IP addresses, got {type(value).__name__}")
    out: list[IPAddress] = []
    for i, v in enumerate(value):
        ip = _ip(v, f"{path}[{i}]")
        if ip in out:
            raise StateError(f"{path}[{i}]", f"{ip} is listed twice")
        out.append(ip)
    return tuple(out)


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise StateError(path, f"{value!r} is not a port number")
    try:
        port = int(value)
    except ValueError:
        raise StateError(path, f"{value!r} is not a port number; named ports are not "
                         "supported in embedded mode, give the number") from None
    if not 1 <= port <= 65535:
        raise StateError(path, f"{port} is not a port number (1-65535)")
    return port


def _bool(value: Any, path: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise StateError(path, f"expected true or false, got {value!r}")
    return value


def _json(value: Any, path: str) -> dict[str, Any]:
    """A policy spec as plain JSON data (how it is stored and sent to ztunnels)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise StateError(path, f"expected a mapping, got {type(value).__name__}")
    try:
        data: dict[str, Any] = json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        # YAML turns unquoted 2024-01-01 into a date, which JSON has no form for.
        raise StateError(path, f"is not plain data ({e}); quote dates and timestamps") from None
    return data


# --- documents -------------------------------------------------------------------------------


def parse_document(doc: Any) -> Record:
    """Validate one document and return its record; ``StateError`` names the bad field."""
    top = mapping(doc, "", ("apiVersion", "kind", "metadata", "spec"))
    kind_name = string(top.get("kind"), "kind")
    kind = KINDS.get(kind_name)
    if kind is None:
        raise StateError("kind", f"{kind_name!r} is not a registry kind; expected one of: "
                         f"{', '.join(KINDS)}")
    api_version = string(top.get("apiVersion"), "apiVersion")
    if api_version != kind.api_version:
        raise StateError("apiVersion", f"{api_version!r} does not serve {kind.name}; use "
                         f"apiVersion: {kind.api_version}")
    meta = mapping(top.get("metadata"), "metadata",
                    ("name", "namespace", "labels", "annotations"))
    # Annotations are accepted (files exported from a cluster carry them) but not kept.
    if meta.get("annotations") is not None and not isinstance(meta["annotations"], Mapping):
        raise StateError("metadata.annotations", "expected a mapping")
    # Gateway names are also label values (gateway-name) and service account names.
    name = dns_name(meta.get("name"), "metadata.name",
                    label=kind.name in ("Namespace", "Service", "Gateway"))
    if kind.namespaced:
        namespace = dns_name(meta.get("namespace", DEFAULT_NAMESPACE), "metadata.namespace",
                             label=True)
    elif "namespace" in meta:
        raise StateError("metadata.namespace", f"a {kind.name} is not namespaced; remove it")
    if kind.name not in LABELLED_KINDS and "labels" in meta:
        raise StateError("metadata.labels", f"labels on a {kind.name} have no effect; remove "
                         "them")
    meta_labels = labels(meta.get("labels"), "metadata.labels")
    _check_waypoint_labels(kind.name, meta_labels)
    spec = top.get("spec")
    if kind.name == "Namespace":
        mapping(spec, "spec", ())
        return Namespace(name, meta_labels)
    if kind.name == "Workload":
        return _workload(name, namespace, meta_labels, spec)
    if kind.name == "Service":
        return _service(name, namespace, meta_labels, spec)
    data = _json(spec, "spec")
    if kind.name == "Gateway":
        return parse_gateway(name, namespace, meta_labels, data)
    if kind.name == "HTTPRoute":
        return parse_http_route(name, namespace, data)
    if kind.name == GRPC_ROUTE:
        return parse_grpc_route(name, namespace, data)
    if kind.name == "TCPRoute":
        return parse_tcp_route(name, namespace, data)
    if kind.name == "HTTPFault":
        return parse_http_fault(name, namespace, data)
    if kind.name == "AuthorizationPolicy":
        # A policy with targetRefs is the waypoint's (L7); one with a selector (or neither)
        # is the ztunnel's.
        if has_target_refs(data):
            parse_waypoint_policy(name, namespace, data)
        else:
            parse_authorization_spec(name, namespace, data, "spec")
        return AuthorizationPolicy(name, namespace, data)
    parse_peer_authentication_spec(name, namespace, data, "spec")
    return PeerAuthentication(name, namespace, data)


def _workload(name: str, namespace: str, meta_labels: Labels, spec: Any) -> Pod:
    m = mapping(spec, "spec", ("serviceAccount", "node", "addresses", "ready",
                                "workloadName"))
    # No addresses yet is a pod scheduled on a node whose sandbox is not up: the node agent
    # can already decide its capture (NodeService), and nothing can address it until the
    # addresses are added.
    addresses = _ips(m.get("addresses"), "spec.addresses")
    workload_name = m.get("workloadName")
    return Pod(
        name=name,
        namespace=namespace,
        service_account=dns_name(m.get("serviceAccount", "default"), "spec.serviceAccount"),
        node=dns_name(m.get("node"), "spec.node"),
        ips=addresses,
        labels=meta_labels,
        ready=_bool(m.get("ready"), "spec.ready", True),
        workload_name="" if workload_name is None else dns_name(workload_name,
                                                                 "spec.workloadName"),
    )


def _service(name: str, namespace: str, meta_labels: Labels, spec: Any) -> Service:
    m = mapping(spec, "spec", ("type", "clusterIP", "clusterIPs", "ports", "selector"))
    if m.get("type", "ClusterIP") != "ClusterIP":
        raise StateError("spec.type", f"{m['type']!r}: only ClusterIP services exist in "
                         "embedded mode")
    if m.get("clusterIP") == "None" or m.get("clusterIPs") == ["None"]:
        raise StateError("spec.clusterIP", "headless services have no virtual IP for the mesh "
                         "to route; give the service a clusterIP")
    ips = _ips(m.get("clusterIPs"), "spec.clusterIPs")
    if "clusterIP" in m:
        first = _ip(m["clusterIP"], "spec.clusterIP")
        if ips and ips[0] != first:
            raise StateError("spec.clusterIP", f"{first} must equal spec.clusterIPs[0] "
                             f"({ips[0]}) when both are given")
        ips = ips or (first,)
    if not ips:
        raise StateError("spec.clusterIP", "is required: the virtual IP clients connect to")
    raw_ports = m.get("ports")
    if not isinstance(raw_ports, list) or not raw_ports:
        raise StateError("spec.ports", "needs at least one port")
    ports: list[ServicePort] = []
    for i, raw in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        p = mapping(raw, path, ("name", "port", "targetPort", "protocol", "appProtocol"))
        if p.get("protocol", "TCP") != "TCP":
            raise StateError(f"{path}.protocol", f"{p['protocol']!r}: the mesh carries TCP only")
        if p.get("port") is None:
            raise StateError(f"{path}.port", "is required")
        port = _port(p["port"], f"{path}.port")
        if any(q.port == port for q in ports):
            raise StateError(f"{path}.port", f"port {port} is listed twice")
        target = p.get("targetPort")
        port_name = p.get("name")
        ports.append(ServicePort(
            port=port,
            target_port=port if target is None else _port(target, f"{path}.targetPort"),
            name="" if port_name is None else dns_name(port_name, f"{path}.name", label=True),
            app_protocol=_app_protocol(p.get("appProtocol"), f"{path}.appProtocol"),
        ))
    return Service(name, namespace, ips, tuple(ports),
                   labels(m.get("selector"), "spec.selector"), meta_labels)


_APP_PROTOCOL_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _app_protocol(value: Any, path: str) -> str:
    """Kubernetes' ``appProtocol``: an IANA service name (``http``, ``grpc``) or a
    domain-prefixed name (``kubernetes.io/h2c``), as its API server validates it."""
    if value is None:
        return ""
    text = string(value, path)
    prefix, _, name = text.rpartition("/")
    if prefix:
        dns_name(prefix, path)
    if len(name) > 63 or not _APP_PROTOCOL_NAME.fullmatch(name):
        raise StateError(path, f"{text!r} is not a protocol name: lowercase letters, digits "
                         "and '-' (e.g. http, http2, grpc, tcp, tls), optionally after a DNS "
                         "prefix and '/' (e.g. kubernetes.io/h2c)")
    return text


def to_document(record: Record) -> dict[str, Any]:
    """The canonical document of a record: what is stored, and what ``ambit get -o yaml``
    prints (so its output can be applied again)."""
    kind, namespace, name = key_of(record)
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    doc: dict[str, Any] = {"apiVersion": KINDS[kind].api_version, "kind": kind,
                           "metadata": meta}
    if isinstance(record, Namespace):
        if record.labels:
            meta["labels"] = dict(record.labels)
    elif isinstance(record, Pod):
        if record.labels:
            meta["labels"] = dict(record.labels)
        spec: dict[str, Any] = {"serviceAccount": record.service_account, "node": record.node,
                                "addresses": [str(ip) for ip in record.ips],
                                "ready": record.ready}
        if record.workload_name:
            spec["workloadName"] = record.workload_name
        doc["spec"] = spec
    elif isinstance(record, Service):
        if record.labels:
            meta["labels"] = dict(record.labels)
        ports: list[dict[str, Any]] = []
        for p in record.ports:
            port: dict[str, Any] = {"name": p.name} if p.name else {}
            port |= {"port": p.port, "targetPort": p.target_port}
            if p.app_protocol:
                port["appProtocol"] = p.app_protocol
            ports.append(port)
        doc["spec"] = {"clusterIPs": [str(ip) for ip in record.cluster_ips], "ports": ports,
                       "selector": dict(record.selector)}
    elif isinstance(record, Gateway):
        if record.labels:
            meta["labels"] = dict(record.labels)
        doc["spec"] = gateway_spec(record)
    elif isinstance(record, HTTPRoute):
        doc["spec"] = http_route_spec(record)
    elif isinstance(record, TCPRoute):
        doc["spec"] = tcp_route_spec(record)
    elif isinstance(record, HTTPFault):
        doc["spec"] = http_fault_spec(record)
    else:
        doc["spec"] = dict(record.spec)
    return doc


def load_documents(text: str, source: str = "input") -> list[Any]:
    """The documents of a (multi-document, ``---``-separated) YAML text; empty ones skipped,
    and a ``kind: List`` (what ``kubectl get -o yaml`` prints) unwrapped."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not valid YAML: {e}") from None
    out: list[Any] = []
    for d in docs:
        if isinstance(d, Mapping) and d.get("kind") == "List" and isinstance(d.get("items"),
                                                                              list):
            out.extend(d["items"])
        else:
            out.append(d)
    return out


def _what(doc: Any) -> str:
    """Best-effort "Kind namespace/name" of a raw document, for error messages."""
    if not isinstance(doc, Mapping):
        return "not a mapping"
    kind = str(doc.get("kind") or "no kind")
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("name"):
        return kind
    namespaced = KINDS[kind].namespaced if kind in KINDS else "namespace" in meta
    ns = str(meta.get("namespace") or DEFAULT_NAMESPACE) if namespaced else ""
    return describe(kind, ns, str(meta["name"]))


def parse_documents(docs: Sequence[Any]) -> list[Record]:
    """Validate a batch: every document, and no object twice; ``DocumentError`` otherwise."""
    records: list[Record] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, doc in enumerate(docs):
        try:
            record = parse_document(doc)
        except StateError as e:
            raise DocumentError(i, _what(doc), e) from None
        key = key_of(record)
        if key in seen:
            raise DocumentError(i, describe(*key), StateError(
                "", f"the same object as document {seen[key] + 1}; keep one of them"))
        seen[key] = i
        records.append(record)
    return records


def find_address_conflict(incoming: Sequence[Record], existing: Iterable[Record],
                          ) -> tuple[int, str, str] | None:
    """The first IP of ``incoming`` that another object already uses, as (index, field path,
    problem); ``existing`` is the registry's content (objects replaced by ``incoming`` are
    ignored). Two pods or services on one address would make routing depend on chance."""
    replaced = {key_of(r) for r in incoming}
    owner: dict[IPAddress, str] = {}
    for r in existing:
        if key_of(r) not in replaced:
            for ip in _addresses(r):
                owner.setdefault(ip, describe(*key_of(r)))
    for i, r in enumerate(incoming):
        field = "spec.addresses" if isinstance(r, Pod) else "spec.clusterIPs"
        for j, ip in enumerate(_addresses(r)):
            if ip in owner:
                return i, f"{field}[{j}]", f"{ip} is already used by {owner[ip]}"
            owner[ip] = describe(*key_of(r))
    return None


def _addresses(record: Record) -> tuple[IPAddress, ...]:
    if isinstance(record, Pod):
        return record.ips
    if isinstance(record, Service):
        return record.cluster_ips
    return ()

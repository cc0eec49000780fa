"""Kubernetes JSON objects to registry records (``controller.registry.model``).

Why separate from the watching: these are pure functions of the reflectors' caches, so every
rule below is tested as data, and the same caches always give the same snapshot.

What is kept and why:

* pods need a node; one without an IP yet (its sandbox is being created) is kept so the node
  agent can decide its capture at CNI ADD, and ``translate`` leaves it out of the mesh state
  until it has an address; host-network pods and pods
  that have finished (``Succeeded``/``Failed``) are left out, because their IP is the node's or
  may already belong to another pod;
* ``workload_name`` is the controlling owner, with a ReplicaSet's ``pod-template-hash`` suffix
  removed so pods of one Deployment share one name in metrics (as Istio reports them);
* services keep numeric target ports; a named ``targetPort`` is resolved through the service's
  EndpointSlices (the endpoint controller's own resolution), else through the container ports
  of the pods the selector picks, else that port is left out with a logged reason; the model
  has one target port per service port, so a name that resolves to different numbers on
  different pods is left out too;
* AuthorizationPolicy and PeerAuthentication specs are kept as written and checked with the
  ztunnel's own parsers (the waypoint's, for policies with ``targetRefs``) only to report
  problems with the field path; an invalid one still goes into the snapshot, where
  ``translate`` (or ``waypoint.parse.waypoint_policies``) makes it fail closed (dropping it
  would fail open);
* Gateways of another class than ``ambit-waypoint`` are not Ambit's and are skipped silently;
  so are HTTPRoutes attached to none of Ambit's parents (a Service, or a waypoint Gateway),
  typically routes of an ingress controller. A waypoint Gateway, HTTPRoute or HTTPFault that
  does not parse is left out with a reported problem: Gateway API treats an invalid route as
  not attached, and a rule naming a missing HTTPFault answers 500 (``resolve_faults``);
* HTTPRoutes are numbered (``creation_index``) oldest first by ``creationTimestamp``, then by
  namespace/name: Gateway API's precedence between routes.

``report`` receives one sentence per problem, naming the object and the field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from controller.registry.model import (
    AuthorizationPolicy,
    Labels,
    Namespace,
    PeerAuthentication,
    Pod,
    RegistrySnapshot,
    Service,
    ServicePort,
    labels_of,
)
from controller.waypoint.model import (
    GRPC_ROUTE,
    HTTP_ROUTE,
    WAYPOINT_CLASS,
    Gateway,
    HTTPFault,
    HTTPRoute,
    TCPRoute,
)
from controller.waypoint.parse import (
    GATEWAY_GROUP,
    has_target_refs,
    parse_gateway,
    parse_grpc_route,
    parse_http_fault,
    parse_http_route,
    parse_tcp_route,
    parse_waypoint_policy,
)
from mesh.state.model import IPAddress
from mesh.state.parse import StateError, parse_authorization_spec, parse_peer_authentication_spec

Report = Callable[[str], None]
Object = Mapping[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _meta(obj: Object) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _spec(obj: Object) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _labels(value: Any) -> Labels:
    if not isinstance(value, Mapping):
        return ()
    return labels_of({str(k): str(v) for k, v in value.items()})


def _name(obj: Object) -> str:
    meta = _meta(obj)
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def namespace_record(obj: Object) -> Namespace:
    meta = _meta(obj)
    return Namespace(name=str(meta.get("name")), labels=_labels(meta.get("labels")))


def _ready(obj: Object) -> bool:
    if _meta(obj).get("deletionTimestamp"):
        return False
    status = obj.get("status") or {}
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _workload_name(obj: Object) -> str:
    meta = _meta(obj)
    for ref in meta.get("ownerReferences") or []:
        if not isinstance(ref, Mapping) or not ref.get("controller"):
            continue
        name = str(ref.get("name") or "")
        pod_hash = (meta.get("labels") or {}).get("pod-template-hash")
        if ref.get("kind") == "ReplicaSet" and pod_hash and name.endswith(f"-{pod_hash}"):
            return name[: -len(pod_hash) - 1]
        return name
    return ""


def pod_record(obj: Object, report: Report) -> Pod | None:
    """The registry's pod, or None when it cannot or must not be addressed (see module doc)."""
    meta, spec = _meta(obj), _spec(obj)
    status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    assert isinstance(status, Mapping)
    node = spec.get("nodeName")
    raw_ips = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, Mapping)]
    if not raw_ips and status.get("podIP"):
        raw_ips = [status.get("podIP")]
    if not node:
        return None  # not scheduled yet; a later event will bring it
    if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    ips: list[IPAddress] = []
    for i, raw in enumerate(raw_ips):
        try:
            ips.append(ipaddress.ip_address(str(raw)))
        except ValueError:
            report(f"Pod {_name(obj)}: status.podIPs[{i}].ip: {raw!r} is not an IP address; "
                   "pod left out")
            return None
    return Pod(
        name=str(meta.get("name")),
        namespace=str(meta.get("namespace")),
        service_account=str(spec.get("serviceAccountName") or "default"),
        node=str(node),
        ips=tuple(ips),
        labels=_labels(meta.get("labels")),
        ready=_ready(obj),
        workload_name=_workload_name(obj),
    )


def _selects(selector: Labels, obj: Object) -> bool:
    labels = _meta(obj).get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector)


def _named_port(name: str, port_name: str, slices: Iterable[Object],
                pods: Iterable[Object]) -> set[int]:
    """Numbers a named targetPort resolves to: EndpointSlices first, else the pods' ports."""
    found: set[int] = set()
    for s in slices:
        for p in s.get("ports") or []:
            if isinstance(p, Mapping) and (p.get("name") or "") == port_name and p.get("port"):
                found.add(int(p["port"]))
    if found:
        return found
    for pod in pods:
        spec = _spec(pod)
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
            for p in (c.get("ports") or []) if isinstance(c, Mapping) else []:
                if isinstance(p, Mapping) and p.get("name") == name and p.get("containerPort"):
                    found.add(int(p["containerPort"]))
    return found


def service_record(obj: Object, slices: Iterable[Object], pods: Iterable[Object],
                   report: Report) -> Service | None:
    """The registry's service; ``slices``/``pods``: this namespace's, for named targetPorts."""
    meta, spec = _meta(obj), _spec(obj)
    if spec.get("type") == "ExternalName":
        return None  # a DNS alias: no virtual IP to intercept
    name, namespace = str(meta.get("name")), str(meta.get("namespace"))
    raw_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    ips: list[IPAddress] = []
    for i, raw in enumerate(raw_ips):
        if raw in ("None", ""):
            continue  # headless
        try:
            ips.append(ipaddress.ip_address(str(raw)))
        except ValueError:
            report(f"Service {namespace}/{name}: spec.clusterIPs[{i}]: {raw!r} is not an IP "
                   "address; left out")
    selector = _labels(spec.get("selector"))
    own_slices = [s for s in slices
                  if (_meta(s).get("labels") or {}).get(SERVICE_NAME_LABEL) == name]
    selected = [p for p in pods if _selects(selector, p)]
    ports: list[ServicePort] = []
    for i, p in enumerate(spec.get("ports") or []):
        if not isinstance(p, Mapping) or not p.get("port"):
            report(f"Service {namespace}/{name}: spec.ports[{i}].port: missing; port left out")
            continue
        port, port_name = int(p["port"]), str(p.get("name") or "")
        protocol = str(p.get("protocol") or "TCP")
        target = p.get("targetPort")
        if target is None or target == "":
            target_port = port
        elif isinstance(target, int):
            target_port = target
        else:
            numbers = _named_port(str(target), port_name, own_slices, selected)
            if len(numbers) != 1:
                why = ("no EndpointSlice or selected pod names it yet" if not numbers else
                       f"it is {sorted(numbers)} on different pods, and a service port has one "
                       "target port here")
                report(f"Service {namespace}/{name}: spec.ports[{i}].targetPort: named port "
                       f"{target!r} cannot be resolved ({why}); port {port} left out")
                continue
            target_port = numbers.pop()
        ports.append(ServicePort(port=port, target_port=target_port, name=port_name,
                                 protocol=protocol,
                                 app_protocol=str(p.get("appProtocol") or "")))
    return Service(name=name, namespace=namespace, cluster_ips=tuple(ips), ports=tuple(ports),
                   selector=selector, labels=_labels(meta.get("labels")))


def _as_mapping(spec: Any) -> Mapping[str, Any]:
    # The CRD schema makes spec an object; should one slip through, wrap it so translate's
    # parser still rejects it (and fails closed) instead of reading it as an empty spec.
    return spec if isinstance(spec, Mapping) else {"specIsNotAMapping": spec}


def authorization_policy_record(obj: Object, report: Report) -> AuthorizationPolicy:
    meta = _meta(obj)
    name, namespace = str(meta.get("name")), str(meta.get("namespace"))
    spec = obj.get("spec") if obj.get("spec") is not None else {}
    try:
        if has_target_refs(spec):
            parse_waypoint_policy(name, namespace, spec, "spec")
        else:
            parse_authorization_spec(name, namespace, spec, "spec")
    except StateError as e:
        report(f"AuthorizationPolicy {namespace}/{name}: {e}; it fails closed until fixed")
    return AuthorizationPolicy(name=name, namespace=namespace, spec=_as_mapping(spec))


def peer_authentication_record(obj: Object, report: Report) -> PeerAuthentication:
    meta = _meta(obj)
    name, namespace = str(meta.get("name")), str(meta.get("namespace"))
    spec = obj.get("spec") if obj.get("spec") is not None else {}
    try:
        parse_peer_authentication_spec(name, namespace, spec, "spec")
    except StateError as e:
        report(f"PeerAuthentication {namespace}/{name}: {e}; it fails closed (STRICT) until "
               "fixed")
    return PeerAuthentication(name=name, namespace=namespace, spec=_as_mapping(spec))


def gateway_record(obj: Object, report: Report) -> Gateway | None:
    """A waypoint, or None: another class's Gateway (silently) or an invalid one (reported)."""
    meta, spec = _meta(obj), _spec(obj)
    if spec.get("gatewayClassName") != WAYPOINT_CLASS:
        return None
    name, namespace = str(meta.get("name")), str(meta.get("namespace"))
    try:
        return parse_gateway(name, namespace, _labels(meta.get("labels")), spec)
    except StateError as e:
        report(f"Gateway {namespace}/{name}: {e}; it is not run as a waypoint until fixed")
        return None


def _ours(obj: Object, waypoints: set[tuple[str, str]]) -> bool:
    """Whether a route attaches to a Service or to one of Ambit's waypoint Gateways."""
    namespace = str(_meta(obj).get("namespace"))
    for ref in _spec(obj).get("parentRefs") or []:
        if not isinstance(ref, Mapping):
            continue
        group, kind = ref.get("group", GATEWAY_GROUP), ref.get("kind", "Gateway")
        if kind == "Service":
            return True  # (a wrong group is the parser's to report)
        if kind == "Gateway" and group == GATEWAY_GROUP and \
                (str(ref.get("namespace") or namespace), str(ref.get("name"))) in waypoints:
            return True
    return False


def http_route_records(objs: Iterable[Object], gateways: Iterable[Gateway],
                       report: Report, grpc_objs: Iterable[Object] = ()) \
        -> tuple[HTTPRoute, ...]:
    """The HTTPRoutes and GRPCRoutes attached to Ambit's parents, numbered oldest first
    (together: precedence between routes is by age whatever their kind; see module doc)."""
    waypoints = {(g.namespace, g.name) for g in gateways}
    tagged = [(HTTP_ROUTE, o) for o in objs] + [(GRPC_ROUTE, o) for o in grpc_objs]
    ours = sorted(((k, o) for k, o in tagged if _ours(o, waypoints)), key=lambda ko: (
        str(_meta(ko[1]).get("creationTimestamp") or ""), str(_meta(ko[1]).get("namespace")),
        str(_meta(ko[1]).get("name")), ko[0]))
    out: list[HTTPRoute] = []
    for index, (kind, obj) in enumerate(ours):
        meta = _meta(obj)
        name, namespace = str(meta.get("name")), str(meta.get("namespace"))
        parse = parse_grpc_route if kind == GRPC_ROUTE else parse_http_route
        try:
            out.append(parse(name, namespace, obj.get("spec"), "spec", index))
        except StateError as e:
            report(f"{kind} {namespace}/{name}: {e}; the route is not applied until fixed")
    return tuple(sorted(out, key=lambda r: (r.key, r.kind)))


def tcp_route_records(objs: Iterable[Object], report: Report) -> tuple[TCPRoute, ...]:
    """TCPRoutes attached to Services (others belong to ingress Gateways), oldest first."""
    ours = sorted((o for o in objs if _ours(o, set())), key=lambda o: (
        str(_meta(o).get("creationTimestamp") or ""), str(_meta(o).get("namespace")),
        str(_meta(o).get("name"))))
    out: list[TCPRoute] = []
    for index, obj in enumerate(ours):
        meta = _meta(obj)
        name, namespace = str(meta.get("name")), str(meta.get("namespace"))
        try:
            out.append(parse_tcp_route(name, namespace, obj.get("spec"), "spec", index))
        except StateError as e:
            report(f"TCPRoute {namespace}/{name}: {e}; the route is not applied until fixed")
    return tuple(sorted(out, key=lambda r: r.key))


def http_fault_record(obj: Object, report: Report) -> HTTPFault | None:
    meta = _meta(obj)
    name, namespace = str(meta.get("name")), str(meta.get("namespace"))
    try:
        return parse_http_fault(name, namespace, obj.get("spec"))
    except StateError as e:
        report(f"HTTPFault {namespace}/{name}: {e}; route rules that use it answer HTTP 500 "
               "until it is fixed")
        return None


def build_snapshot(caches: Mapping[str, Mapping[str, Object]], revision: int,
                   report: Report) -> RegistrySnapshot:
    """One snapshot from the reflectors' caches (keyed by plural; missing kinds are empty)."""

    def objs(plural: str) -> list[Object]:
        return [caches.get(plural, {})[k] for k in sorted(caches.get(plural, {}))]

    pods_by_ns: dict[str, list[Object]] = {}
    for p in objs("pods"):
        pods_by_ns.setdefault(str(_meta(p).get("namespace")), []).append(p)
    slices_by_ns: dict[str, list[Object]] = {}
    for s in objs("endpointslices"):
        slices_by_ns.setdefault(str(_meta(s).get("namespace")), []).append(s)
    gateways = tuple(g for g in (gateway_record(o, report) for o in objs("gateways"))
                     if g is not None)
    pods = (pod_record(p, report) for p in objs("pods"))
    services = (service_record(s, slices_by_ns.get(str(_meta(s).get("namespace")), []),
                              pods_by_ns.get(str(_meta(s).get("namespace")), []), report)
                for s in objs("services"))
    return RegistrySnapshot(
        namespaces=tuple(namespace_record(n) for n in objs("namespaces")),
        pods=tuple(p for p in pods if p is not None),
        services=tuple(s for s in services if s is not None),
        authorization_policies=tuple(authorization_policy_record(a, report)
                                     for a in objs("authorizationpolicies")),
        peer_authentications=tuple(peer_authentication_record(a, report)
                                   for a in objs("peerauthentications")),
        gateways=gateways,
        http_routes=http_route_records(objs("httproutes"), gateways, report,
                                       objs("grpcroutes")),
        tcp_routes=tcp_route_records(objs("tcproutes"), report),
        http_faults=tuple(f for f in (http_fault_record(o, report) for o in objs("httpfaults"))
                          if f is not None),
        revision=revision,
    )

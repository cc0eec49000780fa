"""Turn a state document (YAML/JSON, shaped like docs/state-file.md) into a ``MeshConfig``.

Validation is all-or-nothing: the first problem raises ``StateError`` with the path of the
offending field, so a bad document is rejected whole and the caller keeps its last good state.
The policy parsers are shared with the controller, which reads the same shapes from CRDs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import yaml

from mesh.ports import parse_port
from mesh.spiffe import SpiffeError, SpiffeId
from mesh.state.model import (
    Action,
    AuthorizationPolicy,
    IPAddress,
    IPNetwork,
    MeshConfig,
    MtlsMode,
    Operation,
    PeerAuthentication,
    Protocol,
    Rule,
    Service,
    ServicePort,
    Source,
    StringMatch,
    WaypointRef,
    Workload,
)

T = TypeVar("T")


class StateError(ValueError):
    """A state document that cannot be used; ``path`` names the field (``services[0].vips``)."""

    # Field names and values in a message come from the document's sender; the message goes
    # back to them and into logs, so it is bounded however long what they sent was.
    MAX_MESSAGE = 1024

    def __init__(self, path: str, problem: str) -> None:
        message = f"{path}: {problem}" if path else problem
        if len(message) > self.MAX_MESSAGE:
            message = message[:self.MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.path = path
        self.problem = problem


def mapping(value: Any, path: str, allowed: Iterable[str],
            unsupported: Mapping[str, str] | None = None) -> Mapping[str, Any]:
    """A mapping with only ``allowed`` keys (None is an empty one); keys in ``unsupported``
    get their own message. Public: the controller's documents are checked the same way."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise StateError(path, f"expected a mapping, got {type(value).__name__}")
    allowed = set(allowed)
    for key in value:
        name = str(key) if len(str(key)) <= 64 else f"{str(key)[:61]}..."  # a sender's key
        where = f"{path}.{name}" if path else name
        if unsupported and key in unsupported:
            raise StateError(where, unsupported[key])
        if key not in allowed:
            raise StateError(where, f"unknown field; expected one of: "
                             f"{', '.join(sorted(allowed))}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise StateError(path, f"expected a list, got {type(value).__name__}")
    return value


def _str(value: Any, path: str, *, required: bool = True, default: str = "") -> str:
    if value is None:
        if required:
            raise StateError(path, "is required")
        return default
    if not isinstance(value, str) or (required and not value):
        raise StateError(path, f"expected a non-empty string, got {value!r}")
    return value


def string(value: Any, path: str) -> str:
    """A required, non-empty string (public, for the controller's documents)."""
    return _str(value, path)


def _items(value: Any, path: str, item: Callable[[Any, str], T]) -> tuple[T, ...]:
    return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))


def _ip(value: Any, path: str) -> IPAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise StateError(path, f"{value!r} is not an IP address") from None


def _net(value: Any, path: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise StateError(path, f"{value!r} is not an IP address or CIDR block") from None


def _port(value: Any, path: str) -> int:
    # An int, or a string of ASCII digits (parse_port): int(str(value)) took "٨٠", "+80", "8_0".
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise StateError(path, f"{value!r} is not a port number")
    try:
        return parse_port(text)
    except ValueError:
        raise StateError(path, f"{value!r} is not a port number (1-65535)") from None


def _labels(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise StateError(path, "expected a mapping of label names to values")
    return tuple(sorted((str(k), str(v)) for k, v in value.items()))


def _enum(enum: type[Any], value: Any, path: str, default: Any) -> Any:
    if value is None:
        return default
    try:
        return enum(str(value).upper())
    except ValueError:
        choices = ", ".join(m.value for m in enum)
        raise StateError(path, f"{value!r} is not one of {choices}") from None


def parse_workload(value: Any, path: str, trust_domain: str) -> Workload:
    """One workload entry; shared by the state file and the controller's wire format."""
    m = mapping(
        value,
        path,
        {"uid", "name", "namespace", "serviceAccount", "node", "addresses", "labels",
         "workloadName", "protocol", "status"},
    )
    name = _str(m.get("name"), f"{path}.name")
    namespace = _str(m.get("namespace"), f"{path}.namespace")
    addresses = _items(m.get("addresses"), f"{path}.addresses", _ip)
    if not addresses:
        raise StateError(f"{path}.addresses", "needs at least one pod IP")
    sa = _str(m.get("serviceAccount"), f"{path}.serviceAccount", required=False,
              default="default")
    try:
        SpiffeId.parse(f"spiffe://{trust_domain}/ns/{namespace}/sa/{sa}")
    except SpiffeError as e:
        raise StateError(f"{path}.serviceAccount", str(e)) from None
    return Workload(
        uid=_str(m.get("uid"), f"{path}.uid", required=False, default=f"{namespace}/{name}"),
        name=name,
        namespace=namespace,
        service_account=sa,
        node=_str(m.get("node"), f"{path}.node"),
        addresses=addresses,
        trust_domain=trust_domain,
        labels=_labels(m.get("labels"), f"{path}.labels"),
        workload_name=_str(m.get("workloadName"), f"{path}.workloadName", required=False),
        protocol=_enum(Protocol, m.get("protocol"), f"{path}.protocol", Protocol.HBONE),
        healthy=_status(m.get("status"), f"{path}.status"),
    )


def _status(value: Any, path: str) -> bool:
    if value is None:
        return True
    text = str(value).lower()
    if text not in ("healthy", "unhealthy"):
        raise StateError(path, f"{value!r} is not Healthy or Unhealthy")
    return text == "healthy"


def _service_port(value: Any, path: str) -> ServicePort:
    m = mapping(value, path, {"port", "targetPort", "name", "protocol"})
    port = _port(m.get("port"), f"{path}.port")
    target = m.get("targetPort")
    return ServicePort(port, port if target is None else _port(target, f"{path}.targetPort"))


# A waypoint's instances are found by the label ``gateway-name=<name>``, so its name must be a
# valid label value; namespaces are DNS-1123 labels.
_LABEL_VALUE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _waypoint(value: Any, path: str, service_namespace: str) -> WaypointRef | None:
    if value is None:
        return None
    m = mapping(value, path, {"namespace", "name"})
    name = _str(m.get("name"), f"{path}.name")
    if len(name) > 63 or not _LABEL_VALUE.fullmatch(name):
        raise StateError(f"{path}.name", f"{name!r} is not a waypoint (Gateway) name usable as "
                         "a label value (at most 63 letters, digits, '-', '_', '.')")
    namespace = _str(m.get("namespace"), f"{path}.namespace", required=False,
                     default=service_namespace)
    if len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace):
        raise StateError(f"{path}.namespace", f"{namespace!r} is not a namespace name "
                         "(DNS-1123 label)")
    return WaypointRef(namespace=namespace, name=name)


def parse_service(value: Any, path: str) -> Service:
    """One service entry; shared by the state file and the controller's wire format."""
    m = mapping(value, path, {"name", "namespace", "hostname", "vips", "ports", "selector",
                               "waypoint"})
    name = _str(m.get("name"), f"{path}.name")
    namespace = _str(m.get("namespace"), f"{path}.namespace")
    ports = _items(m.get("ports"), f"{path}.ports", _service_port)
    if not ports:
        raise StateError(f"{path}.ports", "needs at least one port")
    vips = _items(m.get("vips"), f"{path}.vips", _ip)
    if not vips:
        raise StateError(f"{path}.vips", "needs at least one virtual IP")
    return Service(
        name=name,
        namespace=namespace,
        hostname=_str(m.get("hostname"), f"{path}.hostname", required=False,
                      default=f"{name}.{namespace}.svc.cluster.local"),
        vips=vips,
        ports=ports,
        selector=_labels(m.get("selector"), f"{path}.selector"),
        waypoint=_waypoint(m.get("waypoint"), f"{path}.waypoint", namespace),
    )


def _matches(value: Any, path: str) -> tuple[StringMatch, ...]:
    def one(v: Any, p: str) -> StringMatch:
        s = _str(v, p)
        if s != "*" and "*" in s[1:-1]:
            raise StateError(p, f"{s!r}: '*' is only allowed as a prefix or suffix")
        return StringMatch(s.removeprefix("spiffe://"))

    return _items(value, path, one)


def _source(value: Any, path: str) -> Source:
    outer = mapping(value, path, {"source"})
    p = f"{path}.source"
    m = mapping(outer.get("source"), p, {
        "principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks",
        "notIpBlocks", "requestPrincipals", "notRequestPrincipals", "remoteIpBlocks",
        "notRemoteIpBlocks"})
    for l7 in ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks",
               "notRemoteIpBlocks"):
        if l7 in m:
            raise StateError(f"{p}.{l7}", "is an L7 attribute; the ztunnel enforces L4 only "
                             "(attach the policy to a waypoint instead)")
    return Source(
        principals=_matches(m.get("principals"), f"{p}.principals"),
        not_principals=_matches(m.get("notPrincipals"), f"{p}.notPrincipals"),
        namespaces=_matches(m.get("namespaces"), f"{p}.namespaces"),
        not_namespaces=_matches(m.get("notNamespaces"), f"{p}.notNamespaces"),
        ip_blocks=_items(m.get("ipBlocks"), f"{p}.ipBlocks", _net),
        not_ip_blocks=_items(m.get("notIpBlocks"), f"{p}.notIpBlocks", _net),
    )


L7_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")


def _operation(value: Any, path: str) -> Operation:
    outer = mapping(value, path, {"operation"})
    p = f"{path}.operation"
    m = mapping(outer.get("operation"), p, {"ports", "notPorts", *L7_OPERATION_FIELDS})
    for l7 in L7_OPERATION_FIELDS:
        if l7 in m:
            raise StateError(f"{p}.{l7}", "is an L7 attribute; the ztunnel enforces L4 only "
                             "(attach the policy to a waypoint instead)")
    return Operation(
        ports=_items(m.get("ports"), f"{p}.ports", _port),
        not_ports=_items(m.get("notPorts"), f"{p}.notPorts", _port),
    )


def _rule(value: Any, path: str) -> Rule:
    m = mapping(value, path, {"from", "to", "when"})
    if m.get("when"):
        raise StateError(f"{path}.when", "conditions are not supported by the L4 ztunnel; "
                         "express them with from/to")
    return Rule(
        sources=_items(m.get("from"), f"{path}.from", _source),
        operations=_items(m.get("to"), f"{path}.to", _operation),
    )


def _selector(value: Any, path: str) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    m = mapping(value, path, {"matchLabels"})
    return _labels(m.get("matchLabels"), f"{path}.matchLabels")


def parse_authorization_spec(name: str, namespace: str, spec: Any, path: str) \
        -> AuthorizationPolicy:
    """Parse an Istio-shaped AuthorizationPolicy spec (L4 subset)."""
    m = mapping(spec, path, {"selector", "action", "rules", "targetRefs", "targetRef"})
    if "targetRefs" in m or "targetRef" in m:
        raise StateError(f"{path}.targetRefs", "targets a waypoint; the ztunnel applies only "
                         "selector policies")
    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        action=_enum(Action, m.get("action"), f"{path}.action", Action.ALLOW),
        rules=_items(m.get("rules"), f"{path}.rules", _rule),
        selector=_selector(m.get("selector"), f"{path}.selector"),
    )


def _named(value: Any, path: str) -> tuple[str, str, Any]:
    m = mapping(value, path, {"name", "namespace", "spec"})
    return (_str(m.get("name"), f"{path}.name"), _str(m.get("namespace"), f"{path}.namespace"),
            m.get("spec"))


def _authz(value: Any, path: str) -> AuthorizationPolicy:
    name, namespace, spec = _named(value, path)
    return parse_authorization_spec(name, namespace, spec, f"{path}.spec")


def parse_peer_authentication_spec(name: str, namespace: str, spec: Any, path: str) \
        -> PeerAuthentication:
    m = mapping(spec, path, {"selector", "mtls", "portLevelMtls"})
    mtls = mapping(m.get("mtls"), f"{path}.mtls", {"mode"})
    port_modes: list[tuple[int, MtlsMode]] = []
    levels = m.get("portLevelMtls") or {}
    if not isinstance(levels, Mapping):
        raise StateError(f"{path}.portLevelMtls", "expected a mapping of port to {mode: ...}")
    for port, v in levels.items():
        p = f"{path}.portLevelMtls.{port}"
        mode_map = mapping(v, p, {"mode"})
        port_modes.append(
            (_port(port, p), _enum(MtlsMode, mode_map.get("mode"), f"{p}.mode", MtlsMode.UNSET))
        )
    return PeerAuthentication(
        name=name,
        namespace=namespace,
        mode=_enum(MtlsMode, mtls.get("mode"), f"{path}.mtls.mode", MtlsMode.UNSET),
        selector=_selector(m.get("selector"), f"{path}.selector"),
        port_modes=tuple(sorted(port_modes, key=lambda pm: pm[0])),
    )


def _peer_auth(value: Any, path: str) -> PeerAuthentication:
    name, namespace, spec = _named(value, path)
    return parse_peer_authentication_spec(name, namespace, spec, f"{path}.spec")


def _unique(items: tuple[Any, ...], path: str, key: Callable[[Any], str], what: str) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        k = key(item)
        if k in seen:
            raise StateError(f"{path}[{i}]", f"duplicate {what} {k!r} (first at [{seen[k]}])")
        seen[k] = i


def parse_state(doc: Any) -> MeshConfig:
    """Validate a whole state document; raise ``StateError`` on the first problem."""
    m = mapping(doc, "", {"trustDomain", "workloads", "services", "authorizationPolicies",
                           "peerAuthentications", "version"})
    td = _str(m.get("trustDomain"), "trustDomain", required=False, default="cluster.local")
    workloads = _items(m.get("workloads"), "workloads", lambda v, p: parse_workload(v, p, td))
    _unique(workloads, "workloads", lambda w: w.uid, "workload uid")
    owner: dict[IPAddress, str] = {}
    for i, w in enumerate(workloads):
        for j, ip in enumerate(w.addresses):
            if ip in owner:
                raise StateError(f"workloads[{i}].addresses[{j}]",
                                 f"{ip} is already the address of workload {owner[ip]}")
            owner[ip] = w.uid
    services = _items(m.get("services"), "services", parse_service)
    _unique(services, "services", lambda s: s.key, "service")
    vips: dict[IPAddress, str] = {}
    for i, s in enumerate(services):
        for j, vip in enumerate(s.vips):
            if vip in vips or vip in owner:
                other = vips.get(vip) or f"workload {owner[vip]}"
                raise StateError(f"services[{i}].vips[{j}]", f"{vip} is already used by {other}")
            vips[vip] = s.key
    policies = _items(m.get("authorizationPolicies"), "authorizationPolicies", _authz)
    _unique(policies, "authorizationPolicies", lambda p: p.key, "policy")
    peer = _items(m.get("peerAuthentications"), "peerAuthentications", _peer_auth)
    _unique(peer, "peerAuthentications", lambda p: p.key, "peer authentication")
    return MeshConfig(
        trust_domain=td,
        workloads=workloads,
        services=services,
        policies=policies,
        peer_authentications=peer,
        version=str(m.get("version") or ""),
    )


def load_state_text(text: str) -> MeshConfig:
    """Parse YAML or JSON text (JSON is YAML) into a validated ``MeshConfig``."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StateError("", f"not valid YAML/JSON: {e}") from None
    except RecursionError:
        # PyYAML's scanner and composer recurse per nesting level: "[[[[..." is not a crash.
        raise StateError("", "not usable YAML/JSON: nested too deeply") from None
    return parse_state(doc)

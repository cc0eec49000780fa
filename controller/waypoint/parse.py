"""Strict parsers from Kubernetes-shaped specs to the waypoint model's records, and back.

Why strict and here: the same objects reach the controller from the embedded registry (YAML
applied with ``ambit apply``, where nothing else validates them) and from the Kubernetes API
(where the upstream Gateway API CRDs validate most of the shape, but Ambit supports only part
of it). One parser for both means a route means the same thing in both modes, and every
mistake or unsupported feature is reported once, naming the field
(``spec.rules[0].backendRefs[1].weight: ...``), instead of being dropped silently: a filter or
policy rule the waypoint ignored would change what the user asked for.

What is parsed (Gateway API v1 field names and defaults, and its validation limits):

* ``Gateway`` of class ``ambit-waypoint`` with at most the HBONE listener (``HBONE_PORT``);
* ``HTTPRoute``: parentRefs (a Service, or a waypoint Gateway), matches (path, headers,
  method), filters (Request/ResponseHeaderModifier, ExtensionRef to an ``HTTPFault``),
  Service backendRefs with weights, timeouts (GEP-2257 durations) and retry (GEP-1731);
* ``HTTPFault`` (``networking.ambit.dev/v1alpha1``): delay and/or abort;
* ``AuthorizationPolicy`` with ``targetRefs``: enforced by the waypoint (L7), see
  ``waypoint_policies`` for how a broken one fails closed.

Regular expressions are checked with Python's ``re`` plus a few RE2 restrictions (Envoy
uses RE2): lookaround, backreferences and atomic groups are rejected; other differences
between the two dialects are not caught here.

Everything is pure: no I/O, no clock. The ``*_spec`` functions are the inverse of the parsers
(the registry stores canonical documents and reads them back through the parsers).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from controller.registry.fields import dns_name, mapping, string
from controller.registry.model import AuthorizationPolicy
from controller.waypoint.model import (
    FAULT_GROUP,
    FAULT_KIND,
    GRPC_ROUTE,
    WAYPOINT_CLASS,
    WAYPOINT_FOR_LABEL,
    BackendRef,
    Fault,
    Gateway,
    GRPCMethodMatch,
    HeaderMatch,
    HeaderMatchType,
    HeaderModifier,
    HTTPFault,
    HTTPRoute,
    L7Operation,
    L7Rule,
    L7Source,
    Match,
    ParentRef,
    PathMatch,
    PathMatchType,
    PathModifier,
    PathModifierType,
    PolicyAction,
    QueryParamMatch,
    Redirect,
    Retry,
    RouteMatch,
    RouteRule,
    TargetRef,
    TCPRoute,
    URLRewrite,
    WaypointPolicy,
)
from mesh.ports import HBONE_PORT
from mesh.state.parse import StateError

__all__ = [
    "FAULT_API_VERSION", "GATEWAY_API_VERSION", "GATEWAY_GROUP",
    "HBONE_PORT", "METHODS", "WAYPOINT_FOR", "format_duration", "gateway_spec",
    "has_target_refs", "http_fault_spec", "http_route_spec", "parse_duration",
    "parse_gateway", "parse_grpc_route", "parse_http_fault", "parse_http_route",
    "parse_tcp_route", "parse_waypoint_policy", "resolve_faults", "tcp_route_spec",
    "waypoint_policies",
]

T = TypeVar("T")
_E = TypeVar("_E", bound=enum.Enum)

GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_API_VERSION = f"{GATEWAY_GROUP}/v1"
FAULT_API_VERSION = f"{FAULT_GROUP}/v1alpha1"
HBONE_LISTENER = {"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}
WAYPOINT_FOR = ("service", "workload", "all", "none")
# Gateway API's HTTPMethod enum.
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")

# Gateway API v1 (1.1+) validation limits.
MAX_PARENTS = 32
MAX_RULES = 16
MAX_MATCHES = 64  # per rule; 8 before Gateway API 1.1
MAX_ROUTE_MATCHES = 128  # across all rules of a route
MAX_FILTERS = 16
MAX_BACKENDS = 16
MAX_HEADERS = 16
MAX_WEIGHT = 1_000_000
MAX_INT32 = 2**31 - 1
# When a retry gives no attempts, Gateway API leaves the number to the implementation;
# Istio's default is 2.
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_FAULT_PERCENT = 100.0

_SUPPORTED_FILTERS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
}
_UNSUPPORTED_FILTERS = ("RequestMirror", "CORS", "ExternalAuth")
# What each place accepts (Gateway API: a GRPCRoute has no redirect or rewrite; a backendRef's
# own filters here are the header modifiers).
_RULE_FILTERS = tuple(_SUPPORTED_FILTERS)
_GRPC_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "ExtensionRef")
_BACKEND_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier")
# RequestRedirect status codes: 301 and 302 are core, 303, 307 and 308 extended; all served.
REDIRECT_CODES = (301, 302, 303, 307, 308)
REDIRECT_SCHEMES = ("http", "https")
_CORE_GROUPS = ("", "core")

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
_GRPC_SERVICE = re.compile(r"\.?[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*")
_GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_PATH = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+")
_DURATION = re.compile(r"([0-9]{1,5}(h|m|s|ms)){1,4}")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
# 99999h59m59s999ms: the largest duration GEP-2257 can write.
MAX_DURATION_MS = 99_999 * 3_600_000 + 59 * 60_000 + 59 * 1000 + 999
# RE2 (Envoy's regex engine) has no lookaround, backreferences or atomic groups.
_NOT_RE2 = re.compile(r"\(\?(=|!|<=|<!|>|P=)|\\[1-9]")


# --- field helpers -------------------------------------------------------------------------


def _list(value: Any, path: str, limit: int | None = None, what: str = "entries") -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise StateError(path, f"expected a list, got {type(value).__name__}")
    if limit is not None and len(value) > limit:
        raise StateError(path, f"at most {limit} {what} (a Gateway API limit), got "
                         f"{len(value)}")
    return value


def _items(value: Any, path: str, item: Callable[[Any, str], T], limit: int | None = None,
           what: str = "entries") -> tuple[T, ...]:
    return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path, limit, what)))


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise StateError(path, f"must be an integer {lo}..{hi}, got {value!r}")
    return value


def _port(value: Any, path: str) -> int:
    if value is None:
        raise StateError(path, "is required")
    return _int(value, path, 1, 65535)


def _percent(value: Any, path: str) -> float:
    if value is None:
        return DEFAULT_FAULT_PERCENT
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0 <= value <= 100:
        raise StateError(path, f"must be a number 0..100, got {value!r}")
    return float(value)


def _header_name(value: Any, path: str) -> str:
    text = string(value, path)
    if len(text) > 256 or not _HEADER_NAME.fullmatch(text):
        raise StateError(path, f"{text!r} is not an HTTP header name (at most 256 letters, "
                         "digits and !#$%&'*+-.^_`|~)")
    return text


def _header_value(value: Any, path: str) -> str:
    text = string(value, path)
    if len(text) > 4096:
        raise StateError(path, "at most 4096 characters")
    return text


def _regex(value: str, path: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise StateError(path, f"{value!r} is not a valid regular expression: {e}") from None
    bad = _NOT_RE2.search(value)
    if bad:
        raise StateError(path, f"{value!r}: {bad.group(0)!r} is not supported by RE2, the "
                         "regular expression engine of the waypoint (no lookaround, "
                         "backreferences or atomic groups)")
    return value


def parse_duration(value: Any, path: str) -> int:
    """A GEP-2257 duration (``500ms``, ``1s``, ``1m30s``) in milliseconds."""
    text = string(value, path)
    if not _DURATION.fullmatch(text):
        raise StateError(path, f"{text!r} is not a Gateway API duration: one to four "
                         "parts of up to 5 digits and a unit h, m, s or ms (e.g. 500ms, 1s, "
                         "1m30s)")
    total = sum(int(n) * _UNIT_MS[unit] for n, unit in _DURATION_PART.findall(text))
    if total > MAX_DURATION_MS:
        raise StateError(path, f"{text!r} is longer than 99999h59m59s999ms")
    return total


def format_duration(ms: int) -> str:
    """The canonical GEP-2257 form: each unit once, largest first; zero is ``0s``."""
    if ms == 0:
        return "0s"
    out = ""
    for unit in ("h", "m", "s", "ms"):
        n, ms = divmod(ms, _UNIT_MS[unit])
        if n:
            out += f"{n}{unit}"
    return out


def _optional_duration(value: Any, path: str) -> int | None:
    """A duration where ``0s`` means "no limit": None."""
    if value is None:
        return None
    return parse_duration(value, path) or None


def _unique(keys: Iterable[str], path: str, what: str) -> None:
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in seen:
            raise StateError(f"{path}[{i}]", f"duplicate {what} {key!r} (first at "
                             f"[{seen[key]}])")
        seen[key] = i


# --- Gateway -------------------------------------------------------------------------------


def parse_gateway(name: str, namespace: str, labels: Iterable[tuple[str, str]], spec: Any,
                  path: str = "spec") -> Gateway:
    """A waypoint ``Gateway``; ``labels`` are its metadata labels (``ambit.dev/waypoint-for``
    says which traffic it serves, default ``service``)."""
    label_list = tuple(sorted(labels))
    waypoint_for = dict(label_list).get(WAYPOINT_FOR_LABEL, "service")
    if waypoint_for not in WAYPOINT_FOR:
        raise StateError(f"metadata.labels.{WAYPOINT_FOR_LABEL}",
                         f"{waypoint_for!r} is not one of {', '.join(WAYPOINT_FOR)}")
    m = mapping(spec, path, ("gatewayClassName", "listeners"), {
        k: "is not supported by Ambit waypoints; remove it" for k in (
            "addresses", "infrastructure", "backendTLS", "allowedListeners")})
    gateway_class = string(m.get("gatewayClassName"), f"{path}.gatewayClassName")
    if gateway_class != WAYPOINT_CLASS:
        raise StateError(f"{path}.gatewayClassName", f"{gateway_class!r} is not Ambit's "
                         f"waypoint class; use gatewayClassName: {WAYPOINT_CLASS}")
    listeners = _list(m.get("listeners"), f"{path}.listeners")
    if len(listeners) > 1:
        raise StateError(f"{path}.listeners[1]", "a waypoint has one listener: {name: mesh, "
                         f"port: {HBONE_PORT}, protocol: HBONE}}")
    for i, raw in enumerate(listeners):
        p = f"{path}.listeners[{i}]"
        listener = mapping(raw, p, ("name", "port", "protocol", "allowedRoutes"), {
            k: "is not supported on a waypoint's HBONE listener; remove it" for k in (
                "hostname", "tls")})
        _allowed_routes(listener.get("allowedRoutes"), f"{p}.allowedRoutes")
        dns_name(listener.get("name"), f"{p}.name", label=True)
        if listener.get("port") != HBONE_PORT:
            raise StateError(f"{p}.port", f"a waypoint listens on port {HBONE_PORT} (HBONE) "
                             f"only, got {listener.get('port')!r}")
        if listener.get("protocol") != "HBONE":
            raise StateError(f"{p}.protocol", "a waypoint's listener speaks HBONE only, got "
                             f"{listener.get('protocol')!r}")
    return Gateway(name=name, namespace=namespace, gateway_class=gateway_class,
                   waypoint_for=waypoint_for, labels=label_list)


def _allowed_routes(value: Any, path: str) -> None:
    """Checked for shape only: Kubernetes defaults it on every listener ({namespaces: {from:
    Same}}), and routes reach a waypoint through the Services they attach to, not through
    this listener."""
    m = mapping(value, path, ("namespaces", "kinds"))
    ns = mapping(m.get("namespaces"), f"{path}.namespaces", ("from", "selector"))
    if ns.get("from", "Same") not in ("Same", "All", "Selector"):
        raise StateError(f"{path}.namespaces.from", f"{ns['from']!r} is not one of Same, All, "
                         "Selector")
    if ns.get("selector") is not None and not isinstance(ns["selector"], Mapping):
        raise StateError(f"{path}.namespaces.selector", "expected a label selector mapping")
    for i, kind in enumerate(_list(m.get("kinds"), f"{path}.kinds")):
        k = mapping(kind, f"{path}.kinds[{i}]", ("group", "kind"))
        string(k.get("kind"), f"{path}.kinds[{i}].kind")


def gateway_spec(gateway: Gateway) -> dict[str, Any]:
    """The canonical spec of a waypoint Gateway (with its one listener, as Kubernetes needs)."""
    return {"gatewayClassName": gateway.gateway_class, "listeners": [dict(HBONE_LISTENER)]}


# --- HTTPRoute -----------------------------------------------------------------------------


def parse_http_route(name: str, namespace: str, spec: Any, path: str = "spec",
                     creation_index: int = 0) -> HTTPRoute:
    """An ``HTTPRoute``; rules keep ExtensionRefs unresolved (``RouteRule.fault_ref``): call
    ``resolve_faults`` with the HTTPFaults before using the routes."""
    m = mapping(spec, path, ("parentRefs", "rules"), {"hostnames": _NO_HOSTNAMES})
    parents = _parents(m, path, namespace)
    if m.get("rules") is None:
        rules: tuple[RouteRule, ...] = (RouteRule(),)  # Gateway API's default: match all
    else:
        rules = _items(m.get("rules"), f"{path}.rules",
                       lambda v, p: _rule(v, p, namespace), MAX_RULES, "rules")
    _count_matches(rules, path)
    return HTTPRoute(name=name, namespace=namespace, parents=parents, rules=rules,
                     creation_index=creation_index)


_NO_HOSTNAMES = ("is not supported by the waypoint: a mesh route applies to the Service it "
                 "attaches to (parentRefs), whatever the Host header; remove it")


def _parents(m: Mapping[str, Any], path: str, namespace: str) -> tuple[ParentRef, ...]:
    parents = _items(m.get("parentRefs"), f"{path}.parentRefs",
                     lambda v, p: _parent_ref(v, p, namespace), MAX_PARENTS, "parentRefs")
    if not parents:
        raise StateError(f"{path}.parentRefs", "needs at least one parent: the Service (or "
                         "waypoint Gateway) the route applies to")
    _unique((f"{p.kind} {p.namespace}/{p.name}" + (f" port {p.port}" if p.port else "")
             for p in parents), f"{path}.parentRefs", "parentRef")
    return parents


def _count_matches(rules: tuple[RouteRule, ...], path: str) -> None:
    total = sum(len(r.matches) for r in rules)
    if total > MAX_ROUTE_MATCHES:
        raise StateError(f"{path}.rules", f"at most {MAX_ROUTE_MATCHES} matches in all rules "
                         f"together (a Gateway API limit), got {total}")


def _parent_ref(value: Any, path: str, namespace: str) -> ParentRef:
    m = mapping(value, path, ("group", "kind", "namespace", "name", "port"), {
        "sectionName": "is not supported; select a Service port with port, or attach to the "
                       "whole waypoint Gateway"})
    group = m.get("group", GATEWAY_GROUP)
    kind = m.get("kind", "Gateway")
    if kind == "Service":
        if group not in _CORE_GROUPS:
            raise StateError(f"{path}.group", f"{group!r}: a Service is in the core group; "
                             'use group: ""')
    elif kind == "Gateway":
        if group != GATEWAY_GROUP:
            raise StateError(f"{path}.group", f"{group!r}: a Gateway is in group "
                             f"{GATEWAY_GROUP}")
        if m.get("port") is not None:
            raise StateError(f"{path}.port", f"a waypoint Gateway has one listener "
                             f"({HBONE_PORT}); remove port, or attach to a Service port")
    else:
        raise StateError(f"{path}.kind", f"{kind!r}: a route attaches to a Service (group "
                         f'"") or a waypoint Gateway (group {GATEWAY_GROUP})')
    # A Service of another namespace makes a consumer route (GEP-1294): the waypoint applies
    # it only to clients of the route's own namespace (HTTPRoute.consumer_of), so one
    # namespace can never reroute another's clients.
    parent_namespace = dns_name(m.get("namespace", namespace), f"{path}.namespace", label=True)
    return ParentRef(
        kind=kind,
        name=dns_name(m.get("name"), f"{path}.name", label=True),
        namespace=parent_namespace,
        port=None if m.get("port") is None else _port(m["port"], f"{path}.port"),
    )


class _Filters:
    """What a rule's (or a backendRef's) ``filters`` list asks for, each kind at most once."""

    def __init__(self) -> None:
        self.request_headers: HeaderModifier | None = None
        self.response_headers: HeaderModifier | None = None
        self.redirect: Redirect | None = None
        self.rewrite: URLRewrite | None = None
        self.fault_ref = ""


def _filters(value: Any, path: str, namespace: str, allowed: tuple[str, ...]) -> _Filters:
    out = _Filters()
    seen: dict[str, int] = {}
    for i, raw in enumerate(_list(value, path, MAX_FILTERS, "filters")):
        p = f"{path}[{i}]"
        kind, config = _filter(raw, p, allowed)
        if kind in seen:
            raise StateError(f"{p}.type", f"{kind} may appear once per filters list (first "
                             f"at [{seen[kind]}])")
        seen[kind] = i
        if kind == "RequestHeaderModifier":
            out.request_headers = _header_modifier(config, f"{p}.requestHeaderModifier")
        elif kind == "ResponseHeaderModifier":
            out.response_headers = _header_modifier(config, f"{p}.responseHeaderModifier")
        elif kind == "RequestRedirect":
            out.redirect = _redirect(config, f"{p}.requestRedirect")
        elif kind == "URLRewrite":
            out.rewrite = _url_rewrite(config, f"{p}.urlRewrite")
        else:
            out.fault_ref = f"{namespace}/{_extension_ref(config, f'{p}.extensionRef')}"
    if out.redirect is not None and out.rewrite is not None:
        raise StateError(path, "RequestRedirect and URLRewrite cannot be used together (a "
                         "Gateway API rule): a redirect answers the request, a rewrite "
                         "forwards it")
    return out


def _rule(value: Any, path: str, namespace: str) -> RouteRule:
    m = mapping(value, path, ("name", "matches", "filters", "backendRefs", "timeouts",
                              "retry"), {
        "sessionPersistence": "is not supported by the waypoint yet; remove it"})
    rule_name = "" if m.get("name") is None else dns_name(m["name"], f"{path}.name",
                                                          label=True)
    matches = _items(m.get("matches"), f"{path}.matches", _match, MAX_MATCHES, "matches")
    f = _filters(m.get("filters"), f"{path}.filters", namespace, _RULE_FILTERS)
    backends = _items(m.get("backendRefs"), f"{path}.backendRefs",
                      lambda v, p: _backend(v, p, namespace), MAX_BACKENDS, "backendRefs")
    if f.redirect is not None and backends:
        raise StateError(f"{path}.backendRefs", "a rule with a RequestRedirect filter answers "
                         "the request itself; remove its backendRefs (a Gateway API rule)")
    for modifier in (f.redirect, f.rewrite):
        if modifier is not None and modifier.path is not None and \
                modifier.path.type is PathModifierType.REPLACE_PREFIX_MATCH:
            _prefix_matches_only(matches, f"{path}.matches")
    timeouts = mapping(m.get("timeouts"), f"{path}.timeouts", ("request", "backendRequest"))
    request = _optional_duration(timeouts.get("request"), f"{path}.timeouts.request")
    backend = _optional_duration(timeouts.get("backendRequest"),
                                 f"{path}.timeouts.backendRequest")
    if request is not None and backend is not None and backend > request:
        raise StateError(f"{path}.timeouts.backendRequest", "cannot be longer than the "
                         "request timeout")
    return RouteRule(
        matches=matches or (RouteMatch(),),  # none given: Gateway API matches everything
        backends=backends,
        request_headers=f.request_headers,
        response_headers=f.response_headers,
        timeout_ms=request,
        backend_timeout_ms=backend,
        retry=None if m.get("retry") is None else _retry(m["retry"], f"{path}.retry"),
        fault_ref=f.fault_ref,
        redirect=f.redirect,
        rewrite=f.rewrite,
        name=rule_name,
    )


def _prefix_matches_only(matches: tuple[RouteMatch, ...], path: str) -> None:
    """ReplacePrefixMatch replaces the matched prefix, so every match must be a PathPrefix
    (Gateway API's validation says exactly one; several prefixes each replace their own)."""
    if not matches:
        raise StateError(path, "ReplacePrefixMatch needs a PathPrefix match to replace; add "
                         "matches: [{path: {type: PathPrefix, value: ...}}]")
    for i, m in enumerate(matches):
        if m.path.type is not PathMatchType.PATH_PREFIX:
            raise StateError(f"{path}[{i}].path.type", f"{m.path.type.value}: ReplacePrefixMatch "
                             "replaces a matched prefix, so the rule's matches must be "
                             "PathPrefix")


def _path_modifier(value: Any, path: str) -> PathModifier:
    m = mapping(value, path, ("type", "replaceFullPath", "replacePrefixMatch"))
    kind = _member(PathModifierType, m.get("type"), f"{path}.type")
    field = "replaceFullPath" if kind is PathModifierType.REPLACE_FULL_PATH \
        else "replacePrefixMatch"
    other = "replacePrefixMatch" if field == "replaceFullPath" else "replaceFullPath"
    if m.get(other) is not None:
        raise StateError(f"{path}.{other}", f"must not be set when type is {kind.value}; "
                         f"use {field}")
    text = m.get(field)
    p = f"{path}.{field}"
    if not isinstance(text, str) or not text.startswith("/"):
        raise StateError(p, f"is required for type {kind.value}: an absolute path starting "
                         f"with '/', got {text!r}")
    if len(text) > 1024 or not _PATH.fullmatch(text):
        raise StateError(p, f"{text!r} has characters a path cannot contain unencoded (at "
                         "most 1024)")
    return PathModifier(kind, text)


def _hostname(value: Any, path: str) -> str:
    text = string(value, path).lower()
    if "*" in text:
        raise StateError(path, f"{text!r}: a redirect or rewrite needs a precise hostname, "
                         "no wildcard")
    return dns_name(text, path)


def _redirect(value: Any, path: str) -> Redirect:
    m = mapping(value, path, ("scheme", "hostname", "path", "port", "statusCode"))
    scheme = m.get("scheme")
    if scheme is not None and scheme not in REDIRECT_SCHEMES:
        raise StateError(f"{path}.scheme", f"{scheme!r} is not one of "
                         f"{', '.join(REDIRECT_SCHEMES)}")
    code = 302 if m.get("statusCode") is None else m["statusCode"]
    if code not in REDIRECT_CODES or isinstance(code, bool):
        raise StateError(f"{path}.statusCode", f"{code!r} is not one of "
                         f"{', '.join(map(str, REDIRECT_CODES))}")
    return Redirect(
        scheme=scheme,
        hostname=None if m.get("hostname") is None else _hostname(m["hostname"],
                                                                  f"{path}.hostname"),
        path=None if m.get("path") is None else _path_modifier(m["path"], f"{path}.path"),
        port=None if m.get("port") is None else _port(m["port"], f"{path}.port"),
        status_code=code,
    )


def _url_rewrite(value: Any, path: str) -> URLRewrite:
    m = mapping(value, path, ("hostname", "path"))
    if m.get("hostname") is None and m.get("path") is None:
        raise StateError(path, "needs hostname, path or both")
    return URLRewrite(
        hostname=None if m.get("hostname") is None else _hostname(m["hostname"],
                                                                  f"{path}.hostname"),
        path=None if m.get("path") is None else _path_modifier(m["path"], f"{path}.path"))


def _match(value: Any, path: str) -> RouteMatch:
    m = mapping(value, path, ("path", "headers", "method", "queryParams"))
    headers = _items(m.get("headers"), f"{path}.headers", _header_match, MAX_HEADERS,
                     "headers")
    _unique((h.name.lower() for h in headers), f"{path}.headers", "header name")
    query = _items(m.get("queryParams"), f"{path}.queryParams", _query_match, MAX_HEADERS,
                   "queryParams")
    # Query parameter names are case-sensitive (RFC 3986), unlike header names.
    _unique((q.name for q in query), f"{path}.queryParams", "parameter name")
    method = m.get("method")
    if method is not None and method not in METHODS:
        raise StateError(f"{path}.method", f"{method!r} is not one of {', '.join(METHODS)}")
    return RouteMatch(
        path=RouteMatch().path if m.get("path") is None else _path(m["path"], f"{path}.path"),
        headers=headers,
        method=method,
        query_params=query,
    )


def _query_match(value: Any, path: str) -> QueryParamMatch:
    m = mapping(value, path, ("type", "name", "value"))
    kind = _member(HeaderMatchType, m.get("type", HeaderMatchType.EXACT.value), f"{path}.type")
    name = string(m.get("name"), f"{path}.name")
    if len(name) > 256 or not _HEADER_NAME.fullmatch(name):
        raise StateError(f"{path}.name", f"{name!r} is not a query parameter name (at most "
                         "256 letters, digits and !#$%&'*+-.^_`|~)")
    text = string(m.get("value"), f"{path}.value")
    if len(text) > 1024:
        raise StateError(f"{path}.value", "at most 1024 characters")
    if kind is HeaderMatchType.REGULAR_EXPRESSION:
        _regex(text, f"{path}.value")
    return QueryParamMatch(name, text, kind)


def _member(values: type[_E], raw: Any, path: str) -> _E:
    """A Gateway API enum value, case-sensitive as the API's are."""
    try:
        return values(raw)
    except ValueError:
        raise StateError(path, f"{raw!r} is not one of "
                         f"{', '.join(t.value for t in values)}") from None


def _path(value: Any, path: str) -> PathMatch:
    m = mapping(value, path, ("type", "value"))
    kind = _member(PathMatchType, m.get("type", PathMatchType.PATH_PREFIX.value), f"{path}.type")
    text = m.get("value", "/")
    p = f"{path}.value"
    if not isinstance(text, str) or not text:
        raise StateError(p, f"expected a non-empty string, got {text!r}")
    if len(text) > 1024:
        raise StateError(p, "at most 1024 characters")
    if kind is PathMatchType.REGULAR_EXPRESSION:
        return PathMatch(kind, _regex(text, p))
    if not text.startswith("/"):
        raise StateError(p, f"{text!r} must be an absolute path starting with '/'")
    if not _PATH.fullmatch(text):
        raise StateError(p, f"{text!r} has characters a path cannot contain unencoded")
    for bad in ("//", "/./", "/../", "%2f", "%2F", "#"):
        if bad in text:
            raise StateError(p, f"{text!r} must not contain {bad!r}")
    if text.endswith(("/..", "/.")):
        raise StateError(p, f"{text!r} must not end with '/..' or '/.'")
    return PathMatch(kind, text)


def _header_match(value: Any, path: str) -> HeaderMatch:
    m = mapping(value, path, ("type", "name", "value"))
    kind = _member(HeaderMatchType, m.get("type", HeaderMatchType.EXACT.value), f"{path}.type")
    text = _header_value(m.get("value"), f"{path}.value")
    if kind is HeaderMatchType.REGULAR_EXPRESSION:
        _regex(text, f"{path}.value")
    return HeaderMatch(_header_name(m.get("name"), f"{path}.name"), text, kind)


def _filter(value: Any, path: str, allowed: tuple[str, ...]) -> tuple[str, Any]:
    if not isinstance(value, Mapping):
        raise StateError(path, f"expected a mapping, got {type(value).__name__}")
    kind = string(value.get("type"), f"{path}.type")
    supported = ", ".join(k if k != "ExtensionRef" else f"ExtensionRef (to an {FAULT_KIND})"
                          for k in allowed)
    if kind in _UNSUPPORTED_FILTERS:
        raise StateError(f"{path}.type", f"{kind} is not supported by the waypoint yet; "
                         f"supported filters here: {supported}")
    field = _SUPPORTED_FILTERS.get(kind)
    if field is None:
        raise StateError(f"{path}.type", f"{kind!r} is not a filter type; supported filters "
                         f"here: {supported}")
    if kind not in allowed:
        raise StateError(f"{path}.type", f"{kind} cannot be used here; supported filters "
                         f"here: {supported}")
    for key in value:
        if key not in ("type", field):
            raise StateError(f"{path}.{key}", f"must not be set on a {kind} filter; "
                             f"expected only: type, {field}")
    if value.get(field) is None:
        raise StateError(f"{path}.{field}", f"is required for type {kind}")
    return kind, value[field]


def _header_modifier(value: Any, path: str) -> HeaderModifier:
    m = mapping(value, path, ("set", "add", "remove"))

    def header(v: Any, p: str) -> tuple[str, str]:
        h = mapping(v, p, ("name", "value"))
        return _header_name(h.get("name"), f"{p}.name"), _header_value(h.get("value"),
                                                                        f"{p}.value")

    out: dict[str, Any] = {}
    for key in ("set", "add"):
        pairs = _items(m.get(key), f"{path}.{key}", header, MAX_HEADERS, "headers")
        _unique((n.lower() for n, _ in pairs), f"{path}.{key}", "header name")
        out[key] = pairs
    remove = _items(m.get("remove"), f"{path}.remove", _header_name, MAX_HEADERS, "headers")
    _unique((n.lower() for n in remove), f"{path}.remove", "header name")
    return HeaderModifier(set=out["set"], add=out["add"], remove=remove)


def _extension_ref(value: Any, path: str) -> str:
    m = mapping(value, path, ("group", "kind", "name"))
    if m.get("group") != FAULT_GROUP or m.get("kind") != FAULT_KIND:
        raise StateError(path, f"group {m.get('group')!r}, kind {m.get('kind')!r} is not "
                         f"supported; the waypoint's extension is group: {FAULT_GROUP}, "
                         f"kind: {FAULT_KIND}")
    return dns_name(m.get("name"), f"{path}.name")


def _backend(value: Any, path: str, namespace: str) -> BackendRef:
    m = mapping(value, path, ("group", "kind", "name", "namespace", "port", "weight",
                              "filters"))
    if m.get("group", "") not in _CORE_GROUPS:
        raise StateError(f"{path}.group", f"{m['group']!r}: backends are Services (group "
                         '"")')
    if m.get("kind", "Service") != "Service":
        raise StateError(f"{path}.kind", f"{m['kind']!r}: backends are Services")
    if m.get("port") is None:
        raise StateError(f"{path}.port", "is required for a Service backend")
    f = _filters(m.get("filters"), f"{path}.filters", namespace, _BACKEND_FILTERS)
    return BackendRef(
        name=dns_name(m.get("name"), f"{path}.name", label=True),
        namespace=dns_name(m.get("namespace", namespace), f"{path}.namespace", label=True),
        port=_port(m["port"], f"{path}.port"),
        weight=1 if m.get("weight") is None else _int(m["weight"], f"{path}.weight", 0,
                                                      MAX_WEIGHT),
        request_headers=f.request_headers,
        response_headers=f.response_headers,
    )


# --- GRPCRoute and TCPRoute ----------------------------------------------------------------


def parse_grpc_route(name: str, namespace: str, spec: Any, path: str = "spec",
                     creation_index: int = 0) -> HTTPRoute:
    """A ``GRPCRoute``, as the HTTP/2 route it is (``HTTPRoute`` with kind GRPCRoute): method
    matches become ``:path`` matches, the rest is shared with HTTPRoute."""
    m = mapping(spec, path, ("parentRefs", "rules"), {"hostnames": _NO_HOSTNAMES})
    parents = _parents(m, path, namespace)
    if m.get("rules") is None:
        rules: tuple[RouteRule, ...] = (RouteRule(),)
    else:
        rules = _items(m.get("rules"), f"{path}.rules",
                       lambda v, p: _grpc_rule(v, p, namespace), MAX_RULES, "rules")
    _count_matches(rules, path)
    return HTTPRoute(name=name, namespace=namespace, parents=parents, rules=rules,
                     creation_index=creation_index, kind=GRPC_ROUTE)


def _grpc_rule(value: Any, path: str, namespace: str) -> RouteRule:
    m = mapping(value, path, ("name", "matches", "filters", "backendRefs"), {
        "sessionPersistence": "is not supported by the waypoint yet; remove it"})
    rule_name = "" if m.get("name") is None else dns_name(m["name"], f"{path}.name",
                                                          label=True)
    matches = _items(m.get("matches"), f"{path}.matches", _grpc_match, MAX_MATCHES, "matches")
    f = _filters(m.get("filters"), f"{path}.filters", namespace, _GRPC_FILTERS)
    backends = _items(m.get("backendRefs"), f"{path}.backendRefs",
                      lambda v, p: _backend(v, p, namespace), MAX_BACKENDS, "backendRefs")
    return RouteRule(matches=matches or (RouteMatch(),), backends=backends,
                     request_headers=f.request_headers, response_headers=f.response_headers,
                     fault_ref=f.fault_ref, name=rule_name)


def _grpc_match(value: Any, path: str) -> RouteMatch:
    m = mapping(value, path, ("method", "headers"))
    headers = _items(m.get("headers"), f"{path}.headers", _header_match, MAX_HEADERS,
                     "headers")
    _unique((h.name.lower() for h in headers), f"{path}.headers", "header name")
    if m.get("method") is None:
        return RouteMatch(headers=headers)
    p = f"{path}.method"
    mm = mapping(m["method"], p, ("type", "service", "method"))
    kind = _member(HeaderMatchType, mm.get("type", HeaderMatchType.EXACT.value), f"{p}.type")
    service = None if mm.get("service") is None else string(mm["service"], f"{p}.service")
    method = None if mm.get("method") is None else string(mm["method"], f"{p}.method")
    if service is None and method is None:
        raise StateError(p, "needs service, method or both")
    for text, field, pattern in ((service, "service", _GRPC_SERVICE),
                                 (method, "method", _GRPC_METHOD)):
        if text is None:
            continue
        if len(text) > 1024:
            raise StateError(f"{p}.{field}", "at most 1024 characters")
        if kind is HeaderMatchType.EXACT and not pattern.fullmatch(text):
            raise StateError(f"{p}.{field}", f"{text!r} is not a gRPC {field} name")
        if kind is HeaderMatchType.REGULAR_EXPRESSION:
            _regex(text, f"{p}.{field}")
    grpc = GRPCMethodMatch(service=service, method=method, type=kind)
    return RouteMatch(path=grpc.path(), headers=headers, grpc=grpc)


def parse_tcp_route(name: str, namespace: str, spec: Any, path: str = "spec",
                    creation_index: int = 0) -> TCPRoute:
    """A ``TCPRoute`` on a Service's TCP port: one rule, its backendRefs and weights."""
    m = mapping(spec, path, ("parentRefs", "rules"))
    parents = _parents(m, path, namespace)
    for i, parent in enumerate(parents):
        if parent.kind != "Service":
            raise StateError(f"{path}.parentRefs[{i}].kind", "a TCPRoute attaches to a "
                             "Service port (kind: Service, group: \"\")")
        if parent.namespace != namespace:
            raise StateError(f"{path}.parentRefs[{i}].namespace", "a TCPRoute attaches to "
                             f"Services of its own namespace ({namespace}) only")
    rules = _list(m.get("rules"), f"{path}.rules", 1, "rule (one rule per TCPRoute: its "
                  "connections cannot be told apart)")
    if not rules:
        raise StateError(f"{path}.rules", "needs one rule with backendRefs")
    r = mapping(rules[0], f"{path}.rules[0]", ("name", "backendRefs"))
    if r.get("name") is not None:
        dns_name(r["name"], f"{path}.rules[0].name", label=True)
    backends = _items(r.get("backendRefs"), f"{path}.rules[0].backendRefs",
                      lambda v, p: _tcp_backend(v, p, namespace), MAX_BACKENDS, "backendRefs")
    if not backends:
        raise StateError(f"{path}.rules[0].backendRefs", "needs at least one backend")
    return TCPRoute(name=name, namespace=namespace, parents=parents, backends=backends,
                    creation_index=creation_index)


def _tcp_backend(value: Any, path: str, namespace: str) -> BackendRef:
    if isinstance(value, Mapping) and value.get("filters") is not None:
        raise StateError(f"{path}.filters", "a TCP connection has no headers to modify; "
                         "remove it")
    return _backend(value, path, namespace)


def _retry(value: Any, path: str) -> Retry:
    m = mapping(value, path, ("codes", "attempts", "backoff"))
    codes = Retry(0).codes if m.get("codes") is None else _items(
        m["codes"], f"{path}.codes", lambda v, p: _int(v, p, 400, 599))
    _unique((str(c) for c in codes), f"{path}.codes", "status code")
    backoff: int | None = None
    if m.get("backoff") is not None:
        backoff = parse_duration(m["backoff"], f"{path}.backoff")
        if not backoff:
            raise StateError(f"{path}.backoff", "must be more than 0 (omit it for the "
                             "default)")
    attempts = DEFAULT_RETRY_ATTEMPTS if m.get("attempts") is None else _int(
        m["attempts"], f"{path}.attempts", 0, MAX_INT32)
    return Retry(attempts=attempts, codes=codes, backoff_ms=backoff)


def _parents_spec(parents: Iterable[ParentRef]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in parents:
        group = "" if p.kind == "Service" else GATEWAY_GROUP
        parent: dict[str, Any] = {"group": group, "kind": p.kind, "namespace": p.namespace,
                                  "name": p.name}
        if p.port is not None:
            parent["port"] = p.port
        out.append(parent)
    return out


def http_route_spec(route: HTTPRoute) -> dict[str, Any]:
    """The canonical spec of a route, HTTPRoute or GRPCRoute (``fault_ref`` as an
    ExtensionRef; a resolved ``fault`` and ``invalid`` are not part of it)."""
    grpc = route.kind == GRPC_ROUTE
    return {"parentRefs": _parents_spec(route.parents),
            "rules": [_rule_spec(r, grpc) for r in route.rules]}


def tcp_route_spec(route: TCPRoute) -> dict[str, Any]:
    return {"parentRefs": _parents_spec(route.parents),
            "rules": [{"backendRefs": [_backend_spec(b) for b in route.backends]}]}


def _modifier_filters(request: HeaderModifier | None,
                      response: HeaderModifier | None) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = []
    for kind, modifier in (("RequestHeaderModifier", request),
                           ("ResponseHeaderModifier", response)):
        if modifier is not None:
            filters.append({"type": kind, _SUPPORTED_FILTERS[kind]: _modifier_spec(modifier)})
    return filters


def _backend_spec(b: BackendRef) -> dict[str, Any]:
    out: dict[str, Any] = {"group": "", "kind": "Service", "name": b.name,
                           "namespace": b.namespace, "port": b.port, "weight": b.weight}
    filters = _modifier_filters(b.request_headers, b.response_headers)
    if filters:
        out["filters"] = filters
    return out


def _path_modifier_spec(modifier: PathModifier) -> dict[str, Any]:
    field = "replaceFullPath" if modifier.type is PathModifierType.REPLACE_FULL_PATH \
        else "replacePrefixMatch"
    return {"type": modifier.type.value, field: modifier.value}


def _rule_spec(rule: RouteRule, grpc: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"name": rule.name} if rule.name else {}
    out["matches"] = [_grpc_match_spec(m) if grpc else _match_spec(m) for m in rule.matches]
    filters = _modifier_filters(rule.request_headers, rule.response_headers)
    if rule.redirect is not None:
        r = rule.redirect
        redirect: dict[str, Any] = {"statusCode": r.status_code}
        if r.scheme is not None:
            redirect["scheme"] = r.scheme
        if r.hostname is not None:
            redirect["hostname"] = r.hostname
        if r.path is not None:
            redirect["path"] = _path_modifier_spec(r.path)
        if r.port is not None:
            redirect["port"] = r.port
        filters.append({"type": "RequestRedirect", "requestRedirect": redirect})
    if rule.rewrite is not None:
        rewrite: dict[str, Any] = {}
        if rule.rewrite.hostname is not None:
            rewrite["hostname"] = rule.rewrite.hostname
        if rule.rewrite.path is not None:
            rewrite["path"] = _path_modifier_spec(rule.rewrite.path)
        filters.append({"type": "URLRewrite", "urlRewrite": rewrite})
    if rule.fault_ref:
        filters.append({"type": "ExtensionRef", "extensionRef": {
            "group": FAULT_GROUP, "kind": FAULT_KIND,
            "name": rule.fault_ref.partition("/")[2]}})
    if filters:
        out["filters"] = filters
    out["backendRefs"] = [_backend_spec(b) for b in rule.backends]
    timeouts: dict[str, str] = {}
    if rule.timeout_ms is not None:
        timeouts["request"] = format_duration(rule.timeout_ms)
    if rule.backend_timeout_ms is not None:
        timeouts["backendRequest"] = format_duration(rule.backend_timeout_ms)
    if timeouts:
        out["timeouts"] = timeouts
    if rule.retry is not None:
        retry: dict[str, Any] = {"attempts": rule.retry.attempts,
                                 "codes": list(rule.retry.codes)}
        if rule.retry.backoff_ms is not None:
            retry["backoff"] = format_duration(rule.retry.backoff_ms)
        out["retry"] = retry
    return out


def _headers_spec(headers: Iterable[HeaderMatch]) -> list[dict[str, Any]]:
    return [{"type": h.type.value, "name": h.name, "value": h.value} for h in headers]


def _match_spec(match: RouteMatch) -> dict[str, Any]:
    out: dict[str, Any] = {"path": {"type": match.path.type.value, "value": match.path.value}}
    if match.headers:
        out["headers"] = _headers_spec(match.headers)
    if match.query_params:
        out["queryParams"] = [{"type": q.type.value, "name": q.name, "value": q.value}
                              for q in match.query_params]
    if match.method is not None:
        out["method"] = match.method
    return out


def _grpc_match_spec(match: RouteMatch) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if match.grpc is not None:
        method: dict[str, Any] = {"type": match.grpc.type.value}
        if match.grpc.service is not None:
            method["service"] = match.grpc.service
        if match.grpc.method is not None:
            method["method"] = match.grpc.method
        out["method"] = method
    if match.headers:
        out["headers"] = _headers_spec(match.headers)
    return out


def _modifier_spec(modifier: HeaderModifier) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if modifier.set:
        out["set"] = [{"name": n, "value": v} for n, v in modifier.set]
    if modifier.add:
        out["add"] = [{"name": n, "value": v} for n, v in modifier.add]
    if modifier.remove:
        out["remove"] = list(modifier.remove)
    return out


def resolve_faults(routes: Iterable[HTTPRoute],
                   faults: Iterable[HTTPFault]) -> tuple[HTTPRoute, ...]:
    """``routes`` with every ExtensionRef resolved: ``RouteRule.fault`` filled from the named
    HTTPFault or, when there is none, ``RouteRule.invalid`` set (Gateway API: requests that
    match an invalid rule get HTTP 500)."""
    by_key = {f.key: f.fault for f in faults}
    out: list[HTTPRoute] = []
    for route in routes:
        rules: list[RouteRule] = []
        for i, rule in enumerate(route.rules):
            if rule.fault_ref:
                fault = by_key.get(rule.fault_ref)
                if fault is not None:
                    rule = replace(rule, fault=fault)
                else:
                    rule = replace(rule, fault=None, invalid=(
                        f"HTTPRoute {route.key} rules[{i}]: its ExtensionRef names "
                        f"{FAULT_KIND} {rule.fault_ref}, which does not exist; requests "
                        "matching the rule get HTTP 500 until it is created or the filter "
                        "removed"))
            rules.append(rule)
        out.append(replace(route, rules=tuple(rules)))
    return tuple(out)


# --- HTTPFault -----------------------------------------------------------------------------


def parse_http_fault(name: str, namespace: str, spec: Any, path: str = "spec") -> HTTPFault:
    """An ``HTTPFault``: ``delay`` (fixedDelay, percentage) and/or ``abort`` (httpStatus,
    percentage); percentages default to 100."""
    m = mapping(spec, path, ("delay", "abort"))
    if m.get("delay") is None and m.get("abort") is None:
        raise StateError(path, "needs delay, abort or both")
    fault = Fault()
    if m.get("delay") is not None:
        p = f"{path}.delay"
        d = mapping(m["delay"], p, ("fixedDelay", "percentage"))
        delay = parse_duration(d.get("fixedDelay"), f"{p}.fixedDelay")
        if not delay:
            raise StateError(f"{p}.fixedDelay", "must be more than 0")
        fault = replace(fault, delay_ms=delay,
                        delay_percent=_percent(d.get("percentage"), f"{p}.percentage"))
    if m.get("abort") is not None:
        p = f"{path}.abort"
        a = mapping(m["abort"], p, ("httpStatus", "percentage"))
        if a.get("httpStatus") is None:
            raise StateError(f"{p}.httpStatus", "is required")
        fault = replace(fault, abort_status=_int(a["httpStatus"], f"{p}.httpStatus", 200, 599),
                        abort_percent=_percent(a.get("percentage"), f"{p}.percentage"))
    return HTTPFault(name=name, namespace=namespace, fault=fault)


def http_fault_spec(fault: HTTPFault) -> dict[str, Any]:
    f = fault.fault
    out: dict[str, Any] = {}
    if f.delay_ms is not None:
        out["delay"] = {"fixedDelay": format_duration(f.delay_ms),
                        "percentage": f.delay_percent}
    if f.abort_status is not None:
        out["abort"] = {"httpStatus": f.abort_status, "percentage": f.abort_percent}
    return out


# --- AuthorizationPolicy with targetRefs ---------------------------------------------------

_NOT_YET = "is not supported by the waypoint yet; remove it"


def has_target_refs(spec: Any) -> bool:
    """Whether an AuthorizationPolicy spec attaches to a waypoint (``targetRefs`` or
    ``targetRef``) rather than selecting workloads for the ztunnel."""
    return isinstance(spec, Mapping) and (spec.get("targetRefs") is not None
                                          or spec.get("targetRef") is not None)


def parse_waypoint_policy(name: str, namespace: str, spec: Any,
                          path: str = "spec") -> WaypointPolicy:
    """An AuthorizationPolicy with ``targetRefs``, enforced by the waypoint (L7)."""
    m = mapping(spec, path, ("targetRefs", "targetRef", "action", "rules", "selector"), {
        "provider": "CUSTOM providers are not supported by the waypoint; remove it"})
    if m.get("selector") is not None:
        raise StateError(f"{path}.selector", "a policy either selects workloads (selector, "
                         "enforced by the ztunnel) or targets a waypoint (targetRefs), not "
                         "both; remove one")
    targets = _targets(m, path, namespace)
    raw_action = m.get("action", "ALLOW")
    action_text = str(raw_action).upper()
    if action_text in ("AUDIT", "CUSTOM"):
        raise StateError(f"{path}.action", f"{raw_action!r} is not supported by the waypoint; "
                         "use ALLOW or DENY")
    try:
        action = PolicyAction(action_text)
    except ValueError:
        raise StateError(f"{path}.action", f"{raw_action!r} is not one of ALLOW, DENY") \
            from None
    return WaypointPolicy(name=name, namespace=namespace, action=action,
                          rules=_items(m.get("rules"), f"{path}.rules", _l7_rule),
                          targets=targets)


def _targets(m: Mapping[str, Any], path: str, namespace: str) -> tuple[TargetRef, ...]:
    if m.get("targetRefs") is not None and m.get("targetRef") is not None:
        raise StateError(f"{path}.targetRef", "give targetRefs or targetRef, not both")
    if m.get("targetRef") is not None:
        return (_target(m["targetRef"], f"{path}.targetRef", namespace),)
    targets = _items(m.get("targetRefs"), f"{path}.targetRefs",
                     lambda v, p: _target(v, p, namespace))
    if not targets:
        raise StateError(f"{path}.targetRefs", "needs at least one target (a waypoint "
                         "Gateway or a Service)")
    _unique((f"{t.kind} {t.name}" for t in targets), f"{path}.targetRefs", "target")
    return targets


def _target(value: Any, path: str, namespace: str) -> TargetRef:
    m = mapping(value, path, ("group", "kind", "name", "namespace"))
    group, kind = m.get("group", ""), m.get("kind")
    if (group, kind) not in ((GATEWAY_GROUP, "Gateway"), ("", "Service"), ("core", "Service")):
        raise StateError(path, f"group {group!r}, kind {kind!r} cannot be targeted; use "
                         f"group: {GATEWAY_GROUP}, kind: Gateway (the waypoint) or group: "
                         '"", kind: Service')
    if m.get("namespace") not in (None, namespace):
        raise StateError(f"{path}.namespace", f"{m['namespace']!r}: a policy targets objects "
                         f"of its own namespace ({namespace}) only")
    return TargetRef(kind=str(kind), name=dns_name(m.get("name"), f"{path}.name", label=True),
                     namespace=namespace)


def _match_values(value: Any, path: str, *, principal: bool = False) -> tuple[Match, ...]:
    def one(v: Any, p: str) -> Match:
        s = string(v, p)
        if s != "*" and "*" in s[1:-1]:
            raise StateError(p, f"{s!r}: '*' is only allowed as a prefix or suffix")
        return Match(s.removeprefix("spiffe://") if principal else s)

    return _items(value, path, one)


def _l7_rule(value: Any, path: str) -> L7Rule:
    m = mapping(value, path, ("from", "to"), {"when": f"(conditions) {_NOT_YET}"})
    return L7Rule(sources=_items(m.get("from"), f"{path}.from", _l7_source),
                  operations=_items(m.get("to"), f"{path}.to", _l7_operation))


def _l7_source(value: Any, path: str) -> L7Source:
    outer = mapping(value, path, ("source",))
    p = f"{path}.source"
    m = mapping(outer.get("source"), p, (
        "principals", "notPrincipals", "namespaces", "notNamespaces"), {
        k: _NOT_YET for k in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks",
                              "requestPrincipals", "notRequestPrincipals")})
    return L7Source(
        principals=_match_values(m.get("principals"), f"{p}.principals", principal=True),
        not_principals=_match_values(m.get("notPrincipals"), f"{p}.notPrincipals",
                                     principal=True),
        namespaces=_match_values(m.get("namespaces"), f"{p}.namespaces"),
        not_namespaces=_match_values(m.get("notNamespaces"), f"{p}.notNamespaces"),
    )


def _policy_port(value: Any, path: str) -> int:
    # Istio writes ports as strings ("8080"); numbers are accepted too.
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return _port(value, path)


def _l7_operation(value: Any, path: str) -> L7Operation:
    outer = mapping(value, path, ("operation",))
    p = f"{path}.operation"
    m = mapping(outer.get("operation"), p, (
        "methods", "notMethods", "paths", "notPaths", "ports", "notPorts"), {
        k: _NOT_YET for k in ("hosts", "notHosts")})
    return L7Operation(
        methods=_match_values(m.get("methods"), f"{p}.methods"),
        not_methods=_match_values(m.get("notMethods"), f"{p}.notMethods"),
        paths=_match_values(m.get("paths"), f"{p}.paths"),
        not_paths=_match_values(m.get("notPaths"), f"{p}.notPaths"),
        ports=_items(m.get("ports"), f"{p}.ports", _policy_port),
        not_ports=_items(m.get("notPorts"), f"{p}.notPorts", _policy_port),
    )


def waypoint_policies(policies: Iterable[AuthorizationPolicy]) \
        -> tuple[tuple[WaypointPolicy, ...], tuple[str, ...]]:
    """The waypoint policies among registry ``AuthorizationPolicy`` records (those with
    ``targetRefs``), sorted by namespace/name, and one sentence per invalid one.

    An invalid policy fails closed, as the ztunnel's do: it becomes a DENY-all policy for the
    targets that can still be read (so an ALLOW meant to let some callers in lets none in,
    and a DENY meant to keep some out keeps all out) until it is fixed.
    """
    out: list[WaypointPolicy] = []
    problems: list[str] = []
    for p in sorted(policies, key=lambda p: (p.namespace, p.name)):
        if not has_target_refs(p.spec):
            continue
        try:
            out.append(parse_waypoint_policy(p.name, p.namespace, p.spec))
            continue
        except StateError as e:
            error = e
        targets = _readable_targets(p.spec, p.namespace)
        out.append(WaypointPolicy(p.name, p.namespace, PolicyAction.DENY, (L7Rule(),),
                                  targets))
        if targets:
            scope = "denying all traffic through " + ", ".join(
                f"{t.kind} {t.namespace}/{t.name}" for t in targets)
        else:
            scope = "its targets cannot be read either, so it applies to nothing"
        problems.append(f"AuthorizationPolicy {p.namespace}/{p.name}: {error}; {scope} until "
                        "it is fixed")
    return tuple(out), tuple(problems)


def _readable_targets(spec: Mapping[str, Any], namespace: str) -> tuple[TargetRef, ...]:
    raw = spec.get("targetRefs")
    candidates = list(raw) if isinstance(raw, list) else []
    if spec.get("targetRef") is not None:
        candidates.append(spec["targetRef"])
    out: list[TargetRef] = []
    for c in candidates:
        try:
            t = _target(c, "", namespace)
        except StateError:
            continue
        if t not in out:
            out.append(t)
    return tuple(out)

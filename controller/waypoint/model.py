"""Typed records of the L7 configuration a waypoint enforces, as users declare it.

Why a model of its own: Gateway API ``Gateway``/``HTTPRoute``, Ambit's ``HTTPFault`` and the
L7 half of ``AuthorizationPolicy`` reach the controller from two sources (embedded registry
documents and the Kubernetes API) and end up as Envoy resources. Parsing (``parse.py``)
produces these records once, strictly, naming the field of any mistake; the Envoy generator
(``envoy_config.py``) consumes only these records, never raw YAML.

Durations are integer milliseconds; percentages are floats in [0, 100].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

# Gateway API class of Ambit waypoints (Istio's is "istio-waypoint").
WAYPOINT_CLASS = "ambit-waypoint"
# On a Gateway: which traffic it serves ("service", "workload", "all", "none"); default service.
WAYPOINT_FOR_LABEL = "ambit.dev/waypoint-for"
# On a Service or Namespace: bind its services' traffic to the waypoint NAME ("none" unbinds a
# service even when its namespace is bound); the waypoint's namespace defaults to the object's.
USE_WAYPOINT_LABEL = "ambit.dev/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "ambit.dev/use-waypoint-namespace"
# On a waypoint's pods (set by whatever runs them, as Kubernetes' Gateway controllers do).
# Group/kind of Ambit's fault injection filter, referenced from an HTTPRoute rule's
# ``filters: [{type: ExtensionRef, extensionRef: {group, kind, name}}]``.
FAULT_GROUP = "networking.ambit.dev"
FAULT_KIND = "HTTPFault"


@dataclass(frozen=True)
class Gateway:
    """A waypoint as declared (a Gateway API ``Gateway`` of class ``ambit-waypoint``)."""

    name: str
    namespace: str
    gateway_class: str = WAYPOINT_CLASS
    waypoint_for: str = "service"
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PathMatchType(Enum):
    EXACT = "Exact"
    PATH_PREFIX = "PathPrefix"
    REGULAR_EXPRESSION = "RegularExpression"


@dataclass(frozen=True)
class PathMatch:
    type: PathMatchType
    value: str


class HeaderMatchType(Enum):
    EXACT = "Exact"
    REGULAR_EXPRESSION = "RegularExpression"


@dataclass(frozen=True)
class HeaderMatch:
    name: str  # as written; HTTP header names compare case-insensitively
    value: str
    type: HeaderMatchType = HeaderMatchType.EXACT


@dataclass(frozen=True)
class QueryParamMatch:
    """``queryParams[]``: the first value of parameter ``name`` (case-sensitive) matches."""

    name: str
    value: str
    type: HeaderMatchType = HeaderMatchType.EXACT


@dataclass(frozen=True)
class GRPCMethodMatch:
    """A GRPCRoute ``method`` match: ``/service/method`` with either part left open."""

    service: str | None = None
    method: str | None = None
    type: HeaderMatchType = HeaderMatchType.EXACT  # Exact or RegularExpression

    def path(self) -> PathMatch:
        """The HTTP/2 ``:path`` condition this method match stands for (gRPC calls are POSTs
        to ``/<package.Service>/<Method>``)."""
        if self.type is HeaderMatchType.EXACT:
            if self.service and self.method:
                return PathMatch(PathMatchType.EXACT, f"/{self.service}/{self.method}")
            if self.service:
                return PathMatch(PathMatchType.REGULAR_EXPRESSION,
                                 f"/{re.escape(self.service)}/[^/]+")
            return PathMatch(PathMatchType.REGULAR_EXPRESSION,
                             f"/[^/]+/{re.escape(self.method or '')}")
        return PathMatch(PathMatchType.REGULAR_EXPRESSION,
                         f"/{self.service or '[^/]+'}/{self.method or '[^/]+'}")


@dataclass(frozen=True)
class RouteMatch:
    """One ``matches[]`` entry: every given condition must hold (AND)."""

    path: PathMatch = PathMatch(PathMatchType.PATH_PREFIX, "/")
    headers: tuple[HeaderMatch, ...] = ()
    method: str | None = None  # GET, POST, ... (upper case)
    query_params: tuple[QueryParamMatch, ...] = ()
    # GRPCRoute matches: the method as written (``path`` holds what it means on the wire).
    grpc: GRPCMethodMatch | None = None


@dataclass(frozen=True)
class HeaderModifier:
    """``RequestHeaderModifier``: set (replace), add (append), remove."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


class PathModifierType(Enum):
    REPLACE_FULL_PATH = "ReplaceFullPath"
    REPLACE_PREFIX_MATCH = "ReplacePrefixMatch"


@dataclass(frozen=True)
class PathModifier:
    """``HTTPPathModifier`` of a redirect or rewrite: the whole path, or the matched prefix,
    replaced by ``value``."""

    type: PathModifierType
    value: str


@dataclass(frozen=True)
class Redirect:
    """``RequestRedirect``: answered by the waypoint; unset parts keep the request's.
    ``port`` None follows Gateway API's rule (the scheme's well-known port when the scheme
    is given, else the port the request came to)."""

    scheme: str | None = None  # http or https
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True)
class URLRewrite:
    """``URLRewrite``: the request goes on with this Host and/or path."""

    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True)
class BackendRef:
    """A Service (by name, in ``namespace``) and its service port; weight per Gateway API.
    ``request_headers``/``response_headers``: the backendRef's own filters, applied only to
    requests sent to this backend."""

    name: str
    namespace: str
    port: int
    weight: int = 1
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None


@dataclass(frozen=True)
class Retry:
    """Gateway API ``HTTPRouteRule.retry`` (GEP-1731): retry on these status codes (and on
    connect failures/resets), at most ``attempts`` more times, waiting ``backoff_ms``."""

    attempts: int
    codes: tuple[int, ...] = (500, 502, 503, 504)
    backoff_ms: int | None = None


@dataclass(frozen=True)
class Fault:
    """Ambit ``HTTPFault``: delay and/or abort a share of requests, injected on the backend
    side of the waypoint, so the rule's retries and timeouts see them as a failing backend."""

    delay_ms: int | None = None
    delay_percent: float = 0.0
    abort_status: int | None = None
    abort_percent: float = 0.0


@dataclass(frozen=True)
class RouteRule:
    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    backends: tuple[BackendRef, ...] = ()
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    timeout_ms: int | None = None  # timeouts.request: the whole request, retries included
    backend_timeout_ms: int | None = None  # timeouts.backendRequest: each attempt
    retry: Retry | None = None
    fault: Fault | None = None
    # "ns/name" of the HTTPFault an ExtensionRef filter names, as written; ``parse.py`` leaves
    # ``fault`` unset and ``parse.resolve_faults`` fills it in (or marks the rule invalid).
    fault_ref: str = ""
    # Set when the rule cannot be served as written (e.g. an ExtensionRef to a missing
    # HTTPFault): Gateway API says matching requests then get HTTP 500; the text says why.
    invalid: str = ""
    redirect: Redirect | None = None  # answered by the waypoint, no backend
    rewrite: URLRewrite | None = None
    name: str = ""  # Gateway API's optional rule name (GEP-995): in the Envoy route's name


@dataclass(frozen=True)
class ParentRef:
    """``parentRefs[]``: the Service (GAMMA) or waypoint Gateway a route attaches to."""

    kind: str  # "Service" or "Gateway"
    name: str
    namespace: str
    port: int | None = None  # Service parents: only this service port, else every port


HTTP_ROUTE = "HTTPRoute"
GRPC_ROUTE = "GRPCRoute"


@dataclass(frozen=True)
class HTTPRoute:
    """An ``HTTPRoute``, or a ``GRPCRoute`` (``kind``): a gRPC route is HTTP/2 routing whose
    method matches stand for ``:path`` matches, so both are served by the same code."""

    name: str
    namespace: str
    parents: tuple[ParentRef, ...]
    rules: tuple[RouteRule, ...]
    # Gateway API precedence between routes: oldest first, then by namespace/name.
    creation_index: int = 0
    kind: str = HTTP_ROUTE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def consumer_of(self, parent: ParentRef) -> bool:
        """A consumer route (GEP-1294) for ``parent``: a Service of another namespace, whose
        traffic it changes only for clients in the route's own namespace."""
        return parent.kind == "Service" and parent.namespace != self.namespace


@dataclass(frozen=True)
class TCPRoute:
    """A ``TCPRoute`` (``v1alpha2``) on a TCP port of a Service: its one rule's backends and
    weights take the port's connections instead of the Service's own endpoints."""

    name: str
    namespace: str
    parents: tuple[ParentRef, ...]
    backends: tuple[BackendRef, ...]
    creation_index: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class HTTPFault:
    """The ``networking.ambit.dev/v1alpha1 HTTPFault`` object an ExtensionRef names."""

    name: str
    namespace: str
    fault: Fault

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- L7 authorization (AuthorizationPolicy with targetRefs) ----------------------------------

class PolicyAction(Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True)
class Match:
    """Istio string match: exact, ``prefix*``, ``*suffix`` or ``*`` (presence)."""

    value: str


@dataclass(frozen=True)
class L7Source:
    principals: tuple[Match, ...] = ()  # Istio principals: td/ns/N/sa/S (no scheme)
    not_principals: tuple[Match, ...] = ()
    namespaces: tuple[Match, ...] = ()
    not_namespaces: tuple[Match, ...] = ()


@dataclass(frozen=True)
class L7Operation:
    methods: tuple[Match, ...] = ()
    not_methods: tuple[Match, ...] = ()
    paths: tuple[Match, ...] = ()
    not_paths: tuple[Match, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class L7Rule:
    """Matches when any ``from`` matches (or none given) and any ``to`` matches (or none)."""

    sources: tuple[L7Source, ...] = ()
    operations: tuple[L7Operation, ...] = ()


@dataclass(frozen=True)
class TargetRef:
    kind: str  # "Gateway" (every service the waypoint serves) or "Service"
    name: str
    namespace: str


@dataclass(frozen=True)
class WaypointPolicy:
    """An AuthorizationPolicy with ``targetRefs``: enforced by the waypoint, not the ztunnel."""

    name: str
    namespace: str
    action: PolicyAction
    rules: tuple[L7Rule, ...]
    targets: tuple[TargetRef, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

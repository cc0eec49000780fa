"""Typed records of the registry's raw objects, shaped like their Kubernetes counterparts.

Why a model of its own rather than ztunnel's ``MeshConfig``: the registry holds what users and
Kubernetes declare (namespace labels, pod readiness, policy specs as written), and the mesh
membership rules are applied later, in one pure function (``translate.py``). Both registry
sources (embedded SQLite and the Kubernetes API) produce these records, so neither can drift
from the other in what "in the mesh" means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.waypoint.model import Gateway, HTTPFault, HTTPRoute, TCPRoute
from mesh.state.model import IPAddress

# The label that enrols a namespace (value "ambient") or opts a pod out (value "none").
DATAPLANE_MODE_LABEL = "ambit.dev/dataplane-mode"
AMBIENT = "ambient"
OPT_OUT = "none"

Labels = tuple[tuple[str, str], ...]


def labels_of(mapping: Mapping[str, str]) -> Labels:
    """Labels in their canonical (sorted) form, so equal label sets compare equal."""
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels = ()

    @property
    def ambient(self) -> bool:
        return dict(self.labels).get(DATAPLANE_MODE_LABEL) == AMBIENT


@dataclass(frozen=True)
class Pod:
    """A workload instance: a Kubernetes pod, or an embedded-mode ``Workload`` document."""

    name: str
    namespace: str
    service_account: str
    node: str
    ips: tuple[IPAddress, ...]
    labels: Labels = ()
    ready: bool = True
    # The owning Deployment/StatefulSet etc., for metrics; empty means the pod's own name.
    workload_name: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def opted_out(self) -> bool:
        return dict(self.labels).get(DATAPLANE_MODE_LABEL) == OPT_OUT


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""
    # Kubernetes services also carry UDP/SCTP ports; the mesh carries TCP only.
    protocol: str = "TCP"
    # Kubernetes' appProtocol (``http``, ``kubernetes.io/h2c``, ...): with the name, what a
    # waypoint parses the port as (controller/waypoint/protocol.py).
    app_protocol: str = ""


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    # Empty for a headless service (clusterIP: None): nothing to intercept.
    cluster_ips: tuple[IPAddress, ...]
    ports: tuple[ServicePort, ...]
    selector: Labels = ()
    # The service's own labels: ambit.dev/use-waypoint binds it to a waypoint.
    labels: Labels = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# Policy specs are kept as written (Istio's shape) and parsed by ztunnel's own parsers, which
# is also how they travel to ztunnels (``Policy.spec_json``): one parser, one meaning. The dict
# is excluded from hashing (it is not hashable) but compared, so equal policies are equal.


@dataclass(frozen=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    spec: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PeerAuthentication:
    name: str
    namespace: str
    spec: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NodeToken:
    """A node's credential in embedded mode: only the secret's hash is ever stored."""

    token_id: str
    node: str
    secret_sha256: bytes
    issued_at: float


# Gateway, HTTPRoute (GRPCRoutes too: ``HTTPRoute.kind``), TCPRoute and HTTPFault are the
# waypoint model's records (controller/waypoint), parsed once by controller/waypoint/parse.py;
# the registry stores and lists them as they are.
Record = (Namespace | Pod | Service | AuthorizationPolicy | PeerAuthentication | Gateway
          | HTTPRoute | TCPRoute | HTTPFault)


@dataclass(frozen=True)
class RegistrySnapshot:
    """Everything a registry holds at one revision; independent of where it came from."""

    namespaces: tuple[Namespace, ...] = ()
    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    # Waypoints (only Gateways of class ambit-waypoint), L7 routes and faults. Routes keep
    # their ExtensionRefs unresolved: ``controller.waypoint.parse.resolve_faults(http_routes,
    # http_faults)`` pairs them. ``HTTPRoute.creation_index`` orders routes oldest first.
    # ``http_routes`` holds GRPCRoutes too (``HTTPRoute.kind``): the waypoint serves both.
    gateways: tuple[Gateway, ...] = ()
    http_routes: tuple[HTTPRoute, ...] = ()
    http_faults: tuple[HTTPFault, ...] = ()
    tcp_routes: tuple[TCPRoute, ...] = ()
    # The source's revision when this was read (embedded: the SQLite revision counter).
    revision: int = 0

    def namespace(self, name: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        return None

    def gateway(self, namespace: str, name: str) -> Gateway | None:
        for gw in self.gateways:
            if gw.namespace == namespace and gw.name == name:
                return gw
        return None

"""The mesh model the ztunnel acts on, as immutable typed records.

Records are frozen so a snapshot can be shared by every connection without locks: an update
builds a new snapshot and swaps it in, and a connection keeps the one it started with.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum

from mesh.spiffe import SpiffeId

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Protocol(Enum):
    """How a workload is reached: HBONE (enrolled in the mesh) or plain TCP (not captured)."""

    HBONE = "HBONE"
    TCP = "TCP"


@dataclass(frozen=True)
class Workload:
    uid: str
    name: str
    namespace: str
    service_account: str
    node: str
    addresses: tuple[IPAddress, ...]
    trust_domain: str
    labels: tuple[tuple[str, str], ...] = ()
    workload_name: str = ""
    protocol: Protocol = Protocol.HBONE
    # Readiness as the registry reports it; unhealthy pods get no service traffic.
    healthy: bool = True

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def owner_name(self) -> str:
        return self.workload_name or self.name


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int


@dataclass(frozen=True)
class WaypointRef:
    """The waypoint (a Gateway) a service's traffic is bound to. Its instances are the
    workloads of ``namespace`` labelled ``gateway.networking.k8s.io/gateway-name=<name>``."""

    namespace: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: tuple[IPAddress, ...]
    ports: tuple[ServicePort, ...]
    selector: tuple[tuple[str, str], ...]
    # Set when the service is bound to a waypoint (ambit.dev/use-waypoint): its VIP traffic
    # goes over HBONE to a waypoint instance instead of straight to an endpoint.
    waypoint: WaypointRef | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def target_port(self, port: int) -> int | None:
        for p in self.ports:
            if p.port == port:
                return p.target_port
        return None


class Action(Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


@dataclass(frozen=True)
class StringMatch:
    """Istio string match: exact, ``prefix*``, ``*suffix`` or ``*`` (presence)."""

    value: str

    def matches(self, s: str) -> bool:
        v = self.value
        if v == "*":
            return True
        if v.endswith("*"):
            return s.startswith(v[:-1])
        if v.startswith("*"):
            return s.endswith(v[1:])
        return s == v


@dataclass(frozen=True)
class Source:
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Operation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class Rule:
    """Matches when any ``from`` matches (or none given) and any ``to`` matches (or none)."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    action: Action
    rules: tuple[Rule, ...]
    # None: applies to every workload of the namespace (or the mesh, in the root namespace).
    selector: tuple[tuple[str, str], ...] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class MtlsMode(Enum):
    UNSET = "UNSET"
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"


@dataclass(frozen=True)
class PeerAuthentication:
    name: str
    namespace: str
    mode: MtlsMode
    selector: tuple[tuple[str, str], ...] | None = None
    port_modes: tuple[tuple[int, MtlsMode], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class MeshConfig:
    """Everything one state source delivers, before indexing."""

    trust_domain: str = "cluster.local"
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    version: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)

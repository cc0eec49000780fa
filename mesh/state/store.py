"""Indexed, immutable snapshots of the mesh state, and the store that swaps them atomically.

The data path asks four questions per connection: who owns this IP, is this IP:port a
service, which instances serve the waypoint a service is bound to, and which policies apply to
this workload. ``StateSnapshot`` answers each with a dict lookup. The store replaces the whole
snapshot at once, so a half-applied update is never seen.

One IP, two workloads: when the state lists several workloads with one address (a deleted pod
the registry still lists and the new pod the CNI gave its IP, until the state settles), the
address belongs to none of them: ``workload_by_ip`` answers None, so a connection from it is
from an unknown source (refused outbound, no identity inbound) and one to it has no mesh
destination, rather than either pod's identity being used for the other's traffic. Which
workloads claim it is in ``contested`` (for the reasons the data path gives), and a workload
whose address is contested is no service endpoint or waypoint instance meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.ports import GATEWAY_NAME_LABEL
from mesh.state.model import (
    AuthorizationPolicy,
    IPAddress,
    MeshConfig,
    MtlsMode,
    PeerAuthentication,
    Protocol,
    Service,
    WaypointRef,
    Workload,
)

# The label Kubernetes Gateway controllers (and Ambit's waypoint deployer) put on a waypoint's
# pods. Same string as controller.waypoint.model.GATEWAY_NAME_LABEL, duplicated on purpose: the
# ztunnel does not import controller code.


def _selects(selector: tuple[tuple[str, str], ...], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector)


@dataclass(frozen=True)
class StateSnapshot:
    config: MeshConfig
    root_namespace: str = "ambit-system"
    by_uid: dict[str, Workload] = field(default_factory=dict)
    by_ip: dict[IPAddress, Workload] = field(default_factory=dict)
    # Addresses several workloads claim -> their uids (sorted): nobody's in ``by_ip``.
    contested: dict[IPAddress, tuple[str, ...]] = field(default_factory=dict)
    by_vip: dict[IPAddress, Service] = field(default_factory=dict)
    by_node: dict[str, tuple[Workload, ...]] = field(default_factory=dict)
    endpoints: dict[str, tuple[Workload, ...]] = field(default_factory=dict)
    # WaypointRef.key ("ns/name") -> healthy workloads of ns labelled gateway-name=name.
    waypoints: dict[str, tuple[Workload, ...]] = field(default_factory=dict)
    loaded_at: float = 0.0

    @classmethod
    def build(cls, config: MeshConfig, root_namespace: str = "ambit-system",
              now: float | None = None) -> StateSnapshot:
        by_uid = {w.uid: w for w in config.workloads}
        claims: dict[IPAddress, dict[str, Workload]] = {}
        for w in config.workloads:
            for ip in w.addresses:
                claims.setdefault(ip, {})[w.uid] = w
        by_ip = {ip: next(iter(ws.values())) for ip, ws in claims.items() if len(ws) == 1}
        contested = {ip: tuple(sorted(ws)) for ip, ws in claims.items() if len(ws) > 1}
        # Reached at addresses[0]: not while another workload claims it too.
        reachable = [w for w in config.workloads
                     if not (w.addresses and w.addresses[0] in contested)]
        by_vip = {vip: s for s in config.services for vip in s.vips}
        nodes: dict[str, list[Workload]] = {}
        for w in config.workloads:
            nodes.setdefault(w.node, []).append(w)
        endpoints: dict[str, tuple[Workload, ...]] = {}
        for s in config.services:
            # An empty selector selects nothing, as for a Kubernetes Service without selector.
            endpoints[s.key] = tuple(
                w for w in reachable
                if s.selector and w.namespace == s.namespace and _selects(s.selector, w.label_map)
            )
        waypoints: dict[str, list[Workload]] = {}
        for w in reachable:
            gateway = w.label_map.get(GATEWAY_NAME_LABEL)
            if gateway and w.healthy:
                waypoints.setdefault(f"{w.namespace}/{gateway}", []).append(w)
        return cls(
            config=config,
            root_namespace=root_namespace,
            by_uid=by_uid,
            by_ip=by_ip,
            contested=contested,
            by_vip=by_vip,
            by_node={k: tuple(v) for k, v in nodes.items()},
            endpoints=endpoints,
            waypoints={k: tuple(v) for k, v in waypoints.items()},
            loaded_at=time.time() if now is None else now,
        )

    @property
    def version(self) -> str:
        return self.config.version

    def workload_by_ip(self, ip: IPAddress) -> Workload | None:
        """The one workload with address ``ip``; None if none has it or several claim it."""
        return self.by_ip.get(ip)

    def claimants(self, ip: IPAddress) -> tuple[str, ...]:
        """The uids of the workloads that claim ``ip`` when there are several, else ()."""
        return self.contested.get(ip, ())

    def service_by_vip(self, ip: IPAddress) -> Service | None:
        return self.by_vip.get(ip)

    def local_workloads(self, node: str) -> tuple[Workload, ...]:
        return self.by_node.get(node, ())

    def service_endpoints(self, service: Service) -> tuple[Workload, ...]:
        return self.endpoints.get(service.key, ())

    def waypoint_instances(self, waypoint: WaypointRef) -> tuple[Workload, ...]:
        """The ready instances of ``waypoint`` (in state order)."""
        return self.waypoints.get(waypoint.key, ())

    @staticmethod
    def is_waypoint_instance(workload: Workload, waypoint: WaypointRef) -> bool:
        """Whether ``workload`` is a pod of ``waypoint``, ready or not."""
        return (workload.namespace == waypoint.namespace
                and workload.label_map.get(GATEWAY_NAME_LABEL) == waypoint.name)

    def policies_for(self, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
        """Policies selecting ``workload``: mesh-wide (root namespace, no selector),
        namespace-wide (no selector), and selector matches in its namespace."""
        labels = workload.label_map
        out = []
        for p in self.config.policies:
            mesh_wide = p.namespace == self.root_namespace and p.selector is None
            selected = p.namespace == workload.namespace and (
                p.selector is None or _selects(p.selector, labels))
            if mesh_wide or selected:
                out.append(p)
        return tuple(out)

    def mtls_mode(self, workload: Workload, port: int) -> MtlsMode:
        """Effective PeerAuthentication mode: workload selector, then namespace, then mesh;
        port-level settings win within the chosen policy; default PERMISSIVE."""
        labels = workload.label_map
        def tier(p: PeerAuthentication) -> int:
            if p.namespace == workload.namespace and p.selector is not None:
                return 0 if _selects(p.selector, labels) else 3
            if p.namespace == workload.namespace:
                return 1
            if p.namespace == self.root_namespace and p.selector is None:
                return 2
            return 3

        chosen: list[PeerAuthentication] = []
        for level in (0, 1, 2):
            matched = sorted((p for p in self.config.peer_authentications if tier(p) == level),
                             key=lambda p: p.name)
            chosen.extend(matched[:1])
        for p in chosen:
            mode = dict(p.port_modes).get(port, p.mode)
            if mode is not MtlsMode.UNSET:
                return mode
        return MtlsMode.PERMISSIVE

    def in_mesh(self, workload: Workload | None) -> bool:
        return workload is not None and workload.protocol is Protocol.HBONE


Listener = Callable[[StateSnapshot, StateSnapshot], None]


class StateStore:
    """Holds the current snapshot; ``replace`` swaps it and tells listeners (old, new)."""

    def __init__(self, root_namespace: str = "ambit-system") -> None:
        self.root_namespace = root_namespace
        self._current = StateSnapshot.build(MeshConfig(), root_namespace, now=0.0)
        self._listeners: list[Listener] = []
        self.ready = False

    @property
    def current(self) -> StateSnapshot:
        return self._current

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def replace(self, config: MeshConfig) -> StateSnapshot:
        old = self._current
        self._current = StateSnapshot.build(config, self.root_namespace)
        self.ready = True
        for listener in self._listeners:
            listener(old, self._current)
        return self._current

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

import dataclasses
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


# -- Provisional workloads (pod start) ------------------------------------------------------
#
# Why: at CNI ADD the node agent knows a new pod (IP from the main plugin, identity from the
# controller's membership answer) about a second before the controller's state push lists it,
# and the pod's first connection may come in that second. The agent hands the workload to the
# node's ztunnel over its link; the ztunnel keeps it here, apart from the controller's state,
# until the push lists the pod (then the controller's record wins), the pod is deleted, or it
# grows too old. Bounded in count and age: the link is an input from outside the process.

DEFAULT_PROVISIONAL_MAX = 256  # a node runs at most ~110 pods (kubelet's default max-pods)
DEFAULT_PROVISIONAL_MAX_AGE = 300.0  # the push lists a pod within seconds of its ADD


class ProvisionalFull(ValueError):
    """The overlay holds its maximum of workloads none of which may be dropped yet."""


@dataclass(frozen=True)
class Provisional:
    workload: Workload
    added_at: float


class ProvisionalWorkloads:
    """Workloads the node agent reported at CNI ADD and the controller's state does not list
    yet. Pure: the caller passes the time, so expiry is a table test."""

    def __init__(self, max_entries: int = DEFAULT_PROVISIONAL_MAX,
                 max_age: float = DEFAULT_PROVISIONAL_MAX_AGE) -> None:
        if max_entries < 1 or max_age <= 0:
            raise ValueError("provisional workloads: max_entries must be >= 1 and max_age > 0")
        self.max_entries = max_entries
        self.max_age = max_age
        self.entries: dict[str, Provisional] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, workload: Workload, now: float) -> tuple[str, ...]:
        """Add (or renew) ``workload``; returns the uids it displaced: another provisional pod
        holding one of its addresses (the CNI just gave the address to this pod, so the older
        claim is stale). Raises ``ProvisionalFull`` when the overlay is full of live entries."""
        self.expire(now)
        ips = set(workload.addresses)
        displaced = tuple(uid for uid, p in self.entries.items()
                          if uid != workload.uid and ips & set(p.workload.addresses))
        for uid in displaced:
            del self.entries[uid]
        if workload.uid not in self.entries and len(self.entries) >= self.max_entries:
            raise ProvisionalFull(
                f"{len(self.entries)} pods already wait for the controller's state (the "
                f"maximum); is the ztunnel's state push stuck? (check its xds_connected "
                f"metric); entries expire after {self.max_age:g}s")
        self.entries[workload.uid] = Provisional(workload, now)
        return displaced

    def remove(self, uid: str) -> bool:
        return self.entries.pop(uid, None) is not None

    def expire(self, now: float) -> tuple[str, ...]:
        """Drop entries older than ``max_age``; returns their uids."""
        old = tuple(uid for uid, p in self.entries.items() if now - p.added_at >= self.max_age)
        for uid in old:
            del self.entries[uid]
        return old

    def confirm(self, base: StateSnapshot) -> tuple[str, ...]:
        """Drop the entries ``base`` (the controller's state) lists: same uid, and every address
        the agent reported among its addresses. From then on the controller's record wins (its
        labels, protocol, readiness). A record of the uid with other addresses is the pod's
        previous incarnation, not a confirmation."""
        done = tuple(uid for uid, p in self.entries.items()
                     if (w := base.by_uid.get(uid)) is not None
                     and set(p.workload.addresses) <= set(w.addresses))
        for uid in done:
            del self.entries[uid]
        return done

    def merged(self, base: StateSnapshot) -> StateSnapshot:
        """``base`` with the provisional workloads in it. A provisional workload wins its uid and
        its addresses over ``base``'s records: they are older than the CNI ADD that assigned
        them (a reused IP, a pod re-created under the same name)."""
        if not self.entries:
            return base
        mine = [p.workload for p in self.entries.values()]
        uids = {w.uid for w in mine}
        ips = {ip for w in mine for ip in w.addresses}
        kept = tuple(w for w in base.config.workloads
                     if w.uid not in uids and not ips & set(w.addresses))
        config = dataclasses.replace(base.config, workloads=kept + tuple(mine))
        return StateSnapshot.build(config, base.root_namespace, now=base.loaded_at)


class OverlayStateStore(StateStore):
    """A ``StateStore`` whose ``current`` snapshot is the controller's state with the
    provisional workloads merged in. Listeners hear about every change of the merged view:
    a state push, and a provisional workload added, removed or expired."""

    def __init__(self, root_namespace: str = "ambit-system",
                 overlay: ProvisionalWorkloads | None = None) -> None:
        super().__init__(root_namespace)
        self.overlay = overlay if overlay is not None else ProvisionalWorkloads()
        self._merged = self._current

    @property
    def current(self) -> StateSnapshot:
        return self._merged

    @property
    def base(self) -> StateSnapshot:
        """The controller's (or the state file's) snapshot, without provisional workloads."""
        return self._current

    def replace(self, config: MeshConfig) -> StateSnapshot:
        listeners, self._listeners = self._listeners, []
        try:  # the base store applies its own rules; listeners hear the merged view below
            base = super().replace(config)
        finally:
            self._listeners = listeners
        self.overlay.confirm(base)
        self._publish()
        return self._merged

    def add_provisional(self, workload: Workload, now: float) -> tuple[str, ...]:
        displaced = self.overlay.add(workload, now)
        self._publish()
        return displaced

    def remove_provisional(self, uid: str) -> bool:
        removed = self.overlay.remove(uid)
        if removed:
            self._publish()
        return removed

    def expire_provisional(self, now: float) -> tuple[str, ...]:
        gone = self.overlay.expire(now)
        if gone:
            self._publish()
        return gone

    def _publish(self) -> None:
        old = self._merged
        self._merged = self.overlay.merged(self._current)
        for listener in self._listeners:
            listener(old, self._merged)

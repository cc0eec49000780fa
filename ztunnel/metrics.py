"""Prometheus metrics with Istio's names and labels, so existing Istio dashboards work.

Each ztunnel has its own registry (two ztunnels can share a test process). Connection metrics
are recorded per connection from a ``ConnectionLabels`` record; byte counters are incremented as
bytes flow, so long-lived connections show up before they close.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from mesh.state.model import Service, Workload
from mesh.telemetry import PEER_LABELS

CONNECTION_LABELS = (*PEER_LABELS, "request_protocol", "connection_security_policy",
                     "response_flags")

UNKNOWN = "unknown"


@dataclass(frozen=True)
class ConnectionLabels:
    reporter: str  # "source" (outbound) or "destination" (inbound), as in Istio
    source: Workload | None
    source_principal: str | None
    destination: Workload | None
    service: Service | None
    mtls: bool
    response_flags: str = "-"

    def values(self) -> tuple[str, ...]:
        s, d, svc = self.source, self.destination, self.service
        return (
            self.reporter,
            s.owner_name if s else UNKNOWN,
            s.namespace if s else UNKNOWN,
            f"spiffe://{self.source_principal}" if self.source_principal else UNKNOWN,
            s.label_map.get("app", s.owner_name) if s else UNKNOWN,
            d.owner_name if d else UNKNOWN,
            d.namespace if d else UNKNOWN,
            str(d.identity) if d else UNKNOWN,
            d.label_map.get("app", d.owner_name) if d else UNKNOWN,
            svc.hostname if svc else UNKNOWN,
            svc.name if svc else UNKNOWN,
            svc.namespace if svc else UNKNOWN,
            "tcp",
            "mutual_tls" if self.mtls else "none",
            self.response_flags,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened",
                              CONNECTION_LABELS, registry=r)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed",
                              CONNECTION_LABELS, registry=r)
        self.sent = Counter("istio_tcp_sent_bytes", "Bytes sent to the destination",
                            CONNECTION_LABELS, registry=r)
        self.received = Counter("istio_tcp_received_bytes", "Bytes received from the destination",
                                CONNECTION_LABELS, registry=r)
        self.connection_errors = Counter(
            "ambit_ztunnel_connection_errors", "Connections closed because of bad input or a "
            "failure, by listener and reason", ("listener", "reason"), registry=r)
        self.connections_refused = Counter(
            "ambit_ztunnel_connections_refused", "Connections refused by a connection limit "
            "(ztunnel/admission.py), by listener and reason: total, per_ip, per_identity, "
            "per_pod", ("listener", "reason"), registry=r)
        self.denied = Counter("ambit_ztunnel_policy_denied", "Connections denied by policy",
                              ("direction", "policy"), registry=r)
        self.active = Gauge("ambit_ztunnel_active_connections", "Open proxied connections",
                            ("listener",), registry=r)
        self.config_loaded = Counter("ambit_config_loaded", "Mesh state versions applied",
                                     registry=r)
        self.config_rejected = Counter("ambit_config_rejected", "Mesh state updates rejected",
                                       registry=r)
        self.state_workloads = Gauge("ambit_state_workloads", "Workloads in the mesh state",
                                     registry=r)
        self.xds_connected = Gauge("ambit_xds_connected",
                                   "1 while subscribed to the controller's state push",
                                   registry=r)
        self.state_age = Gauge("ambit_state_age_seconds",
                               "Seconds since the mesh state was last updated or confirmed",
                               registry=r)
        self.hbone_pool_connections = Gauge("ambit_hbone_pool_connections",
                                            "Open outbound HBONE connections", registry=r)
        self.cert_expiry = Gauge("ambit_certificate_expiry_seconds",
                                 "Unix time at which a workload certificate expires",
                                 ("identity",), registry=r)
        self.ca_fetch_errors = Counter(
            "ambit_ca_fetch_errors", "Failed certificate requests to the mesh CA, by gRPC "
            "status code (or bad_response)", ("code",), registry=r)

        # Pod start (ztunnel/pod_start.py): captured connections from a source the state did
        # not know yet, held until it does.
        self.held = Gauge("ambit_ztunnel_held_connections", "Captured connections held "
                          "because their source is not in the state yet", registry=r)
        self.held_total = Counter(
            "ambit_ztunnel_held", "Connections from a source not in the state "
            "yet, by outcome: released (the state named it in time), timeout (refused), "
            "over_total / over_source (not held: limits)", ("outcome",), registry=r)
        self.provisional = Gauge("ambit_ztunnel_provisional_workloads", "Pods the node agent "
                                 "reported at CNI ADD that the controller's state does not "
                                 "list yet", registry=r)

        # Worker processes (ztunnel/workers.py); set by the parent only.
        self.workers = Gauge("ambit_ztunnel_workers", "Worker processes configured "
                             "(--workers)", registry=r)
        self.workers_ready = Gauge("ambit_ztunnel_workers_ready", "Worker processes that "
                                   "report ready", registry=r)
        self.worker_restarts = Counter("ambit_ztunnel_worker_restarts", "Worker processes "
                                       "restarted after they exited", registry=r)

    def render(self) -> bytes:
        out: bytes = generate_latest(self.registry)
        return out

"""Istio's metric labels, shared by the ztunnel's TCP metrics and the waypoint agent's request
metrics, so one set of Istio dashboards reads both (and a test can hold them to one list)."""

from __future__ import annotations

# Istio's labels for who talked to whom, shared by its TCP (ztunnel) and request (waypoint)
# metrics.
PEER_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
)

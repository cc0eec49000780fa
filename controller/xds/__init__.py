"""xDS for Envoy waypoints: a versioned resource cache and the ADS gRPC server over it.

Why a package of its own: the waypoint view produces Envoy resources (``controller.waypoint``),
this package only delivers them with Envoy's protocol rules (ACK/NACK, nonces, push order) and
authorizes who may receive which snapshot. See ``cache.py``, ``server.py`` and ``authz.py``.
"""

from controller.xds.authz import XdsDecision, decide_waypoint, waypoint_identity
from controller.xds.cache import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
    Snapshot,
    XdsCache,
)
from controller.xds.server import (
    AdsServer,
    Authorize,
    StreamStatus,
    TypeStatus,
    XdsDenied,
    peer_identity,
)

__all__ = [
    "CLUSTER_TYPE",
    "ENDPOINT_TYPE",
    "LISTENER_TYPE",
    "ROUTE_TYPE",
    "SECRET_TYPE",
    "AdsServer",
    "Authorize",
    "Snapshot",
    "StreamStatus",
    "TypeStatus",
    "XdsCache",
    "XdsDecision",
    "XdsDenied",
    "decide_waypoint",
    "peer_identity",
    "waypoint_identity",
]

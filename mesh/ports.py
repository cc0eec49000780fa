"""The numbers two components must agree on: ports, socket marks and labels, defined once.

Why one module: the capture rules (agent), the listeners (ztunnel), the waypoint's Envoy
(controller, waypoint agent) and the install manifests all meet at these numbers; a copy kept
equal by a "must equal" comment drifts, an import cannot. The ports are Istio's, so dashboards
and NetworkPolicies written for Istio's ambient mode fit Ambit unchanged.
"""

from __future__ import annotations

# --- the ztunnel's listeners (Istio's numbers) -------------------------------------------------
OUTBOUND_PORT = 15001  # captured outbound TCP from a local pod
INBOUND_PLAINTEXT_PORT = 15006  # captured inbound TCP that did not arrive over HBONE
HBONE_PORT = 15008  # HBONE (HTTP/2 CONNECT in mutual TLS): every ztunnel and every waypoint
SOCKS5_PORT = 15080  # SOCKS5 outbound (off by default, as in Istio)
ADMIN_PORT = 15000  # admin: /config_dump, /healthz (ztunnel and waypoint Envoy)
METRICS_PORT = 15020  # Prometheus /metrics (ztunnel and waypoint agent)
READINESS_PORT = 15021  # /healthz/ready and /healthz/live (ztunnel and waypoint agent)

# --- the node agent ------------------------------------------------------------------------------
NODE_METRICS_PORT = 15022  # one scrape target per node: agent + ztunnel metrics, /debug/pods

# --- the controller (istiod's numbers) ----------------------------------------------------------
GRPC_PORT = 15012  # state push (Subscribe), node service and the mesh CA
XDS_PORT = 15011  # the same services with a REQUIRED client certificate: waypoints' ADS
MONITORING_PORT = 15014  # the controller's /metrics and /ready

# --- the node's own ports -----------------------------------------------------------------------
# Every port a mesh process may listen on in the node's network namespace (the ztunnel and the
# agent are hostNetwork; the controller may run there too). Traffic the ztunnel carries for a pod
# (passthrough, SOCKS5, captured) must never reach one of them on a node address: a pod would
# read /config_dump or the metrics, or HBONE 15008 would loop back into the ztunnel itself.
NODE_OWN_PORTS = frozenset({
    ADMIN_PORT, OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT, SOCKS5_PORT, METRICS_PORT,
    READINESS_PORT, NODE_METRICS_PORT, XDS_PORT, GRPC_PORT, MONITORING_PORT,
})

# --- socket marks -------------------------------------------------------------------------------
# SO_MARK on every socket the ztunnel opens, so no capture rule (iptables or eBPF) ever loops the
# proxy's own traffic back into it. Istio's value.
ZTUNNEL_SOCKET_MARK = 0x539
# What TPROXY marks captured packets with; distinct from the socket mark under MARK_MASK, so the
# proxy's own packets never match the policy-routing rule (Istio's choice too).
TPROXY_MARK = 0x111
MARK_MASK = 0xFFF

# --- labels -------------------------------------------------------------------------------------
# A waypoint's instances carry the Gateway API's gateway-name label; the registry (controller)
# and the ztunnel's store both find a waypoint's pods by it.
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


def parse_port(text: str) -> int:
    """A port number from text (wire or config): 1-5 ASCII digits, 1..65535; else ValueError.

    Not ``int()`` or ``str.isdigit()`` alone: they accept non-ASCII digits ("٨٠٨٠" is 8080) and
    ``int`` also signs, spaces and underscores, so one peer's port could read as another.
    """
    if not (0 < len(text) <= 5 and text.isascii() and text.isdigit()):
        raise ValueError(f"port {text[:16]!r} is not 1-5 ASCII digits")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not in 1..65535")
    return port

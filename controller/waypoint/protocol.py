"""Which protocol a Service port speaks, decided as Kubernetes and Istio decide it.

Why it matters: a waypoint parses a bound service's port as HTTP only when the port says it
is HTTP. Handling every port as HTTP broke TCP and TLS ports behind a waypoint (a database
or a TLS passthrough port got an HTTP parser and a 400); handling every port as TCP would
lose L7 routing. The order (``port_protocol``), Istio's "protocol selection":

1. ``appProtocol`` on the port (Kubernetes' standard field), when it names a protocol we know
   (``http``, ``http2``, ``grpc``, ``tcp``, ``tls``, ``https``, and Kubernetes'
   ``kubernetes.io/h2c``, ``kubernetes.io/ws``, ``kubernetes.io/wss``);
2. else the port name's prefix: ``<protocol>`` or ``<protocol>-<suffix>`` (``http-web``,
   ``grpc``, ``tcp-db``);
3. else TCP: bytes pass through untouched (never guessed as HTTP).

An ``appProtocol`` the table does not know (``mysql``) leaves the decision to the name, as in
Istio; a name that says nothing (``metrics``, none) is TCP: the waypoint only parses what it
is told is HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from controller.registry.model import Service as RegistryService


class PortProtocol(Enum):
    HTTP = "HTTP"  # HTTP/1.1 (or h2c when the client upgrades or speaks it directly)
    HTTP2 = "HTTP2"  # HTTP/2 in clear text, to the backend too
    GRPC = "GRPC"  # gRPC: HTTP/2 end to end
    TCP = "TCP"  # opaque bytes
    TLS = "TLS"  # TLS the waypoint does not terminate: opaque bytes too

    @property
    def is_http(self) -> bool:
        return self in (PortProtocol.HTTP, PortProtocol.HTTP2, PortProtocol.GRPC)

    @property
    def h2_upstream(self) -> bool:
        """The backend must be spoken to in HTTP/2 (gRPC has no HTTP/1 form)."""
        return self in (PortProtocol.HTTP2, PortProtocol.GRPC)


# appProtocol values (compared case-insensitively), Kubernetes' standard ones included.
_APP_PROTOCOLS = {
    "http": PortProtocol.HTTP,
    "kubernetes.io/ws": PortProtocol.HTTP,  # WebSocket over HTTP/1.1
    "http2": PortProtocol.HTTP2,
    "kubernetes.io/h2c": PortProtocol.HTTP2,
    "grpc": PortProtocol.GRPC,
    "grpc-web": PortProtocol.HTTP,  # gRPC-Web is carried over HTTP/1.1 as well
    "tcp": PortProtocol.TCP,
    "tls": PortProtocol.TLS,
    "https": PortProtocol.TLS,
    "kubernetes.io/wss": PortProtocol.TLS,
}
# Port name prefixes (Istio's names); longest first so "http2-x" is not read as "http".
_NAME_PREFIXES = (
    ("grpc-web", PortProtocol.HTTP),
    ("http2", PortProtocol.HTTP2),
    ("https", PortProtocol.TLS),
    ("http", PortProtocol.HTTP),
    ("grpc", PortProtocol.GRPC),
    ("tcp", PortProtocol.TCP),
    ("tls", PortProtocol.TLS),
)


def port_protocol(name: str, app_protocol: str = "") -> PortProtocol:
    """The protocol of a service port named ``name`` with ``appProtocol`` (either may be
    empty): appProtocol first, then the name's prefix, else TCP."""
    if app_protocol:
        known = _APP_PROTOCOLS.get(app_protocol.lower())
        if known is not None:
            return known
    lowered = name.lower()
    for prefix, protocol in _NAME_PREFIXES:
        if lowered == prefix or lowered.startswith(prefix + "-"):
            return protocol
    return PortProtocol.TCP


def port_key(namespace: str, name: str, port: int) -> str:
    """How a service port is named in a view's protocol table: ``ns/name:port``."""
    return f"{namespace}/{name}:{port}"


def service_port_protocols(services: Iterable[RegistryService]) -> dict[str, PortProtocol]:
    """The protocol of every port of ``services`` (registry Services), by ``port_key``."""
    return {port_key(s.namespace, s.name, p.port): port_protocol(p.name, p.app_protocol)
            for s in services for p in s.ports}

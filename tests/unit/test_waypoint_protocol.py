"""Protocol selection per Service port (controller/waypoint/protocol.py), as a table."""

from __future__ import annotations

import pytest

from controller.registry.model import Service, ServicePort
from controller.waypoint.protocol import (
    PortProtocol,
    port_key,
    port_protocol,
    service_port_protocols,
)

P = PortProtocol


@pytest.mark.parametrize(("name", "app_protocol", "expected"), [
    # appProtocol first, whatever the name says.
    ("tcp-x", "http", P.HTTP),
    ("", "HTTP", P.HTTP),  # compared case-insensitively
    ("http", "kubernetes.io/h2c", P.HTTP2),
    ("http", "http2", P.HTTP2),
    ("", "grpc", P.GRPC),
    ("http", "tcp", P.TCP),
    ("http", "tls", P.TLS),
    ("http", "https", P.TLS),
    ("", "kubernetes.io/ws", P.HTTP),
    ("", "kubernetes.io/wss", P.TLS),
    # An appProtocol we do not know leaves it to the name (as Istio does).
    ("http-web", "mysql", P.HTTP),
    ("", "mysql", P.TCP),
    # The name: <protocol> or <protocol>-<suffix>.
    ("http", "", P.HTTP),
    ("http-web", "", P.HTTP),
    ("HTTP-web", "", P.HTTP),
    ("http2", "", P.HTTP2),
    ("http2-api", "", P.HTTP2),
    ("grpc", "", P.GRPC),
    ("grpc-api", "", P.GRPC),
    ("grpc-web", "", P.HTTP),
    ("tcp", "", P.TCP),
    ("tls-db", "", P.TLS),
    ("https", "", P.TLS),
    # Not a prefix followed by '-': nothing said, so TCP (never guessed as HTTP).
    ("httpx", "", P.TCP),
    ("http-alt", "", P.HTTP),
    ("web", "", P.TCP),
    ("metrics", "", P.TCP),
    ("", "", P.TCP),
])
def test_port_protocol(name: str, app_protocol: str, expected: PortProtocol) -> None:
    assert port_protocol(name, app_protocol) is expected


def test_http_and_h2_flags() -> None:
    assert [p for p in PortProtocol if p.is_http] == [P.HTTP, P.HTTP2, P.GRPC]
    assert [p for p in PortProtocol if p.h2_upstream] == [P.HTTP2, P.GRPC]


def test_service_port_protocols() -> None:
    svc = Service("echo", "mesh", (), (
        ServicePort(80, 8080, "http"),
        ServicePort(7070, 7070, "grpc", app_protocol="kubernetes.io/h2c"),
        ServicePort(9090, 9090, "tcp"),
        ServicePort(5432, 5432)))
    assert service_port_protocols([svc]) == {
        port_key("mesh", "echo", 80): P.HTTP, port_key("mesh", "echo", 7070): P.HTTP2,
        port_key("mesh", "echo", 9090): P.TCP, port_key("mesh", "echo", 5432): P.TCP}
    assert port_key("mesh", "echo", 80) == "mesh/echo:80"

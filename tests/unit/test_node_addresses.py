"""The node's own addresses: how they are read, and how the ztunnel keeps its guard current."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mesh.ports import NODE_OWN_PORTS
from ztunnel import app
from ztunnel.app import Ztunnel
from ztunnel.config import ZtunnelConfig
from ztunnel.node_addresses import parse_interface_address, read_node_addresses

ip = ipaddress.ip_address


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.10", "192.0.2.10"),
    ("fd00::10", "fd00::10"),
    ("fe80::1%eth0", "fe80::1"),  # the zone is dropped: no dialled destination carries one
    ("00:16:3e:00:00:01", None),  # a link-layer address
    ("", None),
])
def test_parse_interface_address(text: str, expected: str | None) -> None:
    got = parse_interface_address(text)
    assert got == (None if expected is None else ip(expected))


def test_read_node_addresses_sees_this_namespace() -> None:
    addresses = read_node_addresses()
    assert ip("127.0.0.1") in addresses
    assert all(a.version in (4, 6) for a in addresses)


def test_the_ztunnel_keeps_its_guard_current(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    zt = Ztunnel(ZtunnelConfig(node="n", identity_dir=tmp_path, admin_port=16000,
                               socks5_port=16080).validate())
    # The own ports are the mesh's and this ztunnel's configured ones; loopback pods are off.
    assert zt.ctx.own.ports == NODE_OWN_PORTS | {16000, 16080}
    assert not zt.ctx.own.loopback_pods and not zt.ctx.own.addresses
    reads: list[frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] | OSError] = [
        frozenset({ip("127.0.0.1"), ip("192.0.2.10")}),
        frozenset({ip("127.0.0.1"), ip("192.0.2.10"), ip("10.244.0.1")}),  # a new bridge
        OSError("netlink said no"),
    ]

    def fake_read() -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        r = reads.pop(0)
        if isinstance(r, OSError):
            raise r
        return r

    monkeypatch.setattr(app, "read_node_addresses", fake_read)
    zt.refresh_node_addresses()
    assert zt.ctx.own.addresses == {ip("127.0.0.1"), ip("192.0.2.10")}
    zt.refresh_node_addresses()
    assert ip("10.244.0.1") in zt.ctx.own.addresses
    zt.refresh_node_addresses()  # a failed read keeps what was known
    assert ip("10.244.0.1") in zt.ctx.own.addresses
    assert zt.ctx.own.ports == NODE_OWN_PORTS | {16000, 16080}


def test_binds_default_to_the_node_only() -> None:
    c = ZtunnelConfig(node="n").validate()
    assert (c.admin_host, c.stats_host, c.socks5_host) == ("127.0.0.1",) * 3
    with pytest.raises(ValueError, match="node_address_refresh"):
        ZtunnelConfig(node="n", node_address_refresh=0).validate()

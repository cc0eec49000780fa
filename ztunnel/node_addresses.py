"""The node's own addresses, for the routing guard (``routing.OwnEndpoints``).

The ztunnel shares the node's network namespace (hostNetwork), so the addresses of the
interfaces it sees are the node's: every one of them reaches the admin, metrics and capture
listeners, the node agent and a controller on the node. They are read here, with I/O, so that
``routing`` stays pure: the app reads them at start and again every ``node_address_refresh``
seconds (an address added by DHCP, a new bridge or a CNI gateway is covered within that time;
loopback and unspecified addresses need no list, routing refuses them by their kind).
"""

from __future__ import annotations

import ipaddress
import socket

import psutil

from mesh.state.model import IPAddress


def parse_interface_address(text: str) -> IPAddress | None:
    """An interface address as psutil (getifaddrs) spells it: ``fe80::1%eth0`` carries a zone,
    which no destination the ztunnel dials has (``:authority`` forbids it; ``getsockname``
    drops it), so it is compared without; None for anything that is not an IP address."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def read_node_addresses() -> frozenset[IPAddress]:
    """Every IPv4 and IPv6 address of every interface in this network namespace (up or down:
    a down interface's address is still local to the kernel). OSError if they cannot be read."""
    found: set[IPAddress] = set()
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ip = parse_interface_address(a.address)
                if ip is not None:
                    found.add(ip)
    return frozenset(found)

"""Which interfaces of the node are uplinks: where other nodes' traffic to local pods arrives.

Why it exists: eBPF capture steers inbound connections at tc ingress of the uplinks, so a
connection arriving on an interface that is not one is not captured. A real node rarely has
just ``eth0``: a Vagrant or cloud VM has a NAT interface and a private one, and overlay CNIs
deliver other nodes' pod traffic on their own device (flannel's ``flannel.1``, Calico's
``vxlan.calico``). ``--uplink auto`` finds them: every interface that is

* up, with an IPv4 address (capture is IPv4 only),
* an Ethernet device (the uplink program parses Ethernet headers; ``tunl0``-style IP-in-IP and
  WireGuard devices are not, so they are skipped and logged),
* not loopback, not a bridge (``cni0``, ``docker0``: traffic on them is local),
* not a veth, unless the node routes through it via a gateway (the node's own ``eth0`` is a
  veth in kind and in the dev cluster; a pod's host-side veth never carries a gateway route),
* not the host side of a pod the agent knows.

The agent re-resolves ``auto`` on every resync and attaches capture to new uplinks, so an
interface that comes up later (a VPN, the overlay device created after the agent started) is
covered. The selection is a pure function of link records (``select``), tested as a table;
``read_links`` is the netlink part. Explicit names can be mixed in (``--uplink auto,eth5``).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("agent.uplinks")

AUTO = "auto"
ARPHRD_ETHER = 1
IFF_UP = 0x1
IFF_LOOPBACK = 0x8


class UplinkError(RuntimeError):
    """The node's interfaces could not be read."""


@dataclass(frozen=True)
class Link:
    """What the selection needs to know about one interface.

    ``kind`` is the rtnetlink ``IFLA_INFO_KIND`` ("" for a physical or virtio NIC, ``veth``,
    ``bridge``, ``vxlan``, ...); ``link_type`` the ARPHRD type; ``gateway_routes``: some IPv4
    route of the main table goes through a gateway over this interface.
    """

    name: str
    kind: str = ""
    up: bool = True
    loopback: bool = False
    link_type: int = ARPHRD_ETHER
    ipv4: tuple[str, ...] = ()
    gateway_routes: bool = False


def why_not(link: Link, pod_ifaces: Collection[str] = ()) -> str | None:
    """Why ``link`` is not an uplink, or ``None`` if it is one."""
    if link.loopback or link.name == "lo":
        return "loopback"
    if not link.up:
        return "down"
    if not link.ipv4:
        return "no IPv4 address"
    if link.name in pod_ifaces:
        return "a pod's host interface"
    if link.kind == "bridge":
        return "a bridge (local pod traffic)"
    if link.kind == "veth" and not link.gateway_routes:
        return "a veth without gateway routes (a pod's host side)"
    if link.link_type != ARPHRD_ETHER:
        return (f"not an Ethernet device (link type {link.link_type}); the eBPF uplink "
                "program cannot parse its packets, so inbound traffic on it is not captured")
    return None


def select(links: Iterable[Link], pod_ifaces: Collection[str] = ()) -> tuple[str, ...]:
    """The uplinks among ``links``, by name."""
    return tuple(sorted(link.name for link in links if why_not(link, pod_ifaces) is None))


def wants_auto(uplinks: Sequence[str]) -> bool:
    return AUTO in uplinks


def resolve(uplinks: Sequence[str], links: Iterable[Link],
            pod_ifaces: Collection[str] = ()) -> tuple[str, ...]:
    """``--uplink`` values (names and/or ``auto``) to interface names, explicit ones first."""
    explicit = [u for u in uplinks if u != AUTO]
    found = select(links, pod_ifaces) if wants_auto(uplinks) else ()
    return tuple(dict.fromkeys([*explicit, *found]))


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def read_links() -> list[Link]:
    """The interfaces of the current network namespace, from netlink."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            addrs: dict[int, list[str]] = {}
            for a in ipr.get_addr(family=socket.AF_INET):
                addrs.setdefault(int(a["index"]), []).append(str(_attr(a, "IFA_ADDRESS")))
            via_gateway: set[int] = set()
            for r in ipr.get_routes(family=socket.AF_INET, table=254):
                if _attr(r, "RTA_GATEWAY") is not None and _attr(r, "RTA_OIF") is not None:
                    via_gateway.add(int(_attr(r, "RTA_OIF")))
                for hop in _attr(r, "RTA_MULTIPATH") or ():
                    if hop.get_attr("RTA_GATEWAY") is not None:
                        via_gateway.add(int(hop["oif"]))
            out = []
            for link in ipr.get_links():
                index = int(link["index"])
                info = _attr(link, "IFLA_LINKINFO")
                kind = str(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""
                flags = int(link["flags"])
                out.append(Link(
                    name=str(_attr(link, "IFLA_IFNAME")),
                    kind=kind,
                    up=bool(flags & IFF_UP),
                    loopback=bool(flags & IFF_LOOPBACK),
                    link_type=int(link["ifi_type"]),
                    ipv4=tuple(addrs.get(index, ())),
                    gateway_routes=index in via_gateway,
                ))
            return out
    except Exception as e:  # NetlinkError and socket errors
        raise UplinkError(f"reading the node's interfaces over netlink: {e}") from e


def describe(links: Iterable[Link], pod_ifaces: Collection[str] = ()) -> list[str]:
    """One line per interface that is not an uplink and why (for the agent's log)."""
    return [f"{link.name}: {reason}" for link in links
            if (reason := why_not(link, pod_ifaces)) is not None]

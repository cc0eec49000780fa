"""Find the node-side interface of a pod from the node's routing table.

Why it exists: pods that were started before the agent (or whose CNI ADD it missed) have no
record from ``ambit-cni``. Point-to-point CNIs (ptp, Calico, Cilium's veth mode) install a /32
route to each local pod over its veth, so the route to a pod IP names its interface; for the
agent to adopt a pod, that interface must not be an uplink (then the IP is not local).
Both lookups here ask the kernel at the moment of the call: they are the live evidence that a
pod is (still) on the node, never a cached listing.
"""

from __future__ import annotations

import socket
from collections.abc import Collection

from pyroute2 import IPRoute


def host_iface_for(ip: str, uplinks: Collection[str]) -> str | None:
    """The interface a /32 (or on-link) route sends ``ip`` to, unless it is an uplink."""
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=ip)
        except Exception:  # no route: pyroute2 raises NetlinkError
            return None
        for route in routes:
            oif = route.get_attr("RTA_OIF")
            if oif is None or route.get_attr("RTA_GATEWAY") is not None:
                continue
            links = ipr.get_links(oif)
            if not links:
                continue
            name = str(links[0].get_attr("IFLA_IFNAME"))
            if name not in uplinks and name != "lo":
                return name
    return None


def iface_exists(name: str) -> bool:
    """Whether the node has an interface ``name`` right now (a fresh lookup, never cached)."""
    if not name:
        return False
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True

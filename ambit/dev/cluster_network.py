"""The dev cluster's network: namespaces, the cluster bridge, veths, routes and the bpffs.

Why it exists: the nodes and the control plane must reach each other as on a real cluster
network, and none of it may touch the machine's own namespace. This module builds that shape
(``ambd-<name>-net`` holding bridge ``br0``, a veth to each host's ``eth0``, routes between
the nodes' pod CIDRs) with ``ambit.dev.netns``, records what each node looked like before
capture (``node_snapshot``, so a test can check that uninstall restores it), and removes it
all again. Pods' own namespaces are wired by CNI in ``cluster_pods``, not here.
"""

from __future__ import annotations

import contextlib
import json

from agent.capture.bpffs import ensure_bpffs, is_bpffs
from ambit.dev import netns
from ambit.dev.cluster_state import CONTROL_PLANE_IP, ClusterState

BRIDGE = "br0"


def node_snapshot(ns: str) -> dict[str, str]:
    """What capture can change in a node namespace, for 'uninstall leaves it as it was'."""
    snap: dict[str, str] = {}
    links = json.loads(netns.ns_run(ns, ["ip", "-j", "link", "show"]) or "[]")
    filters = []
    for link in links:
        name = link["ifname"]
        for hook in ("ingress", "egress"):
            out = netns.ns_run(ns, ["tc", "filter", "show", "dev", name, hook])
            if out.strip():
                filters.append(f"{name} {hook}: {out.strip()}")
    snap["tc_filters"] = "\n".join(filters)
    snap["ip_rules"] = netns.ns_run(ns, ["ip", "rule", "show"])
    snap["table_100"] = netns.ns_run(ns, ["ip", "route", "show", "table", "100"]) \
        if "100" in snap["ip_rules"] else ""
    saved = netns.ns_run(ns, ["iptables-save", "-t", "mangle"])
    snap["mangle"] = "\n".join(line for line in saved.splitlines()
                               if not line.startswith("#") and not line.startswith(":"))
    return snap


class ClusterNetwork(ClusterState):
    """Build and remove the cluster network and the bpffs the agents pin their maps in."""

    def _build_network(self) -> None:
        netns.create_netns(self.net_ns)
        netns.add_bridge(self.net_ns, BRIDGE)
        hosts = [(self.cp_ns, CONTROL_PLANE_IP, "cp")] + \
            [(n.netns, n.ip, f"n{n.index}") for n in self.nodes]
        for ns, ip, port in hosts:
            netns.create_netns(ns)
            netns.add_veth(self.net_ns, port, ns, "eth0")
            netns.set_master(self.net_ns, port, BRIDGE)
            netns.add_address(ns, "eth0", f"{ip}/24")
        for node in self.nodes:
            netns.set_sysctl(node.netns, "net.ipv4.ip_forward", 1)
            # Captured packets arrive on one interface for sockets whose addresses live
            # elsewhere (TPROXY semantics); strict reverse-path filtering would drop them.
            for scope in ("all", "default", "eth0"):
                netns.set_sysctl(node.netns, f"net.ipv4.conf.{scope}.rp_filter", 0)
            for other in self.nodes:
                if other is not node:
                    netns.add_route(node.netns, other.pod_cidr, via=other.ip, dev="eth0")
            # Waypoint pods talk to the controller (CA, xDS): the way back to pod addresses.
            netns.add_route(self.cp_ns, node.pod_cidr, via=node.ip, dev="eth0")
        for node in self.nodes:
            self.baseline[node.name] = node_snapshot(node.netns)

    def _mount_bpffs(self) -> None:
        self.bpffs.mkdir(parents=True, exist_ok=True)
        ensure_bpffs(self.bpffs)

    def _remove_network(self) -> None:
        """Delete every namespace of this cluster (found by prefix, so also those of a
        half-built or crashed one) and unmount its bpffs."""
        for ns in [n for n in netns.list_netns() if n.startswith(self.prefix)]:
            netns.delete_netns(ns)
        if is_bpffs(self.bpffs):
            with contextlib.suppress(netns.NetnsError):
                netns.run(["umount", str(self.bpffs)])

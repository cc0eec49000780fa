"""A small Kubernetes-shaped cluster built from network namespaces, for tests, demo and benches.

Why it exists: the ztunnel's behaviour depends on where packets come from and go to (pod veth,
another node, its own sockets), so tests need the real shape of a node: pods on veths, a node
that routes, other nodes behind a network. ``Cluster`` builds that shape on one machine, never
touching the root namespace:

* ``<prefix>net``: the "cluster network", a Linux bridge ``br0``;
* ``<prefix>n<i>``: node ``node-<i>`` with ``eth0`` on the bridge at 10.100.0.<i>/24,
  ip_forward=1, and a route to every other node's pod subnet via that node;
* ``<prefix><pod>``: a pod with ``eth0`` at 10.244.<i>.<k+2>/32 (pod subnet 10.244.<i>.0/24 of
  its node), default route via 10.244.<i>.1; the node holds that gateway address on ``lo`` and
  a /32 route to the pod over the node-side veth ``veth-<pod>`` (so same-node pods also talk
  through the node, as with Calico, and capture sees every packet).

Namespace names start with ``amb-<pid>-`` so a later run can find and remove what a crashed
run left behind (``netns.remove_stale_netns``). Everything created, processes included, is
removed by ``close()`` / leaving the ``with`` block.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from agent.capture.iptables import CaptureRules, render_capture
from ambit.dev import netns

MAX_NODES = 250
MAX_PODS_PER_NODE = 250
BRIDGE = "br0"
# Pod names become part of the node-side interface name "veth-<name>" (15 characters max).
_POD_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?$")
_instances = itertools.count(1)


class TopologyError(RuntimeError):
    """Bad use of a ``Cluster`` (unknown node, duplicate pod, ...); the message says which."""


@dataclass
class Pod:
    name: str
    node: Node
    netns: str
    ip: str
    host_iface: str  # the veth end inside the node namespace


@dataclass
class Node:
    index: int  # 1-based, as in the name
    name: str  # "node-<index>", the name ztunnels and the state file use
    netns: str
    ip: str
    pod_cidr: str
    gateway: str
    pods: dict[str, Pod] = field(default_factory=dict)
    captured_ifaces: list[str] = field(default_factory=list)
    captured_ips: list[str] = field(default_factory=list)
    policy_routing: bool = False

    def pod_ip(self, k: int) -> str:
        return f"10.244.{self.index}.{k + 2}"


class Cluster:
    """N nodes on a bridge, pods added on demand. Use as a context manager."""

    def __init__(self, nodes: int = 2, *, tag: str = netns.DEFAULT_TAG) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise TopologyError(f"nodes: {nodes} must be between 1 and {MAX_NODES}")
        self.prefix = f"{netns.netns_prefix(tag)}{next(_instances)}-"
        self.tag = tag
        self.net_ns = f"{self.prefix}net"
        self.nodes: list[Node] = [
            Node(
                index=i,
                name=f"node-{i}",
                netns=f"{self.prefix}n{i}",
                ip=f"10.100.0.{i}",
                pod_cidr=f"10.244.{i}.0/24",
                gateway=f"10.244.{i}.1",
            )
            for i in range(1, nodes + 1)
        ]
        self.pods: dict[str, Pod] = {}
        self.cleanup = netns.Cleanup()
        self._started = False

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Cluster:
        netns.require_root()
        netns.remove_stale_netns(self.tag)
        self._started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _new_netns(self, name: str) -> None:
        netns.create_netns(name)
        self.cleanup.netns(name)

    def _build(self) -> None:
        self._new_netns(self.net_ns)
        netns.add_bridge(self.net_ns, BRIDGE)
        for node in self.nodes:
            self._new_netns(node.netns)
            port = f"n{node.index}"
            netns.add_veth(self.net_ns, port, node.netns, "eth0")
            netns.set_master(self.net_ns, port, BRIDGE)
            netns.add_address(node.netns, "eth0", f"{node.ip}/24")
            # Pods use the gateway as their next hop; on lo it answers ARP on every pod veth.
            netns.add_address(node.netns, "lo", f"{node.gateway}/32")
            netns.set_sysctl(node.netns, "net.ipv4.ip_forward", 1)
            # Captured packets arrive on one interface and (per TPROXY) belong to sockets whose
            # addresses live elsewhere; strict reverse-path filtering would drop them.
            for scope in ("all", "default"):
                netns.set_sysctl(node.netns, f"net.ipv4.conf.{scope}.rp_filter", 0)
        for node in self.nodes:
            for other in self.nodes:
                if other is not node:
                    netns.add_route(node.netns, other.pod_cidr, via=other.ip, dev="eth0")

    def close(self) -> None:
        """Stop every spawned process and delete every namespace (safe to call twice)."""
        self.cleanup.close()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- lookup ----------------------------------------------------------------------------

    def node(self, ref: Node | str | int) -> Node:
        """A node by object, name ("node-1") or 1-based index."""
        if isinstance(ref, Node):
            return ref
        for n in self.nodes:
            if ref in (n.name, n.index):
                return n
        names = ", ".join(n.name for n in self.nodes)
        raise TopologyError(f"no node {ref!r} in this cluster (nodes: {names})")

    def pod(self, name: str) -> Pod:
        try:
            return self.pods[name]
        except KeyError:
            raise TopologyError(
                f"no pod {name!r} (pods: {', '.join(self.pods) or 'none'})"
            ) from None

    # --- pods ------------------------------------------------------------------------------

    def add_pod(self, node_ref: Node | str | int, name: str) -> Pod:
        """Create pod ``name`` on a node: a namespace, a veth to the node, address and routes."""
        if not self._started:
            raise TopologyError("start the cluster (or enter its `with` block) before add_pod")
        node = self.node(node_ref)
        if not _POD_NAME.match(name):
            raise TopologyError(
                f"pod name {name!r}: use 1-10 of [a-z0-9-], starting and ending alphanumeric "
                "(it becomes the interface name veth-<name>)"
            )
        if name in self.pods:
            raise TopologyError(f"pod {name!r} already exists on {self.pods[name].node.name}")
        k = len(node.pods)
        if k >= MAX_PODS_PER_NODE:
            raise TopologyError(f"{node.name} already has {k} pods, the most its /24 holds")
        pod = Pod(
            name=name,
            node=node,
            netns=f"{self.prefix}{name}",
            ip=node.pod_ip(k),
            host_iface=f"veth-{name}",
        )
        self._new_netns(pod.netns)
        netns.add_veth(node.netns, pod.host_iface, pod.netns, "eth0")
        netns.add_address(pod.netns, "eth0", f"{pod.ip}/32")
        netns.add_route(pod.netns, node.gateway, dev="eth0", scope="link")
        netns.add_route(pod.netns, "default", via=node.gateway, dev="eth0")
        # src = the node IP, so whatever the node itself sends to a pod (a proxy's connection)
        # shows up with one recognisable address.
        netns.add_route(node.netns, f"{pod.ip}/32", dev=pod.host_iface, src=node.ip)
        node.pods[name] = pod
        self.pods[name] = pod
        return pod

    # --- capture ---------------------------------------------------------------------------

    def enable_capture(
        self,
        node_ref: Node | str | int,
        pod_ips: Iterable[str],
        pod_ifaces: Iterable[str],
        **options: int,
    ) -> CaptureRules:
        """Capture these pods' TCP into the ztunnel of their node (TPROXY, node ns only).

        Adds to what is already captured on the node and re-applies the whole mangle table.
        ``options`` are passed to ``render_capture`` (ports, marks, table).
        """
        node = self.node(node_ref)
        node.captured_ips = list(dict.fromkeys([*node.captured_ips, *pod_ips]))
        node.captured_ifaces = list(dict.fromkeys([*node.captured_ifaces, *pod_ifaces]))
        rules = render_capture(node.captured_ifaces, node.captured_ips, **options)
        netns.ns_run(node.netns, ["iptables-restore", "--noflush"], input=rules.iptables_restore)
        if not node.policy_routing:
            netns.ns_run(node.netns, ["iptables", "-t", "mangle", "-I", *rules.jump])
            for args in rules.ip_commands:
                netns.ip(node.netns, args)
            node.policy_routing = True
        return rules

    def capture_pods(self, pods: Sequence[Pod], **options: int) -> None:
        """``enable_capture`` for pods given as objects, grouped by their node."""
        for node in self.nodes:
            mine = [p for p in pods if p.node is node]
            if mine:
                self.enable_capture(
                    node, [p.ip for p in mine], [p.host_iface for p in mine], **options
                )

    # --- processes -------------------------------------------------------------------------

    def spawn(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``ns``; it is stopped by ``close()``. Output goes to ``log``."""
        out: int | IO[Any] = subprocess.DEVNULL
        if log is not None:
            out = log.open("ab")
        try:
            proc = netns.ns_spawn(
                ns, argv, stdout=out, stderr=subprocess.STDOUT, env=env or os.environ
            )
        finally:
            if not isinstance(out, int):
                out.close()  # the child holds its own copy of the descriptor
        self.cleanup.process(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], *, timeout: float = 30.0) -> str:
        """Run ``argv`` inside ``ns`` to completion and return its stdout."""
        return netns.ns_run(ns, argv, timeout=timeout)

"""The benchmark's private network: a two-node dev cluster with one client and one server pod.

    client pod ── node-1 ──(cluster bridge)── node-2 ── server pod
                  Envoy A                     Envoy B          (envoy setup)
                  ztunnel                     ztunnel          (ambit setup)

Why this shape: traffic between two pods of a real mesh crosses the client's node and the
server's node, and that is where the proxies sit. The direct setup crosses the same routing hops
without proxies, so the three setups differ only in the proxies. The namespaces are built by
``ambit.dev.topology.Cluster`` (the same topology the netns tests and the demo use, never
connected to the root namespace); this module only names the parts the benchmark needs and
turns TPROXY capture on for the ambit setup.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ambit.dev import netns
from ambit.dev.topology import Cluster, Pod
from bench.procs import BenchError, in_netns, run

# Namespaces are named "ambench-<pid>-<n>-..." so a crashed run's leftovers are found and
# removed by the next run (Cluster.start removes stale namespaces of this tag).
TAG = "ambench"


@dataclass(frozen=True)
class Addresses:
    client: str  # client pod
    client_node: str  # node-1 on the cluster network (Envoy A listens here)
    server_node: str  # node-2 on the cluster network (Envoy B listens here)
    server: str  # server pod


class Topology:
    """One fresh cluster per setup: ``create`` builds it, ``destroy`` removes everything."""

    def __init__(self) -> None:
        self.cluster = Cluster(nodes=2, tag=TAG)
        self.ns: dict[str, str] = {}
        self._pods: list[Pod] = []
        self._addrs: Addresses | None = None
        # Run by destroy() after the namespaces are gone (e.g. unmounting the eBPF setup's
        # bpffs, whose pinned maps the node namespaces' programs used).
        self._after_destroy: list[Callable[[], None]] = []

    @property
    def addrs(self) -> Addresses:
        if self._addrs is None:
            raise BenchError("topology used before create()")
        return self._addrs

    def create(self) -> None:
        try:
            self.cluster.start()
            client = self.cluster.add_pod("node-1", "client")
            server = self.cluster.add_pod("node-2", "server")
        except (netns.NetnsError, RuntimeError) as e:
            raise BenchError(f"cannot build the benchmark topology: {e}") from None
        n1, n2 = self.cluster.node(1), self.cluster.node(2)
        self._pods = [client, server]
        self.ns = {"client": client.netns, "client-node": n1.netns,
                   "server-node": n2.netns, "server": server.netns}
        self._addrs = Addresses(client=client.ip, client_node=n1.ip, server_node=n2.ip,
                                server=server.ip)
        self._check()

    def enable_capture(self) -> None:
        """TPROXY both pods into their node's ztunnel (rules in the node namespaces only)."""
        try:
            self.cluster.capture_pods(self._pods)
        except (netns.NetnsError, RuntimeError, ValueError) as e:
            raise BenchError(f"cannot enable capture: {e}") from None

    def pods_on(self, role: str) -> list[Pod]:
        """The pods of node namespace ``role`` ("client-node" or "server-node")."""
        return [p for p in self._pods if p.node.netns == self.ns[role]]

    def after_destroy(self, fn: Callable[[], None]) -> None:
        self._after_destroy.append(fn)

    def _check(self) -> None:
        """One TCP probe across the whole path, so a broken topology fails before any benchmark.

        A connect to a closed port of the server pod is answered with a RST (connection
        refused) only when the packet made it through both nodes and back.
        """
        probe = (
            "import socket,sys\n"
            "s=socket.socket();s.settimeout(2)\n"
            "try:\n s.connect((sys.argv[1],9))\nexcept ConnectionRefusedError:\n sys.exit(0)\n"
            "except OSError as e:\n sys.exit(str(e))\n"
            "sys.exit('port 9 unexpectedly open')\n"
        )
        try:
            run(in_netns(self.ns["client"], [sys.executable, "-c", probe, self.addrs.server]),
                timeout=10)
        except BenchError as e:
            raise BenchError(f"client pod cannot reach server pod: {e}") from None

    def destroy(self) -> None:
        """Kill leftovers in our namespaces and delete them; reports but never raises."""
        try:
            self.cluster.close()
        except Exception as e:
            print(f"bench: warning: cleanup: {e}", file=sys.stderr)
        while self._after_destroy:
            try:
                self._after_destroy.pop()()
            except Exception as e:
                print(f"bench: warning: cleanup: {e}", file=sys.stderr)

    def __enter__(self) -> Topology:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.destroy()

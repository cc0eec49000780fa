"""``ambit dev cluster``: a multi-node Ambit mesh on one machine, built the way a cluster is.

Why it exists: the node agent, the CNI plugin, the controller and the ztunnel only prove
themselves together, wired as on a real node: pods created by the real CNI plugins (Debian's
``ptp`` + ``host-local``, with ``ambit-cni`` chained after them, called exactly as a kubelet's
runtime calls them), an agent and a ztunnel per node, and the controller in embedded mode. The
e2e tests, ``make demo`` and users trying Ambit all use this.

Topology (nothing is connected to the machine's own network namespace):

* ``ambd-<name>-net``: the "cluster network", a bridge;
* ``ambd-<name>-cp``: the control plane, 10.100.0.254, running ``ambit controller``;
* ``ambd-<name>-n<i>``: node ``node-<i>`` at 10.100.0.<i>, pod CIDR 10.244.<i>.0/24, routes
  to the other nodes' pod CIDRs, running ``ambit ztunnel`` and ``ambit agent``;
* ``ambd-<name>-<pod>``: a pod: a network namespace wired by CNI plus a cgroup (under the
  machine's cgroup v2 tree, ``ambit-dev/<name>/<pod>``) holding its processes.

The registry plays the API server's part: a pod is written to it (scheduled, no IP), then CNI
ADD runs (``ambit-cni`` asks the agent, which asks the controller, and capture is in place
before anything runs in the pod), then the pod's IP is written (the kubelet's status update).

Everything lives under ``/var/run/ambit-dev/<name>`` (state file, logs, registry, the bpffs
for pinned maps) so ``down`` and ``status`` work from another process, and ``down`` removes it
all: pods (CNI DEL), processes, capture (``ambit agent uninstall``), namespaces, cgroups,
mounts.

``DevCluster`` is put together from one class per concern, each in its own module and each
built on ``ClusterState`` (the record and its state file, ``cluster_state``):
``cluster_procs`` (start, stop and wait for processes by role), ``cluster_registry`` (the
documents the cluster writes to its registry), ``cluster_network`` (namespaces, bridge,
veths, bpffs), ``cluster_nodes`` (controller, CNI config, ztunnel and agent per node),
``cluster_pods`` (pods through CNI, servers in them), ``cluster_waypoints`` and
``cluster_status``. This module keeps what needs all of them: ``up`` and ``down``, the order
in which a cluster is built and taken apart. Its names stay importable from here.
"""

from __future__ import annotations

import shutil
import time

from ambit.dev import netns
from ambit.dev.cluster_network import BRIDGE, ClusterNetwork, node_snapshot
from ambit.dev.cluster_state import (
    CONTROL_PLANE_IP,
    MAX_NODES,
    NS_PREFIX,
    STATE_ROOT,
    ClusterError,
    NodeInfo,
    Out,
    PodInfo,
    Process,
    cgroup2_root,
)
from ambit.dev.cluster_status import ClusterStatus
from ambit.dev.cluster_waypoints import WAYPOINT_RUN_ROOT, ClusterWaypoints

# The names callers import from ``ambit.dev.cluster`` (the CLI, the demo, the tests).
__all__ = [
    "BRIDGE", "CONTROL_PLANE_IP", "MAX_NODES", "NS_PREFIX", "STATE_ROOT", "WAYPOINT_RUN_ROOT",
    "ClusterError", "DevCluster", "NodeInfo", "Out", "PodInfo", "Process", "cgroup2_root",
    "node_snapshot",
]


class DevCluster(ClusterWaypoints, ClusterStatus, ClusterNetwork):
    """A dev cluster: ``up`` builds it, ``down`` removes it (also a half-built one), and the
    parts' methods (pods, waypoints, registry edits, processes, status) act on it between."""

    def up(self, timeout: float = 60.0) -> None:
        netns.require_root()
        if self.state_file.exists():
            raise ClusterError(f"dev cluster {self.name!r} already exists ({self.state_file}); "
                               f"see `ambit dev cluster status --name {self.name}` or remove "
                               f"it with `ambit dev cluster down --name {self.name}`")
        leftovers = [n for n in netns.list_netns() if n.startswith(self.prefix)]
        if leftovers:
            raise ClusterError(f"namespaces of an earlier cluster {self.name!r} remain "
                               f"({', '.join(leftovers)}); run `ambit dev cluster down "
                               f"--name {self.name}` first")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save()
        try:
            self._up(timeout)
        except BaseException:
            self.out("    failed; tearing down what was built")
            self.down(quiet=True)
            raise

    def _up(self, timeout: float) -> None:
        t0 = time.monotonic()
        n = len(self.nodes)
        self.out(f"[1/4] network: a cluster bridge, a control-plane host and {n} node(s), "
                 "all in private network namespaces")
        self._build_network()
        self.out("[2/4] controller (embedded registry, mesh CA, state push) on "
                 f"{self.controller_address}")
        self._start_controller(timeout)
        self.out(f"[3/4] CNI on each node: ptp + host-local, then ambit-cni "
                 f"(plugins from {self._plugin_dir()})")
        for node in self.nodes:
            self._prepare_node(node)
        self.out(f"[4/4] ztunnel and node agent on each node (redirect mode "
                 f"{self.redirect_mode})")
        self._mount_bpffs()
        for node in self.nodes:
            self.start_node(node, timeout)
            mode = self.agent_mode(node)
            self.out(f"    {node.name} {node.ip}: ztunnel ready, agent ready ({mode})")
        self.save()
        self.out(f"cluster {self.name!r} up in {time.monotonic() - t0:.1f}s")

    def down(self, quiet: bool = False) -> None:
        """Remove everything ``up`` created; safe to run on a half-built cluster."""
        say = (lambda _line: None) if quiet else self.out
        # Pods first (CNI DEL needs the agents and the nodes' namespaces), then processes,
        # then capture (uninstall needs the nodes' namespaces), then the namespaces.
        for name in list(self.pods):
            try:
                self.delete_pod(name)
            except Exception as e:  # keep going: the rest must still be removed
                say(f"    pod {name}: {e}")
        self._stop_all()
        self._uninstall_capture(say)
        self._remove_network()
        self._remove_pod_cgroups()
        shutil.rmtree(self.dir, ignore_errors=True)
        self._remove_waypoint_dirs()
        say(f"cluster {self.name!r} removed")

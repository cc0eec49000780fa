"""The dev cluster's mesh components: the controller, and each node's CNI, ztunnel and agent.

Why it exists: these are what the dev cluster is for, started with the flags a real install
gives them: the controller in embedded mode on the control-plane host, and on each node a CNI
configuration (``ptp`` + ``host-local`` with ``ambit-cni`` chained), a node token, a ztunnel
and a node agent. Starting, restarting and asking them for their state (the agent's pods and
redirect mode, the node metrics) lives here; how a process is started and watched is
``cluster_procs``, and the token comes from ``cluster_registry``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ambit.dev import mesh, netns
from ambit.dev.cluster_procs import ClusterProcesses
from ambit.dev.cluster_registry import ClusterRegistry
from ambit.dev.cluster_state import CONTROL_PLANE_IP, ClusterError, NodeInfo, Out, Process
from ambit.dev.cni_runner import CniRunner, conflist_for_node, prepare_plugin_dir
from mesh.ports import GRPC_PORT, NODE_METRICS_PORT
from mesh.ports import MONITORING_PORT as CONTROLLER_MONITORING_PORT
from mesh.ports import READINESS_PORT as ZTUNNEL_READY_PORT


class ClusterNodes(ClusterProcesses, ClusterRegistry):
    """Prepare, start, restart and query the controller and the nodes' ztunnels and agents."""

    # --- controller ------------------------------------------------------------------------

    def _start_controller(self, timeout: float) -> None:
        self.controller_dir.mkdir(parents=True, exist_ok=True)
        self.spawn("controller", self.cp_ns, self._ambit(
            "controller", "--mode", "embedded", "--db", str(self.db),
            "--data-dir", str(self.controller_dir), "--serving-ip", CONTROL_PLANE_IP,
            "--grpc-port", str(GRPC_PORT), "--monitoring-port",
            str(CONTROLLER_MONITORING_PORT)))
        self._wait_http("controller", self.cp_ns,
                        f"http://127.0.0.1:{CONTROLLER_MONITORING_PORT}/ready", timeout)

    def restart_controller(self, timeout: float = 60.0) -> None:
        self.stop("controller")
        self._start_controller(timeout)

    # --- node preparation (what an installer puts on a node) -------------------------------

    def _plugin_dir(self) -> Path:
        return self.dir / "cni-bin"

    def _prepare_node(self, node: NodeInfo) -> None:
        run_dir = Path(node.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # The static host binary, as a real node runs it (the agent does the CNI work).
        from agent.cni import shim

        try:
            binary = shim.build()
        except shim.ShimBuildError as e:
            raise ClusterError(str(e)) from None
        prepare_plugin_dir(self._plugin_dir(), ambit_cni=binary)
        conflist = conflist_for_node(node.pod_cidr, run_dir, run_dir / "cni.sock")
        (run_dir / "10-ambit.conflist").write_text(json.dumps(conflist, indent=1))
        (run_dir / "node.token").write_text(self._issue_node_token(node.name))
        (run_dir / "node.token").chmod(0o600)

    def runner(self, node: NodeInfo) -> CniRunner:
        """The node's CNI runtime, calling the plugins as a kubelet's runtime would."""
        run_dir = Path(node.run_dir)
        conflist = json.loads((run_dir / "10-ambit.conflist").read_text())
        return CniRunner(conflist, [self._plugin_dir()], node.netns, run_dir / "cni-cache")

    # --- ztunnel and agent -----------------------------------------------------------------

    def start_node(self, node: NodeInfo, timeout: float = 60.0) -> None:
        self.start_ztunnel(node, timeout)
        self.start_agent(node, timeout)

    def _spawn_ztunnel(self, node: NodeInfo) -> Process:
        run_dir = Path(node.run_dir)
        return self.spawn(f"ztunnel/{node.name}", node.netns, self._ambit(
            "ztunnel", "--node", node.name, "--controller", self.controller_address,
            "--node-token-file", str(run_dir / "node.token"),
            "--ca-root-cert", str(self.trust_bundle), "--inbound-bind", "shared",
            "--agent-socket", str(run_dir / "ztunnel.sock"),
            "--access-log", str(run_dir / "access.jsonl")))

    def start_ztunnel(self, node: NodeInfo, timeout: float = 60.0) -> None:
        self._spawn_ztunnel(node)
        self._wait_http(f"ztunnel/{node.name}", node.netns,
                        f"http://127.0.0.1:{ZTUNNEL_READY_PORT}/healthz/ready", timeout)

    def restart_ztunnel(self, node: NodeInfo, timeout: float = 60.0,
                        overlap: bool = True) -> Process:
        """Replace the node's ztunnel; returns the new one's process.

        ``overlap`` (the default, as a rolling update with surge does): the new ztunnel starts
        beside the old one, takes the capture listeners over from the node agent and, once
        ready, registers; the agent then tells the old one it is superseded, and it drains (its
        established connections get its drain period) and exits on its own, recorded as
        ``ztunnel/<node>/draining-<pid>`` until then. Otherwise the old one is stopped first
        (SIGTERM, drain) and the new one started after, as a container restart does: the agent
        keeps the listeners meanwhile and connections wait in their queues.
        """
        role = f"ztunnel/{node.name}"
        self._forget_drained(node)
        if not overlap:
            self.stop(role, timeout=timeout)
            self.start_ztunnel(node, timeout)
            return self.process(role)
        old = self.process(role)
        old.role = f"{role}/draining-{old.pid}"
        self.save()
        new = self._spawn_ztunnel(node)
        deadline = time.monotonic() + timeout
        while True:  # registered = ready (it registers only then) and the old one superseded
            if not self.alive(role):
                raise ClusterError(f"the new ztunnel of {node.name} exited; log:\n"
                                   f"{self.log_tail(role)}")
            try:
                if self.agent_status(node).get("ztunnelPid") == new.pid:
                    return new
            except ClusterError:
                pass  # the agent answers again in a moment
            if time.monotonic() > deadline:
                raise ClusterError(f"the new ztunnel of {node.name} (pid {new.pid}) did not "
                                   f"register with the agent within {timeout:g}s; log:\n"
                                   f"{self.log_tail(role)}")
            time.sleep(0.1)

    def start_agent(self, node: NodeInfo, timeout: float = 60.0) -> None:
        run_dir = Path(node.run_dir)
        role = f"agent/{node.name}"
        self.spawn(role, node.netns, self._ambit(
            "agent", "run", "--node", node.name, "--controller", self.controller_address,
            "--node-token-file", str(run_dir / "node.token"),
            "--ca-root-cert", str(self.trust_bundle), "--redirect-mode", self.redirect_mode,
            "--run-dir", str(run_dir), "--bpf-dir", node.bpf_dir, "--uplink", "eth0",
            "--metrics-port", str(NODE_METRICS_PORT)))
        self._wait_http(role, node.netns,
                        f"http://127.0.0.1:{NODE_METRICS_PORT}/healthz/ready", timeout)

    def _forget_drained(self, node: NodeInfo) -> None:
        """Drop the records of this node's superseded ztunnels that have exited."""
        prefix = f"ztunnel/{node.name}/draining-"
        gone = [p for p in self.processes if p.role.startswith(prefix) and not self.alive(p.role)]
        for p in gone:
            self.processes.remove(p)
            self._popen.pop(p.pid, None)
        if gone:
            self.save()

    def restart_agent(self, node: NodeInfo, timeout: float = 60.0) -> None:
        self.stop(f"agent/{node.name}")
        self.start_agent(node, timeout)

    def _uninstall_capture(self, say: Out) -> None:
        """``ambit agent uninstall`` on each node still there, as a node's uninstall would:
        capture goes even when an agent died without cleaning up."""
        for node in self.nodes:
            if netns.netns_exists(node.netns):
                try:
                    netns.ns_run(node.netns, self._ambit(
                        "agent", "uninstall", "--run-dir", node.run_dir, "--bpf-dir",
                        node.bpf_dir, "--uplink", "eth0"), timeout=60)
                except netns.NetnsError as e:
                    say(f"    {node.name}: agent uninstall: {e}")

    # --- asking the node -------------------------------------------------------------------

    def agent_status(self, node: NodeInfo) -> dict[str, Any]:
        status, body = mesh.http_get(node.netns,
                                     f"http://127.0.0.1:{NODE_METRICS_PORT}/debug/pods")
        if status != 200:
            raise ClusterError(f"{node.name} agent /debug/pods: {status} {body[:200]}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def agent_mode(self, node: NodeInfo) -> str:
        doc = self.agent_status(node)
        return f"{doc['redirectMode']}: {doc['redirectModeReason']}"

    def node_metrics(self, node: NodeInfo) -> str:
        status, body = mesh.http_get(node.netns, f"http://127.0.0.1:{NODE_METRICS_PORT}/metrics")
        if status != 200:
            raise ClusterError(f"{node.name} node metrics: {status} {body[:200]}")
        return body

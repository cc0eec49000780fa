"""``ambit dev cluster status``: what runs in a dev cluster and how to reach it.

Why it exists: a user (or a failed test's log) needs one screen that says whether the
controller, each node's ztunnel and agent are up, which redirect mode each agent chose, which
pods are captured, and the commands to use the cluster next. It only reads: the recorded
processes, and one request per node to the agent.
"""

from __future__ import annotations

import contextlib

from ambit.dev import mesh
from ambit.dev.cluster_nodes import ClusterNodes


class ClusterStatus(ClusterNodes):
    """The cluster's status as lines of text."""

    def status_lines(self) -> list[str]:
        lines = [f"cluster {self.name!r} ({self.dir}), redirect mode {self.redirect_mode}"]
        ctl = "running" if self.alive("controller") else "NOT RUNNING"
        lines.append(f"  controller   {self.controller_address:<22} {ctl}")
        captured: dict[str, bool] = {}
        for node in self.nodes:
            zt = "up" if self.alive(f"ztunnel/{node.name}") else "DOWN"
            ag = "up" if self.alive(f"agent/{node.name}") else "DOWN"
            mode = ""
            if ag == "up":
                with contextlib.suppress(Exception):
                    doc = self.agent_status(node)  # one request per node: mode and pods
                    mode = f" ({doc['redirectMode']}: {doc['redirectModeReason']})"
                    captured.update({p["pod"]: p["captured"] for p in doc["pods"]})
            lines.append(f"  {node.name:<12} {node.ip:<22} ztunnel {zt}, agent {ag}{mode}")
        for pod in self.pods.values():
            cap = captured.get(f"{pod.namespace}/{pod.name}")
            state = "captured" if cap else "not captured" if cap is False else "unknown"
            lines.append(f"  pod {pod.namespace}/{pod.name:<16} {pod.ip:<15} on {pod.node} "
                         f"({state}, netns {pod.netns})")
        lines += [
            "reach it:",
            f"  export AMBIT_DB={self.db}   # then: ambit namespace enable default, "
            "ambit get workloads, ambit apply -f ...",
            f"  ambit dev cluster pod add NAME --node node-1 [--echo 8080] --name {self.name}",
            f"  ambit dev cluster exec --name {self.name} POD -- "
            f"{mesh.PYTHON} -m ambit.dev.probe tcp IP 8080",
            f"  logs: {self.dir / 'logs'}",
        ]
        return lines

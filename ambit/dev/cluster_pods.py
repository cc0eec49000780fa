"""The dev cluster's pods: scheduled, wired by CNI and started as a kubelet would.

Why it exists: capture is only proven when pods come and go the way they do on a node. A pod
here is written to the registry without an IP (the scheduler's binding), given a sandbox (a
network namespace and a cgroup under ``ambit-dev/<name>/<pod>``), wired by CNI ADD on its node
(``ambit-cni`` asks the agent, so capture is in place before anything runs in it), and only
then given its IP in the registry (the kubelet's status update); deleting it runs CNI DEL.
This module also starts the small servers the tests and the demo run inside pods.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from ambit.dev import mesh, netns
from ambit.dev.cluster_nodes import ClusterNodes
from ambit.dev.cluster_state import ClusterError, PodInfo, Process, cgroup2_root
from ambit.dev.cni_runner import CniError, RuntimeConf, k8s_pod_args


class ClusterPods(ClusterNodes):
    """Add, relabel and delete pods, and run processes inside them."""

    def add_pod(self, name: str, node_ref: str | int, *, namespace: str = "default",
                service_account: str | None = None,
                labels: Mapping[str, str] | None = None, attempts: int = 5) -> PodInfo:
        """Schedule, wire (CNI ADD) and start a pod, as the API server and kubelet would."""
        node = self.node(node_ref)
        if name in self.pods:
            raise ClusterError(f"pod {name!r} already exists on {self.pods[name].node}")
        if len(f"{self.prefix}{name}") > 40 or not name.replace("-", "").isalnum():
            raise ClusterError(f"pod name {name!r}: use a short name of [a-z0-9-]")
        container_id = f"{self.name}-{name}-{uuid.uuid4().hex[:8]}"
        pod = PodInfo(name=name, namespace=namespace, node=node.name,
                      netns=f"{self.prefix}{name}", ip="", host_iface="",
                      container_id=container_id,
                      cgroup=str(cgroup2_root() / "ambit-dev" / self.name / name),
                      service_account=service_account or name,
                      labels=dict(labels or {"app": name}))
        # 1. the scheduler binds the pod to the node (the registry has it, without an IP)
        self.apply([self._workload_doc(pod, [])])
        # 2. the runtime creates the sandbox: network namespace and cgroup
        netns.create_netns(pod.netns)
        Path(pod.cgroup).mkdir(parents=True, exist_ok=True)
        rt = RuntimeConf(container_id, pod.netns_path, "eth0",
                         k8s_pod_args(namespace, name, str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                                      container_id)),
                                      container_id))
        runner = self.runner(node)
        # 3. CNI ADD; like the kubelet, retry a sandbox whose setup failed (after a DEL)
        for attempt in range(1, attempts + 1):
            try:
                result = runner.add(rt)
                break
            except CniError as e:
                runner.delete(rt)
                if attempt == attempts or e.code != 11:
                    self._drop_sandbox(pod)
                    self.delete("Workload", namespace, name)
                    raise ClusterError(f"CNI ADD for pod {namespace}/{name} failed: {e}") \
                        from None
                time.sleep(0.2 * attempt)
        pod.ip = str(result["ips"][0]["address"]).split("/")[0]
        pod.host_iface = next((i["name"] for i in result.get("interfaces", [])
                               if not i.get("sandbox")), "")
        # 4. the kubelet reports the pod's IP
        self.apply([self._workload_doc(pod, [pod.ip])])
        self.pods[name] = pod
        self.save()
        return pod

    def _drop_sandbox(self, pod: PodInfo) -> None:
        netns.delete_netns(pod.netns)
        with contextlib.suppress(OSError):
            Path(pod.cgroup).rmdir()

    def delete_pod(self, name: str) -> None:
        pod = self.pod(name)
        for p in [p for p in self.processes if p.role.startswith(f"pod/{name}/")]:
            self.stop(p.role, timeout=3)
        rt = RuntimeConf(pod.container_id, pod.netns_path, "eth0",
                         k8s_pod_args(pod.namespace, pod.name, "", pod.container_id))
        errors = self.runner(self.node(pod.node)).delete(rt)
        for e in errors:
            self.out(f"    CNI DEL {pod.name}: {e}")
        self._drop_sandbox(pod)
        with contextlib.suppress(Exception):
            self.delete("Workload", pod.namespace, pod.name)
        del self.pods[name]
        self.save()

    def _remove_pod_cgroups(self) -> None:
        """Remove the cluster's cgroup tree, also what a crashed run left (``down``)."""
        with contextlib.suppress(ClusterError):
            cg = cgroup2_root() / "ambit-dev" / self.name
            if cg.exists():
                for child in cg.iterdir():
                    if child.is_dir():
                        with contextlib.suppress(OSError):
                            child.rmdir()
                with contextlib.suppress(OSError):
                    cg.rmdir()
                with contextlib.suppress(OSError):
                    cg.parent.rmdir()  # only if no other dev cluster uses it

    def set_pod_labels(self, name: str, labels: Mapping[str, str]) -> None:
        pod = self.pod(name)
        pod.labels = dict(labels)
        self.apply([self._workload_doc(pod, [pod.ip])])
        self.save()

    # --- processes in pods -----------------------------------------------------------------

    def run_in_pod(self, name: str, argv: Sequence[str], role: str | None = None) -> Process:
        """Start a long-running process in the pod (its netns and cgroup)."""
        pod = self.pod(name)
        return self.spawn(f"pod/{name}/{role or Path(argv[0]).name}", pod.netns, argv,
                          cgroup=Path(pod.cgroup))

    def start_echo(self, name: str, port: int = 8080, timeout: float = 10.0) -> Process:
        return self._start_server(name, f"echo-{port}", "echo server", [
            "-m", "ambit.dev.echo", "--host", "0.0.0.0", "--port", str(port)], timeout)

    def start_http_echo(self, name: str, port: int = 8080, version: str = "v1",
                        timeout: float = 10.0) -> Process:
        """Run ``ambit.dev.http_echo`` in the pod: every answer names ``version``."""
        return self._start_server(name, f"http-{port}", "HTTP echo server", [
            "-m", "ambit.dev.http_echo", "--port", str(port), "--version", version,
            "--pod", name], timeout)

    def _start_server(self, name: str, tag: str, what: str, args: Sequence[str],
                      timeout: float) -> Process:
        """Start ``python ARGS --ready-file F`` in pod ``name`` and wait until F exists."""
        pod = self.pod(name)
        ready = self.dir / f"{tag}-{name}.ready"
        ready.unlink(missing_ok=True)
        role = f"pod/{name}/{tag}"
        proc = self.spawn(role, pod.netns, [mesh.PYTHON, *args, "--ready-file", str(ready)],
                          cgroup=Path(pod.cgroup))
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if not self.alive(role) or time.monotonic() > deadline:
                raise ClusterError(f"{what} in pod {name} did not start; log:\n"
                                   f"{self.log_tail(role)}")
            time.sleep(0.05)
        return proc

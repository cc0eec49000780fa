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
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.capture.bpffs import ensure_bpffs, is_bpffs
from ambit.dev import mesh, netns
from ambit.dev.cni_runner import (
    CniError,
    CniRunner,
    RuntimeConf,
    conflist_for_node,
    k8s_pod_args,
    prepare_plugin_dir,
)
from controller.waypoint.parse import HBONE_LISTENER
from mesh.files import write_atomic
from mesh.ports import GRPC_PORT, NODE_METRICS_PORT, XDS_PORT
from mesh.ports import MONITORING_PORT as CONTROLLER_MONITORING_PORT
from mesh.ports import READINESS_PORT as ZTUNNEL_READY_PORT

STATE_ROOT = Path("/var/run/ambit-dev")
NS_PREFIX = "ambd-"
CONTROL_PLANE_IP = "10.100.0.254"
WAYPOINT_RUN_ROOT = Path("/var/run/ambit-dev-wp")
BRIDGE = "br0"
MAX_NODES = 20

Out = Callable[[str], None]


class ClusterError(RuntimeError):
    """The dev cluster cannot do what was asked; the message says why and what to do."""


def _print(line: str) -> None:
    print(line, flush=True)


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted (``/sys/fs/cgroup`` on most nodes, ``.../unified`` on
    hybrid hosts)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    raise ClusterError("no cgroup v2 mount found in /proc/mounts; pods need cgroup v2")


@dataclass
class NodeInfo:
    name: str
    index: int
    netns: str
    ip: str
    pod_cidr: str
    run_dir: str
    bpf_dir: str


@dataclass
class PodInfo:
    name: str
    namespace: str
    node: str
    netns: str
    ip: str
    host_iface: str
    container_id: str
    cgroup: str
    service_account: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"


@dataclass
class Process:
    role: str  # controller, ztunnel/node-1, agent/node-1, pod/<name>
    pid: int
    netns: str
    log: str
    argv: list[str]


class DevCluster:
    def __init__(self, name: str = "dev", *, nodes: int = 2, redirect_mode: str = "auto",
                 root: Path = STATE_ROOT, out: Out = _print) -> None:
        if not name.replace("-", "").isalnum() or len(name) > 12:
            raise ClusterError(f"cluster name {name!r}: use 1-12 of [a-z0-9-]")
        if not 1 <= nodes <= MAX_NODES:
            raise ClusterError(f"nodes: {nodes} must be between 1 and {MAX_NODES}")
        self.name = name
        self.out = out
        self.redirect_mode = redirect_mode
        self.dir = root / name
        self.prefix = f"{NS_PREFIX}{name}-"
        self.net_ns = f"{self.prefix}net"
        self.cp_ns = f"{self.prefix}cp"
        self.nodes = [NodeInfo(f"node-{i}", i, f"{self.prefix}n{i}", f"10.100.0.{i}",
                               f"10.244.{i}.0/24", str(self.dir / f"node-{i}"),
                               str(self.dir / "bpf" / f"node-{i}"))
                      for i in range(1, nodes + 1)]
        self.pods: dict[str, PodInfo] = {}
        self.processes: list[Process] = []
        self._popen: dict[int, subprocess.Popen[bytes]] = {}
        self.baseline: dict[str, dict[str, str]] = {}

    # --- paths -----------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "cluster.json"

    @property
    def db(self) -> Path:
        return self.dir / "registry.db"

    @property
    def controller_dir(self) -> Path:
        return self.dir / "controller"

    @property
    def trust_bundle(self) -> Path:
        return self.controller_dir / "trust-bundle.pem"

    @property
    def bpffs(self) -> Path:
        return self.dir / "bpf"

    @property
    def controller_address(self) -> str:
        return f"{CONTROL_PLANE_IP}:{GRPC_PORT}"

    def node(self, ref: str | int) -> NodeInfo:
        for n in self.nodes:
            if ref in (n.name, n.index, str(n.index)):
                return n
        raise ClusterError(f"no node {ref!r} (nodes: {', '.join(n.name for n in self.nodes)})")

    def pod(self, name: str) -> PodInfo:
        try:
            return self.pods[name]
        except KeyError:
            raise ClusterError(f"no pod {name!r} (pods: {', '.join(self.pods) or 'none'})") \
                from None

    # --- persistence -----------------------------------------------------------------------

    def save(self) -> None:
        doc = {
            "name": self.name, "redirectMode": self.redirect_mode,
            "nodes": [asdict(n) for n in self.nodes],
            "pods": [asdict(p) for p in self.pods.values()],
            "processes": [asdict(p) for p in self.processes],
            "baseline": self.baseline,
        }
        write_atomic(self.state_file, json.dumps(doc, indent=1))

    @classmethod
    def load(cls, name: str = "dev", root: Path = STATE_ROOT, out: Out = _print) -> DevCluster:
        path = root / name / "cluster.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no dev cluster {name!r} ({path} does not exist); start one "
                               "with `ambit dev cluster up`") from None
        c = cls(name, nodes=len(doc["nodes"]), redirect_mode=doc["redirectMode"], root=root,
                out=out)
        c.nodes = [NodeInfo(**n) for n in doc["nodes"]]
        c.pods = {p["name"]: PodInfo(**p) for p in doc["pods"]}
        c.processes = [Process(**p) for p in doc["processes"]]
        c.baseline = doc.get("baseline", {})
        return c

    # --- processes -------------------------------------------------------------------------

    def spawn(self, role: str, ns: str, argv: Sequence[str], *, cgroup: Path | None = None,
              env: Mapping[str, str] | None = None) -> Process:
        """Start ``argv`` in ``ns`` (and ``cgroup``), detached, logging to logs/<role>.log."""
        log = self.dir / "logs" / f"{role.replace('/', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        procs_file = None if cgroup is None else cgroup / "cgroup.procs"

        def enter_cgroup() -> None:  # runs in the child before exec, in our mount namespace
            if procs_file is not None:
                procs_file.write_text(str(os.getpid()))

        with log.open("ab") as fh:
            proc = subprocess.Popen(netns.ns_argv(ns, argv), stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.STDOUT,
                                    env=dict(env) if env is not None else None,
                                    start_new_session=True, preexec_fn=enter_cgroup)
        p = Process(role, proc.pid, ns, str(log), list(argv))
        self._popen[proc.pid] = proc
        self.processes.append(p)
        self.save()
        return p

    def stop(self, role: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the process(es) of ``role`` and wait until they are gone."""
        for p in [p for p in self.processes if p.role == role]:
            self._stop_pid(p.pid, sig, timeout)
            self.processes.remove(p)
        self.save()

    def _stop_pid(self, pid: int, sig: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        popen = self._popen.pop(pid, None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if popen is not None:
                if popen.poll() is not None:
                    return
            elif not netns.pid_alive(pid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)

    def process(self, role: str) -> Process:
        for p in self.processes:
            if p.role == role:
                return p
        raise ClusterError(f"no process {role!r} in this cluster")

    def alive(self, role: str) -> bool:
        try:
            p = self.process(role)
        except ClusterError:
            return False
        popen = self._popen.get(p.pid)
        return popen.poll() is None if popen is not None else netns.pid_alive(p.pid)

    def log_tail(self, role: str, lines: int = 15) -> str:
        try:
            return mesh.log_tail(Path(self.process(role).log), lines)
        except ClusterError:
            return "(no such process)"

    def _wait_http(self, role: str, ns: str, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive(role):
                raise ClusterError(f"{role} exited during startup; log:\n{self.log_tail(role)}")
            status, body = mesh.http_get(ns, url, timeout=2.0)
            if status == 200:
                return
            last = f"{status} {body.strip()[:200]}"
            time.sleep(0.2)
        raise ClusterError(f"{role} not ready after {timeout:g}s (last: {last}); log:\n"
                           f"{self.log_tail(role)}")

    # --- registry --------------------------------------------------------------------------

    def apply(self, documents: Sequence[Mapping[str, Any]]) -> None:
        """Write documents to the embedded registry, as ``ambit apply`` would."""
        from controller.registry.sqlite import EmbeddedRegistry

        with EmbeddedRegistry(self.db) as registry:
            registry.apply(list(documents))

    def delete(self, kind: str, namespace: str, name: str, missing_ok: bool = False) -> None:
        from controller.registry.sqlite import EmbeddedRegistry, NotFoundError

        with EmbeddedRegistry(self.db) as registry:
            try:
                registry.delete(kind, namespace, name)
            except NotFoundError:
                if not missing_ok:
                    raise

    def set_namespace(self, name: str, ambient: bool,
                      labels: Mapping[str, str] | None = None) -> None:
        all_labels = dict(labels or {})
        if ambient:
            all_labels["ambit.dev/dataplane-mode"] = "ambient"
        self.apply([{"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": name, "labels": all_labels}}])

    def _workload_doc(self, pod: PodInfo, addresses: Sequence[str]) -> dict[str, Any]:
        return {"apiVersion": "ambit.dev/v1", "kind": "Workload",
                "metadata": {"name": pod.name, "namespace": pod.namespace,
                             "labels": dict(pod.labels)},
                "spec": {"serviceAccount": pod.service_account, "node": pod.node,
                         "addresses": list(addresses)}}

    def set_pod_labels(self, name: str, labels: Mapping[str, str]) -> None:
        pod = self.pod(name)
        pod.labels = dict(labels)
        self.apply([self._workload_doc(pod, [pod.ip])])
        self.save()

    # --- up --------------------------------------------------------------------------------

    def _ambit(self, *args: str) -> list[str]:
        return [*mesh.ambit_command(), *args]

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

    def _start_controller(self, timeout: float) -> None:
        self.controller_dir.mkdir(parents=True, exist_ok=True)
        self.spawn("controller", self.cp_ns, self._ambit(
            "controller", "--mode", "embedded", "--db", str(self.db),
            "--data-dir", str(self.controller_dir), "--serving-ip", CONTROL_PLANE_IP,
            "--grpc-port", str(GRPC_PORT), "--monitoring-port",
            str(CONTROLLER_MONITORING_PORT)))
        self._wait_http("controller", self.cp_ns,
                        f"http://127.0.0.1:{CONTROLLER_MONITORING_PORT}/ready", timeout)

    def _plugin_dir(self) -> Path:
        return self.dir / "cni-bin"

    def _prepare_node(self, node: NodeInfo) -> None:
        from controller.registry.sqlite import EmbeddedRegistry

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
        with EmbeddedRegistry(self.db) as registry:
            (run_dir / "node.token").write_text(registry.issue_node_token(node.name))
        (run_dir / "node.token").chmod(0o600)

    def _mount_bpffs(self) -> None:
        self.bpffs.mkdir(parents=True, exist_ok=True)
        ensure_bpffs(self.bpffs)

    def runner(self, node: NodeInfo) -> CniRunner:
        run_dir = Path(node.run_dir)
        conflist = json.loads((run_dir / "10-ambit.conflist").read_text())
        return CniRunner(conflist, [self._plugin_dir()], node.netns, run_dir / "cni-cache")

    def start_node(self, node: NodeInfo, timeout: float = 60.0) -> None:
        self.start_ztunnel(node, timeout)
        self.start_agent(node, timeout)

    def start_ztunnel(self, node: NodeInfo, timeout: float = 60.0) -> None:
        run_dir = Path(node.run_dir)
        role = f"ztunnel/{node.name}"
        self.spawn(role, node.netns, self._ambit(
            "ztunnel", "--node", node.name, "--controller", self.controller_address,
            "--node-token-file", str(run_dir / "node.token"),
            "--ca-root-cert", str(self.trust_bundle), "--inbound-bind", "shared",
            "--agent-socket", str(run_dir / "ztunnel.sock"),
            "--access-log", str(run_dir / "access.jsonl")))
        self._wait_http(role, node.netns,
                        f"http://127.0.0.1:{ZTUNNEL_READY_PORT}/healthz/ready", timeout)

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

    def restart_agent(self, node: NodeInfo, timeout: float = 60.0) -> None:
        self.stop(f"agent/{node.name}")
        self.start_agent(node, timeout)

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

    # --- pods ------------------------------------------------------------------------------

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

    # --- waypoints -------------------------------------------------------------------------

    def waypoint_run_dir(self, name: str, namespace: str = "default") -> Path:
        """The waypoint agent's directory. Short and outside ``self.dir`` (which may be
        deep, e.g. under pytest's tmp) because it holds a unix socket (108-byte limit)."""
        return WAYPOINT_RUN_ROOT / f"{self.name}-{namespace}-{name}"

    @staticmethod
    def waypoint_pod(name: str, namespace: str = "default") -> str:
        """The waypoint's pod name (pods are named cluster-wide here)."""
        return f"{name}-wp" if namespace == "default" else f"{namespace}-{name}-wp"

    def add_waypoint(self, name: str, namespace: str = "default",
                     node_ref: str | int | None = None, waypoint_for: str = "service",
                     timeout: float = 60.0) -> PodInfo:
        """Declare a waypoint (a Gateway of class ambit-waypoint) and run it, as Kubernetes'
        Gateway controller and kubelet would: a pod labelled with the gateway's name (never
        captured), running ``ambit waypoint run`` (certificate from the CA, then Envoy
        configured by the controller over xDS). Ready when Envoy has its listeners."""
        from controller.waypoint.model import WAYPOINT_CLASS
        from mesh.ports import GATEWAY_NAME_LABEL

        node = self.node(node_ref) if node_ref is not None else min(
            self.nodes, key=lambda n: sum(1 for p in self.pods.values() if p.node == n.name))
        self.apply([{
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"ambit.dev/waypoint-for": waypoint_for}},
            "spec": {"gatewayClassName": WAYPOINT_CLASS,
                     "listeners": [HBONE_LISTENER]},
        }])
        pod_name = self.waypoint_pod(name, namespace)
        pod = self.add_pod(pod_name, node.name, namespace=namespace, service_account=name,
                           labels={GATEWAY_NAME_LABEL: name, "app": name})
        run_dir = self.waypoint_run_dir(name, namespace)
        run_dir.mkdir(parents=True, exist_ok=True)
        role = f"pod/{pod_name}/waypoint"
        self.spawn(role, pod.netns, self._ambit(
            "waypoint", "run", "--namespace", namespace, "--gateway", name,
            "--pod-name", pod_name, "--pod-ip", pod.ip, "--service-account", name,
            "--controller", f"{CONTROL_PLANE_IP}:{XDS_PORT}",
            "--ca-address", self.controller_address,
            "--token-file", str(Path(node.run_dir) / "node.token"),
            "--ca-root-cert", str(self.trust_bundle), "--run-dir", str(run_dir)),
            cgroup=Path(pod.cgroup))
        self._wait_http(role, pod.netns, "http://127.0.0.1:15021/healthz/ready", timeout)
        self.save()
        return pod

    def delete_waypoint(self, name: str, namespace: str = "default") -> None:
        pod_name = self.waypoint_pod(name, namespace)
        if pod_name in self.pods:
            self.delete_pod(pod_name)
        with contextlib.suppress(Exception):
            self.delete("Gateway", namespace, name)
        shutil.rmtree(self.waypoint_run_dir(name, namespace), ignore_errors=True)

    def waypoint_metrics(self, name: str, namespace: str = "default") -> str:
        pod = self.pod(self.waypoint_pod(name, namespace))
        status, body = mesh.http_get(pod.netns, "http://127.0.0.1:15020/metrics")
        if status != 200:
            raise ClusterError(f"waypoint {namespace}/{name} metrics: {status} {body[:200]}")
        return body

    def restart_controller(self, timeout: float = 60.0) -> None:
        self.stop("controller")
        self._start_controller(timeout)

    # --- down ------------------------------------------------------------------------------

    def down(self, quiet: bool = False) -> None:
        """Remove everything ``up`` created; safe to run on a half-built cluster."""
        say = (lambda _line: None) if quiet else self.out
        for name in list(self.pods):
            try:
                self.delete_pod(name)
            except Exception as e:  # keep going: the rest must still be removed
                say(f"    pod {name}: {e}")
        for p in list(self.processes):
            self._stop_pid(p.pid, signal.SIGTERM, 10)
        self.processes = []
        for node in self.nodes:
            if netns.netns_exists(node.netns):
                try:
                    netns.ns_run(node.netns, self._ambit(
                        "agent", "uninstall", "--run-dir", node.run_dir, "--bpf-dir",
                        node.bpf_dir, "--uplink", "eth0"), timeout=60)
                except netns.NetnsError as e:
                    say(f"    {node.name}: agent uninstall: {e}")
        for ns in [n for n in netns.list_netns() if n.startswith(self.prefix)]:
            netns.delete_netns(ns)
        if is_bpffs(self.bpffs):
            with contextlib.suppress(netns.NetnsError):
                netns.run(["umount", str(self.bpffs)])
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
        shutil.rmtree(self.dir, ignore_errors=True)
        for wp_dir in WAYPOINT_RUN_ROOT.glob(f"{self.name}-*"):
            shutil.rmtree(wp_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            WAYPOINT_RUN_ROOT.rmdir()  # only when no other cluster has waypoints
        say(f"cluster {self.name!r} removed")

    # --- status ----------------------------------------------------------------------------

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

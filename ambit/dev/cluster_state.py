"""What one dev cluster is: its names, paths, nodes, pods and processes, and its state file.

Why it exists: every part of ``DevCluster`` (processes, registry, network, nodes, pods,
waypoints, status) reads the same record, and ``down`` and ``status`` run in another process
than ``up``, so the record is saved to ``cluster.json`` after each change. Keeping it here,
apart from the code that acts on it, lets each part's module start from one small base class
(``ClusterState``) instead of from the whole cluster.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

from mesh.files import write_atomic
from mesh.ports import GRPC_PORT

STATE_ROOT = Path("/var/run/ambit-dev")
NS_PREFIX = "ambd-"
CONTROL_PLANE_IP = "10.100.0.254"
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


class ClusterState:
    """The cluster's record and paths; the base every part of ``DevCluster`` builds on."""

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
        # Handles of the processes this Python process started (``processes`` also lists
        # those a cluster loaded from its state file started, known only by pid).
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
    def load(cls, name: str = "dev", root: Path = STATE_ROOT, out: Out = _print) -> Self:
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

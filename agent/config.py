"""The node agent's settings, validated once at startup (``ambit agent run`` flags).

Why a config object: like the ztunnel's (``ztunnel/config.py``), every setting has one typed home
and ``validate()`` rejects a bad combination with a message naming the flag and the fix, before
anything on the node is touched.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from agent.capture.base import MODE_EBPF, MODE_IPTABLES

MODE_AUTO = "auto"
REDIRECT_MODES = (MODE_AUTO, MODE_EBPF, MODE_IPTABLES)
NODE_METRICS_PORT = 15022
DEFAULT_RUN_DIR = Path("/var/run/ambit")
DEFAULT_BPF_DIR = Path("/sys/fs/bpf/ambit")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class AgentConfigError(ValueError):
    """A flag value that cannot work; the message names the flag."""


@dataclass(frozen=True)
class AgentConfig:
    node: str
    controller_address: str
    node_token_file: Path | None = None
    ca_root_cert: Path | None = None
    redirect_mode: str = MODE_AUTO
    run_dir: Path = DEFAULT_RUN_DIR
    bpf_dir: Path = DEFAULT_BPF_DIR
    uplinks: tuple[str, ...] = ("eth0",)
    exclude_cidrs: tuple[str, ...] = ()
    metrics_host: str = "0.0.0.0"
    metrics_port: int = NODE_METRICS_PORT
    ztunnel_metrics_url: str = "http://127.0.0.1:15020/metrics"
    membership_timeout: float = 5.0
    resync_interval: float = 10.0
    log_level: str = "info"

    @property
    def cni_socket(self) -> Path:
        """Where ``ambit-cni`` reaches the agent (the CNI config's ``agentSocket``)."""
        return self.run_dir / "cni.sock"

    @property
    def ztunnel_socket(self) -> Path:
        """Where the node's ztunnel hands over its listening sockets (eBPF mode)."""
        return self.run_dir / "ztunnel.sock"

    @property
    def pods_file(self) -> Path:
        """The agent's record of the node's pods, so a restarted agent knows them."""
        return self.run_dir / "pods.json"

    def validate(self) -> AgentConfig:
        if not self.node:
            raise AgentConfigError("--node: required (the node name, as the registry knows it)")
        if not self.controller_address:
            raise AgentConfigError("--controller: required (HOST:PORT of the controller's gRPC "
                                   "port, 15012)")
        if self.redirect_mode not in REDIRECT_MODES:
            raise AgentConfigError(f"--redirect-mode: {self.redirect_mode!r} is not one of "
                                   f"{', '.join(REDIRECT_MODES)}")
        for iface in self.uplinks:
            if not _IFNAME.match(iface):
                raise AgentConfigError(f"--uplink: {iface!r} is not an interface name")
        for cidr in self.exclude_cidrs:
            try:
                net = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise AgentConfigError(f"--exclude-cidr: {cidr!r} is not a CIDR "
                                       "(e.g. 169.254.0.0/16)") from None
            if net.version != 4:
                raise AgentConfigError(f"--exclude-cidr: {cidr}: capture is IPv4 only")
        if not 0 <= self.metrics_port <= 65535:
            raise AgentConfigError(f"--metrics-port: {self.metrics_port} is not a port")
        for name, path in (("--node-token-file", self.node_token_file),
                           ("--ca-root-cert", self.ca_root_cert)):
            if path is not None and not path.is_file():
                raise AgentConfigError(f"{name}: {path} does not exist or is not a file")
        if self.membership_timeout <= 0 or self.resync_interval <= 0:
            raise AgentConfigError("timeouts and intervals must be positive")
        return self

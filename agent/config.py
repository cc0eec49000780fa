"""The node agent's settings, validated once at startup (``ambit agent run`` flags).

Why a config object: like the ztunnel's (``ztunnel/config.py``), every setting has one typed home
and ``validate()`` rejects a bad combination with a message naming the flag and the fix, before
anything on the node is touched.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.capture.base import MODE_EBPF, MODE_INPOD, MODE_IPTABLES
from agent.uplinks import AUTO as UPLINKS_AUTO
from agent.ztunnel_link import DEFAULT_HOLD_SECONDS, PEER_CHECK_CMDLINE, PEER_CHECKS
from mesh.ports import METRICS_PORT, NODE_METRICS_PORT

# The node's ztunnel shares the node's network namespace (hostNetwork), so loopback reaches it.
ZTUNNEL_METRICS_URL = f"http://127.0.0.1:{METRICS_PORT}/metrics"
MODE_AUTO = "auto"
REDIRECT_MODES = (MODE_AUTO, MODE_EBPF, MODE_IPTABLES, MODE_INPOD)
DEFAULT_RUN_DIR = Path("/var/run/ambit")
DEFAULT_BPF_DIR = Path("/sys/fs/bpf/ambit")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class AgentConfigError(ValueError):
    """A flag value that cannot work; the message names the flag."""


def parse_uplinks(values: Sequence[str], default: tuple[str, ...] = ("eth0",)) -> tuple[str, ...]:
    """``--uplink`` values (repeatable, each a comma-separated list) as one tuple of names
    and/or ``auto``; ``default`` when none is given."""
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip()
            if not name:
                raise AgentConfigError(f"--uplink: {value!r} has an empty name; give names "
                                       "separated by commas (e.g. eth0,eth1) or auto")
            out.append(name)
    return tuple(dict.fromkeys(out)) or default


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
    ztunnel_metrics_url: str = ZTUNNEL_METRICS_URL
    membership_timeout: float = 5.0
    # Pod start: how long CNI ADD of a mesh pod waits for the node's ztunnel to take its
    # workload (agent/app.py ``_hand_to_ztunnel``). With ``membership_timeout`` it stays under
    # the plugin's default timeoutSeconds (10), so ADD fails with the agent's reason rather
    # than the plugin's timeout.
    ztunnel_handoff_timeout: float = 4.0
    # How long the agent keeps the capture listeners once no ztunnel is linked, for the next
    # ztunnel to take over (``--listener-hold``, agent/ztunnel_link.py).
    listener_hold: float = DEFAULT_HOLD_SECONDS
    resync_interval: float = 10.0
    log_level: str = "info"
    # The host's CNI directories as mounted in the pod, and the plugin binary to keep
    # installed there (``--cni-bin-dir``, ``--cni-conf-dir``, ``--binary``).
    cni_bin_dir: Path | None = None
    cni_conf_dir: Path | None = None
    cni_binary: Path | None = None
    # ``--daemonset``: on SIGTERM, remove everything if this DaemonSet is being deleted.
    daemonset: str | None = None
    daemonset_namespace: str = ""
    # Who may use the agent's sockets besides root and the agent's own user
    # (``--socket-uid``), and how the ztunnel link tells the ztunnel from other processes
    # (``--ztunnel-peer-check``, agent/ztunnel_link.py).
    socket_uids: tuple[int, ...] = ()
    ztunnel_peer_check: str = PEER_CHECK_CMDLINE

    @property
    def uplinks_auto(self) -> bool:
        """``--uplink auto``: the agent finds the uplinks itself, on every resync."""
        return UPLINKS_AUTO in self.uplinks

    @property
    def manages_cni(self) -> bool:
        """The agent knows the CNI directories (to keep or to remove the chain)."""
        return self.cni_bin_dir is not None and self.cni_conf_dir is not None

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
                raise AgentConfigError(f"--uplink: {iface!r} is not an interface name (or "
                                       f"{UPLINKS_AUTO})")
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
        if self.membership_timeout <= 0 or self.resync_interval <= 0 or \
                self.ztunnel_handoff_timeout <= 0:
            raise AgentConfigError("timeouts and intervals must be positive")
        if not 0 <= self.listener_hold <= 3600:
            raise AgentConfigError(f"--listener-hold: {self.listener_hold:g} is not between 0 "
                                   "and 3600 seconds")
        if (self.cni_bin_dir is None) != (self.cni_conf_dir is None):
            raise AgentConfigError("--cni-bin-dir and --cni-conf-dir go together (the host's "
                                   "/opt/cni/bin and /etc/cni/net.d as mounted in the pod)")
        if self.cni_binary is not None:
            if not self.manages_cni:
                raise AgentConfigError("--binary: needs --cni-bin-dir and --cni-conf-dir (where "
                                       "to keep the plugin installed and chained)")
            if not self.cni_binary.is_file():
                raise AgentConfigError(f"--binary: {self.cni_binary} does not exist or is not "
                                       "a file (the image ships /opt/ambit/cni/ambit-cni)")
        for name, path in (("--cni-bin-dir", self.cni_bin_dir),
                           ("--cni-conf-dir", self.cni_conf_dir)):
            if path is not None and not path.is_dir():
                raise AgentConfigError(f"{name}: {path} is not a directory (mount the host's "
                                       "CNI directory there)")
        if self.daemonset is not None:
            if not _DNS_NAME.match(self.daemonset):
                raise AgentConfigError(f"--daemonset: {self.daemonset!r} is not a DaemonSet "
                                       "name")
            if not _DNS_NAME.match(self.daemonset_namespace):
                raise AgentConfigError("--daemonset: the namespace comes from $POD_NAMESPACE "
                                       "(downward API, metadata.namespace), which is "
                                       f"{self.daemonset_namespace!r}")
        for uid in self.socket_uids:
            if not 0 <= uid < 2**32 - 1:
                raise AgentConfigError(f"--socket-uid: {uid} is not a uid")
        if self.ztunnel_peer_check not in PEER_CHECKS:
            raise AgentConfigError(f"--ztunnel-peer-check: {self.ztunnel_peer_check!r} is not "
                                   f"one of {', '.join(PEER_CHECKS)}")
        return self

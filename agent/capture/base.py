"""What every capture backend (eBPF, iptables) offers the node agent, and the shared records.

Why it exists: the agent decides *which* pods are captured (CNI ADD/DEL plus reconcile from the
registry); a backend only knows *how*. Keeping that seam narrow lets the e2e suite run the same
scenarios against both redirect modes and lets the reconcile logic be tested without a kernel.

Semantics both backends implement (docs/architecture.md, "Capture"):

* outbound: a new TCP connection *from* an enrolled pod (entering the node on the pod's
  host-side interface) is delivered to the ztunnel's outbound listener (15001) with its
  original destination preserved (TPROXY semantics: ``getsockname()`` of the accepted socket is
  the address the pod dialled);
* inbound: a new TCP connection *to* an enrolled pod's IP arriving from anywhere but the node
  itself goes to the HBONE listener when its destination port is the HBONE port, else to the
  plaintext inbound listener (``mesh.ports``);
* packets of sockets that already exist on the node go to them; connections that existed before
  a pod was enrolled are left alone; the node's own traffic (kubelet probes, the ztunnel's own
  connections) is never captured.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Names of the ztunnel listeners a backend steers to; the eBPF backend keys its SOCKMAP by
# ``LISTENER_SLOTS[name]``.
LISTENER_OUTBOUND = "outbound"
LISTENER_INBOUND = "inbound"
LISTENER_INBOUND_PLAINTEXT = "inbound_plaintext"
LISTENER_SLOTS = {LISTENER_OUTBOUND: 0, LISTENER_INBOUND: 1, LISTENER_INBOUND_PLAINTEXT: 2}

MODE_EBPF = "ebpf"
MODE_IPTABLES = "iptables"
MODE_INPOD = "inpod"  # rules inside each pod's network namespace (agent/capture/inpod.py)


class CaptureError(RuntimeError):
    """A backend could not apply or remove capture; the message names what and how to fix it."""


@dataclass(frozen=True)
class PodCapture:
    """One local pod as capture sees it.

    ``uid`` is ``namespace/name``; ``ips`` are its IPv4 addresses; ``host_iface`` is the
    node-side end of its veth (where its packets enter the node); ``netns`` is informational
    (the pod's network namespace path, for ``ambit status``).
    """

    uid: str
    ips: tuple[str, ...]
    host_iface: str
    netns: str = ""

    def __post_init__(self) -> None:
        for ip in self.ips:
            if ipaddress.ip_address(ip).version != 4:
                raise CaptureError(f"pod {self.uid}: {ip} is not IPv4; capture is IPv4 only")


@dataclass(frozen=True)
class PodCounters:
    """Per-pod capture counters, exported as ``ambit_capture_*_total{pod=...}``.

    ``captured``: new connections steered to a ztunnel listener; ``passed``: packets of the
    pod seen by capture and left alone (non-TCP, excluded destinations, connections older than
    the enrollment); ``errors``: connections that could not be steered (no ztunnel listener,
    assign failed) and were dropped, since capture fails closed.
    """

    captured: int = 0
    passed: int = 0
    errors: int = 0


@dataclass
class BackendStatus:
    """What ``ambit agent status`` and the agent's /debug endpoint show for a backend."""

    mode: str
    detail: Mapping[str, str] = field(default_factory=dict)


class CaptureBackend(Protocol):
    """A redirect mode. All methods are idempotent and synchronous (called off the loop)."""

    mode: str

    def setup(self) -> None:
        """Node-level pieces: policy routing, programs on the uplink, pinned maps."""

    def watch_interface(self, pod: PodCapture) -> None:
        """A local pod exists (enrolled or not): same-node traffic *to* enrolled pods from it
        must be seen (the eBPF backend attaches its pod program to every local pod's veth)."""

    def enroll(self, pod: PodCapture) -> None:
        """Capture ``pod``'s traffic from now on."""

    def unenroll(self, pod: PodCapture) -> None:
        """Stop capturing ``pod`` (existing captured connections keep working)."""

    def forget_interface(self, pod: PodCapture) -> None:
        """The pod is gone (CNI DEL): drop whatever was attached to its interface."""

    def enrolled(self) -> set[str]:
        """Pod IPs the kernel captures right now, read back from kernel state (pinned maps,
        rules), so a restarted agent sees what its predecessor left."""

    def set_listeners(self, fds: Mapping[str, int]) -> None:
        """The ztunnel's listening sockets by ``LISTENER_*`` name (eBPF steers into them;
        iptables mode finds them by port and ignores this)."""

    def counters(self) -> dict[str, PodCounters]:
        """Per pod IP counters."""

    def status(self) -> BackendStatus: ...

    def uninstall(self) -> None:
        """Remove every program, pinned object, rule and route this backend created."""

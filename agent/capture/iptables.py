"""TPROXY capture rules for one node, as pure text: iptables-restore input plus `ip` commands.

Why it exists: in node (shared) mode the ztunnel listens on its capture ports (``mesh.ports``)
in the node's network namespace and the kernel must steer enrolled pods' TCP into those
listeners without rewriting addresses, so the ztunnel can read the original destination from
the accepted socket. That is TPROXY plus policy routing. Rendering the rules is kept free of
I/O so the exact rule set is unit-tested; whoever owns the node namespace (the dev topology
today, the node agent later) applies it with ``iptables-restore`` and ``ip``.

The rule set lives in two chains of our own in the ``mangle`` table, reached by one jump from
``PREROUTING``. It is applied with ``iptables-restore --noflush``, which replaces our chains'
contents and leaves every other rule of the node (kube-proxy's, the CNI's) alone; after that,
enrolling or removing a pod applies only that pod's rules (``render_update``: ``-D``/``-I``/``-A``
lines), so the cost of a change does not grow with the pods the node captures:

1. Packets carrying the ztunnel's socket mark (``SO_MARK`` ``ZTUNNEL_SOCKET_MARK`` on every
   socket it opens) are left alone, so the proxy's own connections can never be captured back
   into itself.
2. ``-m socket``: a packet belonging to a socket that already exists here (a reply to one of
   the ztunnel's connections, or a later segment of an already-captured connection) is marked
   and delivered to it. Without this, TPROXY would look those packets up as new connections.
3. TCP entering from an enrolled pod's veth goes to the outbound listener (15001).
4. TCP for an enrolled pod's IP arriving from anywhere else goes to the HBONE listener if it
   is HBONE (destination port ``HBONE_PORT``), else to the plaintext inbound listener (15006).

TPROXY marks what it captures; ``ip rule fwmark MARK lookup TABLE`` with ``local 0.0.0.0/0
dev lo`` in that table makes the kernel deliver those packets locally even though their
destination address is not one of the node's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.ports import HBONE_PORT as INBOUND_HBONE_PORT
from mesh.ports import (
    INBOUND_PLAINTEXT_PORT,
    MARK_MASK,
    OUTBOUND_PORT,
    TPROXY_MARK,
    ZTUNNEL_SOCKET_MARK,
)

ROUTE_TABLE = 100
RULE_PRIORITY = 100

CHAIN = "AMBIT_PREROUTING"
DIVERT_CHAIN = "AMBIT_DIVERT"
# The one rule outside our chains (``iptables -t mangle`` without -I/-C/-D).
JUMP = ("PREROUTING", "-p", "tcp", "-j", CHAIN)

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_RESERVED_TABLES = {0, 253, 254, 255}  # unspec, default, main, local


class CaptureConfigError(ValueError):
    """The capture settings cannot produce a correct rule set; the message says why."""


@dataclass(frozen=True)
class CaptureRules:
    """What to apply inside the node namespace.

    ``iptables_restore`` is input for ``iptables-restore --noflush``: it declares (so flushes)
    and fills only Ambit's chains, so re-applying after enrolling another pod is idempotent.
    ``jump`` is the ``iptables -t mangle`` rule (without ``-I``/``-C``/``-D``) that sends
    PREROUTING TCP into them; insert it once if ``-C`` says it is missing. ``ip_commands`` are
    argument lists for ``ip`` (policy routing).
    """

    iptables_restore: str
    jump: tuple[str, ...]
    ip_commands: tuple[tuple[str, ...], ...]


def _ipv4(text: str) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise CaptureConfigError(f"pod IP {text!r} is not an IP address") from None
    if addr.version != 4:
        raise CaptureConfigError(f"pod IP {text}: only IPv4 capture is supported (no ip6tables)")
    return str(addr)


def _ifname(text: str) -> str:
    if not _IFNAME.match(text):
        raise CaptureConfigError(
            f"pod interface {text!r} is not an interface name (1-15 of [A-Za-z0-9_.-])"
        )
    return text


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))  # keeps order, so the output is deterministic


@dataclass(frozen=True)
class _Settings:
    outbound_port: int
    inbound_plaintext_port: int
    inbound_port: int
    socket_mark: int
    tproxy_mark: int
    mark_mask: int

    @property
    def mark(self) -> str:
        return f"{self.tproxy_mark:#x}/{self.mark_mask:#x}"

    def check(self) -> None:
        ports = {
            "outbound_port": self.outbound_port,
            "inbound_plaintext_port": self.inbound_plaintext_port,
            "inbound_port": self.inbound_port,
        }
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise CaptureConfigError(f"{name}: {port} is not a TCP port (1-65535)")
        if len(set(ports.values())) != len(ports):
            raise CaptureConfigError(f"capture ports must differ, got {ports}")
        mark_mask, tproxy_mark, socket_mark = self.mark_mask, self.tproxy_mark, self.socket_mark
        if not 0 < mark_mask <= 0xFFFFFFFF:
            raise CaptureConfigError(f"mark_mask: {mark_mask:#x} must be a non-zero 32-bit mask")
        if tproxy_mark == 0 or tproxy_mark & ~mark_mask:
            raise CaptureConfigError(
                f"tproxy_mark: {tproxy_mark:#x} must be non-zero and inside mark_mask "
                f"{mark_mask:#x}"
            )
        if socket_mark & mark_mask in (0, tproxy_mark):
            raise CaptureConfigError(
                f"socket_mark: {socket_mark:#x} must be non-zero and differ from tproxy_mark "
                f"{tproxy_mark:#x} under mark_mask {mark_mask:#x}, or the proxy's own packets "
                "would be captured"
            )

    def outbound(self, iface: str) -> str:
        """The rule (without ``-A CHAIN``) steering TCP entering from ``iface``."""
        return (f"-i {iface} -p tcp -j TPROXY --on-port {self.outbound_port} "
                f"--tproxy-mark {self.mark}")

    def inbound(self, ip: str) -> tuple[str, str]:
        """The two rules (without ``-A CHAIN``) for TCP to ``ip``: HBONE first, then the rest."""
        return (
            f"-d {ip}/32 -p tcp -m tcp --dport {self.inbound_port} "
            f"-j TPROXY --on-port {self.inbound_port} --tproxy-mark {self.mark}",
            f"-d {ip}/32 -p tcp "
            f"-j TPROXY --on-port {self.inbound_plaintext_port} --tproxy-mark {self.mark}",
        )


# The rules before any pod's in CHAIN (the ztunnel's own packets, existing sockets): pods'
# outbound rules are inserted right after them, so they always precede every inbound rule.
BASE_RULES = 2
OUTBOUND_POSITION = BASE_RULES + 1


def render_capture(
    pod_ifaces: Iterable[str],
    pod_ips: Iterable[str],
    *,
    outbound_port: int = OUTBOUND_PORT,
    inbound_plaintext_port: int = INBOUND_PLAINTEXT_PORT,
    inbound_port: int = INBOUND_HBONE_PORT,
    socket_mark: int = ZTUNNEL_SOCKET_MARK,
    tproxy_mark: int = TPROXY_MARK,
    mark_mask: int = MARK_MASK,
    table: int = ROUTE_TABLE,
    rule_priority: int = RULE_PRIORITY,
) -> CaptureRules:
    """Render the capture of the enrolled pods of one node.

    ``pod_ifaces`` are the node-side veth names of the enrolled pods (their outbound traffic
    enters the node there); ``pod_ips`` are their addresses (inbound traffic is addressed to
    them). Either may be empty.
    """
    ifaces = _unique(_ifname(i) for i in pod_ifaces)
    ips = _unique(_ipv4(a) for a in pod_ips)
    cfg = _Settings(outbound_port, inbound_plaintext_port, inbound_port, socket_mark,
                    tproxy_mark, mark_mask)
    cfg.check()
    if not 0 < table < 2**32 or table in _RESERVED_TABLES:
        raise CaptureConfigError(
            f"table: {table} must be a routing table id other than 0, 253, 254, 255"
        )
    if not 0 < rule_priority < 32766:
        raise CaptureConfigError(
            f"rule_priority: {rule_priority} must be in 1-32765 (before the main table)"
        )

    mark = cfg.mark
    lines = [
        "# Ambit TPROXY capture (agent/capture/iptables.py); for iptables-restore --noflush.",
        "*mangle",
        f":{CHAIN} - [0:0]",
        f":{DIVERT_CHAIN} - [0:0]",
        f"-A {DIVERT_CHAIN} -j MARK --set-xmark {mark}",
        f"-A {DIVERT_CHAIN} -j ACCEPT",
        "# The ztunnel's own connections (SO_MARK) are never captured.",
        f"-A {CHAIN} -m mark --mark {socket_mark:#x}/{mark_mask:#x} -j RETURN",
        "# Packets of sockets that already exist here go straight to them.",
        f"-A {CHAIN} -p tcp -m socket -j {DIVERT_CHAIN}",
    ]
    if ifaces:
        lines.append("# Outbound: TCP leaving enrolled pods.")
    for iface in ifaces:
        lines.append(f"-A {CHAIN} {cfg.outbound(iface)}")
    if ips:
        lines.append("# Inbound: TCP to enrolled pods, HBONE on its port, everything else plain.")
    for ip in ips:
        lines += [f"-A {CHAIN} {rule}" for rule in cfg.inbound(ip)]
    lines += ["COMMIT", ""]
    ip_commands = (
        ("rule", "add", "priority", str(rule_priority), "fwmark", mark, "lookup", str(table)),
        ("route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(table)),
    )
    return CaptureRules("\n".join(lines), JUMP, ip_commands)


def render_update(
    add_ifaces: Iterable[str] = (),
    add_ips: Iterable[str] = (),
    del_ifaces: Iterable[str] = (),
    del_ips: Iterable[str] = (),
    *,
    outbound_port: int = OUTBOUND_PORT,
    inbound_plaintext_port: int = INBOUND_PLAINTEXT_PORT,
    inbound_port: int = INBOUND_HBONE_PORT,
    socket_mark: int = ZTUNNEL_SOCKET_MARK,
    tproxy_mark: int = TPROXY_MARK,
    mark_mask: int = MARK_MASK,
) -> str:
    """``iptables-restore --noflush`` input that changes only the given pods' rules in a chain
    ``render_capture`` set up: deletions (``-D``) first, then additions; "" if there is nothing
    to change. Its size depends on the pods changed, never on how many the node captures.

    An outbound rule is inserted right after the base rules (``-I CHAIN 3``) and inbound rules
    are appended, so every outbound rule still precedes every inbound one (a packet from one
    enrolled pod to another is the sender's outbound connection), and each address's HBONE
    rule precedes its plaintext rule, as in the full render. Applied together with the full
    render of the pods before the change, the chain holds the full render of the pods after
    it, up to the order of pods within the outbound and within the inbound rules (they never
    overlap: one interface or one address each). Every ``-D`` must name a rule that is there
    (else ``iptables-restore`` refuses the whole input and nothing changes).
    """
    cfg = _Settings(outbound_port, inbound_plaintext_port, inbound_port, socket_mark,
                    tproxy_mark, mark_mask)
    cfg.check()
    lines: list[str] = []
    for iface in _unique(_ifname(i) for i in del_ifaces):
        lines.append(f"-D {CHAIN} {cfg.outbound(iface)}")
    for ip in _unique(_ipv4(a) for a in del_ips):
        lines += [f"-D {CHAIN} {rule}" for rule in cfg.inbound(ip)]
    for iface in _unique(_ifname(i) for i in add_ifaces):
        lines.append(f"-I {CHAIN} {OUTBOUND_POSITION} {cfg.outbound(iface)}")
    for ip in _unique(_ipv4(a) for a in add_ips):
        lines += [f"-A {CHAIN} {rule}" for rule in cfg.inbound(ip)]
    if not lines:
        return ""
    return "\n".join(["*mangle", *lines, "COMMIT", ""])

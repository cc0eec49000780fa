"""The iptables redirect mode: TPROXY rules and policy routing, applied in the node namespace.

Why it exists: where eBPF cannot be used (no BTF or kernel headers, no CAP_BPF, an old kernel)
the agent still captures with the same semantics (``agent/capture/base.py``). The rules are
rendered by the pure ``render_capture`` and applied with ``iptables-restore --noflush``, which
rewrites only Ambit's chains; the node's other rules are never touched.

What is *not* the same as eBPF mode: per-pod counters here come from the TPROXY rules' packet
counters, which count the packets steered to a listener (in practice the first SYN of each
connection, since later packets match the ``-m socket`` rule); packets passed and drops are not
counted, so ``passed`` and ``errors`` stay 0.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Mapping, Sequence

from agent.capture import policy_routing
from agent.capture.base import (
    MODE_IPTABLES,
    BackendStatus,
    CaptureError,
    PodCapture,
    PodCounters,
)
from agent.capture.iptables import CHAIN, DIVERT_CHAIN, JUMP, render_capture

log = logging.getLogger("agent.capture.iptables")

_COUNTED_RULE = re.compile(r"^\[(\d+):\d+\] -A " + CHAIN + r" (?P<rule>.*-j TPROXY.*)$")
_BY_IFACE = re.compile(r"-i (\S+) ")
_BY_DEST = re.compile(r"-d (\d+\.\d+\.\d+\.\d+)/32 ")


def _run(argv: Sequence[str], input: str | None = None) -> str:
    try:
        res = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                             timeout=30, check=False)
    except FileNotFoundError:
        raise CaptureError(f"{argv[0]} is not installed; install iptables (Debian: "
                           "apt-get install iptables) or use --redirect-mode ebpf") from None
    if res.returncode != 0:
        raise CaptureError(f"`{' '.join(argv)}` failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout


def parse_saved(text: str) -> tuple[dict[str, str], dict[str, int], dict[str, int]]:
    """From ``iptables-save -c -t mangle``: (enrolled pod IP -> "", packets steered per
    outbound interface, packets steered per inbound pod IP)."""
    enrolled: dict[str, str] = {}
    by_iface: dict[str, int] = {}
    by_ip: dict[str, int] = {}
    for line in text.splitlines():
        m = _COUNTED_RULE.match(line)
        if not m:
            continue
        packets, rule = int(m.group(1)), m.group("rule") + " "
        if (i := _BY_IFACE.search(rule)) is not None:
            by_iface[i.group(1)] = by_iface.get(i.group(1), 0) + packets
        elif (d := _BY_DEST.search(rule)) is not None:
            enrolled[d.group(1)] = ""
            by_ip[d.group(1)] = by_ip.get(d.group(1), 0) + packets
    return enrolled, by_iface, by_ip


class IptablesCapture:
    mode = MODE_IPTABLES

    def __init__(self) -> None:
        # The pods we capture: IP -> host interface. Seeded from the kernel by ``setup`` so a
        # restarted agent re-renders exactly what its predecessor applied.
        self._pods: dict[str, PodCapture] = {}

    # -- kernel state ----------------------------------------------------------------------

    def _saved(self) -> str:
        return _run(["iptables-save", "-c", "-t", "mangle"])

    def _apply(self) -> None:
        pods = sorted(self._pods.values(), key=lambda p: p.uid)
        rules = render_capture([p.host_iface for p in pods], [ip for p in pods for ip in p.ips])
        _run(["iptables-restore", "--noflush"], input=rules.iptables_restore)
        check = subprocess.run(["iptables", "-t", "mangle", "-C", *rules.jump],
                               capture_output=True, check=False)
        if check.returncode != 0:
            _run(["iptables", "-t", "mangle", "-I", *rules.jump])

    # -- CaptureBackend --------------------------------------------------------------------

    def setup(self) -> None:
        policy_routing.ensure_policy_routing()
        self._apply_if_missing()

    def _apply_if_missing(self) -> None:
        if f":{CHAIN} " not in self._saved():
            self._apply()

    def watch_interface(self, pod: PodCapture) -> None:
        """Nothing to do: PREROUTING sees every interface of the node."""

    def enroll(self, pod: PodCapture) -> None:
        before = self._pods.get(pod.uid)
        self._pods = {k: v for k, v in self._pods.items()
                      if k == pod.uid or not set(v.ips) & set(pod.ips)}
        self._pods[pod.uid] = pod
        if before != pod or not set(pod.ips) <= self.enrolled():
            self._apply()

    def unenroll(self, pod: PodCapture) -> None:
        gone = [k for k, v in self._pods.items() if k == pod.uid or set(v.ips) & set(pod.ips)]
        for k in gone:
            del self._pods[k]
        if gone or set(pod.ips) & self.enrolled():
            self._apply()

    def forget_interface(self, pod: PodCapture) -> None:
        self.unenroll(pod)

    def enrolled(self) -> set[str]:
        return set(parse_saved(self._saved())[0])

    def adopt(self, pods: Mapping[str, PodCapture]) -> None:
        """Take over the pods a previous agent captured (their uids and interfaces come from
        the agent's records; the kernel only knows addresses)."""
        kernel = self.enrolled()
        for pod in pods.values():
            if set(pod.ips) & kernel:
                self._pods[pod.uid] = pod

    def set_listeners(self, fds: Mapping[str, int]) -> None:
        """TPROXY finds the ztunnel's listeners by port; nothing to hand over."""

    def counters(self) -> dict[str, PodCounters]:
        _, by_iface, by_ip = parse_saved(self._saved())
        out: dict[str, PodCounters] = {}
        for pod in self._pods.values():
            for ip in pod.ips:
                steered = by_ip.get(ip, 0) + by_iface.get(pod.host_iface, 0)
                out[ip] = PodCounters(captured=steered)
        return out

    def status(self) -> BackendStatus:
        return BackendStatus(MODE_IPTABLES, {
            "chains": f"mangle {CHAIN}, {DIVERT_CHAIN}",
            "pods": str(len(self._pods)),
        })

    def uninstall(self) -> None:
        while subprocess.run(["iptables", "-t", "mangle", "-D", *JUMP], capture_output=True,
                             check=False).returncode == 0:
            pass
        for chain in (CHAIN, DIVERT_CHAIN):
            subprocess.run(["iptables", "-t", "mangle", "-F", chain], capture_output=True,
                           check=False)
        for chain in (CHAIN, DIVERT_CHAIN):
            subprocess.run(["iptables", "-t", "mangle", "-X", chain], capture_output=True,
                           check=False)
        policy_routing.remove_policy_routing()
        self._pods.clear()
        log.info("iptables capture removed (chains %s, %s and policy routing)", CHAIN,
                 DIVERT_CHAIN)

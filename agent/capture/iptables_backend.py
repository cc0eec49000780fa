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
from collections.abc import Mapping, Sequence, Set

from agent.capture import policy_routing
from agent.capture.base import (
    MODE_IPTABLES,
    BackendStatus,
    CaptureError,
    PodCapture,
    PodCounters,
)
from agent.capture.iptables import CHAIN, DIVERT_CHAIN, JUMP, render_capture, render_update

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
    """``CaptureBackend`` with TPROXY rules.

    A pod's enrolment or removal applies only that pod's rules (``render_update``, one small
    ``iptables-restore --noflush``), so its cost does not depend on how many pods the node
    captures; the full render (``render_capture``) is applied at setup when our chain is
    missing, and as the fallback when an incremental change is refused (someone else changed
    our chain). The kernel is read back (``iptables-save``) only by ``enrolled``, ``adopt``
    and ``counters``, never per pod.
    """

    mode = MODE_IPTABLES

    def __init__(self) -> None:
        # The pods we capture: uid -> pod, and each captured address's pod. Seeded from the
        # agent's records by ``adopt`` so a restarted agent keeps what its predecessor applied.
        self._pods: dict[str, PodCapture] = {}
        self._owner: dict[str, str] = {}
        # What our chain holds, as of the last read or change: interfaces with an outbound
        # rule, addresses with inbound rules; and whether the chain is there.
        self._ifaces: set[str] = set()
        self._ips: set[str] = set()
        self._installed = False

    # -- kernel state ----------------------------------------------------------------------

    def _saved(self) -> str:
        return _run(["iptables-save", "-c", "-t", "mangle"])

    def _read(self) -> tuple[str, dict[str, str]]:
        """Read our chain back from the kernel and take it as what is applied."""
        text = self._saved()
        enrolled, by_iface, _ = parse_saved(text)
        self._ips, self._ifaces = set(enrolled), set(by_iface)
        self._installed = f":{CHAIN} " in text
        return text, enrolled

    def _apply(self) -> None:
        """Replace our chains with the full render of the pods we capture."""
        pods = sorted(self._pods.values(), key=lambda p: p.uid)
        ifaces = [p.host_iface for p in pods]
        ips = [ip for p in pods for ip in p.ips]
        rules = render_capture(ifaces, ips)
        _run(["iptables-restore", "--noflush"], input=rules.iptables_restore)
        check = subprocess.run(["iptables", "-t", "mangle", "-C", *rules.jump],
                               capture_output=True, check=False)
        if check.returncode != 0:
            _run(["iptables", "-t", "mangle", "-I", *rules.jump])
        self._ifaces, self._ips, self._installed = set(ifaces), set(ips), True

    def _update(self, add_ifaces: Set[str], add_ips: Set[str], del_ifaces: Set[str],
                del_ips: Set[str]) -> None:
        """Apply only these rules' changes against what our chain holds; the model
        (``_pods``, ``_owner``) is already updated."""
        if not self._installed:
            self._apply()
            return
        add_i = sorted(add_ifaces - self._ifaces)
        add_a = sorted(add_ips - self._ips)
        del_i = sorted((del_ifaces & self._ifaces) - add_ifaces)
        del_a = sorted((del_ips & self._ips) - add_ips)
        text = render_update(add_i, add_a, del_i, del_a)
        if not text:
            return
        try:
            _run(["iptables-restore", "--noflush"], input=text)
        except CaptureError as e:
            # Our chain is not what we think (changed behind our back): rewrite it whole.
            log.warning("incremental rule change refused (%s); re-applying all capture rules",
                        e)
            self._apply()
            return
        self._ifaces.difference_update(del_i)
        self._ips.difference_update(del_a)
        self._ifaces.update(add_i)
        self._ips.update(add_a)

    def _drop(self, uid: str) -> PodCapture | None:
        pod = self._pods.pop(uid, None)
        if pod is not None:
            for ip in pod.ips:
                if self._owner.get(ip) == uid:
                    del self._owner[ip]
        return pod

    # -- CaptureBackend --------------------------------------------------------------------

    def setup(self) -> None:
        policy_routing.ensure_policy_routing()
        self._apply_if_missing()

    def _apply_if_missing(self) -> None:
        self._read()
        if not self._installed:
            self._apply()

    def watch_interface(self, pod: PodCapture) -> None:
        """Nothing to do: PREROUTING sees every interface of the node."""

    def enroll(self, pod: PodCapture) -> None:
        # One address is one pod's: a pod with a reused IP replaces the old pod's rules.
        uids = {pod.uid, *(self._owner[ip] for ip in pod.ips if ip in self._owner)}
        displaced = [old for u in uids if (old := self._drop(u)) is not None]
        self._pods[pod.uid] = pod
        for ip in pod.ips:
            self._owner[ip] = pod.uid
        self._update({pod.host_iface}, set(pod.ips),
                     {p.host_iface for p in displaced if p.host_iface},
                     {ip for p in displaced for ip in p.ips})

    def unenroll(self, pod: PodCapture) -> None:
        known = pod.uid in self._pods
        uids = {pod.uid, *(self._owner[ip] for ip in pod.ips if ip in self._owner)}
        gone = [old for u in uids if (old := self._drop(u)) is not None]
        del_ifaces = {p.host_iface for p in (pod, *gone) if p.host_iface}
        if not known:
            # An address of no known pod (released by reconcile): the outbound rules of
            # interfaces no pod we capture has go too (rare; never on the CNI path).
            del_ifaces |= self._ifaces - {p.host_iface for p in self._pods.values()}
        self._update(set(), set(), del_ifaces, {*pod.ips, *(ip for p in gone for ip in p.ips)})

    def forget_interface(self, pod: PodCapture) -> None:
        self.unenroll(pod)

    def enrolled(self) -> set[str]:
        return set(self._read()[1])

    def adopt(self, pods: Mapping[str, PodCapture]) -> None:
        """Take over the pods a previous agent captured (their uids and interfaces come from
        the agent's records; the kernel only knows addresses)."""
        kernel = self.enrolled()
        for pod in pods.values():
            if set(pod.ips) & kernel:
                self._pods[pod.uid] = pod
                for ip in pod.ips:
                    self._owner[ip] = pod.uid

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
        self._owner.clear()
        self._ifaces.clear()
        self._ips.clear()
        self._installed = False
        log.info("iptables capture removed (chains %s, %s and policy routing)", CHAIN,
                 DIVERT_CHAIN)

"""The in-pod redirect mode (issue 15): redirection inside each mesh pod's network namespace.

Why it exists: node-level capture (tc programs or TPROXY rules on the host side of each veth)
makes the ztunnel's connections leave from the node (a server sees the node, not its client)
and collides with CNIs that own the host-side veths (Cilium, Calico eBPF). In this mode the
agent adds nothing to the node's namespace or the host side of the veth. At enrolment it
enters the pod's namespace (the CNI netns path recorded at ADD; a pod found running without
one is looked up by its address among ``/var/run/netns/*``, the runtime's namespaces, then
``/proc/<pid>/ns/net``) and installs, there:

* nat ``AMBIT_INPOD_OUTPUT`` (from OUTPUT): the ztunnel's own sockets (``ZTUNNEL_SOCKET_MARK``) and
  loopback are left alone; any other TCP is REDIRECTed to 127.0.0.1:15001 (the ztunnel's
  outbound listener in the pod; ``SO_ORIGINAL_DST`` keeps the destination);
* nat ``AMBIT_INPOD_PREROUTING`` (from PREROUTING): the HBONE port goes to the ztunnel's
  HBONE listener in the pod as is; connections from the pod's gateway (the node itself:
  kubelet probes) are left alone; any other TCP is REDIRECTed to 15006;
* mangle ``AMBIT_INPOD_OUTPUT``: the ztunnel connects to the application with the original
  client's address (IP_TRANSPARENT); its packets to a local address mark their connection
  (connmark 0x111) and the application's replies get that mark back, which the node-level
  modes' policy routing (``policy_routing``: ``fwmark 0x111/0xfff lookup 100``, ``local
  0.0.0.0/0 dev lo table 100``), installed inside the pod, delivers to the ztunnel's socket
  instead of routing it out.

The ztunnel gets the pod's namespace from the agent (``agent/ztunnel_link.py``, ``pod_netns``)
and opens its listeners there before the rules go in (``Agent._hand_netns``). Rules stay in
the pod when the agent stops; ``enrolled`` reads them back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from agent.capture import policy_routing
from agent.capture.base import (
    MODE_INPOD,
    BackendStatus,
    CaptureError,
    PodCapture,
    PodCounters,
)
from mesh.netns import entered
from mesh.ports import (
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    MARK_MASK,
    OUTBOUND_PORT,
    TPROXY_MARK,
    ZTUNNEL_SOCKET_MARK,
)

log = logging.getLogger("agent.capture.inpod")

NAT_PREROUTING = "AMBIT_INPOD_PREROUTING"
NAT_OUTPUT = "AMBIT_INPOD_OUTPUT"
MANGLE_OUTPUT = "AMBIT_INPOD_OUTPUT"
NETNS_DIRS = (Path("/var/run/netns"), Path("/run/netns"))
JUMPS = (("nat", "PREROUTING", NAT_PREROUTING), ("nat", "OUTPUT", NAT_OUTPUT),
         ("mangle", "OUTPUT", MANGLE_OUTPUT))


def render_pod_rules(exempt_sources: Sequence[str] = ()) -> str:
    """The ``iptables-restore --noflush`` input for one pod's namespace (our chains are
    declared, so flushed and rewritten; the jumps into them are added apart, once).
    ``exempt_sources``: addresses whose connections to the pod are not captured (the node's,
    for kubelet probes)."""
    mark = f"{ZTUNNEL_SOCKET_MARK:#x}/{MARK_MASK:#x}"
    conn = f"{TPROXY_MARK:#x}/{MARK_MASK:#x}"
    lines = [
        "*nat",
        f":{NAT_PREROUTING} - [0:0]",
        f":{NAT_OUTPUT} - [0:0]",
        f"-A {NAT_PREROUTING} -i lo -j RETURN",
        f"-A {NAT_PREROUTING} -p tcp --dport {HBONE_PORT} -j RETURN",
        *(f"-A {NAT_PREROUTING} -s {ip}/32 -j RETURN" for ip in exempt_sources),
        f"-A {NAT_PREROUTING} -p tcp -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}",
        f"-A {NAT_OUTPUT} -m mark --mark {mark} -j RETURN",
        f"-A {NAT_OUTPUT} -o lo -j RETURN",
        f"-A {NAT_OUTPUT} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}",
        "COMMIT",
        "*mangle",
        f":{MANGLE_OUTPUT} - [0:0]",
        f"-A {MANGLE_OUTPUT} -m mark --mark {mark} -m addrtype --dst-type LOCAL "
        f"-j CONNMARK --set-xmark {conn}",
        f"-A {MANGLE_OUTPUT} -m connmark --mark {conn} -j CONNMARK --restore-mark "
        f"--nfmask {MARK_MASK:#x} --ctmask {MARK_MASK:#x}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def _enroll_script(rules: str) -> str:
    """Shell run inside the pod's namespace: the rules and the jumps into them (once)."""
    jumps = "\n".join(f"iptables -w -t {t} -C {c} -j {j} 2>/dev/null || "
                      f"iptables -w -t {t} -I {c} -j {j}" for t, c, j in JUMPS)
    return f"""set -e
iptables-restore -w --noflush <<'AMBIT_RULES'
{rules}AMBIT_RULES
{jumps}
"""


def _remove_script() -> str:
    jumps = "\n".join(f"while iptables -w -t {t} -D {c} -j {j} 2>/dev/null; do :; done"
                      for t, c, j in JUMPS)
    chains = "\n".join(f"iptables -w -t {t} -F {j} 2>/dev/null; iptables -w -t {t} -X {j} "
                       "2>/dev/null" for t, _, j in JUMPS)
    return f"""{jumps}
{chains}
true
"""


def _in_netns(path: str, argv: Sequence[str], input: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(["nsenter", f"--net={path}", *argv], input=input,
                             capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise CaptureError("nsenter is not installed (util-linux); the inpod mode runs "
                           "iptables inside each pod's network namespace with it") from None
    if check and res.returncode != 0:
        raise CaptureError(f"in {path}: `{' '.join(argv)[:80]}` failed: "
                           f"{(res.stderr or res.stdout).strip()[-500:]}")
    return res


@contextlib.contextmanager
def _inside(path: str) -> Iterator[None]:
    """This thread inside the namespace at ``path`` (the agent's kernel-work thread)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with entered(fd):
            yield
    finally:
        os.close(fd)


def gateways(path: str) -> list[str]:
    """The IPv4 gateways of the pod's default routes: the node's address on the pod's link,
    where kubelet probes come from."""
    from pyroute2 import IPRoute

    with _inside(path), IPRoute() as ipr:
        routes = ipr.get_default_routes(family=2)
    out = {str(r.get_attr("RTA_GATEWAY")) for r in routes if r.get_attr("RTA_GATEWAY")}
    return sorted(out)


def _routing(path: str, add: bool) -> None:
    """The fwmark rule and local route inside the pod (``policy_routing``, as the node-level
    modes use them in the node: the same numbers, another namespace)."""
    with _inside(path):
        if add:
            policy_routing.ensure_policy_routing()
        else:
            policy_routing.remove_policy_routing()


def addresses_in(path: str) -> set[str]:
    """The IPv4 addresses of the network namespace at ``path`` (read from inside it)."""
    import psutil

    with _inside(path):
        found = psutil.net_if_addrs()
    return {a.address for addrs in found.values() for a in addrs if a.family == 2}


def find_netns(ip: str) -> str | None:
    """A path to the network namespace that has ``ip``: the runtime's named namespaces
    first, then those of the processes this agent can see."""
    candidates = [str(p) for d in NETNS_DIRS if d.is_dir() for p in sorted(d.iterdir())]
    seen: set[tuple[int, int]] = set()
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        candidates.append(f"/proc/{pid}/ns/net")
    for path in candidates:
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if ip in addresses_in(path):
                return path
        except OSError:
            continue
    return None


class InpodCapture:
    """``CaptureBackend`` with rules inside each pod's network namespace."""

    mode = MODE_INPOD

    def __init__(self) -> None:
        self._pods: dict[str, PodCapture] = {}  # uid -> the pod (its netns path resolved)
        self._enrolled: set[str] = set()  # uids whose rules are in place

    def netns_path(self, pod: PodCapture) -> str:
        """Where ``pod``'s network namespace is: the recorded path while it exists, else the
        namespace that has its address. Raises ``CaptureError`` if there is none."""
        known = self._pods.get(pod.uid)
        for path in (pod.netns, known.netns if known else ""):
            if path and os.path.exists(path):
                return path
        found = find_netns(pod.ips[0]) if pod.ips else None
        if found is None:
            raise CaptureError(f"pod {pod.uid}: no network namespace with {pod.ips[0]} (its "
                               f"CNI netns {pod.netns or '(unknown)'} is gone)")
        return found

    def _known(self, pod: PodCapture) -> PodCapture:
        path = self.netns_path(pod)
        resolved = PodCapture(pod.uid, pod.ips, pod.host_iface, path)
        self._pods[pod.uid] = resolved
        return resolved

    def setup(self) -> None:
        """Nothing on the node: this mode adds nothing to its namespace."""

    def watch_interface(self, pod: PodCapture) -> None:
        """Nothing on the host side of the veth."""

    def enroll(self, pod: PodCapture) -> None:
        p = self._known(pod)
        rules = render_pod_rules(gateways(p.netns))
        _in_netns(p.netns, ["sh", "-c", _enroll_script(rules)])
        _routing(p.netns, add=True)
        self._enrolled.add(pod.uid)

    def unenroll(self, pod: PodCapture) -> None:
        self._enrolled.discard(pod.uid)
        known = self._pods.get(pod.uid, pod)
        path = known.netns or pod.netns
        if path and os.path.exists(path):
            _in_netns(path, ["sh", "-c", _remove_script()], check=False)
            _routing(path, add=False)

    def forget_interface(self, pod: PodCapture) -> None:
        """The pod is gone (its namespace with it, and our rules in it)."""
        self._enrolled.discard(pod.uid)
        self._pods.pop(pod.uid, None)

    def has_rules(self, path: str) -> bool:
        return _in_netns(path, ["iptables", "-w", "-t", "nat", "-S", NAT_OUTPUT],
                         check=False).returncode == 0

    def enrolled(self) -> set[str]:
        """Addresses of the pods whose namespace has our rules, read back from each."""
        out: set[str] = set()
        for uid, pod in list(self._pods.items()):
            if pod.netns and os.path.exists(pod.netns) and self.has_rules(pod.netns):
                self._enrolled.add(uid)
                out.update(pod.ips)
            else:
                self._enrolled.discard(uid)
        return out

    def adopt(self, pods: Mapping[str, PodCapture]) -> None:
        """Take over the pods a previous agent enrolled (the rules stayed in them)."""
        for pod in pods.values():
            try:
                self._known(pod)
            except CaptureError as e:
                log.info("%s; not adopting it", e)

    def set_listeners(self, fds: Mapping[str, int]) -> None:
        """The ztunnel's listeners are inside each pod; nothing to do on the node."""

    def counters(self) -> dict[str, PodCounters]:
        """Connections REDIRECTed in each pod (the packet counters of the REDIRECT rules: in
        practice each connection's first packet)."""
        out: dict[str, PodCounters] = {}
        for uid in list(self._enrolled):
            pod = self._pods.get(uid)
            if pod is None or not os.path.exists(pod.netns):
                continue
            res = _in_netns(pod.netns, ["iptables-save", "-c", "-t", "nat"], check=False)
            steered = 0
            for line in res.stdout.splitlines():
                if "-j REDIRECT" in line and line.startswith("["):
                    steered += int(line[1:line.index(":")])
            for ip in pod.ips:
                out[ip] = PodCounters(captured=steered)
        return out

    def status(self) -> BackendStatus:
        return BackendStatus(MODE_INPOD, {
            "rules": f"inside each pod: nat {NAT_PREROUTING}, {NAT_OUTPUT}; mangle "
                     f"{MANGLE_OUTPUT}; fwmark {TPROXY_MARK:#x} policy routing",
            "pods": str(len(self._enrolled)),
        })

    def uninstall(self) -> None:
        """Remove our rules from every pod this backend knows (``uninstall_pods`` for the
        ones in an agent's records)."""
        for pod in list(self._pods.values()):
            self.unenroll(pod)
        self._pods.clear()
        self._enrolled.clear()


def uninstall_pods(netns_paths: Sequence[str]) -> list[str]:
    """Remove the in-pod rules from these namespaces (those that still exist); the paths
    cleaned."""
    done = []
    for path in netns_paths:
        if path and os.path.exists(path):
            _in_netns(path, ["sh", "-c", _remove_script()], check=False)
            _routing(path, add=False)
            done.append(path)
    return done

"""Which local pods must be captured, as a pure function (tested as a table).

Why pure: the agent learns about pods from three places that can disagree for a while (CNI
ADD/DEL, the registry's state push, the kernel's own record of what is captured, which survives
agent restarts), and getting the precedence right is the whole job. As in kopf's reconcile,
the function sees a full picture and returns what to change; the agent does the I/O.

Precedence for a pod's desired capture:

1. the state push, when it lists one of the pod's IPs as a workload of this node: HBONE means
   capture, TCP means the namespace is not enrolled or the pod opted out;
2. else the registry's answer at CNI ADD (the pod has no IP in the registry yet);
3. else not captured.

Addresses the kernel captures that belong to no known pod are released, unless the state push
says a mesh pod of this node has that address: then the agent looks for it on the node
(``discover``) instead, which is how pods that predate the agent are adopted.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from agent.pods import LocalPod


@dataclass(frozen=True)
class MeshPod:
    """A workload the state push places on this node."""

    uid: str
    in_mesh: bool


@dataclass(frozen=True)
class Plan:
    enroll: tuple[LocalPod, ...] = ()
    unenroll: tuple[LocalPod, ...] = ()
    release: tuple[str, ...] = ()  # captured IPs of no known pod
    discover: tuple[str, ...] = ()  # mesh IPs of this node without a local pod record

    @property
    def empty(self) -> bool:
        return not (self.enroll or self.unenroll or self.release or self.discover)


def desired(pod: LocalPod, mesh: Mapping[str, MeshPod]) -> bool:
    listed = [mesh[ip] for ip in pod.ips if ip in mesh]
    if listed:
        return any(m.in_mesh for m in listed)
    return bool(pod.decision)


def plan(local: Mapping[str, LocalPod], mesh: Mapping[str, MeshPod],
         enrolled: Set[str]) -> Plan:
    enroll: list[LocalPod] = []
    unenroll: list[LocalPod] = []
    for pod in sorted(local.values(), key=lambda p: p.uid):
        want = desired(pod, mesh)
        if want and not set(pod.ips) <= enrolled:
            enroll.append(pod)
        elif not want and set(pod.ips) & enrolled:
            unenroll.append(pod)
    known_ips = {ip for p in local.values() for ip in p.ips}
    discover = sorted(ip for ip, m in mesh.items() if m.in_mesh and ip not in known_ips)
    release = sorted(ip for ip in enrolled if ip not in known_ips and ip not in discover)
    return Plan(tuple(enroll), tuple(unenroll), tuple(release), tuple(discover))

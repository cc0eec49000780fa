"""tc attachment of the eBPF capture programs: attach, detach and list our clsact ingress filters.

Why it exists: the programs run as direct-action ``bpf`` filters at tc ingress of every pod
veth and uplink, attached by fd with pyroute2. Our filters use one fixed priority, handle and
name prefix, so attaching again replaces a program in place and uninstall can tell our filters
from other tools' ones; this module is the only place that knows those numbers.
"""

from __future__ import annotations

import errno
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from agent.capture.base import CaptureError
from agent.capture.ebpf_programs import LoadedProgram

# Our tc filters: one fixed priority and handle on every interface, so attaching again
# replaces the program in place (no window without capture, no stacking) and uninstall can
# tell our filters from anybody else's. The name carries the program too (`tc filter show`).
FILTER_PRIORITY = 0xA3B1
FILTER_HANDLE = 1
FILTER_NAME_PREFIX = "ambit_"
TC_INGRESS_PARENT = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS): "ingress"
_ETH_P_ALL = 0x0003


def ifindex(ipr: Any, ifname: str) -> int | None:
    """The index of interface ``ifname`` in ``ipr``'s network namespace, ``None`` if absent."""
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _our_filter(msg: Any) -> str | None:
    """The program name if ``msg`` (a tc filter dump entry) is one of our filters."""
    if msg["handle"] != FILTER_HANDLE or msg["info"] >> 16 != FILTER_PRIORITY:
        return None
    if msg.get_attr("TCA_KIND") != "bpf":
        return None
    options = msg.get_attr("TCA_OPTIONS")
    name = options.get_attr("TCA_BPF_NAME") if options is not None else None
    if not isinstance(name, str) or not name.startswith(FILTER_NAME_PREFIX):
        return None
    return name.removeprefix(FILTER_NAME_PREFIX)


def our_filters(ipr: Any, index: int) -> list[str]:
    """The programs of our filters at tc ingress of interface ``index`` (at most one)."""
    return [
        name
        for msg in ipr.get_filters(index=index, parent=TC_INGRESS_PARENT)
        if (name := _our_filter(msg)) is not None
    ]


def attach(ipr: Any, ifname: str, program: LoadedProgram) -> None:
    """Put ``program`` at tc ingress of ``ifname``, replacing ours if there is one."""
    index = ifindex(ipr, ifname)
    if index is None:
        raise CaptureError(f"interface {ifname} does not exist in this network namespace")
    try:
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        ipr.tc(
            "replace-filter", "bpf", index, FILTER_HANDLE, parent=TC_INGRESS_PARENT,
            prio=FILTER_PRIORITY, protocol=_ETH_P_ALL, fd=program.fd,
            name=FILTER_NAME_PREFIX + program.name, direct_action=True,
        )  # fmt: skip
    except NetlinkError as e:
        raise CaptureError(f"attaching {program.name} to {ifname} (tc ingress): {e}") from None


def detach(ipr: Any, index: int) -> bool:
    """Remove our filter from interface ``index``; False if it had none."""
    if not our_filters(ipr, index):
        return False
    try:
        ipr.tc(
            "del-filter", "bpf", index, FILTER_HANDLE, parent=TC_INGRESS_PARENT,
            prio=FILTER_PRIORITY, protocol=_ETH_P_ALL,
        )  # fmt: skip
    except NetlinkError as e:
        if e.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False  # gone meanwhile
        raise CaptureError(f"detaching from interface #{index}: {e}") from None
    return True


def attached() -> dict[str, str]:
    """Interfaces of this network namespace that carry one of our programs: name -> program."""
    out: dict[str, str] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            names = our_filters(ipr, int(link["index"]))
            if names:
                out[str(link.get_attr("IFLA_IFNAME"))] = names[0]
    return out


def preempted() -> dict[str, str]:
    """Interfaces of this network namespace where another tool's tc ingress filter runs
    before ours (a lower priority number): name -> what it is. A CNI that owns the host-side
    veths (Cilium, Calico eBPF) attaches its own program there, and a direct-action program
    that decides the packet's fate (TC_ACT_OK, a redirect) means ours never runs: the pod is
    not captured (``ambit agent status`` says so; the in-pod mode is not affected)."""
    out: dict[str, str] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            index = int(link["index"])
            if not our_filters(ipr, index):
                continue
            ahead = [f"{msg.get_attr('TCA_KIND')} (prio {msg['info'] >> 16})"
                     for msg in ipr.get_filters(index=index, parent=TC_INGRESS_PARENT)
                     if msg["info"] >> 16 < FILTER_PRIORITY and _our_filter(msg) is None]
            if ahead:
                out[str(link.get_attr("IFLA_IFNAME"))] = ", ".join(sorted(set(ahead)))
    return out

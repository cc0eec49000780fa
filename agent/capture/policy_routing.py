"""Policy routing that delivers captured packets locally, shared by both redirect modes.

Why it exists: a captured packet keeps its original destination (another pod, another node),
so plain routing would forward it. Both backends mark captured packets (iptables with TPROXY's
``--tproxy-mark``, eBPF by setting ``skb->mark``) and these two kernel objects turn the mark
into local delivery::

    ip rule add priority 100 fwmark 0x111/0xfff lookup 100
    ip route replace local 0.0.0.0/0 dev lo table 100

Done with pyroute2 rather than the ``ip`` command so the agent needs no iproute2 binary and gets
netlink errors it can match on. Both functions are idempotent and act on the network namespace
of the calling process (the agent runs in the node's). Numbers come from
``agent/capture/iptables.py`` so the two modes can never disagree.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from agent.capture.base import CaptureError
from agent.capture.iptables import ROUTE_TABLE, RULE_PRIORITY
from mesh.ports import MARK_MASK, TPROXY_MARK

_RT_SCOPE_HOST = 254
_RTN_LOCAL = 2
_FR_ACT_TO_TBL = 1


def _rule_table(msg: Any) -> int:
    table = msg.get_attr("FRA_TABLE")
    return int(table if table is not None else msg["table"])


def _our_rules(
    ipr: Any, mark: int, mask: int, table: int, priority: int
) -> list[Any]:
    found = []
    for msg in ipr.get_rules(family=socket.AF_INET):
        if (
            msg.get_attr("FRA_PRIORITY") == priority
            and msg.get_attr("FRA_FWMARK") == mark
            and (msg.get_attr("FRA_FWMASK") or 0xFFFFFFFF) == mask
            and _rule_table(msg) == table
        ):
            found.append(msg)
    return found


def _loopback_index(ipr: Any) -> int:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        raise CaptureError("no loopback interface 'lo' in this network namespace")
    return int(found[0])


def ensure_policy_routing(
    *,
    mark: int = TPROXY_MARK,
    mask: int = MARK_MASK,
    table: int = ROUTE_TABLE,
    priority: int = RULE_PRIORITY,
) -> None:
    """Add the fwmark rule (unless an identical one exists) and replace the local route."""
    try:
        with IPRoute() as ipr:
            if not _our_rules(ipr, mark, mask, table, priority):
                ipr.rule(
                    "add", family=socket.AF_INET, priority=priority, fwmark=mark,
                    fwmask=mask, table=table, action=_FR_ACT_TO_TBL,
                )  # fmt: skip
            ipr.route(
                "replace", family=socket.AF_INET, dst="0.0.0.0", dst_len=0, type=_RTN_LOCAL,
                scope=_RT_SCOPE_HOST, oif=_loopback_index(ipr), table=table,
            )  # fmt: skip
    except NetlinkError as e:
        raise CaptureError(
            f"policy routing (fwmark {mark:#x}/{mask:#x} lookup {table}): {e}"
        ) from None


def remove_policy_routing(
    *,
    mark: int = TPROXY_MARK,
    mask: int = MARK_MASK,
    table: int = ROUTE_TABLE,
    priority: int = RULE_PRIORITY,
) -> None:
    """Delete every copy of the rule and the local route; what is already gone is fine."""
    try:
        with IPRoute() as ipr:
            for _ in _our_rules(ipr, mark, mask, table, priority):
                ipr.rule(
                    "del", family=socket.AF_INET, priority=priority, fwmark=mark,
                    fwmask=mask, table=table, action=_FR_ACT_TO_TBL,
                )  # fmt: skip
            try:
                ipr.route(
                    "del", family=socket.AF_INET, dst="0.0.0.0", dst_len=0, type=_RTN_LOCAL,
                    scope=_RT_SCOPE_HOST, oif=_loopback_index(ipr), table=table,
                )  # fmt: skip
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT):
                    raise
    except NetlinkError as e:
        raise CaptureError(
            f"removing policy routing (fwmark {mark:#x}/{mask:#x} lookup {table}): {e}"
        ) from None

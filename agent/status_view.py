"""How a node agent's ``/debug/pods`` document is printed, for ``ambit status`` and others.

Why shared: ``ambit agent status`` (on a node, over loopback) and ``ambit status`` (from a
workstation, through the API server's pod proxy) show the same document, and an operator
comparing the two should read the same lines. The document is the agent's ``Agent.status()``
(agent/app.py): node, redirect mode and why, readiness, the uplinks and the CNI chain state,
backend capture counters, the last reconcile error and one entry per pod the agent knows
(captured, whether it should be, why). ``agent/main.py``'s ``ambit agent status`` prints the
same lines through ``agent_lines``. It lives in the agent package, beside the document it
prints, and imports nothing heavy, so the ``ambit`` CLI can use it anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["agent_lines", "agent_summary"]


def agent_summary(doc: Mapping[str, Any]) -> str:
    """One line: ``ebpf (auto: the kernel supports it); ready; 12 pods, 10 captured``."""
    pods = [p for p in doc.get("pods") or [] if isinstance(p, Mapping)]
    captured = sum(1 for p in pods if p.get("captured"))
    wrong = sum(1 for p in pods if bool(p.get("captured")) != bool(p.get("shouldCapture")))
    text = (f"{doc.get('redirectMode', '?')} ({doc.get('redirectModeReason', '?')}); "
            f"{doc.get('ready', '?')}; {len(pods)} pod{'s' if len(pods) != 1 else ''}, "
            f"{captured} captured")
    if wrong:
        text += f", {wrong} not as they should be"
    if doc.get("lastError"):
        text += f"; last reconcile error: {doc['lastError']}"
    return text


def agent_lines(doc: Mapping[str, Any], *, pods: bool = True) -> list[str]:
    """What ``ambit agent status`` prints: header, capture counters, last error, pod table
    (a ``!`` after CAPTURED marks a pod that is not captured as it should be)."""
    lines = [f"node {doc.get('node')}: redirect mode {doc.get('redirectMode')} "
             f"({doc.get('redirectModeReason')}); {doc.get('ready')}"]
    if "uplinks" in doc:
        lines.append(f"  uplinks: {', '.join(str(u) for u in doc.get('uplinks') or []) or 'none'}")
    if "cni" in doc:
        lines.append(f"  cni: {doc['cni']}")
    held = doc.get("heldListeners")
    if isinstance(held, Mapping) and isinstance(held.get("listeners"), Mapping):
        kept = ", ".join(f"{n} x{c}" for n, c in held["listeners"].items())
        gone = held.get("unlinkedFor")
        lines.append(f"  ztunnel listeners kept for restarts: {kept}" +
                     (f" (no ztunnel linked for {gone}s)" if gone is not None else
                      f" (ztunnel pid {doc.get('ztunnelPid')}; "
                      f"{doc.get('ztunnelTakeovers', 0)} takeover(s))"))
    capture = doc.get("capture") or {}
    if isinstance(capture, Mapping):
        for key, value in sorted(capture.items()):
            lines.append(f"  {key}: {value}")
    if doc.get("lastError"):
        lines.append(f"  last reconcile error: {doc['lastError']}")
    if not pods:
        return lines
    lines.append(f"{'POD':<32} {'IPS':<16} {'IFACE':<16} {'CAPTURED':<9} {'MODE':<9} REASON")
    for p in doc.get("pods") or []:
        if not isinstance(p, Mapping):
            continue
        flag = "yes" if p.get("captured") else "no"
        if bool(p.get("captured")) != bool(p.get("shouldCapture")):
            flag += "!"
        ips = ",".join(str(i) for i in p.get("ips") or [])
        mode = str(p.get("mode") or doc.get("redirectMode") or "-")
        reason = str(p.get("reason", ""))
        if p.get("shouldCapture") and not p.get("captured") and p.get("listeners"):
            reason += f"; ztunnel listeners in the pod: {p['listeners']}"
        lines.append(f"{p.get('pod')!s:<32} {ips:<16} {p.get('hostIface')!s:<16} {flag:<9} "
                     f"{mode:<9} {reason}")
    return lines

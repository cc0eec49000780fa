"""``ambit status``: is Ambit running on this cluster, and what does each node capture.

Why a command of its own: troubleshooting a mesh means looking at several places at once (the
controller Deployment and which replica leads, the node DaemonSet and each of its pods, and on
each node what the agent captures and why), and the last of these lives on the node itself.
Rather than asking for a shell on every node, the agent's ``/debug/pods`` document is fetched
through the API server's pod proxy (``GET .../pods/<pod>:15022/proxy/debug/pods``), which needs
nothing but the caller's kubeconfig (RBAC: ``get`` on ``pods/proxy`` in ``ambit-system``).

Every piece is collected into one document (``--json`` prints it as is) and the text view is
rendered from that document; the exit status is 0 when nothing is wrong, 1 otherwise (the
problems are listed at the end), so scripts can use it as a health check.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable, Mapping
from typing import Any

from agent.status_view import agent_lines, agent_summary
from ambit.install.apply import GATEWAY_API_VERSION, pod_problems
from ambit.install.kube import ApiError, ApiResource, Cluster, explain
from ambit.install.names import (
    AGENT_PORT,
    AMBIENT,
    CONFIG_MAP,
    CONTROLLER,
    DATAPLANE_MODE_LABEL,
    GATEWAY_CLASS,
    LEASE,
    NAMESPACE,
    NODE_DAEMONSET,
    WAYPOINT_CONTROLLER_NAME,
)

__all__ = ["StatusError", "collect", "format_status", "status"]

Out = Callable[[str], None]


class StatusError(Exception):
    """The API server cannot be read; the message says why and what to do."""


def _parse_time(text: Any) -> dt.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _pod_row(pod: Mapping[str, Any]) -> dict[str, Any]:
    meta, st = pod.get("metadata") or {}, pod.get("status") or {}
    statuses = st.get("containerStatuses") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in st.get("conditions") or [])
    state = str(st.get("phase") or "Pending")
    for cs in (st.get("initContainerStatuses") or []) + statuses:
        reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
        if reason and reason != "PodInitializing":
            state = str(reason)
            break
    if meta.get("deletionTimestamp"):
        state = "Terminating"
    problem = pod_problems([dict(pod)])
    return {"name": meta.get("name"), "node": (pod.get("spec") or {}).get("nodeName"),
            "ready": ready, "restarts": sum(int(c.get("restartCount") or 0) for c in statuses),
            "status": state, "problem": problem[0] if problem else None}


def _selector(obj: Mapping[str, Any] | None) -> str:
    labels = (((obj or {}).get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


async def _need(cluster: Cluster, api_version: str, kind: str) -> ApiResource:
    res = await cluster.resource(api_version, kind)
    if res is None:
        raise StatusError(f"the API server does not serve {kind} ({api_version})")
    return res


async def _agent(cluster: Cluster, pod: str, port: int,
                 limit: float) -> tuple[dict[str, Any] | None, str | None]:
    try:
        async with asyncio.timeout(limit):
            doc = await cluster.proxy_get(NAMESPACE, pod, port, "debug/pods")
    except TimeoutError:
        return None, f"no answer from the agent within {limit:.0f} s"
    except ApiError as e:
        return None, (f"cannot read the agent through the API server's pod proxy: "
                      f"{e.status} {e.message}" if e.status else e.message)
    return doc, None


async def collect(cluster: Cluster, *, agent_port: int = AGENT_PORT,
                  agent_timeout: float = 10.0, now: dt.datetime | None = None) -> dict[str, Any]:
    """The status document; raises ``StatusError`` when the API server cannot be read."""
    try:
        return await _collect(cluster, agent_port, agent_timeout,
                              now or dt.datetime.now(dt.UTC))
    except ApiError as e:
        raise StatusError(explain(e, "reading Ambit's status", cluster.server)) from None


async def _collect(cluster: Cluster, agent_port: int, agent_timeout: float,
                   now: dt.datetime) -> dict[str, Any]:
    namespaces = await _need(cluster, "v1", "Namespace")
    doc: dict[str, Any] = {"namespace": NAMESPACE, "problems": []}
    problems: list[str] = doc["problems"]
    if await cluster.get(namespaces, None, NAMESPACE) is None:
        doc["installed"] = False
        problems.append(f"Ambit is not installed (no namespace {NAMESPACE}); run ambit install")
        doc["healthy"] = False
        return doc
    doc["installed"] = True
    pods_res = await _need(cluster, "v1", "Pod")
    cm = await cluster.get(await _need(cluster, "v1", "ConfigMap"), NAMESPACE, CONFIG_MAP)
    doc["config"] = (cm or {}).get("data")

    # -- control plane --
    deployments = await _need(cluster, "apps/v1", "Deployment")
    dep = await cluster.get(deployments, NAMESPACE, CONTROLLER)
    controller: dict[str, Any] = {"deployment": None, "leader": None, "pods": []}
    doc["controller"] = controller
    if dep is None:
        problems.append(f"Deployment {NAMESPACE}/{CONTROLLER} does not exist; run ambit install")
    else:
        st, spec = dep.get("status") or {}, dep.get("spec") or {}
        want = int(spec.get("replicas", 1))
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        controller["deployment"] = {
            "replicas": want, "ready": int(st.get("readyReplicas") or 0),
            "updated": int(st.get("updatedReplicas") or 0),
            "available": int(st.get("availableReplicas") or 0),
            "image": containers[0].get("image") if containers else None}
        if controller["deployment"]["ready"] < want:
            problems.append(f"controller: {controller['deployment']['ready']} of {want} "
                            "replicas ready")
        controller["pods"] = [_pod_row(p) for p in await cluster.list(
            pods_res, NAMESPACE, _selector(dep))] if _selector(dep) else []
    leases = await cluster.resource("coordination.k8s.io/v1", "Lease")
    lease = await cluster.get(leases, NAMESPACE, LEASE) if leases is not None else None
    hint = (f"; the controller may still be starting: kubectl -n {NAMESPACE} logs "
            f"deployment/{CONTROLLER}")
    if lease is None:
        problems.append(f"no controller leader (Lease {NAMESPACE}/{LEASE} does not exist)"
                        + hint)
    else:
        lspec = lease.get("spec") or {}
        renewed = _parse_time(lspec.get("renewTime")) or _parse_time(lspec.get("acquireTime"))
        duration = int(lspec.get("leaseDurationSeconds") or 15)
        age = (now - renewed).total_seconds() if renewed else None
        expired = age is None or age > duration
        controller["leader"] = {"holder": lspec.get("holderIdentity"),
                                "renewedSecondsAgo": None if age is None else round(age, 1),
                                "expired": expired}
        if not lspec.get("holderIdentity") or expired:
            problems.append("no controller leader (the Lease is "
                            + ("expired" if lspec.get("holderIdentity") else "not held") + ")"
                            + hint)

    # -- nodes --
    daemonsets = await _need(cluster, "apps/v1", "DaemonSet")
    ds = await cluster.get(daemonsets, NAMESPACE, NODE_DAEMONSET)
    nodes: dict[str, Any] = {"daemonset": None, "pods": []}
    doc["nodes"] = nodes
    if ds is None:
        problems.append(f"DaemonSet {NAMESPACE}/{NODE_DAEMONSET} does not exist; run ambit "
                        "install")
    else:
        st = ds.get("status") or {}
        nodes["daemonset"] = {k: int(st.get(src) or 0) for k, src in (
            ("desired", "desiredNumberScheduled"), ("current", "currentNumberScheduled"),
            ("ready", "numberReady"), ("updated", "updatedNumberScheduled"),
            ("available", "numberAvailable"))}
        if nodes["daemonset"]["ready"] < nodes["daemonset"]["desired"]:
            problems.append(f"nodes: {nodes['daemonset']['ready']} of "
                            f"{nodes['daemonset']['desired']} node pods ready")
        pods = await cluster.list(pods_res, NAMESPACE, _selector(ds)) if _selector(ds) else []
        rows = [_pod_row(p) for p in pods]
        running = [r for r in rows if r["status"] == "Running"]
        answers = await asyncio.gather(*(_agent(cluster, str(r["name"]), agent_port,
                                                agent_timeout) for r in running))
        for row, (agent, error) in zip(running, answers, strict=True):
            row["agent"], row["agentError"] = agent, error
            if error:
                problems.append(f"node {row['node']}: {error} (`kubectl -n {NAMESPACE} logs "
                                f"{row['name']} -c agent` shows whether the agent runs)")
            elif agent is not None:
                wrong = [p for p in agent.get("pods") or [] if isinstance(p, Mapping)
                         and bool(p.get("captured")) != bool(p.get("shouldCapture"))]
                if wrong:
                    problems.append(f"node {row['node']}: {len(wrong)} pod(s) not captured "
                                    "as they should be (ambit status --pods shows them)")
                if agent.get("lastError"):
                    problems.append(f"node {row['node']}: last reconcile error: "
                                    f"{agent['lastError']}")
        for row in rows:
            row.setdefault("agent", None)
            row.setdefault("agentError", None)
            if row["problem"]:
                problems.append(row["problem"])
        nodes["pods"] = rows

    # -- mesh namespaces, waypoints --
    mesh = await cluster.list(namespaces, None, f"{DATAPLANE_MODE_LABEL}={AMBIENT}")
    doc["meshNamespaces"] = [str((n.get("metadata") or {}).get("name")) for n in mesh]
    classes = await cluster.served(GATEWAY_API_VERSION, "gatewayclasses")
    if classes is None:
        doc["gatewayClass"] = "gateway-api-not-served"
    else:
        gc = await cluster.get(classes, None, GATEWAY_CLASS)
        owner = ((gc or {}).get("spec") or {}).get("controllerName")
        doc["gatewayClass"] = "absent" if gc is None else \
            "present" if owner == WAYPOINT_CONTROLLER_NAME else "foreign"
    doc["healthy"] = not problems
    return doc


def _table(rows: list[dict[str, Any]], extra: str = "") -> list[str]:
    head = f"  {'POD':<34} {'NODE':<20} {'READY':<6} {'RESTARTS':<9} {'STATUS':<18}"
    out = [head + (f" {extra}" if extra else "")]
    for r in rows:
        line = (f"  {r['name']!s:<34} {r['node'] or '-'!s:<20} {'yes' if r['ready'] else 'no':<6} "
                f"{r['restarts']:<9} {r['status']:<18}")
        if extra:
            agent = r.get("agent")
            line += " " + (agent_summary(agent) if agent is not None
                           else "agent unreachable (see problems)" if r.get("agentError")
                           else "-")
        out.append(line.rstrip())
    return out


def format_status(doc: Mapping[str, Any], *, pods: bool = False) -> list[str]:
    """The text view of ``collect``'s document."""
    if not doc.get("installed"):
        return [f"Ambit is not installed in this cluster (no namespace {doc.get('namespace')}); "
                "run ambit install"]
    config = doc.get("config") or {}
    lines = [f"Ambit in namespace {doc['namespace']}"
             + (f" ({', '.join(f'{k}={v}' for k, v in sorted(config.items()))})"
                if config else f" (no ConfigMap {CONFIG_MAP})")]
    c = doc["controller"]
    dep, leader = c.get("deployment"), c.get("leader")
    text = "control plane: "
    text += (f"Deployment {CONTROLLER} {dep['ready']}/{dep['replicas']} ready, image "
             f"{dep['image']}" if dep else f"Deployment {CONTROLLER} missing")
    if leader:
        ago = leader.get("renewedSecondsAgo")
        text += (f"; leader {leader.get('holder') or '(none)'}"
                 + (f" (renewed {ago:.0f} s ago{', expired' if leader['expired'] else ''})"
                    if ago is not None else " (never renewed)"))
    else:
        text += "; no leader"
    lines.append(text)
    if c.get("pods"):
        lines += _table(c["pods"])
    n = doc["nodes"]
    ds = n.get("daemonset")
    lines.append(f"nodes: DaemonSet {NODE_DAEMONSET} " + (
        f"{ds['desired']} desired, {ds['ready']} ready, {ds['updated']} up to date, "
        f"{ds['available']} available" if ds else "missing"))
    if n.get("pods"):
        lines += _table(n["pods"], "CAPTURE")
    if pods:
        for row in n.get("pods") or []:
            if row.get("agent") is not None:
                lines.append("")
                lines += agent_lines(row["agent"], pods=True)
    mesh = doc.get("meshNamespaces") or []
    lines.append(f"mesh namespaces ({DATAPLANE_MODE_LABEL}={AMBIENT}): "
                 + (", ".join(mesh) if mesh else "none yet (kubectl label namespace NAME "
                    f"{DATAPLANE_MODE_LABEL}={AMBIENT})"))
    gc = doc.get("gatewayClass")
    lines.append(f"waypoints: GatewayClass {GATEWAY_CLASS} " + {
        "present": "ready",
        "absent": "missing (run ambit install again)",
        "foreign": "belongs to another controller",
        "gateway-api-not-served": "not available: the Gateway API is not installed",
    }.get(str(gc), str(gc)))
    problems = doc.get("problems") or []
    if problems:
        lines.append("problems:")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("no problems found")
    return lines


async def status(cluster: Cluster, *, pods: bool = False, as_json: bool = False,
                 out: Out = print, agent_port: int = AGENT_PORT,
                 agent_timeout: float = 10.0) -> int:
    """Print the status; 0 when healthy, 1 otherwise. Raises ``StatusError``."""
    doc = await collect(cluster, agent_port=agent_port, agent_timeout=agent_timeout)
    if as_json:
        out(json.dumps(doc, indent=2, sort_keys=True))
    else:
        for line in format_status(doc, pods=pods):
            out(line)
    return 0 if doc.get("healthy") else 1

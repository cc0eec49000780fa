"""The dashboard's model of the mesh, built purely from what one gather collected.

Why pure: every decision the page shows (which workloads exist and where, who talks to whom,
whether it is mTLS, what was denied and by which policy, whether a pod is captured and why, what
each policy selects and how often it denied) is a function of the raw documents the gatherer
fetched (``Gathered``). Keeping it free of I/O lets the tests hold it to tables, and the server
only stores and sends its result.

Where each fact comes from:

* workloads: the ztunnels' ``/config_dump`` (the state they act on), in Kubernetes the same
  state computed from the API (``Gathered.state``: the dumps are out of reach there); a graph
  node is a workload by its owner (``workload_name``, else the pod), as Istio's metrics name
  it, with its pods;
* capture: each agent's ``/debug/pods`` (captured, should be, and the reason);
* L4 edges: ``istio_tcp_*`` from each node's ``/metrics`` (the agent's 15022 merges the
  ztunnel's); a connection is reported by both ztunnels, so per edge the larger of the two
  reporters' counts is taken instead of their sum; ``response_flags="DENY"`` counts denials;
* who denied: the ztunnel counts denials per policy on the destination's node
  (``ambit_ztunnel_policy_denied_total{direction="destination"}``) but not per source, so a
  denied edge names the policies that select its destination and denied there
  (``denied_by``); when none has counted yet, the ones selecting it;
* L7 edges: each waypoint's ``istio_requests_total`` (requests, 403 denials, error share), from
  the waypoint to the destination workload (or to the service when the request never reached
  a workload);
* nodes: ``ambit_agent_info`` (version, redirect mode), ``ambit_process_*`` (RSS, CPU),
  ``ambit_ztunnel_active_connections``, ``ambit_xds_connected`` and the config dump's state
  version and certificates;
* policies, PeerAuthentications and HTTPRoutes: the registry's documents when it can be read,
  else the ztunnels' config dumps (which have no routes).

Rates (``with_rates``) compare two models' counters: the server keeps the models of the last
``RATE_WINDOW`` seconds and passes the oldest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ambit.dashboard import promtext

RATE_WINDOW = 60.0
UNKNOWN = "unknown"
GATEWAY_LABEL = "gateway.networking.k8s.io/gateway-name"

NODE_FAMILIES = (
    "istio_tcp_connections_opened", "istio_tcp_sent_bytes", "istio_tcp_received_bytes",
    "ambit_ztunnel_policy_denied", "ambit_agent_info", "ambit_process_resident_memory_bytes",
    "ambit_process_cpu_seconds", "ambit_ztunnel_active_connections", "ambit_xds_connected",
    "ambit_state_age_seconds", "ambit_agent_registry_connected", "ambit_agent_ztunnel_scrape_up",
)
WAYPOINT_FAMILIES = ("istio_requests",)


@dataclass
class NodeRaw:
    """What one node exposed: the agent's merged ``/metrics`` and ``/debug/pods``, the
    ztunnel's ``/config_dump``; ``errors`` names each source that could not be read."""

    name: str
    metrics: str | None = None
    pods: Mapping[str, Any] | None = None
    config: Mapping[str, Any] | None = None
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class WaypointRaw:
    """One waypoint instance (its pod) and its agent's ``/metrics``."""

    namespace: str
    name: str
    pod: str
    node: str
    metrics: str | None = None
    error: str | None = None


@dataclass
class Gathered:
    """Everything one gather collected, at ``at`` (seconds since the epoch)."""

    at: float
    nodes: list[NodeRaw] = field(default_factory=list)
    waypoints: list[WaypointRaw] = field(default_factory=list)
    controller_ready: bool | None = None
    controller_error: str | None = None
    registry: Sequence[Mapping[str, Any]] | None = None
    registry_revision: int | None = None
    registry_error: str | None = None
    source: str = ""
    # Kubernetes: the mesh state computed from the API as the controller computes it, in the
    # config dump's shape (``workloads``, ``services``), standing in for the ztunnels' dumps
    # that only their node can read; and what the conversion had to report.
    state: Mapping[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


# --- helpers -------------------------------------------------------------------------------


def _selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """A policy's selector (None: every workload of its namespace)."""
    return selector is None or all(labels.get(k) == v for k, v in selector.items())


def _flags(value: str) -> set[str]:
    return {f for f in value.split(",") if f and f != "-"}


def workload_id(namespace: str, owner: str) -> str:
    return f"{namespace}/{owner}"


# --- workloads -----------------------------------------------------------------------------


DATAPLANE_MODE_LABEL = "ambit.dev/dataplane-mode"


def capture_reason(agent_pod: Mapping[str, Any] | None, protocol: str,
                   labels: Mapping[str, str]) -> str | None:
    """Why a pod is (not) captured. The agent's reason is the one it had when it enrolled the
    pod; a pod the mesh state lists as plain TCP is out of the mesh, and the state says why
    (the registry's rule: the pod's own label, else its namespace)."""
    if agent_pod is None:
        return None
    reason = str(agent_pod.get("reason", ""))
    if agent_pod.get("captured") or protocol == "HBONE":
        return reason
    if GATEWAY_LABEL in labels:
        return "a waypoint: never captured (it terminates HBONE itself)"
    if labels.get(DATAPLANE_MODE_LABEL) == "none":
        return f"out of the mesh: the pod is labelled {DATAPLANE_MODE_LABEL}=none"
    return "out of the mesh: its namespace is not ambient" if protocol == "TCP" else reason


def workloads(nodes: Sequence[NodeRaw], state: Mapping[str, Any] | None = None) \
        -> dict[str, dict[str, Any]]:
    """Graph nodes by id (``namespace/owner``), with their pods and capture state; the
    workloads come from the ztunnels' config dumps, and from ``state`` (Kubernetes) when
    given."""
    capture: dict[str, Mapping[str, Any]] = {}
    for n in nodes:
        for p in (n.pods or {}).get("pods") or []:
            if isinstance(p, Mapping) and isinstance(p.get("pod"), str):
                capture[p["pod"]] = p
    out: dict[str, dict[str, Any]] = {}
    sources = [(n.config, f"/raw/node/{n.name}/config_dump") for n in nodes]
    if state is not None:
        sources.append((state, "/raw/state"))
    for config, raw in sources:
        for w in (config or {}).get("workloads") or []:
            if not isinstance(w, Mapping):
                continue
            ns, name = str(w.get("namespace", "")), str(w.get("name", ""))
            owner = str(w.get("workload_name") or name)
            labels = {str(k): str(v) for k, v in (w.get("labels") or {}).items()}
            wid = workload_id(ns, owner)
            entry = out.setdefault(wid, {
                "id": wid, "namespace": ns, "name": owner,
                "kind": "waypoint" if GATEWAY_LABEL in labels else "workload",
                "gateway": labels.get(GATEWAY_LABEL),
                "app": labels.get("app", owner), "version": labels.get("version"),
                "serviceAccount": w.get("service_account"), "identity": w.get("identity"),
                "protocol": w.get("protocol"), "labels": labels, "pods": {}, "nodes": [],
                "raw": raw})
            pod_key = f"{ns}/{name}"
            if pod_key in entry["pods"]:
                continue  # every ztunnel lists every workload: the first is enough
            cap = capture.get(pod_key)
            node = str(w.get("node", ""))
            entry["pods"][pod_key] = {
                "name": name, "node": node, "ips": list(w.get("addresses") or []),
                "captured": None if cap is None else bool(cap.get("captured")),
                "shouldCapture": None if cap is None else bool(cap.get("shouldCapture")),
                "reason": capture_reason(cap, str(w.get("protocol", "")), labels),
                "raw": f"/raw/node/{node}/pods"}
            if node and node not in entry["nodes"]:
                entry["nodes"].append(node)
    for entry in out.values():
        pods = list(entry["pods"].values())
        entry["pods"] = pods
        known = [p["captured"] for p in pods if p["captured"] is not None]
        # A workload is captured when every pod whose capture is known is.
        entry["captured"] = all(known) if known else None
        entry["node"] = entry["nodes"][0] if len(entry["nodes"]) == 1 else None
        if entry["raw"] != "/raw/state":
            # The dump of the ztunnel on the workload's own node, the one that acts on it.
            entry["raw"] = f"/raw/node/{entry['nodes'][0]}/config_dump" if entry["nodes"] \
                else None
    return out


# --- L4 edges ------------------------------------------------------------------------------


def _endpoint(labels: Mapping[str, str], side: str) -> str:
    name = labels.get(f"{side}_workload", UNKNOWN) or UNKNOWN
    ns = labels.get(f"{side}_workload_namespace", UNKNOWN) or UNKNOWN
    return UNKNOWN if name == UNKNOWN else workload_id(ns, name)


def tcp_edges(samples_by_node: Mapping[str, Sequence[promtext.Sample]]) \
        -> dict[str, dict[str, Any]]:
    """L4 edges from ``istio_tcp_*``: per (source, destination), connections, bytes, denials,
    other failures and mTLS, the larger of the two reporters' counts."""
    per: dict[tuple[str, str, str], dict[str, float]] = {}
    mtls: dict[tuple[str, str], bool] = {}
    for samples in samples_by_node.values():
        for s in samples:
            if not s.name.startswith("istio_tcp_"):
                continue
            src, dst = _endpoint(s.labels, "source"), _endpoint(s.labels, "destination")
            reporter = s.labels.get("reporter", "")
            c = per.setdefault((src, dst, reporter), {"connections": 0.0, "bytes": 0.0,
                                                      "denied": 0.0, "failed": 0.0})
            if s.name == "istio_tcp_connections_opened_total":
                c["connections"] += s.value
                flags = _flags(s.labels.get("response_flags", "-"))
                if "DENY" in flags:
                    c["denied"] += s.value
                elif flags:
                    c["failed"] += s.value
            else:
                c["bytes"] += s.value
            if s.labels.get("connection_security_policy") == "mutual_tls":
                mtls[(src, dst)] = True
            else:
                mtls.setdefault((src, dst), False)
    edges: dict[str, dict[str, Any]] = {}
    for (src, dst, _reporter), c in sorted(per.items()):
        eid = f"tcp:{src}->{dst}"
        e = edges.setdefault(eid, {"id": eid, "kind": "tcp", "source": src, "target": dst,
                                   "connections": 0.0, "bytes": 0.0, "denied": 0.0,
                                   "failed": 0.0, "mtls": mtls.get((src, dst), False),
                                   "deniedBy": []})
        for key in ("connections", "bytes", "denied", "failed"):
            e[key] = max(e[key], c[key])
    for e in edges.values():
        e["errorShare"] = (e["denied"] + e["failed"]) / e["connections"] \
            if e["connections"] else 0.0
    return edges


def denied_by(target: Mapping[str, Any] | None, policies: Sequence[Mapping[str, Any]],
              denials_on_node: Mapping[str, float]) -> list[str]:
    """The policies (``ns/name``) that denied connections to ``target``: those that select it
    and counted denials on its node; if none has counted, every ALLOW or DENY policy that
    selects it (an ALLOW policy denies what it does not allow)."""
    if target is None:
        return []
    selecting = [f"{p['namespace']}/{p['name']}" for p in policies
                 if p.get("namespace") == target.get("namespace")
                 and _selects(p.get("selector"), target.get("labels") or {})
                 and p.get("action") in ("ALLOW", "DENY")]
    counted = [name for name in selecting if denials_on_node.get(name, 0.0) > 0]
    return counted or selecting


# --- L7 edges ------------------------------------------------------------------------------


def http_edges(waypoints: Sequence[WaypointRaw],
               samples_by_waypoint: Mapping[str, Sequence[promtext.Sample]],
               workload_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """L7 edges from each waypoint's ``istio_requests_total``: waypoint -> destination
    workload (or ``service:<host>`` when no workload answered), with the clients the waypoint
    named (``source_workload``, known when the ztunnel sent its baggage)."""
    known = set(workload_ids)
    edges: dict[str, dict[str, Any]] = {}
    for wp in waypoints:
        src = _waypoint_node_id(wp, known)
        for s in samples_by_waypoint.get(f"{wp.namespace}/{wp.pod}", ()):
            if s.name != "istio_requests_total":
                continue
            dst = _endpoint(s.labels, "destination")
            if dst == UNKNOWN:
                dst = f"service:{s.labels.get('destination_service', UNKNOWN)}"
            eid = f"http:{src}->{dst}"
            e = edges.setdefault(eid, {
                "id": eid, "kind": "http", "source": src, "target": dst, "requests": 0.0,
                "denied": 0.0, "errors": 0.0, "mtls": False, "clients": {},
                "waypoint": f"{wp.namespace}/{wp.name}", "codes": {}})
            code = s.labels.get("response_code", "0")
            e["requests"] += s.value
            e["codes"][code] = e["codes"].get(code, 0.0) + s.value
            if code == "403":
                e["denied"] += s.value
            elif not code.startswith(("2", "3")):
                e["errors"] += s.value
            if s.labels.get("connection_security_policy") == "mutual_tls":
                e["mtls"] = True
            client = _endpoint(s.labels, "source")
            if client == UNKNOWN and s.labels.get("source_principal", UNKNOWN) != UNKNOWN:
                client = s.labels["source_principal"]
            e["clients"][client] = e["clients"].get(client, 0.0) + s.value
    for e in edges.values():
        e["errorShare"] = (e["denied"] + e["errors"]) / e["requests"] if e["requests"] else 0.0
        e["clients"] = [{"id": k, "requests": v} for k, v in sorted(e["clients"].items())]
    return edges


def _waypoint_node_id(wp: WaypointRaw, known: set[str]) -> str:
    pod_id = workload_id(wp.namespace, wp.pod)
    return pod_id if pod_id in known else workload_id(wp.namespace, wp.name)


# --- nodes ---------------------------------------------------------------------------------


def _value(samples: Sequence[promtext.Sample], name: str, **labels: str) -> float | None:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def node_view(n: NodeRaw, samples: Sequence[promtext.Sample], now: float) -> dict[str, Any]:
    info = next((s.labels for s in samples if s.name == "ambit_agent_info"), {})
    config = n.config or {}
    pods = n.pods or {}
    certs: dict[str, dict[str, Any]] = {}
    for c in config.get("certificates") or []:
        if isinstance(c, Mapping) and isinstance(c.get("identity"), str):
            left = c.get("expires_in_seconds")
            prev = certs.get(c["identity"])
            # Workers each hold a copy: the soonest expiry is the one that matters.
            if prev is None or (left is not None and left < (prev["expiresInSeconds"] or 1e18)):
                certs[c["identity"]] = {"identity": c["identity"], "expires": c.get("expires"),
                                        "expiresInSeconds": left}
    active = sum(s.value for s in samples if s.name == "ambit_ztunnel_active_connections")
    xds = _value(samples, "ambit_xds_connected")
    return {
        "name": n.name,
        "agentVersion": info.get("version"),
        "redirectMode": pods.get("redirectMode") or info.get("redirect_mode"),
        "redirectModeReason": pods.get("redirectModeReason"),
        "agentReady": pods.get("ready"),
        "lastError": pods.get("lastError") or None,
        "connections": active,
        "rss": {c: _value(samples, "ambit_process_resident_memory_bytes", component=c)
                for c in ("agent", "ztunnel")},
        "cpuSeconds": {c: _value(samples, "ambit_process_cpu_seconds_total", component=c)
                       for c in ("agent", "ztunnel")},
        "stateFeed": {"connected": None if xds is None else xds >= 1,
                      "version": config.get("version"), "loaded": config.get("loaded"),
                      "ageSeconds": config.get("state_age_seconds")},
        "registryConnected": _value(samples, "ambit_agent_registry_connected"),
        # The agent merges the ztunnel's metrics into its own; 0: that scrape failed, so the
        # ztunnel's families (edges, denials, state feed) are missing from this node's.
        "ztunnelScrapeUp": _value(samples, "ambit_agent_ztunnel_scrape_up"),
        "certificates": sorted(certs.values(), key=lambda c: str(c["identity"])),
        "pods": [{"pod": p.get("pod"), "captured": p.get("captured"),
                  "shouldCapture": p.get("shouldCapture"), "reason": p.get("reason"),
                  "ips": p.get("ips")}
                 for p in pods.get("pods") or [] if isinstance(p, Mapping)],
        "errors": dict(n.errors),
        "raw": {"metrics": f"/raw/node/{n.name}/metrics",
                "pods": f"/raw/node/{n.name}/pods",
                "config_dump": f"/raw/node/{n.name}/config_dump"},
        "at": now,
    }


# --- policies and routes -------------------------------------------------------------------


def _doc_selector(spec: Mapping[str, Any]) -> dict[str, str] | None:
    sel = spec.get("selector")
    if not isinstance(sel, Mapping):
        return None
    labels = sel.get("matchLabels")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else None


def policies_from(g: Gathered) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(AuthorizationPolicies, PeerAuthentications) as ``{namespace, name, selector, action,
    targetRefs, raw}``: from the registry when read, else the ztunnels' config dumps."""
    authz: list[dict[str, Any]] = []
    peer: list[dict[str, Any]] = []
    if g.registry is not None:
        for d in g.registry:
            meta, spec = d.get("metadata") or {}, d.get("spec") or {}
            base = {"namespace": meta.get("namespace"), "name": meta.get("name"),
                    "selector": _doc_selector(spec),
                    "raw": f"/raw/registry/{d.get('kind')}/{meta.get('namespace')}/"
                           f"{meta.get('name')}"}
            if d.get("kind") == "AuthorizationPolicy":
                authz.append({**base, "action": spec.get("action", "ALLOW"),
                              "targetRefs": spec.get("targetRefs") or [],
                              "rules": len(spec.get("rules") or [])})
            elif d.get("kind") == "PeerAuthentication":
                peer.append({**base, "mode": (spec.get("mtls") or {}).get("mode")})
        return authz, peer
    seen: set[tuple[str, str]] = set()
    for n in g.nodes:
        config = n.config or {}
        for p in config.get("authorization_policies") or []:
            key = (str(p.get("namespace")), str(p.get("name")))
            if key not in seen:
                seen.add(key)
                authz.append({"namespace": key[0], "name": key[1], "selector": p.get("selector"),
                              "action": p.get("action"), "targetRefs": [],
                              "rules": len(p.get("rules") or []),
                              "raw": f"/raw/node/{n.name}/config_dump"})
        for p in config.get("peer_authentications") or []:
            key = ("pa", f"{p.get('namespace')}/{p.get('name')}")
            if key not in seen:
                seen.add(key)
                peer.append({"namespace": p.get("namespace"), "name": p.get("name"),
                             "selector": p.get("selector"), "mode": p.get("mode"),
                             "raw": f"/raw/node/{n.name}/config_dump"})
    return authz, peer


def policy_hits(policies: list[dict[str, Any]], wl: Mapping[str, Mapping[str, Any]],
                denials: Mapping[str, float], edges: Mapping[str, Mapping[str, Any]]) -> None:
    """Fill in each policy's selected workloads, denials (ztunnel counters, all nodes) and,
    for a ztunnel (selector) ALLOW policy, the connections its workloads accepted."""
    for p in policies:
        if p.get("targetRefs"):
            p["selects"] = [f"{r.get('kind')}/{r.get('name')}" for r in p["targetRefs"]]
            p["enforcedBy"] = "waypoint"
            p["denied"] = None  # the waypoint's RBAC does not count per policy
            p["allowed"] = None
            continue
        p["enforcedBy"] = "ztunnel"
        selected = [w["id"] for w in wl.values() if w["namespace"] == p["namespace"]
                    and w["kind"] == "workload" and _selects(p.get("selector"), w["labels"])]
        p["selects"] = selected
        p["denied"] = denials.get(f"{p['namespace']}/{p['name']}", 0.0)
        p["allowed"] = sum(e["connections"] - e["denied"] - e["failed"] for e in edges.values()
                           if e["kind"] == "tcp" and e["target"] in selected) \
            if p.get("action") == "ALLOW" else None


def routes_from(g: Gathered) -> list[dict[str, Any]]:
    """HTTPRoutes with the waypoint that serves them (the parent Service's
    ``ambit.dev/use-waypoint``, else its namespace's)."""
    if g.registry is None:
        return []
    docs = list(g.registry)
    services = {(d["metadata"].get("namespace"), d["metadata"].get("name")): d for d in docs
                if d.get("kind") == "Service" and isinstance(d.get("metadata"), Mapping)}
    ns_waypoint = {d["metadata"].get("name"): (d["metadata"].get("labels") or {}).get(
        "ambit.dev/use-waypoint") for d in docs
        if d.get("kind") == "Namespace" and isinstance(d.get("metadata"), Mapping)}
    out = []
    for d in docs:
        if d.get("kind") != "HTTPRoute":
            continue
        meta, spec = d.get("metadata") or {}, d.get("spec") or {}
        ns = meta.get("namespace")
        parents = []
        for ref in spec.get("parentRefs") or []:
            if not isinstance(ref, Mapping):
                continue
            kind = ref.get("kind", "Gateway")
            pns = ref.get("namespace", ns)
            waypoint = None
            if kind == "Service":
                svc = services.get((pns, ref.get("name")))
                labels = ((svc or {}).get("metadata") or {}).get("labels") or {}
                waypoint = labels.get("ambit.dev/use-waypoint") or ns_waypoint.get(pns)
            else:
                waypoint = ref.get("name")
            parents.append({"kind": kind, "name": ref.get("name"), "namespace": pns,
                            "waypoint": f"{pns}/{waypoint}" if waypoint else None})
        backends = sorted({str(b.get("name")) for r in spec.get("rules") or []
                           for b in r.get("backendRefs") or [] if isinstance(b, Mapping)})
        out.append({"namespace": ns, "name": meta.get("name"), "parents": parents,
                    "backends": backends, "rules": len(spec.get("rules") or []),
                    "raw": f"/raw/registry/HTTPRoute/{ns}/{meta.get('name')}"})
    return out


# --- the whole model -----------------------------------------------------------------------


def build(g: Gathered) -> dict[str, Any]:
    """The model the page draws, from one gather; pure."""
    problems: list[str] = []
    node_samples: dict[str, list[promtext.Sample]] = {}
    for n in g.nodes:
        problems += [f"node {n.name}: {src}: {why}" for src, why in sorted(n.errors.items())]
        samples, err = promtext.parse(n.metrics or "", NODE_FAMILIES)
        if err:
            problems.append(f"node {n.name}: metrics: {err}")
        if _value(samples, "ambit_agent_ztunnel_scrape_up") == 0:
            problems.append(f"node {n.name}: the agent could not read the ztunnel's metrics; "
                            "its edges, denials and state feed are missing until it can")
        node_samples[n.name] = samples
    wp_samples: dict[str, list[promtext.Sample]] = {}
    for wp in g.waypoints:
        if wp.error:
            problems.append(f"waypoint {wp.namespace}/{wp.name}: {wp.error}")
        samples, err = promtext.parse(wp.metrics or "", WAYPOINT_FAMILIES)
        if err:
            problems.append(f"waypoint {wp.namespace}/{wp.name}: metrics: {err}")
        wp_samples[f"{wp.namespace}/{wp.pod}"] = samples
    if g.controller_error:
        problems.append(f"controller: {g.controller_error}")
    if g.registry_error:
        problems.append(f"registry: {g.registry_error}")
    problems += g.notes

    wl = workloads(g.nodes, g.state)
    authz, peer = policies_from(g)
    edges = tcp_edges(node_samples)
    # Denials per policy on each node, destination side only (the source side says "-").
    denials_by_node: dict[str, dict[str, float]] = {}
    for node, samples in node_samples.items():
        for s in samples:
            if s.name == "ambit_ztunnel_policy_denied_total" \
                    and s.labels.get("direction") == "destination":
                d = denials_by_node.setdefault(node, {})
                policy = s.labels.get("policy", "-")
                d[policy] = d.get(policy, 0.0) + s.value
    for e in edges.values():
        if e["denied"] > 0:
            target = wl.get(e["target"])
            node = (target or {}).get("node") or ""
            e["deniedBy"] = denied_by(target, authz, denials_by_node.get(node, {}))
    edges.update(http_edges(g.waypoints, wp_samples, wl))
    # Waypoints on the path: a service bound to a waypoint, named on the L4 edge to it.
    for w in g.waypoints:
        wid = _waypoint_node_id(w, set(wl))
        if wid in wl:
            wl[wid]["kind"] = "waypoint"
            wl[wid]["gateway"] = w.name
    all_denials: dict[str, float] = {}
    for d in denials_by_node.values():
        for k, v in d.items():
            all_denials[k] = all_denials.get(k, 0.0) + v
    policy_hits(authz, wl, all_denials, edges)
    graph_ids = set(wl)
    extra: dict[str, dict[str, Any]] = {}
    for e in edges.values():
        for end in (e["source"], e["target"]):
            if end not in graph_ids and end not in extra:
                # A service (an L7 request no workload answered), a source the ztunnels do
                # not know ("unknown"), or a workload gone from the state since.
                kind, ns, name = "service", None, end.removeprefix("service:")
                if not end.startswith("service:"):
                    ns, _, name = end.rpartition("/")
                    kind = "workload" if ns else "external"
                extra[end] = {"id": end, "kind": kind, "name": name, "namespace": ns or None,
                              "pods": [], "nodes": [], "node": None, "captured": None,
                              "labels": {}, "inState": False}
    services: list[dict[str, Any]] = []
    # Every ztunnel holds the same services; in Kubernetes the state computed from the API.
    configs = [g.state] if g.state is not None else [n.config for n in g.nodes[:1]]
    for config in configs:
        for svc in (config or {}).get("services") or []:
            if isinstance(svc, Mapping):
                ref = svc.get("waypoint")
                services.append({"hostname": svc.get("hostname"),
                                 "namespace": svc.get("namespace"), "name": svc.get("name"),
                                 "vips": svc.get("vips"),
                                 "waypoint": f"{ref['namespace']}/{ref['name']}"
                                 if isinstance(ref, Mapping) else None,
                                 "endpoints": svc.get("endpoints")})
    return {
        "at": g.at,
        "source": g.source,
        "workloads": sorted([*wl.values(), *extra.values()], key=lambda w: str(w["id"])),
        "edges": sorted(edges.values(), key=lambda e: str(e["id"])),
        "nodes": [node_view(n, node_samples[n.name], g.at) for n in g.nodes],
        "waypoints": [{"namespace": wp.namespace, "name": wp.name, "pod": wp.pod,
                       "node": wp.node, "error": wp.error,
                       "services": [s["hostname"] for s in services
                                    if s["waypoint"] == f"{wp.namespace}/{wp.name}"],
                       "raw": f"/raw/waypoint/{wp.namespace}/{wp.pod}/metrics"}
                      for wp in g.waypoints],
        "services": services,
        "policies": authz,
        "peerAuthentications": peer,
        "routes": routes_from(g),
        "controller": {"ready": g.controller_ready, "error": g.controller_error,
                       "registryRevision": g.registry_revision},
        "problems": problems,
    }


def with_rates(model: dict[str, Any], earlier: Mapping[str, Any] | None) -> dict[str, Any]:
    """Add per-second rates to ``model``'s edges and nodes from the counters of ``earlier``
    (a model from up to ``RATE_WINDOW`` seconds before). An edge absent earlier started in the
    window: its whole count is the window's. Counters that went down (a restart) rate 0."""
    if earlier is None:
        for e in model["edges"]:
            e["rate"] = None
            e["active"] = False
        return model
    dt = float(model["at"]) - float(earlier["at"])
    before = {e["id"]: e for e in earlier.get("edges") or []}
    for e in model["edges"]:
        count = "connections" if e["kind"] == "tcp" else "requests"
        prev = before.get(e["id"], {}).get(count, 0.0)
        delta = e[count] - prev
        e["rate"] = delta / dt if dt > 0 and delta > 0 else 0.0
        e["active"] = delta > 0
        if e["kind"] == "tcp":
            db = e["bytes"] - before.get(e["id"], {}).get("bytes", 0.0)
            e["byteRate"] = db / dt if dt > 0 and db > 0 else 0.0
    nodes_before = {n["name"]: n for n in earlier.get("nodes") or []}
    for n in model["nodes"]:
        prev_cpu = (nodes_before.get(n["name"]) or {}).get("cpuSeconds") or {}
        n["cpu"] = {}
        for comp, sec in n["cpuSeconds"].items():
            p = prev_cpu.get(comp)
            n["cpu"][comp] = (sec - p) / dt if sec is not None and p is not None and dt > 0 \
                and sec >= p else None
    return model

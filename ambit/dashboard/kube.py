"""``ambit dashboard --kubeconfig``: the dashboard's inputs gathered from a Kubernetes cluster.

Why it exists: in Kubernetes nothing of the mesh is on the dashboard's machine. The node
agents, the controller and the waypoints answer on their pods' addresses, and the ztunnel's
admin port (``/config_dump``, 15000) listens on loopback inside the node pod, out of reach of
anything but the node itself. So, as ``ambit status`` does, everything is read through the API
server with nothing but the caller's kubeconfig:

* the mesh's documents (Namespaces, Pods, Services, EndpointSlices, AuthorizationPolicies,
  PeerAuthentications, Gateways, HTTPRoutes, GRPCRoutes, TCPRoutes, HTTPFaults) are listed and
  turned into a registry snapshot by the controller's own Kubernetes conversion
  (``k8s_convert.build_snapshot``), then into the mesh state the controller sends every ztunnel
  (``translate``): the workloads and services the page draws are the ones the ztunnels are
  given, which stands in for the per-node ``/config_dump`` (so certificate expiry and each
  ztunnel's state version are not shown: only the ztunnel itself knows them);
* each node pod's agent (15022: ``/metrics``, which merges the ztunnel's, and ``/debug/pods``),
  each waypoint's ``/metrics`` (15020) and the controller's ``/ready`` (15014) through the API
  server's pod proxy (``GET .../pods/<pod>:<port>/proxy/<path>``; RBAC: ``get`` on
  ``pods/proxy``).

Every request is bounded as the other sources' are: ``FETCH_TIMEOUT`` seconds and ``MAX_JSON``
bytes. The raw link of a document is the Kubernetes object as the API served it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from ambit.dashboard.gather import (
    FETCH_TIMEOUT,
    MAX_JSON,
    PortGet,
    gather_node,
    gather_waypoint,
)
from ambit.dashboard.model import Gathered, NodeRaw, WaypointRaw
from ambit.dashboard.netns_http import FetchError
from ambit.install.names import CONFIG_MAP, CONTROLLER, NAMESPACE, NODE_DAEMONSET
from mesh.ports import GATEWAY_NAME_LABEL, MONITORING_PORT
from mesh.state.model import MeshConfig

# (plural, collection path, optional): what the controller's Kubernetes feed watches
# (controller.registry.kubernetes.watched_kinds) minus ServiceAccounts, which only the CA
# reads. An optional kind is a CRD the cluster may not serve: a 404 reads as empty.
KINDS: tuple[tuple[str, str, bool], ...] = (
    ("namespaces", "/api/v1/namespaces", False),
    ("pods", "/api/v1/pods", False),
    ("services", "/api/v1/services", False),
    ("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices", False),
    ("authorizationpolicies", "/apis/security.ambit.dev/v1/authorizationpolicies", True),
    ("peerauthentications", "/apis/security.ambit.dev/v1/peerauthentications", True),
    ("gateways", "/apis/gateway.networking.k8s.io/v1/gateways", True),
    ("httproutes", "/apis/gateway.networking.k8s.io/v1/httproutes", True),
    ("grpcroutes", "/apis/gateway.networking.k8s.io/v1/grpcroutes", True),
    ("tcproutes", "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes", True),
    ("httpfaults", "/apis/networking.ambit.dev/v1alpha1/httpfaults", True),
)
DEFAULT_TRUST_DOMAIN = "cluster.local"
CHUNK = 64 << 10


class ApiAnswer(FetchError):
    """The API server (or the pod behind its proxy) answered, but not 200."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- pure conversions ----------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def items(body: bytes, what: str) -> list[dict[str, Any]]:
    """The objects of a list answer; raises ``FetchError`` when it is not one."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise FetchError(f"{what}: not JSON ({e})") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("items", []), list):
        raise FetchError(f"{what}: not a Kubernetes list")
    return [i for i in doc.get("items") or [] if isinstance(i, dict)]


def caches(lists: Mapping[str, Sequence[Mapping[str, Any]]]) \
        -> dict[str, dict[str, Mapping[str, Any]]]:
    """The lists shaped as the reflectors' caches ``build_snapshot`` takes: plural ->
    ``namespace/name`` -> object."""
    return {plural: {f"{_meta(o).get('namespace') or ''}/{_meta(o).get('name')}": o
                     for o in objs}
            for plural, objs in lists.items()}


def matches(selector: Mapping[str, Any] | None, labels: Mapping[str, Any]) -> bool:
    """A ``matchLabels`` selector; an empty or missing one selects nothing (a workload
    controller always has one, and picking every pod of the namespace would be wrong)."""
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def selected_pods(owner: Mapping[str, Any] | None,
                  pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods of a Deployment or DaemonSet (its ``spec.selector.matchLabels``) in its own
    namespace, by name."""
    if owner is None:
        return []
    ns = _meta(owner).get("namespace")
    sel = ((owner.get("spec") or {}).get("selector") or {}).get("matchLabels")
    out = [p for p in pods if _meta(p).get("namespace") == ns
           and matches(sel, _meta(p).get("labels") or {})]
    return sorted(out, key=lambda p: str(_meta(p).get("name")))


def running(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" \
        and not _meta(pod).get("deletionTimestamp")


def waypoint_pods(pods: Sequence[Mapping[str, Any]]) -> list[WaypointRaw]:
    """Every running waypoint instance (a pod with the gateway-name label)."""
    out = []
    for p in pods:
        meta = _meta(p)
        labels = meta.get("labels") or {}
        if GATEWAY_NAME_LABEL in labels and running(p):
            out.append(WaypointRaw(str(meta.get("namespace")), str(labels[GATEWAY_NAME_LABEL]),
                                   str(meta.get("name")),
                                   str((p.get("spec") or {}).get("nodeName") or "")))
    return sorted(out, key=lambda w: (w.namespace, w.pod))


def state_document(cfg: MeshConfig) -> dict[str, Any]:
    """The mesh state in the shape of a ztunnel's ``/config_dump`` (its ``workloads`` and
    ``services``), which the model reads; a service's endpoints are the healthy workloads of
    its namespace its selector picks, as the ztunnel resolves them."""
    workloads = [{"uid": w.uid, "name": w.name, "namespace": w.namespace, "node": w.node,
                  "workload_name": w.workload_name, "service_account": w.service_account,
                  "identity": str(w.identity), "addresses": [str(a) for a in w.addresses],
                  "labels": dict(w.labels), "protocol": w.protocol.value,
                  "healthy": w.healthy}
                 for w in cfg.workloads]
    services = []
    for s in cfg.services:
        sel = dict(s.selector)
        services.append({
            "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
            "vips": [str(v) for v in s.vips],
            "ports": [{"port": p.port, "target_port": p.target_port} for p in s.ports],
            "waypoint": None if s.waypoint is None else
            {"namespace": s.waypoint.namespace, "name": s.waypoint.name},
            "endpoints": [w.uid for w in cfg.workloads if w.namespace == s.namespace
                          and w.healthy and matches(sel, w.label_map)]})
    return {"version": cfg.version, "trust_domain": cfg.trust_domain,
            "workloads": workloads, "services": services}


def mesh_from(lists: Mapping[str, Sequence[Mapping[str, Any]]], trust_domain: str,
              revision: int) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """(registry documents, state document, problems) from the listed objects, by the
    controller's own conversion and translation."""
    from controller.registry.documents import to_document
    from controller.registry.k8s_convert import build_snapshot
    from controller.registry.model import Record
    from controller.registry.translate import translate

    problems: list[str] = []
    snap = build_snapshot(caches(lists), revision, problems.append)
    records: list[Record] = [*snap.namespaces, *snap.services, *snap.authorization_policies,
                             *snap.peer_authentications, *snap.gateways, *snap.http_routes]
    translation = translate(snap, trust_domain, revision)
    problems += translation.problems
    return [to_document(r) for r in records], state_document(translation.config), problems


def _revision(body: bytes) -> int:
    """A list's ``metadata.resourceVersion`` when it is a number (it is opaque in general,
    so anything else reads 0)."""
    try:
        rv = json.loads(body).get("metadata", {}).get("resourceVersion", "")
    except (ValueError, AttributeError):
        return 0
    return int(rv) if isinstance(rv, str) and rv.isdigit() else 0


# --- the source ----------------------------------------------------------------------------


async def _read_bounded(content: Any, limit: int) -> bytes:
    body = bytearray()
    while True:
        chunk = await content.read(CHUNK)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise FetchError(f"answer larger than {limit} bytes")


class KubernetesSource:
    """A cluster through its API server (``--kubeconfig PATH [--context NAME]``)."""

    def __init__(self, kubeconfig: str | None, context: str | None = None, *,
                 api: Any = None) -> None:
        self.kubeconfig = kubeconfig
        self.context = context
        self._api = api  # a kubernetes_asyncio ApiClient; made on the first gather
        where = kubeconfig or "the default kubeconfig"
        self.description = f"Kubernetes ({where}{f', context {context}' if context else ''})"

    async def _client(self) -> Any:
        if self._api is None:
            from ambit.install.kube import connect

            self._api = await connect(self.kubeconfig, self.context)
        return self._api

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def get(self, path: str) -> bytes:
        """One bounded GET through the API server (its pod proxy included): the body of a
        200 of at most ``MAX_JSON`` bytes, within ``FETCH_TIMEOUT`` seconds; else
        ``FetchError`` (``ApiAnswer`` when it answered another status)."""
        api = await self._client()
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                resp = await api.call_api(
                    path, "GET", header_params={"Accept": "application/json, */*"},
                    auth_settings=["BearerToken"], _preload_content=False,
                    _request_timeout=FETCH_TIMEOUT)
                try:
                    status = int(resp.status)
                    body = await _read_bounded(resp.content, MAX_JSON)
                finally:
                    resp.release()
        except FetchError as e:
            raise FetchError(f"GET {path}: {e}") from None
        except TimeoutError:
            raise FetchError(f"GET {path}: no answer within {FETCH_TIMEOUT:g} s") from None
        except Exception as e:  # aiohttp's and the client's own, several unrelated types
            raise FetchError(f"GET {path}: cannot reach the API server "
                             f"({type(e).__name__}: {e})") from None
        if status != 200:
            raise ApiAnswer(status, f"GET {path}: {status} {_status_message(body)}")
        return body

    def _proxy(self, namespace: str, pod: str) -> PortGet:
        def get(port: int, path: str) -> Awaitable[bytes]:
            return self.get(f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy"
                            f"/{path.lstrip('/')}")
        return get

    async def _list(self, path: str, optional: bool) -> tuple[bytes | None, str | None]:
        try:
            return await self.get(path), None
        except ApiAnswer as e:
            if optional and e.status == 404:
                return None, None  # the CRD is not installed: no such objects
            return None, str(e)
        except FetchError as e:
            return None, str(e)

    async def _object(self, path: str) -> tuple[Mapping[str, Any] | None, str | None]:
        body, err = await self._list(path, optional=True)
        if body is None:
            return None, err
        try:
            doc = json.loads(body)
        except ValueError as e:
            return None, f"GET {path}: not JSON ({e})"
        return (doc, None) if isinstance(doc, Mapping) else (None, f"GET {path}: not an object")

    async def gather(self, raw: dict[str, bytes]) -> Gathered:
        g = Gathered(at=time.time(), source=self.description)
        try:
            await self._client()
        except Exception as e:  # ConnectError, or the client's own on a broken kubeconfig
            g.controller_error = str(e)
            g.registry_error = "cannot reach the API server"
            return g
        answers, (ds, ds_err), (dep, dep_err), (cm, _) = await asyncio.gather(
            asyncio.gather(*(self._list(path, optional) for _, path, optional in KINDS)),
            self._object(f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{NODE_DAEMONSET}"),
            self._object(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{CONTROLLER}"),
            self._object(f"/api/v1/namespaces/{NAMESPACE}/configmaps/{CONFIG_MAP}"))
        lists: dict[str, list[dict[str, Any]]] = {}
        errors: list[str] = []
        for (plural, path, _), (body, err) in zip(KINDS, answers, strict=True):
            if err:
                errors.append(err)
            try:
                lists[plural] = items(body, f"GET {path}") if body is not None else []
            except FetchError as e:
                errors.append(str(e))
                lists[plural] = []
        pods = lists["pods"]
        trust_domain = str(((cm or {}).get("data") or {}).get("trustDomain")
                           or DEFAULT_TRUST_DOMAIN)
        if errors:
            g.registry_error = "; ".join(errors)
        else:
            # The pods list's version: it changes whenever a workload does.
            pods_body = next(body for (plural, _, _), (body, _) in zip(KINDS, answers,
                                                                       strict=True)
                             if plural == "pods")
            revision = _revision(pods_body or b"")
            g.registry, state, problems = mesh_from(lists, trust_domain, revision)
            g.registry_revision = revision
            g.state, g.notes = state, problems
            raw["/raw/state"] = json.dumps(state, indent=1).encode()
            by_kind = {plural: kind for plural, kind in (
                ("namespaces", "Namespace"), ("services", "Service"),
                ("authorizationpolicies", "AuthorizationPolicy"),
                ("peerauthentications", "PeerAuthentication"), ("gateways", "Gateway"),
                ("httproutes", "HTTPRoute"))}
            for plural, kind in by_kind.items():
                for o in lists[plural]:
                    meta = _meta(o)
                    raw[f"/raw/registry/{kind}/{meta.get('namespace')}/{meta.get('name')}"] = \
                        json.dumps(o, indent=1).encode()

        node_pods = selected_pods(ds, pods)
        if ds is None:
            g.notes.append(ds_err or f"DaemonSet {NAMESPACE}/{NODE_DAEMONSET} does not exist: "
                           "is Ambit installed (ambit install)?")
        nodes, wps, _ = await asyncio.gather(
            asyncio.gather(*(self._node(p, raw) for p in node_pods)),
            asyncio.gather(*(gather_waypoint(wp, self._proxy(wp.namespace, wp.pod), raw)
                             for wp in waypoint_pods(pods))),
            self._controller(g, dep, dep_err, pods))
        g.nodes, g.waypoints = list(nodes), list(wps)
        return g

    async def _node(self, pod: Mapping[str, Any], raw: dict[str, bytes]) -> NodeRaw:
        meta = _meta(pod)
        name = str((pod.get("spec") or {}).get("nodeName") or meta.get("name"))
        if not running(pod):
            node = NodeRaw(name)
            phase = (pod.get("status") or {}).get("phase") or "Pending"
            node.errors["pod"] = (f"node pod {NAMESPACE}/{meta.get('name')} is {phase}"
                                  f"{' (terminating)' if meta.get('deletionTimestamp') else ''}")
            return node
        # No config_dump: the ztunnel's admin port is on the node pod's loopback only.
        return await gather_node(name, self._proxy(NAMESPACE, str(meta.get("name"))), raw,
                                 config_dump=False)

    async def _controller(self, g: Gathered, dep: Mapping[str, Any] | None,
                          dep_err: str | None, pods: Sequence[Mapping[str, Any]]) -> None:
        if dep is None:
            g.controller_ready = False
            g.controller_error = dep_err or (f"Deployment {NAMESPACE}/{CONTROLLER} does not "
                                             "exist: is Ambit installed (ambit install)?")
            return
        candidates = [p for p in selected_pods(dep, pods) if running(p)]
        if not candidates:
            g.controller_ready = False
            g.controller_error = f"no running pod of Deployment {NAMESPACE}/{CONTROLLER}"
            return
        # Every replica serves /ready (the standby ones too): one answering is enough.
        whys = []
        for p in candidates:
            name = str(_meta(p).get("name"))
            try:
                await self._proxy(NAMESPACE, name)(MONITORING_PORT, "/ready")
            except FetchError as e:
                whys.append(f"{name}: {e}")
                continue
            g.controller_ready, g.controller_error = True, None
            return
        g.controller_ready = False
        g.controller_error = "; ".join(whys)


def _status_message(body: bytes) -> str:
    """A Kubernetes Status's message, else the start of the body."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, Mapping) and doc.get("kind") == "Status":
        return str(doc.get("message") or doc.get("reason") or "")
    return body[:200].decode("utf-8", "replace").strip()


__all__ = ["KINDS", "ApiAnswer", "KubernetesSource", "caches", "items", "matches", "mesh_from",
           "selected_pods", "state_document", "waypoint_pods"]

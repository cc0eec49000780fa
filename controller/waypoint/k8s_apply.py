"""Create, update or delete a waypoint ``Gateway`` through the Kubernetes API, and the small
REST layer the waypoint deployer shares.

Why it exists: ``ambit waypoint apply/delete`` in Kubernetes mode writes one Gateway of class
``ambit-waypoint`` (the controller's deployer then runs it), and a person running it needs an
answer they can act on: the Gateway API CRDs are missing (with the ``kubectl apply`` that
installs them), the namespace does not exist, the credentials may not do it, or a Gateway of
that name belongs to another implementation. So errors are ``WaypointApplyError`` with one
sentence each, never a client stack trace.

Why raw REST (``ApiClient.call_api`` with paths) rather than the generated typed methods: every
caller here works with plain JSON dicts, as the reflectors do (``k8s_watch``), five kinds need
the same five verbs, and a response is never deserialized into models only to be turned back
into dicts. Requests still go through the real ``kubernetes_asyncio`` client (configuration,
credentials, TLS).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client

from controller.waypoint.model import WAYPOINT_CLASS, WAYPOINT_FOR_LABEL, Gateway
from controller.waypoint.parse import GATEWAY_GROUP, HBONE_LISTENER, WAYPOINT_FOR, gateway_spec

__all__ = [
    "CONFIG_MAPS", "DEPLOYMENTS", "GATEWAYS", "GATEWAY_API_INSTALL", "SERVICES",
    "SERVICE_ACCOUNTS", "ApiError", "Resource", "Rest", "WaypointApplyError",
    "apply_waypoint", "delete_waypoint",
]

GATEWAY_API_INSTALL = ("kubectl apply -f https://github.com/kubernetes-sigs/gateway-api/"
                       "releases/download/v1.3.0/standard-install.yaml")
CLI_FIELD_MANAGER = "ambit"
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API's URL space (also ``ambit install``'s discovered kinds)."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def base(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def path(self, namespace: str | None, name: str | None = None,
             subresource: str | None = None) -> str:
        """An object, or a collection (``name`` None); ``namespace`` None or "" for a
        cluster-scoped kind, or a list across namespaces."""
        out = self.base
        if self.namespaced and namespace:
            out += f"/namespaces/{namespace}"
        out += f"/{self.plural}"
        if name is not None:
            out += f"/{name}"
            if subresource:
                out += f"/{subresource}"
        return out

    def describe(self, namespace: str, name: str) -> str:
        return f"{self.kind} {namespace}/{name}"

    def resource_name(self) -> str:
        """How kubectl names it: ``deployments.apps``, ``pods``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount")
SERVICES = Resource("", "v1", "services", "Service")
CONFIG_MAPS = Resource("", "v1", "configmaps", "ConfigMap")
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
GATEWAYS = Resource(GATEWAY_GROUP, "v1", "gateways", "Gateway")


class ApiError(Exception):
    """A request the API server refused (``status`` its HTTP status, ``reason`` the Status
    reason) or could not be sent (``status`` 0)."""

    def __init__(self, status: int, reason: str, message: str,
                 details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"


class Rest:
    """JSON requests to the API server through a ``kubernetes_asyncio`` ``ApiClient``."""

    def __init__(self, api: client.ApiClient, *, timeout: float = 30.0) -> None:
        self.api = api
        self.timeout = timeout

    async def request(self, method: str, path: str, *, body: Any = None,
                      query: Sequence[tuple[str, str]] = (),
                      content_type: str = "application/json") -> dict[str, Any]:
        """The response's JSON object; raises ``ApiError``."""
        try:
            resp = await self.api.call_api(
                path, method, query_params=list(query),
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body, auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=self.timeout)
            try:
                status, raw = resp.status, await resp.read()
            finally:
                resp.release()
        except Exception as e:  # aiohttp's and the client's own, several unrelated types
            raise ApiError(0, "Unreachable", f"{method} {path}: cannot reach the API server "
                           f"({type(e).__name__}: {e})") from e
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = None
        if not 200 <= status < 300:
            if isinstance(doc, dict) and doc.get("kind") == "Status":
                raise ApiError(status, str(doc.get("reason") or ""),
                               str(doc.get("message") or ""), doc.get("details"))
            raise ApiError(status, "", raw[:200].decode(errors="replace").strip())
        if not isinstance(doc, dict):
            raise ApiError(status, "BadResponse", f"{method} {path}: not a JSON object: "
                           f"{raw[:200]!r}")
        return doc

    async def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", res.path(namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def create(self, res: Resource, namespace: str, body: Mapping[str, Any],
                     field_manager: str) -> dict[str, Any]:
        return await self.request("POST", res.path(namespace), body=dict(body),
                                  query=[("fieldManager", field_manager)])

    async def replace(self, res: Resource, namespace: str, name: str,
                      body: Mapping[str, Any], field_manager: str) -> dict[str, Any]:
        """PUT: the body must carry the ``metadata.resourceVersion`` it was read at (409
        Conflict if the object changed since)."""
        return await self.request("PUT", res.path(namespace, name), body=dict(body),
                                  query=[("fieldManager", field_manager)])

    async def patch_status(self, res: Resource, namespace: str, name: str,
                           body: Mapping[str, Any], field_manager: str) -> dict[str, Any]:
        return await self.request("PATCH", res.path(namespace, name, "status"),
                                  body=dict(body), query=[("fieldManager", field_manager)],
                                  content_type=MERGE_PATCH)

    async def delete(self, res: Resource, namespace: str, name: str, *, uid: str = "") -> bool:
        """Delete (dependents in the background); with ``uid``, only that incarnation of the
        object. False when it was already gone."""
        options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions",
                                   "propagationPolicy": "Background"}
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", res.path(namespace, name), body=options)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def served(self, res: Resource) -> bool:
        """Whether the API server serves ``res`` (API discovery): False for a CRD that is not
        installed."""
        try:
            doc = await self.request("GET", res.base)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return any(isinstance(r, Mapping) and r.get("name") == res.plural
                   for r in doc.get("resources") or [])


# --- ambit waypoint apply / delete -----------------------------------------------------------


class WaypointApplyError(Exception):
    """``apply_waypoint``/``delete_waypoint`` could not do it; the message says what to do."""


def _explain(e: ApiError, doing: str, namespace: str) -> WaypointApplyError:
    if e.status == 0:
        text = f"{doing}: {e.message}; check the kubeconfig's server address and the network"
    elif e.status == 401:
        text = (f"{doing}: the API server does not accept these credentials (401); check the "
                "kubeconfig's user or token")
    elif e.status == 403:
        text = (f"{doing}: forbidden ({e.message}); these credentials need RBAC permission on "
                f"gateways.{GATEWAY_GROUP} in namespace {namespace}")
    elif e.status == 422:
        text = f"{doing}: the API server rejected it: {e.message}"
    else:
        text = f"{doing}: the API server answered {e.status} {e.reason}: {e.message}"
    return WaypointApplyError(text)


def _not_installed(doing: str) -> WaypointApplyError:
    return WaypointApplyError(f"{doing}: the Gateway API CRDs are not installed in this cluster "
                              f"(no gateways.{GATEWAY_GROUP}); install them with: "
                              f"{GATEWAY_API_INSTALL}")


def _waypoint_class(obj: Mapping[str, Any]) -> str:
    return str((obj.get("spec") or {}).get("gatewayClassName") or "")


def _listener_ok(spec: Mapping[str, Any]) -> bool:
    listeners = spec.get("listeners")
    if not isinstance(listeners, list) or len(listeners) != 1 \
            or not isinstance(listeners[0], Mapping):
        return False
    return all(listeners[0].get(k) == v for k, v in HBONE_LISTENER.items())


async def apply_waypoint(api_client: client.ApiClient, namespace: str, name: str,
                         waypoint_for: str = "service") -> str:
    """Create or update the waypoint Gateway ``namespace/name`` (class ``ambit-waypoint``, one
    HBONE listener, label ``ambit.dev/waypoint-for``); a one-line summary of what
    happened. Raises ``WaypointApplyError``."""
    doing = f"applying waypoint {namespace}/{name}"
    if waypoint_for not in WAYPOINT_FOR:
        raise WaypointApplyError(f"{doing}: waypoint-for {waypoint_for!r} is not one of "
                                 f"{', '.join(WAYPOINT_FOR)}")
    rest = Rest(api_client)
    model = Gateway(name=name, namespace=namespace, waypoint_for=waypoint_for)
    spec = gateway_spec(model)
    try:
        if not await rest.served(GATEWAYS):
            raise _not_installed(doing)
        for _ in range(3):  # a concurrent writer makes the PUT conflict: read again
            live = await rest.get(GATEWAYS, namespace, name)
            if live is None:
                body = {"apiVersion": GATEWAYS.api_version, "kind": "Gateway",
                        "metadata": {"name": name, "namespace": namespace,
                                     "labels": {WAYPOINT_FOR_LABEL: waypoint_for}},
                        "spec": spec}
                try:
                    await rest.create(GATEWAYS, namespace, body, CLI_FIELD_MANAGER)
                except ApiError as e:
                    if e.status == 404:
                        raise WaypointApplyError(
                            f"{doing}: namespace {namespace} does not exist; create it first "
                            f"(kubectl create namespace {namespace})") from None
                    if e.already_exists:
                        continue
                    raise
                return (f"Gateway {namespace}/{name} created (class {WAYPOINT_CLASS}, waypoint "
                        f"for {waypoint_for} traffic); the controller deploys it")
            found = _waypoint_class(live)
            if found != WAYPOINT_CLASS:
                raise WaypointApplyError(
                    f"{doing}: Gateway {namespace}/{name} already exists with class "
                    f"{found or '(none)'!r}, not {WAYPOINT_CLASS}; it belongs to another "
                    "implementation: choose another name for the waypoint")
            meta = live.setdefault("metadata", {})
            labels = meta.get("labels") or {}
            live_spec = live.get("spec") or {}
            if labels.get(WAYPOINT_FOR_LABEL) == waypoint_for and _listener_ok(live_spec) \
                    and set(live_spec) <= {"gatewayClassName", "listeners"}:
                return f"Gateway {namespace}/{name} unchanged (waypoint for {waypoint_for} traffic)"
            meta["labels"] = {**labels, WAYPOINT_FOR_LABEL: waypoint_for}
            live["spec"] = spec
            live.pop("status", None)
            try:
                await rest.replace(GATEWAYS, namespace, name, live, CLI_FIELD_MANAGER)
            except ApiError as e:
                if e.status in (404, 409):
                    continue
                raise
            return (f"Gateway {namespace}/{name} configured (class {WAYPOINT_CLASS}, waypoint "
                    f"for {waypoint_for} traffic)")
        raise WaypointApplyError(f"{doing}: the Gateway kept changing while being written; "
                                 "try again")
    except ApiError as e:
        raise _explain(e, doing, namespace) from None


async def delete_waypoint(api_client: client.ApiClient, namespace: str, name: str, *,
                          missing_ok: bool = False) -> str:
    """Delete the waypoint Gateway ``namespace/name`` (only one of class ``ambit-waypoint``);
    its ServiceAccount, Deployment and Service go with it (owner references; the controller
    also removes them). A one-line summary; raises ``WaypointApplyError``."""
    doing = f"deleting waypoint {namespace}/{name}"
    rest = Rest(api_client)
    try:
        if not await rest.served(GATEWAYS):
            if missing_ok:
                return f"Gateway {namespace}/{name} not found (the Gateway API is not installed)"
            raise _not_installed(doing)
        live = await rest.get(GATEWAYS, namespace, name)
        if live is None:
            if missing_ok:
                return f"Gateway {namespace}/{name} not found"
            raise WaypointApplyError(f"{doing}: Gateway {namespace}/{name} does not exist "
                                     f"(kubectl get gateways -n {namespace} lists them)")
        found = _waypoint_class(live)
        if found != WAYPOINT_CLASS:
            raise WaypointApplyError(f"{doing}: Gateway {namespace}/{name} has class "
                                     f"{found or '(none)'!r}, not {WAYPOINT_CLASS}: not a "
                                     "waypoint, left alone")
        uid = str((live.get("metadata") or {}).get("uid") or "")
        if not await rest.delete(GATEWAYS, namespace, name, uid=uid) and not missing_ok:
            raise WaypointApplyError(f"{doing}: Gateway {namespace}/{name} does not exist")
    except ApiError as e:
        if e.status == 409:
            raise WaypointApplyError(f"{doing}: the Gateway was replaced while being deleted; "
                                     "check it and try again") from None
        raise _explain(e, doing, namespace) from None
    return (f"Gateway {namespace}/{name} deleted; its Deployment, Service and ServiceAccount "
            "are removed with it")

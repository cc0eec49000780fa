"""The Kubernetes API as install, uninstall and status use it: any kind, found by discovery.

Why not the generated typed client: the objects come from YAML files as plain dicts and go back
as plain dicts (server-side apply takes the manifest itself), of any kind the manifests hold,
including CRDs installed a moment earlier. So, as ``kubectl`` does, a kind is mapped to its URL
by API discovery (``GET /api/v1``, ``GET /apis/<group>/<version>``), and requests go through the
REST helper the waypoint CLI already uses (``controller.waypoint.k8s_apply.Rest``: the real
``kubernetes_asyncio`` client's configuration, credentials and TLS, errors as ``ApiError``).

``explain`` turns an ``ApiError`` into the one line an operator acts on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from ambit.install.names import FIELD_MANAGER
from controller.registry.kubernetes import api_client
from controller.waypoint.k8s_apply import ApiError, Resource, Rest

__all__ = ["APPLY_PATCH", "ApiError", "ApiResource", "Cluster", "ConnectError", "connect",
           "explain", "kubeconfig_source"]

APPLY_PATCH = "application/apply-patch+yaml"


class ConnectError(Exception):
    """No usable credentials; the message says where they were looked for."""


def kubeconfig_source(kubeconfig: str | None,
                      environ: Mapping[str, str] | None = None) -> str | None:
    """The kubeconfig to use, as kubectl picks it: ``--kubeconfig``, ``$KUBECONFIG``,
    ``~/.kube/config``; None for the pod's in-cluster service account."""
    env = os.environ if environ is None else environ
    if kubeconfig:
        return kubeconfig
    if env.get("KUBECONFIG"):
        return env["KUBECONFIG"]
    home = Path(env.get("HOME") or Path.home()) / ".kube" / "config"
    if home.is_file():
        return str(home)
    return None


def _check_exists(source: str | None) -> None:
    """A single kubeconfig that does not exist is a typo ($KUBECONFIG may list several files,
    which kubectl merges: those are left to the client)."""
    if source is not None and os.pathsep not in source and not os.path.isfile(source):
        raise ConnectError(f"kubeconfig {source} does not exist; pass --kubeconfig FILE or "
                           "set $KUBECONFIG to your cluster's kubeconfig")


async def connect(kubeconfig: str | None, context: str | None = None) -> client.ApiClient:
    """An API client for ``kubeconfig_source(kubeconfig)``; raises ``ConnectError``."""
    source = kubeconfig_source(kubeconfig)
    if source is None and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise ConnectError("no Kubernetes credentials: pass --kubeconfig FILE, set $KUBECONFIG, "
                           "or create ~/.kube/config (or run this inside a pod)")
    _check_exists(source)
    try:
        return await api_client(source, context)
    except Exception as e:  # kubernetes_asyncio raises several unrelated types here
        where = f"kubeconfig {source}" if source else "the in-cluster service account"
        ctx = f" (context {context})" if context else ""
        raise ConnectError(f"cannot load Kubernetes credentials from {where}{ctx}: "
                           f"{e}") from None


# A served resource: where its objects live in the URL space (the controller's own type).
ApiResource = Resource


def _split(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


class Cluster:
    """Discovery plus the handful of verbs install/uninstall/status need."""

    def __init__(self, api: client.ApiClient, *, timeout: float = 30.0) -> None:
        self.api = api
        self.rest = Rest(api, timeout=timeout)
        self._discovered: dict[str, list[ApiResource]] = {}

    @property
    def server(self) -> str:
        return str(getattr(self.api.configuration, "host", "") or "the API server")

    # ----- discovery -----

    async def resources(self, api_version: str) -> list[ApiResource]:
        """What ``api_version`` serves (empty: the group/version is not served)."""
        if api_version not in self._discovered:
            group, version = _split(api_version)
            base = f"/apis/{group}/{version}" if group else f"/api/{version}"
            try:
                doc = await self.rest.request("GET", base)
            except ApiError as e:
                if e.status != 404:
                    raise
                doc = {}
            found = []
            for r in doc.get("resources") or []:
                if isinstance(r, Mapping) and "/" not in str(r.get("name", "")):
                    found.append(ApiResource(group, version, str(r["name"]), str(r.get("kind")),
                                             bool(r.get("namespaced"))))
            self._discovered[api_version] = found
        return self._discovered[api_version]

    def forget(self, api_version: str | None = None) -> None:
        """Drop cached discovery (after installing CRDs)."""
        if api_version is None:
            self._discovered.clear()
        else:
            self._discovered.pop(api_version, None)

    async def resource(self, api_version: str, kind: str) -> ApiResource | None:
        """The resource serving ``kind``, None when the cluster does not serve it."""
        for r in await self.resources(api_version):
            if r.kind == kind:
                return r
        return None

    async def served(self, api_version: str, plural: str) -> ApiResource | None:
        for r in await self.resources(api_version):
            if r.plural == plural:
                return r
        return None

    # ----- verbs -----

    async def get(self, res: ApiResource, namespace: str | None,
                  name: str) -> dict[str, Any] | None:
        try:
            return await self.rest.request("GET", res.path(namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, res: ApiResource, namespace: str | None = None,
                   selector: str = "") -> list[dict[str, Any]]:
        query = [("labelSelector", selector)] if selector else []
        doc = await self.rest.request("GET", res.path(namespace), query=query)
        return [i for i in doc.get("items") or [] if isinstance(i, dict)]

    async def apply(self, res: ApiResource, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply (create or update, fields owned by ``ambit``, conflicts forced:
        the manifests are the source of truth for every field they set)."""
        meta = obj.get("metadata") or {}
        return await self.rest.request(
            "PATCH", res.path(meta.get("namespace"), str(meta["name"])), body=dict(obj),
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type=APPLY_PATCH)

    async def delete(self, res: ApiResource, namespace: str | None, name: str,
                     propagation: str = "Background") -> dict[str, Any] | None:
        """Delete; None when it was already gone (404)."""
        options = {"apiVersion": "v1", "kind": "DeleteOptions",
                   "propagationPolicy": propagation}
        try:
            return await self.rest.request("DELETE", res.path(namespace, name), body=options)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def proxy_get(self, namespace: str, pod: str, port: int, path: str,
                        query: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """GET ``path`` on a pod's port through the API server's pod proxy (JSON)."""
        return await self.rest.request(
            "GET", f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/"
                   f"{path.lstrip('/')}", query=query)


def explain(e: ApiError, doing: str, server: str = "the API server") -> str:
    """One line: what failed, why, and what to do."""
    if e.status == 0:
        return (f"{doing}: cannot reach {server} ({e.message}); check the kubeconfig's server "
                "address and context, and that the cluster is up")
    if e.status == 401:
        return (f"{doing}: {server} does not accept these credentials (401 Unauthorized); "
                "check the kubeconfig's user or token (it may have expired)")
    if e.status == 403 and "is being terminated" in e.message:
        return (f"{doing}: {e.message}; wait until the namespace is gone and try again")
    if e.status == 403:
        return (f"{doing}: forbidden ({e.message}); installing Ambit needs cluster-admin "
                "rights (it creates CRDs, ClusterRoles and a privileged DaemonSet)")
    if e.status == 422:
        return f"{doing}: the API server rejected it as invalid: {e.message}"
    if e.status == 404:
        return f"{doing}: not found: {e.message}"
    if e.status == 409:
        return f"{doing}: conflict: {e.message}; try again"
    return f"{doing}: the API server answered {e.status} {e.reason}: {e.message}"

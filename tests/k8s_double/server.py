"""An in-repo Kubernetes API-server double that speaks the real HTTP API, on aiohttp.

Why: no real API server can be installed on our machines, and a mock of the client would
prove nothing about the client. This double serves the wire protocol the real
``kubernetes_asyncio`` client speaks, over loopback, for the kinds Ambit watches:

* ``GET`` lists with ``metadata.resourceVersion``; ``GET`` of one object; bearer-token auth;
* ``?watch=1&resourceVersion=X&allowWatchBookmarks=true&timeoutSeconds=N``: a chunked stream
  of one JSON event per line (ADDED, MODIFIED, DELETED, BOOKMARK), replayed from X;
* resuming from a compacted version: an ``ERROR`` event with a 410 Status (what a real server
  sends), or HTTP 410 when ``gone_as_http_status`` is set;
* faults the test triggers: compaction, bookmarks, dropped streams, held watches, and error
  responses for the next N requests of a resource;
* ``POST`` TokenReview against tokens the test registers;
* writes, for the objects controllers create (the waypoint deployer, ``ambit waypoint``):
  ``POST`` (create: 409 AlreadyExists, 404 when the namespace does not exist), ``PUT``
  (replace: 409 Conflict on a stale ``resourceVersion``, 404 when missing; custom resources
  need a ``resourceVersion``), ``PATCH`` with ``application/merge-patch+json`` (other patch
  types answer 415), ``DELETE`` with ``DeleteOptions`` preconditions (uid, resourceVersion);
  the ``status`` subresource (object writes keep the status, status writes keep the rest);
  ``metadata.generation``; owner references stored as given (no garbage collector runs);
  the defaults a real API server fills in for Services (a cluster IP is allocated),
  Deployments, their pod templates and Gateways, and immutable fields (a Deployment's
  selector, a Service's cluster IP) answered with 422;
* ``labelSelector`` on lists and watches; API discovery (``GET /apis/<group>/<version>``);
  faults on writes (``fail_writes``).

Not reproduced: admission (besides the namespace check), server-side apply and
``managedFields``, strategic-merge and JSON patches, dry runs, field selectors, controllers
(no ReplicaSets, pods or Deployment status appear) and garbage collection.

Every request is recorded in ``requests`` so tests can assert how the client resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.k8s_double.store import (
    KINDS,
    STATUS_SUBRESOURCE,
    Gone,
    Kind,
    Selector,
    Store,
    parse_selector,
)

ADMIN_TOKEN = "double-admin-token"
# The API server's own audience: what a TokenReview without audiences checks tokens against.
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
# Query parameters the double understands; anything else is a 400 so a client change that
# the double would silently ignore shows up as a failing test instead.
KNOWN_PARAMS = {"watch", "resourceVersion", "allowWatchBookmarks", "timeoutSeconds",
                "resourceVersionMatch", "pretty", "labelSelector", "fieldManager",
                "fieldValidation", "propagationPolicy"}
MERGE_PATCH = "application/merge-patch+json"
_BUILTIN_GROUPS = ("", "apps", "discovery.k8s.io")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    at: float = field(default_factory=time.monotonic)

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("1", "true", "True")

    @property
    def resource_version(self) -> str | None:
        return self.query.get("resourceVersion")


@dataclass(frozen=True)
class ServiceAccountToken:
    """What a bound service-account token proves when reviewed (``user`` of a TokenReview)."""

    namespace: str
    service_account: str
    pod_name: str | None = None
    pod_uid: str | None = None
    node_name: str | None = None
    audiences: tuple[str, ...] = (API_AUDIENCE,)

    def user(self) -> dict[str, Any]:
        extra: dict[str, list[str]] = {}
        if self.pod_name:
            extra["authentication.kubernetes.io/pod-name"] = [self.pod_name]
        if self.pod_uid:
            extra["authentication.kubernetes.io/pod-uid"] = [self.pod_uid]
        if self.node_name:
            extra["authentication.kubernetes.io/node-name"] = [self.node_name]
        return {
            "username": f"system:serviceaccount:{self.namespace}:{self.service_account}",
            "uid": f"uid-{self.namespace}-{self.service_account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{self.namespace}",
                       "system:authenticated"],
            "extra": extra,
        }


@dataclass
class _Fault:
    plural: str
    status: int
    remaining: int


@dataclass
class _WriteFault:
    plural: str
    status: int
    remaining: int
    name: str | None = None  # None: any object of the kind
    method: str | None = None  # None: any write (POST, PUT, PATCH, DELETE)


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _status(code: int, reason: str, message: str,
            details: dict[str, Any] | None = None) -> web.Response:
    body = status_body(code, reason, message)
    if details is not None:
        body["details"] = details
    return web.json_response(body, status=code)


def _resource(kind: Kind) -> str:
    """How the API server names a resource in messages: ``pods``, ``gateways.gateway...``."""
    return f"{kind.plural}.{kind.group}" if kind.group else kind.plural


def _details(kind: Kind, name: str) -> dict[str, Any]:
    return {"name": name, "group": kind.group, "kind": kind.plural}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class _Invalid(Exception):
    """A write the API server's validation rejects (422); the message names the field."""


def _image_pull_policy(image: str) -> str:
    tag = image.rsplit("/", 1)[-1]
    return "Always" if "@" not in tag and (":" not in tag or tag.endswith(":latest")) \
        else "IfNotPresent"


def _default_pod_spec(spec: dict[str, Any]) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("terminationGracePeriodSeconds", 30)
    for c in spec.get("containers") or []:
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("imagePullPolicy", _image_pull_policy(str(c.get("image", ""))))
        for port in c.get("ports") or []:
            port.setdefault("protocol", "TCP")
        for env in c.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("fieldRef")
            if isinstance(ref, dict):
                ref.setdefault("apiVersion", "v1")
        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.get(probe_name)
            if isinstance(probe, dict):
                for key, value in (("timeoutSeconds", 1), ("periodSeconds", 10),
                                   ("successThreshold", 1), ("failureThreshold", 3)):
                    probe.setdefault(key, value)
                if isinstance(probe.get("httpGet"), dict):
                    probe["httpGet"].setdefault("scheme", "HTTP")
    for volume in spec.get("volumes") or []:
        for source in ("configMap", "secret", "projected"):
            if isinstance(volume.get(source), dict):
                volume[source].setdefault("defaultMode", 420)


@dataclass(frozen=True)
class _Route:
    kind: Kind
    namespace: str | None
    name: str | None
    subresource: str | None = None


class ApiServerDouble:
    def __init__(self) -> None:
        self.store = Store()
        self.requests: list[Request] = []
        self.tokens: dict[str, ServiceAccountToken] = {}
        self.gone_as_http_status = False
        # Plurals answered with 404, as for a CRD that is not installed.
        self.unserved: set[str] = set()
        self._faults: list[_Fault] = []
        self._write_faults: list[_WriteFault] = []
        self._next_cluster_ip = 1
        self._gate = asyncio.Event()
        self._gate.set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ----- lifecycle -----

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        self._gate.set()
        self.store.disconnect()
        if self._runner is not None:
            await self._runner.cleanup()

    def write_kubeconfig(self, path: Path, token: str = ADMIN_TOKEN) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "admin", "user": {"token": token}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "admin"}}],
        }))
        return path

    # ----- what tests do to the "cluster" -----

    def apply(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.store.apply(plural, obj)

    def delete(self, plural: str, name: str, namespace: str = "") -> dict[str, Any]:
        return self.store.delete(plural, name, namespace)

    def compact(self) -> int:
        return self.store.compact()

    def bookmark(self, plural: str | None = None) -> int:
        return self.store.bookmark(plural)

    def disconnect_watches(self, plural: str | None = None) -> int:
        return self.store.disconnect(plural)

    def hold_watches(self) -> None:
        """New watch requests wait (after being logged) until ``release_watches``."""
        self._gate.clear()

    def release_watches(self) -> None:
        self._gate.set()

    def fail_next(self, plural: str, count: int, status: int = 500) -> None:
        """Answer the next ``count`` list/watch requests for ``plural`` with ``status``."""
        self._faults.append(_Fault(plural, status, count))

    def fail_writes(self, plural: str, count: int, status: int = 500, *,
                    name: str | None = None, method: str | None = None) -> None:
        """Answer the next ``count`` writes to ``plural`` (only of ``name``, only ``method``
        when given) with ``status``."""
        self._write_faults.append(_WriteFault(plural, status, count, name, method))

    def active_watches(self, plural: str) -> int:
        return sum(1 for w in self.store.watchers if w.plural == plural)

    async def wait_for_watches(self, plural: str, count: int = 1) -> None:
        """Until ``count`` watches of ``plural`` are open (wrap in ``asyncio.timeout``)."""
        while self.active_watches(plural) < count:
            self.store.watch_opened.clear()
            await self.store.watch_opened.wait()

    def requests_for(self, plural: str, *, watch: bool | None = None) -> list[Request]:
        return [r for r in self.requests if r.path.rstrip("/").endswith("/" + plural)
                and (watch is None or r.watch == watch)]

    # ----- HTTP -----

    @staticmethod
    def _route(path: str) -> _Route | None:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace: str | None = None
        name: str | None = None
        subresource: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if len(rest) == 3 and rest[2] == "status":
            rest, subresource = rest[:2], "status"
        if len(rest) == 2:
            rest, name = rest[:1], rest[1]
        if len(rest) != 1:
            return None
        kind = KINDS.get(rest[0])
        if kind is None or (kind.group, kind.version) != (group, version):
            return None
        if namespace is not None and not kind.namespaced:
            return None
        if subresource is not None and kind.plural not in STATUS_SUBRESOURCE:
            return None
        return _Route(kind, namespace, name, subresource)

    def _discovery(self, path: str) -> web.Response | None:
        """``GET /api/v1`` or ``/apis/<group>/<version>``: the APIResourceList of what is
        served (404 when nothing is, as for an API group whose CRDs are not installed)."""
        parts = [p for p in path.split("/") if p]
        if parts == ["api", "v1"]:
            group, version = "", "v1"
        elif len(parts) == 3 and parts[0] == "apis":
            group, version = parts[1], parts[2]
        else:
            return None
        resources: list[dict[str, Any]] = []
        for kind in KINDS.values():
            if (kind.group, kind.version) != (group, version) or kind.plural in self.unserved:
                continue
            resources.append({"name": kind.plural, "singularName": kind.kind.lower(),
                              "namespaced": kind.namespaced, "kind": kind.kind,
                              "verbs": ["create", "delete", "get", "list", "patch", "update",
                                        "watch"]})
            if kind.plural in STATUS_SUBRESOURCE:
                resources.append({"name": f"{kind.plural}/status", "singularName": "",
                                  "namespaced": kind.namespaced, "kind": kind.kind,
                                  "verbs": ["get", "patch", "update"]})
        if not resources:
            return web.Response(status=404, text="404 page not found\n",
                                content_type="text/plain")
        return web.json_response({"kind": "APIResourceList", "apiVersion": "v1",
                                  "groupVersion": f"{group}/{version}" if group else version,
                                  "resources": resources})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Request(request.method, request.path, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {ADMIN_TOKEN}":
            return _status(401, "Unauthorized", "Unauthorized")
        if request.path == "/apis/authentication.k8s.io/v1/tokenreviews":
            if request.method != "POST":
                return _status(405, "MethodNotAllowed", "tokenreviews: only create")
            return await self._token_review(request)
        if request.method == "GET":
            discovery = self._discovery(request.path)
            if discovery is not None:
                return discovery
        route = self._route(request.path)
        if route is None or route.kind.plural in self.unserved:
            return _status(404, "NotFound", f"the server could not find the requested "
                                             f"resource ({request.path})")
        unknown = set(request.query) - KNOWN_PARAMS
        if unknown:
            return _status(400, "BadRequest", f"double does not implement {sorted(unknown)}")
        if request.method != "GET":
            return await self._write(request, route)
        try:
            selector = parse_selector(request.query.get("labelSelector", ""))
        except ValueError as e:
            return _status(400, "BadRequest", str(e))
        for fault in self._faults:
            if fault.plural == route.kind.plural and fault.remaining > 0:
                fault.remaining -= 1
                return _status(fault.status, "InternalError", "injected fault")
        if route.name is not None:
            obj = self.store.get(route.kind.plural, route.name, route.namespace or "")
            if obj is None:
                return _status(404, "NotFound",
                               f'{_resource(route.kind)} "{route.name}" not found',
                               _details(route.kind, route.name))
            return web.json_response(obj)
        if request.query.get("watch") in ("1", "true", "True"):
            return await self._watch(request, route, selector)
        items, rv = self.store.list(route.kind.plural, route.namespace, selector)
        kind = route.kind
        return web.json_response({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                                  "metadata": {"resourceVersion": str(rv)}, "items": items})

    async def _watch(self, request: web.Request, route: _Route,
                     selector: Selector = ()) -> web.StreamResponse:
        await self._gate.wait()
        raw_rv = request.query.get("resourceVersion", "")
        try:
            rv = int(raw_rv) if raw_rv not in ("", "0") else None
        except ValueError:
            return _status(400, "BadRequest", f"invalid resourceVersion {raw_rv!r}")
        bookmarks = request.query.get("allowWatchBookmarks") in ("1", "true", "True")
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        gone: Gone | None = None
        try:
            watcher = self.store.watch(route.kind.plural, route.namespace, rv, bookmarks,
                                       selector)
        except Gone as e:
            if self.gone_as_http_status:
                return _status(410, "Expired", str(e))
            gone = e
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            if gone is not None:
                event = {"type": "ERROR", "object": status_body(410, "Expired", str(gone))}
                await resp.write(json.dumps(event).encode() + b"\n")
                await resp.write_eof()
                return resp
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    await resp.write_eof()  # a clean end, as at timeoutSeconds
                    return resp
                try:
                    event_or_stop = await asyncio.wait_for(watcher.queue.get(), min(left, 0.5))
                except TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        return resp  # the client went away
                    continue
                if event_or_stop is None:
                    # Abrupt: close the socket mid-stream, no terminating chunk.
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                line = {"type": event_or_stop.type, "object": event_or_stop.obj}
                await resp.write(json.dumps(line).encode() + b"\n")
        except ConnectionError:
            return resp  # the client went away mid-write
        finally:
            if gone is None:
                self.store.unwatch(watcher)

    # ----- writes -----

    async def _write(self, request: web.Request, route: _Route) -> web.Response:
        kind, method = route.kind, request.method
        allowed: tuple[str, ...]
        if route.subresource == "status":
            allowed = ("PUT", "PATCH") if route.name is not None else ()
        elif route.name is None:
            allowed = ("POST",)
        else:
            allowed = ("PUT", "PATCH", "DELETE")
        if method not in allowed or (method == "POST" and kind.namespaced
                                     and route.namespace is None):
            return _status(405, "MethodNotAllowed", f"{method} is not supported on "
                           f"{request.path}")
        body: Any = None
        if method != "DELETE" or request.can_read_body:
            raw = await request.read()
            if raw or method != "DELETE":
                try:
                    body = json.loads(raw)
                except ValueError:
                    return _status(400, "BadRequest", "the request body is not JSON")
        target = route.name or (((body or {}).get("metadata") or {}).get("name")
                                if isinstance(body, dict) else None) or ""
        for fault in self._write_faults:
            if fault.plural == kind.plural and fault.remaining > 0 \
                    and fault.name in (None, target) and fault.method in (None, method):
                fault.remaining -= 1
                return _status(fault.status, "InternalError", "injected fault")
        try:
            if method == "POST":
                return self._create(kind, route.namespace or "", body)
            assert route.name is not None
            if method == "DELETE":
                return self._delete(kind, route.namespace or "", route.name, body,
                                    request.query.get("propagationPolicy"))
            if method == "PATCH":
                ctype = request.content_type
                if ctype != MERGE_PATCH:
                    why = ("custom resources support only merge and JSON patches"
                           if ctype == "application/strategic-merge-patch+json"
                           and kind.group not in _BUILTIN_GROUPS
                           else f"the double implements only {MERGE_PATCH} patches")
                    return _status(415, "UnsupportedMediaType",
                                   f"the body of the request was in an unknown format - "
                                   f"accepted media types include: {MERGE_PATCH} ({why})")
            return self._update(kind, route.namespace or "", route.name, body,
                                patch=method == "PATCH",
                                status_only=route.subresource == "status")
        except _Invalid as e:
            name = (body or {}).get("metadata", {}).get("name") if isinstance(body, dict) \
                else None
            name = route.name or name or ""
            return _status(422, "Invalid", f'{kind.kind}.{kind.group or "core"} "{name}" is '
                           f"invalid: {e}", _details(kind, name))

    def _check_type(self, kind: Kind, body: Any) -> web.Response | None:
        if not isinstance(body, dict):
            return _status(400, "BadRequest", "the request body must be a JSON object")
        if body.get("apiVersion") not in (None, kind.api_version):
            return _status(400, "BadRequest", f"the API version in the data "
                           f"({body.get('apiVersion')}) does not match the expected API "
                           f"version ({kind.api_version})")
        if body.get("kind") not in (None, kind.kind):
            return _status(400, "BadRequest", f"the kind in the data ({body.get('kind')}) "
                           f"does not match the expected kind ({kind.kind})")
        return None

    def _create(self, kind: Kind, namespace: str, body: Any) -> web.Response:
        bad = self._check_type(kind, body)
        if bad is not None:
            return bad
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise _Invalid("metadata.name: Required value: name or generateName is required")
        if meta.get("resourceVersion"):
            raise _Invalid("metadata.resourceVersion: Invalid value: resourceVersion should "
                           "not be set on objects to be created")
        if kind.namespaced:
            if meta.setdefault("namespace", namespace) != namespace:
                return _status(400, "BadRequest", "the namespace of the provided object does "
                               "not match the namespace sent on the request")
            if self.store.get("namespaces", namespace) is None:
                return _status(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
        if self.store.get(kind.plural, name, namespace if kind.namespaced else "") is not None:
            return _status(409, "AlreadyExists",
                           f'{_resource(kind)} "{name}" already exists', _details(kind, name))
        for key in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
            meta.pop(key, None)
        if kind.plural in STATUS_SUBRESOURCE:
            body.pop("status", None)
        self._default(kind, body, None)
        return web.json_response(self.store.create(kind.plural, body), status=201)

    def _update(self, kind: Kind, namespace: str, name: str, body: Any, *, patch: bool,
                status_only: bool) -> web.Response:
        key_ns = namespace if kind.namespaced else ""
        old = self.store.get(kind.plural, name, key_ns)
        if old is None:
            return _status(404, "NotFound", f'{_resource(kind)} "{name}" not found',
                           _details(kind, name))
        if not isinstance(body, dict):
            return _status(400, "BadRequest", "the request body must be a JSON object")
        wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
        new = merge_patch(old, body) if patch else copy.deepcopy(body)
        bad = self._check_type(kind, new)
        if bad is not None:
            return bad
        meta = new.setdefault("metadata", {})
        if meta.get("name", name) != name or (kind.namespaced and meta.get(
                "namespace", namespace) != namespace):
            return _status(400, "BadRequest", "the name or namespace of the object does not "
                           "match the request")
        old_meta = old["metadata"]
        if meta.get("uid") not in (None, old_meta["uid"]):
            return _status(409, "Conflict", f"Precondition failed: UID in precondition: "
                           f"{meta['uid']}, UID in object meta: {old_meta['uid']}")
        if wanted_rv is None and not patch and kind.group not in _BUILTIN_GROUPS:
            raise _Invalid("metadata.resourceVersion: Invalid value: 0x0: must be specified "
                           "for an update")
        if wanted_rv is not None and str(wanted_rv) != old_meta["resourceVersion"]:
            return _status(409, "Conflict", f'Operation cannot be fulfilled on '
                           f'{_resource(kind)} "{name}": the object has been modified; please '
                           "apply your changes to the latest version and try again",
                           _details(kind, name))
        if status_only:
            kept = copy.deepcopy(old)
            if "status" in new:
                kept["status"] = new["status"]
            else:
                kept.pop("status", None)
            new = kept
        else:
            meta["name"] = name
            if kind.namespaced:
                meta["namespace"] = namespace
            for key in ("uid", "creationTimestamp", "generation"):
                meta[key] = old_meta.get(key)
                if meta[key] is None:
                    meta.pop(key)
            if kind.plural in STATUS_SUBRESOURCE:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            self._default(kind, new, old)
        return web.json_response(self.store.update(kind.plural, new))

    def _delete(self, kind: Kind, namespace: str, name: str, options: Any,
                propagation: str | None) -> web.Response:
        key_ns = namespace if kind.namespaced else ""
        old = self.store.get(kind.plural, name, key_ns)
        if old is None:
            return _status(404, "NotFound", f'{_resource(kind)} "{name}" not found',
                           _details(kind, name))
        if options is not None and not isinstance(options, dict):
            return _status(400, "BadRequest", "DeleteOptions must be a JSON object")
        options = options or {}
        policy = options.get("propagationPolicy") or propagation
        if policy not in (None, "Orphan", "Background", "Foreground"):
            return _status(400, "BadRequest", f"propagationPolicy {policy!r} is not one of "
                           "Orphan, Background, Foreground")
        pre = options.get("preconditions") or {}
        for field_name, actual in (("uid", old["metadata"]["uid"]),
                                   ("resourceVersion", old["metadata"]["resourceVersion"])):
            wanted = pre.get(field_name)
            if wanted is not None and str(wanted) != actual:
                label = "UID" if field_name == "uid" else "ResourceVersion"
                return _status(409, "Conflict", f"Operation cannot be fulfilled on "
                               f'{_resource(kind)} "{name}": Precondition failed: {label} in '
                               f"precondition: {wanted}, {label} in object meta: {actual}",
                               _details(kind, name))
        return web.json_response(self.store.delete(kind.plural, name, key_ns))

    def _default(self, kind: Kind, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """What the real API server fills in (and the validation it does) for the kinds
        controllers write; raises ``_Invalid``."""
        spec = obj.get("spec")
        if kind.plural == "services" and isinstance(spec, dict):
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            for port in spec.get("ports") or []:
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
            old_ip = ((old or {}).get("spec") or {}).get("clusterIP")
            ip = spec.get("clusterIP") or old_ip
            if old_ip and ip != old_ip:
                raise _Invalid(f"spec.clusterIPs[0]: Invalid value: []string{{\"{ip}\"}}: "
                               "may not change once set")
            if not ip and spec["type"] != "ExternalName":
                ip = f"10.96.{self._next_cluster_ip // 250}.{self._next_cluster_ip % 250 + 1}"
                self._next_cluster_ip += 1
            if ip:
                spec["clusterIP"] = ip
                if ip != "None":
                    spec["clusterIPs"] = [ip]
                    spec.setdefault("ipFamilies", ["IPv4"])
                    spec.setdefault("ipFamilyPolicy", "SingleStack")
                    spec.setdefault("internalTrafficPolicy", "Cluster")
        elif kind.plural == "deployments" and isinstance(spec, dict):
            spec.setdefault("replicas", 1)
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("progressDeadlineSeconds", 600)
            spec.setdefault("strategy", {"type": "RollingUpdate", "rollingUpdate": {
                "maxUnavailable": "25%", "maxSurge": "25%"}})
            selector = (spec.get("selector") or {}).get("matchLabels")
            template = spec.get("template") or {}
            labels = (template.get("metadata") or {}).get("labels") or {}
            if not selector:
                raise _Invalid("spec.selector: Required value")
            if any(labels.get(k) != v for k, v in selector.items()):
                raise _Invalid("spec.template.metadata.labels: Invalid value: "
                               f"{labels!r}: `selector` does not match template `labels`")
            if old is not None and (old.get("spec") or {}).get("selector") != spec["selector"]:
                raise _Invalid(f"spec.selector: Invalid value: {spec['selector']!r}: field is "
                               "immutable")
            if isinstance(template.get("spec"), dict):
                _default_pod_spec(template["spec"])
        elif kind.plural == "gateways" and isinstance(spec, dict):
            for listener in spec.get("listeners") or []:
                if isinstance(listener, dict):
                    listener.setdefault("allowedRoutes", {"namespaces": {"from": "Same"}})
            if old is None:
                # The Gateway CRD's default status, until a controller writes its own.
                waiting = {"status": "Unknown", "reason": "Pending",
                           "message": "Waiting for controller",
                           "lastTransitionTime": "1970-01-01T00:00:00Z"}
                obj["status"] = {"conditions": [{"type": "Accepted", **waiting},
                                                {"type": "Programmed", **waiting}]}

    async def _token_review(self, request: web.Request) -> web.Response:
        body: Any = None
        with contextlib.suppress(ValueError):
            body = await request.json()
        spec = body.get("spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("token"), str):
            return _status(400, "BadRequest", "TokenReview: spec.token is required")
        # No audiences: the API server checks against its own (and answers with them).
        wanted = list(spec.get("audiences") or []) or [API_AUDIENCE]
        info = self.tokens.get(spec["token"])
        status: dict[str, Any]
        if info is None:
            status = {"authenticated": False, "user": {},
                      "error": "[invalid bearer token, square/go-jose: error in cryptographic "
                               "primitive]"}
        elif not set(wanted) & set(info.audiences):
            status = {"authenticated": False, "user": {},
                      "error": "[invalid bearer token, token audiences "
                               f"{list(info.audiences)} is invalid for the target audiences "
                               f"{wanted}]"}
        else:
            # The intersection of what was asked and what the token was issued for.
            status = {"authenticated": True, "user": info.user(),
                      "audiences": [a for a in wanted if a in info.audiences]}
        return web.json_response({
            "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": spec, "status": status,
        }, status=201)

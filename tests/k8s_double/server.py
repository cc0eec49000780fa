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
* ``POST`` TokenReview against tokens the test registers.

Every request is recorded in ``requests`` so tests can assert how the client resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.k8s_double.store import KINDS, Gone, Kind, Store

ADMIN_TOKEN = "double-admin-token"
# Query parameters the double understands; anything else is a 400 so a client change that
# the double would silently ignore shows up as a failing test instead.
KNOWN_PARAMS = {"watch", "resourceVersion", "allowWatchBookmarks", "timeoutSeconds",
                "resourceVersionMatch", "pretty"}


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
    audiences: tuple[str, ...] = ("https://kubernetes.default.svc.cluster.local",)

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


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status_body(code, reason, message), status=code)


@dataclass(frozen=True)
class _Route:
    kind: Kind
    namespace: str | None
    name: str | None


class ApiServerDouble:
    def __init__(self) -> None:
        self.store = Store()
        self.requests: list[Request] = []
        self.tokens: dict[str, ServiceAccountToken] = {}
        self.gone_as_http_status = False
        # Plurals answered with 404, as for a CRD that is not installed.
        self.unserved: set[str] = set()
        self._faults: list[_Fault] = []
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
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if len(rest) == 2:
            rest, name = rest[:1], rest[1]
        if len(rest) != 1:
            return None
        kind = KINDS.get(rest[0])
        if kind is None or (kind.group, kind.version) != (group, version):
            return None
        if namespace is not None and not kind.namespaced:
            return None
        return _Route(kind, namespace, name)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Request(request.method, request.path, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {ADMIN_TOKEN}":
            return _status(401, "Unauthorized", "Unauthorized")
        if request.path == "/apis/authentication.k8s.io/v1/tokenreviews":
            if request.method != "POST":
                return _status(405, "MethodNotAllowed", "tokenreviews: only create")
            return await self._token_review(request)
        route = self._route(request.path)
        if route is None or route.kind.plural in self.unserved:
            return _status(404, "NotFound", f"the server could not find the requested "
                                             f"resource ({request.path})")
        if request.method != "GET":
            return _status(405, "MethodNotAllowed", "the double serves reads only over HTTP")
        unknown = set(request.query) - KNOWN_PARAMS
        if unknown:
            return _status(400, "BadRequest", f"double does not implement {sorted(unknown)}")
        for fault in self._faults:
            if fault.plural == route.kind.plural and fault.remaining > 0:
                fault.remaining -= 1
                return _status(fault.status, "InternalError", "injected fault")
        if route.name is not None:
            obj = self.store.get(route.kind.plural, route.name, route.namespace or "")
            if obj is None:
                return _status(404, "NotFound", f'{route.kind.plural} "{route.name}" not found')
            return web.json_response(obj)
        if request.query.get("watch") in ("1", "true", "True"):
            return await self._watch(request, route)
        items, rv = self.store.list(route.kind.plural, route.namespace)
        kind = route.kind
        return web.json_response({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                                  "metadata": {"resourceVersion": str(rv)}, "items": items})

    async def _watch(self, request: web.Request, route: _Route) -> web.StreamResponse:
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
            watcher = self.store.watch(route.kind.plural, route.namespace, rv, bookmarks)
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

    async def _token_review(self, request: web.Request) -> web.Response:
        body: Any = None
        with contextlib.suppress(ValueError):
            body = await request.json()
        spec = body.get("spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("token"), str):
            return _status(400, "BadRequest", "TokenReview: spec.token is required")
        wanted = list(spec.get("audiences") or [])
        info = self.tokens.get(spec["token"])
        status: dict[str, Any]
        if info is None:
            status = {"authenticated": False, "user": {},
                      "error": "[invalid bearer token, square/go-jose: error in cryptographic "
                               "primitive]"}
        elif wanted and not set(wanted) & set(info.audiences):
            status = {"authenticated": False, "user": {},
                      "error": "[invalid bearer token, token audiences "
                               f"{list(info.audiences)} is invalid for the target audiences "
                               f"{wanted}]"}
        else:
            status = {"authenticated": True, "user": info.user(),
                      "audiences": wanted or list(info.audiences)}
        return web.json_response({
            "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": spec, "status": status,
        }, status=201)

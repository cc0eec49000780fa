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
  faults on writes (``fail_writes``);
* server-side apply (``ambit install``): ``PATCH`` with ``application/apply-patch+yaml``
  (``fieldManager`` required, ``force`` accepted; ``force`` on any other patch is a 422). The
  simplification: apply is *create-or-merge*. A missing object is created from the body; an
  existing one gets the body merged in (RFC 7386 rules: maps merge, lists and scalars
  replace), then the defaults are filled in again. No ``managedFields`` are kept, so there is
  no field ownership: a field dropped from a later apply stays (a real server removes it when
  the manager owned it alone), and two managers never conflict (a real server answers 409
  without ``force``);
* no-op writes: an update or patch that changes nothing is not written (same
  ``resourceVersion``, no watch event), as the real storage layer skips them;
* deletion as the real server does it: an object with ``metadata.finalizers`` (or deleted with
  ``propagationPolicy: Foreground``, which adds ``foregroundDeletion``, or ``Orphan`` with
  dependents, which adds ``orphan``) only gets a ``deletionTimestamp``, and goes when an update
  removes its last finalizer; a namespace goes to phase ``Terminating`` (creating objects in it
  is then 403) until its contents are removed. A CRD's deletion removes its custom resources
  and stops serving the kind at once (a real server takes a moment, with a ``Terminating``
  condition). Creating a CRD of a kind the double knows serves that kind (``unserved`` loses
  it) and sets ``Established`` at once, unless ``establish_crds`` is False (then
  ``establish_crd`` does it);
* the garbage collector and the namespace controller, run by ``collect_garbage()`` (one pass
  to a fixed point) or, with ``gc_delay`` set, that long after every delete: dependents
  (``ownerReferences``) of owners that are gone are deleted, owners in foreground deletion
  lose ``foregroundDeletion`` once their dependents are gone, ``orphan`` strips the owner
  references, and a terminating namespace is emptied then removed. Dependents go at once
  (no kubelet: a pod has no grace period); nothing runs unless a test asks, so tests of
  controllers that clean up after themselves still see exactly what those controllers do;
* the pod proxy subresource (``/api/v1/namespaces/<ns>/pods/<pod>[:<port>]/proxy/<path>``),
  forwarded to the URL a test registered for that pod and port (``register_pod_proxy``);
  503, as from a real server that cannot dial the pod, when none is registered. Query
  parameters go to the target unchecked.

Not reproduced: admission (besides the namespace checks), ``managedFields``, strategic-merge
and JSON patches, dry runs, field selectors and controllers (no ReplicaSets or pods appear and
nobody writes a Deployment's or DaemonSet's status: tests do, with ``set_status``).

Every request is recorded in ``requests`` so tests can assert how the client resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
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
                "fieldValidation", "propagationPolicy", "force"}
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
FOREGROUND = "foregroundDeletion"
ORPHAN = "orphan"
_POD_PROXY = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/proxy(/.*)?$")
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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _crd_plural(crd: dict[str, Any]) -> str | None:
    """The double's plural for a CRD's kind, when the double knows the kind."""
    spec = crd.get("spec") or {}
    plural = (spec.get("names") or {}).get("plural")
    kind = KINDS.get(str(plural))
    return kind.plural if kind is not None and kind.group == spec.get("group") else None


def _establish(crd: dict[str, Any]) -> None:
    """The conditions the apiextensions controller sets on a CRD it accepted."""
    now = _now()
    crd["status"] = {
        "acceptedNames": copy.deepcopy((crd.get("spec") or {}).get("names") or {}),
        "storedVersions": [v.get("name") for v in (crd.get("spec") or {}).get("versions") or []
                           if isinstance(v, dict) and v.get("storage")],
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now},
        ]}


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


def _check_workload(spec: dict[str, Any], old: dict[str, Any] | None) -> None:
    """A Deployment's or DaemonSet's selector: required, matching, immutable; pod defaults."""
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


def _unchanged(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a write would store the same object (resourceVersion aside)."""
    a, b = copy.deepcopy(old), copy.deepcopy(new)
    for o in (a, b):
        o.setdefault("metadata", {}).pop("resourceVersion", None)
    return a == b


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
        # (namespace, pod, port) -> base URL the pod proxy forwards to.
        self.pod_proxies: dict[tuple[str, str, int], str] = {}
        # None: no garbage collector runs by itself (tests call collect_garbage()).
        self.gc_delay: float | None = None
        # False: CRDs stay un-Established (and their kinds unserved) until establish_crd().
        self.establish_crds = True
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

    def set_status(self, plural: str, name: str, namespace: str,
                   status: dict[str, Any]) -> dict[str, Any]:
        """Write an object's status, as its controller (or the kubelet) would."""
        obj = self.store.get(plural, name, namespace)
        if obj is None:
            raise KeyError(f"{plural} {namespace}/{name} not found")
        obj["status"] = copy.deepcopy(status)
        return self.store.update(plural, obj)

    def register_pod_proxy(self, namespace: str, pod: str, port: int, url: str) -> None:
        """Forward ``.../pods/<pod>:<port>/proxy/<path>`` to ``url`` + ``/<path>``."""
        self.pod_proxies[(namespace, pod, port)] = url.rstrip("/")

    def establish_crd(self, name: str) -> dict[str, Any]:
        """What the apiextensions controller does: Established, and the kind is served."""
        crd = self.store.get("customresourcedefinitions", name)
        if crd is None:
            raise KeyError(f"customresourcedefinition {name} not found")
        _establish(crd)
        plural = _crd_plural(crd)
        if plural is not None:
            self.unserved.discard(plural)
        return self.store.update("customresourcedefinitions", crd)

    # ----- the garbage collector and the namespace controller -----

    def _remove(self, plural: str, obj: dict[str, Any]) -> bool:
        """Delete as the collector does: with finalizers, only mark it; whether it changed."""
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return False
            meta["deletionTimestamp"] = _now()
            meta["deletionGracePeriodSeconds"] = 0
            self.store.update(plural, obj)
            return True
        self.store.delete(plural, meta["name"], meta.get("namespace", "")
                          if KINDS[plural].namespaced else "")
        return True

    def _gc_pass(self) -> int:
        objects = [(plural, copy.deepcopy(obj)) for plural, objs in self.store.objects.items()
                   for obj in objs.values()]
        by_uid = {obj["metadata"].get("uid"): (plural, obj) for plural, obj in objects}
        dependents: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for plural, obj in objects:
            for ref in obj["metadata"].get("ownerReferences") or []:
                dependents.setdefault(str(ref.get("uid")), []).append((plural, obj))
        changes = 0
        for plural, obj in objects:
            meta = obj["metadata"]
            refs = meta.get("ownerReferences") or []
            if not refs or meta.get("deletionTimestamp"):
                continue
            owners = [by_uid.get(r.get("uid")) for r in refs]
            gone = all(o is None for o in owners)
            foreground = any(o is not None and o[1]["metadata"].get("deletionTimestamp")
                             and FOREGROUND in (o[1]["metadata"].get("finalizers") or [])
                             for o in owners)
            if (gone or foreground) and self._remove(plural, obj):
                changes += 1
        for plural, snapshot in objects:
            current = self.store.get(plural, snapshot["metadata"]["name"],
                                     snapshot["metadata"].get("namespace", ""))
            if current is None or not current["metadata"].get("deletionTimestamp"):
                continue
            obj, meta = current, current["metadata"]
            finalizers = list(meta.get("finalizers") or [])
            uid = str(meta.get("uid"))
            alive = [(p, d) for p, d in dependents.get(uid, [])
                     if self.store.get(p, d["metadata"]["name"],
                                       d["metadata"].get("namespace", "")) is not None]
            if ORPHAN in finalizers:
                for p, d in alive:
                    d = self.store.get(p, d["metadata"]["name"],
                                       d["metadata"].get("namespace", "")) or d
                    d["metadata"]["ownerReferences"] = [
                        r for r in d["metadata"].get("ownerReferences") or []
                        if r.get("uid") != uid] or None
                    if d["metadata"]["ownerReferences"] is None:
                        del d["metadata"]["ownerReferences"]
                    self.store.update(p, d)
                finalizers.remove(ORPHAN)
            elif FOREGROUND in finalizers and not alive:
                finalizers.remove(FOREGROUND)
            else:
                continue
            changes += 1
            if finalizers:
                meta["finalizers"] = finalizers
                self.store.update(plural, obj)
            else:
                meta.pop("finalizers", None)
                self.store.delete(plural, meta["name"], meta.get("namespace", ""), final=obj)
        for ns in self.store.list("namespaces", None)[0]:
            if not ns["metadata"].get("deletionTimestamp"):
                continue
            name = ns["metadata"]["name"]
            left = 0
            for plural, kind in KINDS.items():
                if not kind.namespaced:
                    continue
                for obj in self.store.list(plural, name)[0]:
                    left += 1
                    if self._remove(plural, obj):
                        changes += 1
            if not left:
                self.store.delete("namespaces", name)
                changes += 1
        return changes

    def collect_garbage(self) -> int:
        """Run the garbage collector and the namespace controller until nothing changes;
        how many objects were deleted or changed."""
        total = 0
        while (changes := self._gc_pass()):
            total += changes
        return total

    def _schedule_gc(self) -> None:
        if self.gc_delay is not None:
            asyncio.get_running_loop().call_later(self.gc_delay, self.collect_garbage)

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
        proxy = _POD_PROXY.match(request.path)
        if proxy is not None:
            return await self._pod_proxy(request, proxy.group(1), proxy.group(2),
                                         proxy.group(3) or "/")
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

    async def _pod_proxy(self, request: web.Request, namespace: str, target: str,
                         path: str) -> web.StreamResponse:
        parts = target.split(":")
        if len(parts) == 3:
            parts = parts[1:]  # scheme:name:port
        name, port_text = parts[0], parts[1] if len(parts) > 1 else ""
        pod = self.store.get("pods", name, namespace)
        if pod is None:
            return _status(404, "NotFound", f'pods "{name}" not found',
                           {"name": name, "kind": "pods"})
        ip = (pod.get("status") or {}).get("podIP") or "<none>"
        url = self.pod_proxies.get((namespace, name, int(port_text))) \
            if port_text.isdigit() else None
        unreachable = (f"error trying to reach service: dial tcp {ip}:{port_text or 80}: "
                       "connect: connection refused")
        if url is None:
            return _status(503, "ServiceUnavailable", unreachable)
        try:
            async with aiohttp.ClientSession() as session, session.request(
                    request.method, url + path, params=list(request.query.items()),
                    data=await request.read() or None) as resp:
                body = await resp.read()
                return web.Response(status=resp.status, body=body,
                                    content_type=resp.content_type)
        except aiohttp.ClientError as e:
            return _status(503, "ServiceUnavailable", f"{unreachable} ({e})")

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
        apply = method == "PATCH" and request.content_type == APPLY_PATCH
        if "force" in request.query and not apply:
            raise_422 = "force: Forbidden: may not be specified for non-apply patch"
            return _status(422, "Invalid", f"PatchOptions.meta.k8s.io \"\" is invalid: "
                           f"{raise_422}")
        if method != "DELETE" or request.can_read_body:
            raw = await request.read()
            if apply:
                try:
                    body = yaml.safe_load(raw)
                except yaml.YAMLError as e:
                    return _status(400, "BadRequest", f"error decoding YAML: {e}")
            elif raw or method != "DELETE":
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
            if apply:
                if route.subresource is not None:
                    return _status(415, "UnsupportedMediaType", "the double implements apply "
                                   "patches on objects only, not on subresources")
                return self._apply(kind, route.namespace or "", route.name, body,
                                   request.query.get("fieldManager", ""))
            if method == "PATCH":
                ctype = request.content_type
                if ctype != MERGE_PATCH:
                    why = ("custom resources support only merge and JSON patches"
                           if ctype == "application/strategic-merge-patch+json"
                           and kind.group not in _BUILTIN_GROUPS
                           else f"the double implements only {MERGE_PATCH} patches")
                    return _status(415, "UnsupportedMediaType",
                                   f"the body of the request was in an unknown format - "
                                   f"accepted media types include: {MERGE_PATCH}, "
                                   f"{APPLY_PATCH} ({why})")
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

    def _apply(self, kind: Kind, namespace: str, name: str, body: Any,
               manager: str) -> web.Response:
        """Server-side apply, simplified to create-or-merge (see the module docstring)."""
        if not manager:
            return _status(422, "Invalid", 'PatchOptions.meta.k8s.io "" is invalid: '
                           "fieldManager: Required value: is required for apply patch")
        if not isinstance(body, dict):
            return _status(400, "BadRequest", "the apply body must be a YAML mapping (an "
                           "object)")
        for key in ("apiVersion", "kind"):
            if not body.get(key):
                return _status(400, "BadRequest", f"{key} must be set")
        bad = self._check_type(kind, body)
        if bad is not None:
            return bad
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            return _status(400, "BadRequest", "metadata must be a mapping")
        if meta.setdefault("name", name) != name:
            return _status(400, "BadRequest", f"the name of the object ({meta['name']}) does "
                           f"not match the name on the URL ({name})")
        if kind.namespaced and meta.setdefault("namespace", namespace) != namespace:
            return _status(400, "BadRequest", "the namespace of the provided object does not "
                           "match the namespace sent on the request")
        if self.store.get(kind.plural, name, namespace if kind.namespaced else "") is None:
            return self._create(kind, namespace, body)
        return self._update(kind, namespace, name, body, patch=True, status_only=False)

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
            ns = self.store.get("namespaces", namespace)
            if ns is None:
                return _status(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
            if ns["metadata"].get("deletionTimestamp"):
                return _status(403, "Forbidden", f'{_resource(kind)} "{name}" is forbidden: '
                               f"unable to create new content in namespace {namespace} "
                               "because it is being terminated", _details(kind, name))
        if self.store.get(kind.plural, name, namespace if kind.namespaced else "") is not None:
            return _status(409, "AlreadyExists",
                           f'{_resource(kind)} "{name}" already exists', _details(kind, name))
        for key in ("uid", "creationTimestamp", "generation", "deletionTimestamp",
                    "deletionGracePeriodSeconds"):
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
            for key in ("uid", "creationTimestamp", "generation", "deletionTimestamp",
                        "deletionGracePeriodSeconds"):
                meta[key] = old_meta.get(key)
                if meta[key] is None:
                    meta.pop(key)
            if kind.plural in STATUS_SUBRESOURCE:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            self._default(kind, new, old)
        if _unchanged(old, new):
            return web.json_response(old)  # a no-op is not written
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            # The last finalizer went: the deletion completes.
            new["metadata"].pop("finalizers", None)
            gone = self.store.delete(kind.plural, name, key_ns, final=new)
            self._schedule_gc()
            return web.json_response(gone)
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
        meta = old["metadata"]
        if kind.plural == "namespaces":
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = _now()
                old["status"] = {**(old.get("status") or {}), "phase": "Terminating"}
                old = self.store.update(kind.plural, old)
            self._schedule_gc()
            return web.json_response(old)
        if kind.plural == "customresourcedefinitions":
            plural = _crd_plural(old)
            if plural is not None:
                for obj in self.store.list(plural, None)[0]:
                    self.store.delete(plural, obj["metadata"]["name"],
                                      obj["metadata"].get("namespace", ""))
                self.unserved.add(plural)
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and FOREGROUND not in finalizers:
            finalizers.append(FOREGROUND)
        elif policy == "Orphan" and ORPHAN not in finalizers and self._has_dependents(meta):
            finalizers.append(ORPHAN)
        if finalizers:
            if finalizers != meta.get("finalizers") or not meta.get("deletionTimestamp"):
                meta["finalizers"] = finalizers
                meta.setdefault("deletionTimestamp", _now())
                meta.setdefault("deletionGracePeriodSeconds", 0)
                old = self.store.update(kind.plural, old)
            self._schedule_gc()
            return web.json_response(old)
        gone = self.store.delete(kind.plural, name, key_ns)
        self._schedule_gc()
        return web.json_response(gone)

    def _has_dependents(self, meta: dict[str, Any]) -> bool:
        uid = meta.get("uid")
        return any(r.get("uid") == uid for objs in self.store.objects.values()
                   for o in objs.values() for r in o["metadata"].get("ownerReferences") or [])

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
            _check_workload(spec, old)
        elif kind.plural == "daemonsets" and isinstance(spec, dict):
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {
                "maxUnavailable": 1, "maxSurge": 0}})
            _check_workload(spec, old)
        elif kind.plural == "namespaces" and old is None:
            obj["status"] = {"phase": "Active"}
        elif kind.plural == "customresourcedefinitions" and old is None \
                and self.establish_crds:
            _establish(obj)
            plural = _crd_plural(obj)
            if plural is not None:
                self.unserved.discard(plural)
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

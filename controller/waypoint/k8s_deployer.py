"""Keep what runs each waypoint Gateway in place (Kubernetes mode): the deployer.

Why it exists: a waypoint Gateway is only a declaration; something has to create its
ServiceAccount, Deployment and Service (``deploy.render``), put them back when someone edits or
deletes them, remove them when the Gateway goes, and say in the Gateway's status whether it
worked. That is this loop, built the way Istio's gateway deployment controller and other
Kubernetes controllers are:

* **Informers, not polling**: reflectors (``k8s_watch.Reflector``) mirror the Gateways and,
  selected by the label ``ambit.dev/managed-by=ambit-controller``, our ServiceAccounts,
  Deployments, Services and trust-bundle ConfigMaps. Any change to any of them wakes one
  *level-triggered* pass: the whole desired state is compared with the caches and only the
  differences are written, so a pass with nothing to do makes no API call, and an edit of a
  managed object is repaired within the debounce.
* **Desired set**: a waypoint is deployed when the registry serves it (``reconcile(gateways)``,
  called with each registry snapshot's Gateways) and this loop's own view of the Gateway
  (its ``uid`` for owner references, annotations, generation) agrees it is valid.
* **Drift** (``drift``): every field we render must be in the live object with our value;
  fields the API server defaults or others add are left alone (a live object always has
  more), except in security-relevant subtrees compared exactly (``EXACT``: pod and container
  ``securityContext``, selectors, the ConfigMap's data). An update is a read-modify-write
  (``merged``: our fields over the live object, sent with its ``resourceVersion``, so a
  concurrent change makes it 409 and it is retried); a Deployment whose immutable selector
  drifted is deleted and created again. Server-side apply would express this more directly,
  but it is not used: the API-server double these paths are tested against cannot reproduce
  its field-ownership semantics faithfully, and untested apply semantics are worse than a
  plain, tested read-modify-write.
* **Deletion**: objects labelled as ours, owned by a Gateway (owner reference) that no longer
  exists, is no longer a valid waypoint, or changed class, are deleted (with a uid
  precondition). Kubernetes' garbage collector would remove most of them too; doing it here
  also covers clusters where it lags and invalid Gateways, and never touches an object
  without our label.
* **Isolation**: objects are grouped per Gateway (plus one group per namespace for its
  trust-bundle ConfigMap). A failing group is reported (log, Gateway status) and retried with
  its own exponential backoff; the other groups carry on.
* **Conflicts**: an object with our name that is not ours (no managed-by label) is never
  overwritten: the Gateway's status says ``Programmed: False`` (reason ``Invalid``) and what
  to rename or delete.

Status: ``Accepted``/``Programmed`` conditions and the Service's cluster IPs as addresses
(``deploy.gateway_status``), written with a merge patch only when they change.

One writer: with several controller replicas, only the leader (``controller.leader``) runs the
deployer; ``start()`` on becoming leader, ``stop()`` on losing leadership (``update()`` may be
called either way: it only records what is wanted), and a later ``start()`` begins afresh from
new watches, with no retry state carried over from the previous term.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client

from controller.registry.k8s_watch import Backoff, ListFn, Reflector, stop_tasks
from controller.waypoint.deploy import (
    CA_ROOT_CONFIGMAP,
    CA_ROOT_KEY,
    DEFAULT_DRAIN_SECONDS,
    DEFAULT_RESOURCES,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Problem,
    RenderError,
    Resources,
    gateway_conditions,
    gateway_status,
    render,
    render_ca_root,
    status_differs,
)
from controller.waypoint.k8s_apply import (
    CONFIG_MAPS,
    DEPLOYMENTS,
    GATEWAYS,
    SERVICE_ACCOUNTS,
    SERVICES,
    ApiError,
    Resource,
    Rest,
)
from controller.waypoint.model import WAYPOINT_CLASS, Gateway
from controller.waypoint.parse import GATEWAY_GROUP, parse_gateway
from mesh.state.parse import StateError

__all__ = ["EXACT", "FIELD_MANAGER", "Action", "GatewayDeployer", "drift", "merged",
           "owner_gateway", "plan_object"]

log = logging.getLogger("controller.waypoint.deployer")

FIELD_MANAGER = "ambit-controller"
SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
_BY_KIND = {r.kind: r for r in (SERVICE_ACCOUNTS, SERVICES, DEPLOYMENTS, CONFIG_MAPS)}
_MANAGED = (SERVICE_ACCOUNTS, SERVICES, DEPLOYMENTS, CONFIG_MAPS)
# Subtrees compared (and written) exactly: no extra keys tolerated there. "*" = any list index.
EXACT: tuple[tuple[str, ...], ...] = (
    ("spec", "selector"),
    ("spec", "template", "spec", "securityContext"),
    ("spec", "template", "spec", "containers", "*", "securityContext"),
    ("data",),
)
_OWNER_REFS = ("metadata", "ownerReferences")


# --- pure diff logic -----------------------------------------------------------------------


def _is_exact(path: tuple[str, ...]) -> bool:
    return any(len(path) >= len(p) and all(a in ("*", b) for a, b in zip(p, path, strict=False))
               for p in EXACT)


def _show(path: tuple[str, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or "(object)"


def _gateway_ref(ref: Any) -> bool:
    return isinstance(ref, Mapping) and ref.get("kind") == "Gateway" \
        and str(ref.get("apiVersion", "")).startswith(f"{GATEWAY_GROUP}/")


def drift(desired: Any, live: Any, path: tuple[str, ...] = ()) -> list[str]:
    """The fields of ``desired`` that ``live`` does not have with the same value (dotted
    paths, ``spec.template.spec.containers[0].image``). Extra fields in ``live`` are not
    drift (the API server defaults many), except inside ``EXACT`` subtrees; lists must have
    the same length and match element by element; owner references must include ours."""
    out: list[str] = []
    _drift(desired, live, path, _is_exact(path), out)
    return out


def _drift(desired: Any, live: Any, path: tuple[str, ...], exact: bool,
           out: list[str]) -> None:
    if path == _OWNER_REFS and isinstance(desired, list):
        refs = live if isinstance(live, list) else []
        if any(not any(isinstance(r, Mapping) and all(r.get(k) == v for k, v in want.items())
                       for r in refs) for want in desired):
            out.append(_show(path))
        return
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            out.append(_show(path))
            return
        if exact and set(live) - set(desired):
            out.append(f"{_show(path)} (unexpected {', '.join(sorted(set(live) - set(desired)))})")
        for key, value in desired.items():
            sub = (*path, str(key))
            if key not in live:
                out.append(_show(sub))
            else:
                _drift(value, live[key], sub, exact or _is_exact(sub), out)
        return
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            out.append(_show(path))
            return
        for i, (d, v) in enumerate(zip(desired, live, strict=True)):
            sub = (*path, str(i))
            _drift(d, v, sub, exact or _is_exact(sub), out)
        return
    if desired != live:
        out.append(_show(path))


def merged(live: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The object to PUT: ``live`` (its ``resourceVersion`` included, so a concurrent change
    conflicts) with every field of ``desired`` written over it. Maps merge (labels and
    annotations others added stay), lists and ``EXACT`` subtrees are replaced, and owner
    references to Gateways are replaced by ours (others' stay)."""
    out: dict[str, Any] = _merge(live, desired, ())
    refs = [r for r in (live.get("metadata") or {}).get("ownerReferences") or []
            if not _gateway_ref(r)]
    refs += copy.deepcopy((desired.get("metadata") or {}).get("ownerReferences") or [])
    out.setdefault("metadata", {})["ownerReferences"] = refs
    out.pop("status", None)
    return out


def _merge(live: Any, desired: Any, path: tuple[str, ...]) -> Any:
    if isinstance(desired, Mapping) and isinstance(live, Mapping) and not _is_exact(path):
        out = copy.deepcopy(dict(live))
        for key, value in desired.items():
            out[key] = _merge(live.get(key), value, (*path, str(key)))
        return out
    return copy.deepcopy(desired)


@dataclass(frozen=True)
class Action:
    """One write: ``create``/``update`` (``body``) or ``delete`` (only the object ``uid``)."""

    verb: str
    resource: Resource
    namespace: str
    name: str
    body: dict[str, Any] | None = field(default=None, compare=False)
    uid: str = ""
    why: str = ""

    @property
    def what(self) -> str:
        return self.resource.describe(self.namespace, self.name)


def resource_of(obj: Mapping[str, Any]) -> Resource:
    return _BY_KIND[str(obj["kind"])]


def plan_object(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> Action | None:
    """What to do so that ``live`` (None: absent) has every field of ``desired``."""
    res = resource_of(desired)
    meta = desired["metadata"]
    ns, name = str(meta["namespace"]), str(meta["name"])
    if live is None:
        return Action("create", res, ns, name, dict(desired), why="missing")
    paths = drift(desired, live)
    if not paths:
        return None
    uid = str((live.get("metadata") or {}).get("uid") or "")
    if res is DEPLOYMENTS and any(p.startswith("spec.selector") for p in paths):
        return Action("delete", res, ns, name, uid=uid,
                      why="its spec.selector differs and cannot be changed: recreating it")
    shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    return Action("update", res, ns, name, merged(live, desired), uid=uid,
                  why=f"drifted: {shown}")


def owner_gateway(obj: Mapping[str, Any]) -> list[str]:
    """The ``namespace/name`` of every Gateway that owns ``obj``."""
    meta = obj.get("metadata") or {}
    ns = str(meta.get("namespace") or "")
    return [f"{ns}/{r.get('name')}" for r in meta.get("ownerReferences") or []
            if _gateway_ref(r)]


def _ours(live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether ``live`` is an object we created for ``desired``: it carries our label, or a
    controller owner reference to the same Gateway (same uid) as ``desired``."""
    meta = live.get("metadata") or {}
    if (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY:
        return True
    ours = {r.get("uid") for r in (desired.get("metadata") or {}).get("ownerReferences") or []
            if _gateway_ref(r) and r.get("controller")}
    return any(_gateway_ref(r) and r.get("controller") and r.get("uid") in ours
               for r in meta.get("ownerReferences") or [])


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _rfc3339(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _addresses(service: Mapping[str, Any] | None) -> list[str]:
    spec = (service or {}).get("spec") or {}
    ips = [str(ip) for ip in spec.get("clusterIPs") or [] if ip and ip != "None"]
    if not ips and spec.get("clusterIP") not in (None, "", "None"):
        ips = [str(spec["clusterIP"])]
    return ips


# --- the loop ------------------------------------------------------------------------------


@dataclass
class _Group:
    """One unit of retries: a Gateway's objects, or a namespace's trust bundle."""

    key: str
    actions: list[Action] = field(default_factory=list)
    problem: Problem | None = None  # known before any write (e.g. the Gateway cannot render)


class GatewayDeployer:
    """Deploy every waypoint Gateway; ``start()``, then ``reconcile(gateways)`` (or
    ``update(gateways)`` from synchronous code) with each registry snapshot's Gateways.

    ``controller_address``: HOST:PORT the waypoint's Envoy reaches the controller's xDS at
    (``--controller``); ``ca_address``: its CA port when different (``--ca-address``);
    ``root_cert_pem``: the mesh root, written to each waypoint namespace's ``ambit-ca-root``
    ConfigMap (None: someone else provides that ConfigMap).
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        image: str,
        trust_domain: str,
        controller_address: str,
        *,
        ca_address: str = "",
        root_cert_pem: str | bytes | None = None,
        image_pull_policy: str = "IfNotPresent",
        drain_seconds: float = DEFAULT_DRAIN_SECONDS,
        resources: Resources = DEFAULT_RESOURCES,
        debounce: float = 0.1,
        resync: float = 300.0,
        backoff: Callable[[], Backoff] = lambda: Backoff(initial=1.0, cap=60.0),
        watch_backoff: Callable[[], Backoff] = Backoff,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.rest = Rest(api_client)
        self._api = api_client
        self._render = functools.partial(
            render, image=image, trust_domain=trust_domain,
            controller_address=controller_address, ca_address=ca_address,
            image_pull_policy=image_pull_policy, drain_seconds=drain_seconds,
            resources=resources)
        self._root = root_cert_pem.decode() if isinstance(root_cert_pem, bytes) \
            else root_cert_pem
        self._debounce = debounce
        self._resync = resync
        self._backoff = backoff
        self._watch_backoff = watch_backoff
        self._watch_timeout = watch_timeout
        self._clock = clock
        self._now = now
        self.reflectors: dict[str, Reflector] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()  # any watch event (for read-your-writes waits)
        self._lock = asyncio.Lock()
        # What this pass wrote: (plural, namespace/name, resourceVersion or None, deleted uid).
        self._written: list[tuple[str, str, int | None, str]] = []
        self._catch_up = 2.0
        self._wanted: dict[str, Gateway] | None = None
        self._retry_at: dict[str, float] = {}
        self._backoffs: dict[str, Backoff] = {}
        self._logged: dict[str, str] = {}
        # The current problem of each group (gateway or namespace key), for diagnostics.
        self.problems: dict[str, str] = {}
        self.passes = 0

    # ----- lifecycle -----

    def _list_fn(self, res: Resource) -> ListFn:
        core, apps = client.CoreV1Api(self._api), client.AppsV1Api(self._api)
        fns: dict[str, ListFn] = {
            "serviceaccounts": core.list_service_account_for_all_namespaces,
            "services": core.list_service_for_all_namespaces,
            "configmaps": core.list_config_map_for_all_namespaces,
            "deployments": apps.list_deployment_for_all_namespaces,
        }
        return functools.partial(fns[res.plural], label_selector=SELECTOR)

    def _on_change(self) -> None:
        self._changed.set()
        self._wake.set()

    async def start(self) -> None:
        """Start watching; passes begin with the first ``reconcile``/``update``."""
        if self._tasks:
            return
        custom = client.CustomObjectsApi(self._api)
        self.reflectors = {"gateways": Reflector(
            "gateways", functools.partial(custom.list_cluster_custom_object, GATEWAYS.group,
                                          GATEWAYS.version, GATEWAYS.plural),
            self._on_change, backoff=self._watch_backoff(),
            watch_timeout=self._watch_timeout, optional=True)}
        for res in _MANAGED:
            if res is CONFIG_MAPS and self._root is None:
                continue
            self.reflectors[res.plural] = Reflector(
                f"managed {res.plural}", self._list_fn(res), self._on_change,
                backoff=self._watch_backoff(), watch_timeout=self._watch_timeout)
        self._tasks = [asyncio.create_task(r.run(), name=f"deployer-{plural}")
                       for plural, r in self.reflectors.items()]
        self._tasks.append(asyncio.create_task(self._run(), name="deployer"))

    async def stop(self) -> None:
        """Stop watching and writing (e.g. leadership lost); ``start()`` may follow."""
        await stop_tasks(self._tasks)
        self._tasks = []
        # Another replica writes meanwhile: what this one knew about groups is stale.
        for table in (self.problems, self._logged, self._retry_at, self._backoffs):
            table.clear()

    async def wait_synced(self) -> None:
        if not self._tasks:
            raise RuntimeError("GatewayDeployer.start() was not called")
        for r in self.reflectors.values():
            await r.synced.wait()

    def update(self, gateways: Iterable[Gateway]) -> None:
        """Set the waypoints the registry serves and wake the loop (does not wait)."""
        self._wanted = {g.key: g for g in gateways if g.gateway_class == WAYPOINT_CLASS}
        self._wake.set()

    async def reconcile(self, gateways: Sequence[Gateway]) -> None:
        """Set the waypoints the registry serves and run one pass now: create what is
        missing, repair what drifted, delete what no Gateway owns any more, write status.
        Groups in backoff after a failure are left to the loop."""
        self.update(gateways)
        await self.wait_synced()
        async with self._lock:
            await self._pass()

    async def _run(self) -> None:
        next_resync = self._clock() + self._resync
        while True:
            try:
                timeout = next_resync - self._clock()
                if self._retry_at:
                    timeout = min(timeout, min(self._retry_at.values()) - self._clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(timeout, 0.0)):
                        await self._wake.wait()
                await asyncio.sleep(self._debounce)
                self._wake.clear()
                if self._wanted is None or not all(r.synced.is_set()
                                                   for r in self.reflectors.values()):
                    continue
                if self._clock() >= next_resync:
                    next_resync = self._clock() + self._resync
                async with self._lock:
                    await self._pass()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the loop for good
                log.exception("waypoint deployer: pass failed; retrying")
                await asyncio.sleep(1.0)

    # ----- one pass -----

    def _cache(self, plural: str) -> dict[str, dict[str, Any]]:
        r = self.reflectors.get(plural)
        return r.cache if r is not None else {}

    def _live(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        return self._cache(res.plural).get(_key(namespace, name))

    async def _pass(self) -> None:
        self.passes += 1
        self._written = []
        try:
            await self._pass_once()
        finally:
            await self._await_own_writes()

    def _wrote(self, plural: str, key: str, result: Mapping[str, Any] | None = None,
               deleted_uid: str = "") -> None:
        rv = str(((result or {}).get("metadata") or {}).get("resourceVersion") or "")
        self._written.append((plural, key, int(rv) if rv.isdigit() else None, deleted_uid))

    def _caught_up(self, plural: str, key: str, rv: int | None, deleted_uid: str) -> bool:
        live = self._cache(plural).get(key)
        if deleted_uid:
            return live is None or (live.get("metadata") or {}).get("uid") != deleted_uid
        if rv is None:
            return True
        seen = str((live or {}).get("metadata", {}).get("resourceVersion") or "")
        return live is not None and seen.isdigit() and int(seen) >= rv

    async def _await_own_writes(self) -> None:
        """Until the watch caches show what this pass wrote (at most ``_catch_up`` seconds),
        so the next pass never plans against a cache older than our own writes (which would
        write the same status twice, or PUT with a stale resourceVersion and conflict).
        resourceVersions are compared as integers, as client-go's mutation cache does."""
        deadline = self._clock() + self._catch_up
        while not all(self._caught_up(*w) for w in self._written):
            left = deadline - self._clock()
            if left <= 0:
                log.debug("waypoint deployer: watch caches did not show our writes within "
                          "%.1fs; the next pass re-checks", self._catch_up)
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.1)):
                    await self._changed.wait()

    async def _pass_once(self) -> None:
        wanted = self._wanted or {}
        now = self._clock()
        valid: dict[str, tuple[Gateway, dict[str, Any]]] = {}
        invalid: dict[str, tuple[dict[str, Any], StateError]] = {}
        for key, raw in self._cache("gateways").items():
            spec = raw.get("spec") or {}
            if not isinstance(spec, Mapping) or spec.get("gatewayClassName") != WAYPOINT_CLASS:
                continue
            meta = raw.get("metadata") or {}
            try:
                gw = parse_gateway(str(meta.get("name")), str(meta.get("namespace")),
                                   (meta.get("labels") or {}).items(), spec)
            except StateError as e:
                invalid[key] = (raw, e)
                continue
            valid[key] = (gw, raw)
        # Objects of every valid waypoint Gateway stay (even one the registry does not serve
        # yet); the rest, if they are ours and owned by a Gateway, go.
        keep: set[tuple[str, str]] = set()
        groups: dict[str, _Group] = {}
        namespaces: dict[str, list[tuple[Gateway, str]]] = {}
        for key, (gw, raw) in sorted(valid.items()):
            uid = str(raw["metadata"].get("uid") or "")
            for res in (SERVICE_ACCOUNTS, SERVICES, DEPLOYMENTS):
                keep.add((res.plural, key))
            namespaces.setdefault(gw.namespace, []).append((gw, uid))
            if key not in wanted:
                continue
            group = groups.setdefault(key, _Group(key))
            try:
                desired = self._render(gw, uid=uid,
                                       annotations=raw["metadata"].get("annotations") or {})
            except RenderError as e:
                group.problem = Problem(str(e), accepted_reason="InvalidParameters")
                continue
            for obj in desired:
                res = resource_of(obj)
                action = plan_object(obj, self._live(res, gw.namespace, gw.name))
                if action is not None:
                    group.actions.append(action)
        ns_groups: dict[str, _Group] = {}
        if self._root is not None:
            for ns, owners in sorted(namespaces.items()):
                keep.add((CONFIG_MAPS.plural, _key(ns, CA_ROOT_CONFIGMAP)))
                served = [(g, u) for g, u in owners if g.key in wanted]
                if not served:
                    continue
                group = ns_groups.setdefault(ns, _Group(_key(ns, CA_ROOT_CONFIGMAP)))
                action = plan_object(render_ca_root(ns, self._root, served),
                                     self._live(CONFIG_MAPS, ns, CA_ROOT_CONFIGMAP))
                if action is not None:
                    group.actions.append(action)
        for res in _MANAGED:
            for key, obj in sorted(self._cache(res.plural).items()):
                owned_by = owner_gateway(obj)
                if not owned_by or (res.plural, key) in keep:
                    continue
                gone = ", ".join(sorted(set(owned_by)))
                meta = obj["metadata"]
                group_key = owned_by[0] if res is not CONFIG_MAPS else key
                group = groups.setdefault(group_key, _Group(group_key))
                group.actions.append(Action(
                    "delete", res, str(meta["namespace"]), str(meta["name"]),
                    uid=str(meta.get("uid") or ""),
                    why=f"its Gateway {gone} is gone or no longer a valid waypoint"))

        # Namespaces' trust bundles first (the pods mount them), then each Gateway.
        ns_problems: dict[str, Problem] = {}
        for ns, group in ns_groups.items():
            if self._due(group.key, now):
                problem = await self._execute(group)
                self._settle(group.key, problem, retry=problem is not None)
            elif group.key in self.problems:
                problem = Problem(self.problems[group.key])
            else:
                problem = None
            if problem is not None:
                ns_problems[ns] = problem
        for key in invalid:
            groups.setdefault(key, _Group(key))
        services: dict[str, dict[str, Any]] = {}
        for key, group in sorted(groups.items()):
            if not self._due(key, now):
                continue
            # A Gateway that cannot be rendered (or parsed) waits for its next change, not for
            # a retry; failed writes are retried.
            problem = group.problem
            retry = None if problem is not None else await self._execute(group, services)
            problem = problem or retry
            status_problem = None
            if key in valid:
                gw, raw = valid[key]
                problem = problem or ns_problems.get(gw.namespace)
                service = services.get(key) or self._live(SERVICES, gw.namespace, gw.name)
                status_problem = await self._write_status(key, raw, problem,
                                                          _addresses(service))
            elif key in invalid:
                raw, error = invalid[key]
                where = str(error)
                reason = "ListenersNotValid" if ".listeners" in where else "InvalidParameters"
                problem = Problem(f"not a valid Ambit waypoint: {where}", accepted_reason=reason)
                status_problem = await self._write_status(key, raw, problem, [])
            retry = retry or status_problem
            self._settle(key, problem or status_problem, retry=retry is not None)
        # Forget what is known about groups that no longer exist.
        active = {*groups, *invalid, *(g.key for g in ns_groups.values())}
        for stale in {*self.problems, *self._retry_at} - active:
            self._forget(stale)

    def _due(self, key: str, now: float) -> bool:
        return self._retry_at.get(key, 0.0) <= now

    def _forget(self, key: str) -> None:
        for table in (self.problems, self._logged, self._retry_at, self._backoffs):
            table.pop(key, None)

    def _settle(self, key: str, problem: Problem | None, *, retry: bool) -> None:
        """Record a group's outcome: the problem it has now (logged once per distinct
        message) and, with ``retry``, when to try again (exponential backoff per group)."""
        suffix = ""
        if retry:
            delay = self._backoffs.setdefault(key, self._backoff()).delay()
            self._retry_at[key] = self._clock() + delay
            suffix = f"; retrying in {delay:.1f}s"
        else:
            self._backoffs.pop(key, None)
            self._retry_at.pop(key, None)
        if problem is None:
            if key in self.problems:
                log.info("waypoint %s: resolved", key)
            self.problems.pop(key, None)
            self._logged.pop(key, None)
            return
        self.problems[key] = problem.message
        level = logging.WARNING if self._logged.get(key) != problem.message else logging.DEBUG
        self._logged[key] = problem.message
        log.log(level, "waypoint %s: %s%s", key, problem.message, suffix)

    async def _execute(self, group: _Group,
                       services: dict[str, dict[str, Any]] | None = None) -> Problem | None:
        """Run a group's writes in order; the first failure stops the group."""
        for a in group.actions:
            try:
                if a.verb == "create":
                    assert a.body is not None
                    result = await self.rest.create(a.resource, a.namespace, a.body,
                                                    FIELD_MANAGER)
                elif a.verb == "update":
                    assert a.body is not None
                    result = await self.rest.replace(a.resource, a.namespace, a.name, a.body,
                                                     FIELD_MANAGER)
                else:
                    await self.rest.delete(a.resource, a.namespace, a.name, uid=a.uid)
                    result = None
                self._wrote(a.resource.plural, _key(a.namespace, a.name), result,
                            deleted_uid=a.uid if a.verb == "delete" else "")
            except ApiError as e:
                problem = await self._failed(a, e)
                if problem is None:
                    continue
                return problem
            log.info("waypoint %s: %sd %s (%s)", group.key, a.verb.removesuffix("e"), a.what,
                     a.why)
            if result is not None and a.resource is SERVICES and services is not None:
                services[group.key] = result
        return None

    async def _failed(self, a: Action, e: ApiError) -> Problem | None:
        """What a failed write means: None when it is fine after all (a create that lost a
        race with our own earlier create, a delete of something already gone)."""
        if a.verb == "delete" and e.status == 404:
            return None
        if a.verb == "create" and e.already_exists and a.body is not None:
            try:
                other = await self.rest.get(a.resource, a.namespace, a.name)
                if other is None:
                    return None  # deleted meanwhile: the next pass creates it
                if _ours(other, a.body):
                    # Ours but not in the label-selected cache: created by an earlier pass
                    # whose event has not arrived yet, or someone removed our label (then the
                    # owner reference still names the Gateway): take it back.
                    if drift(a.body, other):
                        result = await self.rest.replace(a.resource, a.namespace, a.name,
                                                         merged(other, a.body), FIELD_MANAGER)
                        self._wrote(a.resource.plural, _key(a.namespace, a.name), result)
                        log.info("waypoint: took back %s (it had lost our label or fields)",
                                 a.what)
                    return None
            except ApiError as again:
                return Problem(f"{a.what}: {again}")
            if a.resource is CONFIG_MAPS and (other.get("data") or {}).get(CA_ROOT_KEY) == \
                    (a.body or {}).get("data", {}).get(CA_ROOT_KEY):
                return None  # someone else provides the same trust bundle: fine
            return Problem(
                f"{a.what} already exists and is not managed by Ambit (no label "
                f"{MANAGED_BY_LABEL}={MANAGED_BY}); delete or rename it, or give the Gateway "
                "another name", programmed_reason="Invalid")
        if e.status == 409:
            return Problem(f"{a.what} changed while being {a.verb}d; retrying")
        if e.status == 403:
            return Problem(f"cannot {a.verb} {a.what}: forbidden ({e.message}); the "
                           f"controller's service account needs get, list, watch, create, "
                           f"update and delete on {a.resource.plural} (RBAC)")
        if e.status == 422:
            return Problem(f"the API server rejected {a.what} ({a.why}): {e.message}",
                           programmed_reason="Invalid")
        if e.status == 404 and a.verb == "create":
            return Problem(f"cannot create {a.what}: {e.message}")
        return Problem(f"cannot {a.verb} {a.what}: {e}")

    async def _write_status(self, key: str, raw: Mapping[str, Any], problem: Problem | None,
                            addresses: list[str]) -> Problem | None:
        meta = raw.get("metadata") or {}
        generation = meta.get("generation")
        conds = gateway_conditions(key, addresses=addresses, problem=problem)
        body = gateway_status(
            generation=int(generation) if isinstance(generation, int) else None,
            conditions=conds, addresses=addresses, previous=raw.get("status"),
            now=_rfc3339(self._now()))
        if not status_differs(raw.get("status"), body):
            return None
        ns, name = key.split("/", 1)
        try:
            result = await self.rest.patch_status(GATEWAYS, ns, name, body, FIELD_MANAGER)
            self._wrote("gateways", key, result)
        except ApiError as e:
            if e.status == 404:
                return None  # the Gateway is gone; the next pass cleans up
            if e.status == 403:
                return Problem(f"cannot write the status of Gateway {key}: forbidden "
                               f"({e.message}); the controller's service account needs patch "
                               f"on gateways/status in {GATEWAY_GROUP} (RBAC)")
            return Problem(f"cannot write the status of Gateway {key}: {e}")
        log.debug("waypoint %s: status %s", key,
                  "; ".join(f"{c.type}={c.status} ({c.reason})" for c in conds))
        return None

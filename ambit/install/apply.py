"""``ambit install``: apply the rendered manifests, then wait until Ambit runs.

Why server-side apply: the manifests are the source of truth for every field they set, and
an upgrade must work on every kind as it is, including a Service (whose cluster IP the API
server allocated and a whole-object replace would try to clear) and a Deployment (whose
selector is immutable). ``PATCH`` with ``application/apply-patch+yaml``, field manager
``ambit`` and ``force=true`` does exactly that, as ``kubectl apply --server-side
--force-conflicts`` would, and re-running it with the same manifests writes nothing.

Order and checks, so that a failure leaves as little behind as possible and says what it left:

1. every object's kind is resolved by API discovery before anything is written (a kind the
   cluster does not serve stops the install with nothing applied, unless a CRD applied in this
   run provides it);
2. Namespaces, then CRDs, then the rest in the kustomization's order; an object of a kind
   defined by a CRD of this run waits for that CRD to be ``Established``;
3. the GatewayClass ``ambit-waypoint`` only when the cluster serves the Gateway API (it is
   not in the kustomize base, which must apply on a cluster without it), saying so either way;
4. with ``--wait`` (the default), until each CRD is Established and each workload is rolled
   out by the criteria ``kubectl rollout status`` uses, printing progress as it changes and
   at least every ``heartbeat`` seconds; on timeout, why the pods that are not ready are not
   (waiting reasons, restarts).

Any API error becomes ``InstallError``: one line naming the object and what to do, plus the
list of what was applied before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ambit
from ambit.install.kube import ApiError, ApiResource, Cluster, explain
from ambit.install.names import (
    CONFIG_MAP,
    DATAPLANE_MODE_LABEL,
    GATEWAY_CLASS,
    NAMESPACE,
    WAYPOINT_CONTROLLER_NAME,
)
from ambit.install.render import Manifest, Rendered, apply_order, gateway_class, pod_templates
from controller.waypoint.k8s_apply import GATEWAY_API_INSTALL

__all__ = ["GATEWAY_API_VERSION", "InstallError", "InstallResult", "Out", "install",
           "pod_problems", "poll_interval", "rollout_state"]

Out = Callable[[str], None]
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")


class InstallError(Exception):
    """The install stopped; the message says where, why, what was applied and what to do."""


@dataclass
class InstallResult:
    applied: list[tuple[str, str]] = field(default_factory=list)  # (object, outcome)
    gateway_class: str = ""  # created | configured | unchanged | skipped | foreign
    rollouts: dict[str, str] = field(default_factory=dict)  # workload -> last state


# ----- rollout criteria (pure) -----

def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _condition(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == type_:
            return c
    return None


class RolloutFailed(Exception):
    """The workload's controller gave up (a Deployment past its progress deadline)."""


def rollout_state(obj: Mapping[str, Any]) -> tuple[bool, str]:
    """(rolled out, what it is waiting for), by ``kubectl rollout status``'s criteria.

    Raises ``RolloutFailed`` for a Deployment whose Progressing condition says
    ``ProgressDeadlineExceeded``.
    """
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    st = obj.get("status") or {}
    if _int(st.get("observedGeneration")) < _int(meta.get("generation")):
        return False, "waiting for its controller to observe the new spec"
    if kind == "Deployment":
        progressing = _condition(obj, "Progressing")
        if progressing is not None and progressing.get("reason") == "ProgressDeadlineExceeded":
            raise RolloutFailed(str(progressing.get("message") or "progress deadline exceeded"))
        want = _int(spec.get("replicas", 1))
        updated, total = _int(st.get("updatedReplicas")), _int(st.get("replicas"))
        available = _int(st.get("availableReplicas"))
        if updated < want:
            return False, f"{updated} of {want} replicas updated"
        if total > updated:
            return False, f"{total - updated} old replicas still terminating"
        if available < updated:
            return False, f"{available} of {updated} updated replicas available"
        return True, f"{available} of {want} replicas available"
    if kind == "DaemonSet":
        desired = _int(st.get("desiredNumberScheduled"))
        updated = _int(st.get("updatedNumberScheduled"))
        available = _int(st.get("numberAvailable"))
        if updated < desired:
            return False, f"{updated} of {desired} node pods updated"
        if available < desired:
            return False, f"{available} of {desired} updated node pods available"
        if desired == 0:
            return True, "rolled out, but no node runs it (no schedulable nodes?)"
        return True, f"{available} of {desired} node pods available"
    if kind == "StatefulSet":
        want = _int(spec.get("replicas", 1))
        ready = _int(st.get("readyReplicas"))
        if st.get("updateRevision") and st.get("currentRevision") != st.get("updateRevision"):
            return False, f"{_int(st.get('updatedReplicas'))} of {want} replicas updated"
        if ready < want:
            return False, f"{ready} of {want} replicas ready"
        return True, f"{ready} of {want} replicas ready"
    return True, "nothing to wait for"


def pod_problems(pods: list[dict[str, Any]]) -> list[str]:
    """One line per pod that is not ready: node, phase, why its containers wait, restarts."""
    lines = []
    for pod in pods:
        meta, st = pod.get("metadata") or {}, pod.get("status") or {}
        ready = _condition(pod, "Ready")
        if ready is not None and ready.get("status") == "True":
            continue
        why: list[str] = []
        for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            state = cs.get("state") or {}
            waiting = state.get("waiting") or {}
            term = (cs.get("lastState") or {}).get("terminated") or {}
            if waiting.get("reason"):
                text = f"{cs.get('name')}: {waiting['reason']}"
                if waiting.get("message"):
                    text += f" ({waiting['message']})"
                why.append(text)
            elif not cs.get("ready"):
                why.append(f"{cs.get('name')}: not ready")
            if _int(cs.get("restartCount")):
                last = f", last exit {term.get('reason')} {term.get('exitCode')}" if term else ""
                why.append(f"{cs.get('name')} restarted {cs['restartCount']}x{last}")
        if not why:
            sched = _condition(pod, "PodScheduled")
            if sched is not None and sched.get("status") == "False":
                why.append(f"unschedulable: {sched.get('message') or sched.get('reason')}")
        node = (pod.get("spec") or {}).get("nodeName") or "(no node)"
        lines.append(f"pod {meta.get('name')} on {node}: {st.get('phase', 'Pending')}"
                     + (f"; {'; '.join(why)}" if why else ""))
    return lines


# ----- installing -----

def poll_interval(poll: float, attempt: int) -> float:
    """Short sleeps first (most waits end within a second), then every ``poll`` seconds."""
    return min(poll, 0.2 * float(2 ** min(attempt, 10)))


def _rv(obj: Mapping[str, Any]) -> Any:
    return (obj.get("metadata") or {}).get("resourceVersion")


def _crd_kinds(manifests: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    """(group, kind) -> the CRD manifest that defines it."""
    out = {}
    for m in manifests:
        if m.kind == "CustomResourceDefinition":
            spec = m.obj.get("spec") or {}
            out[(str(spec.get("group")), str((spec.get("names") or {}).get("kind")))] = m
    return out


class _Installer:
    def __init__(self, cluster: Cluster, rendered: Rendered, out: Out, *, timeout: float,
                 poll: float, heartbeat: float) -> None:
        self.cluster = cluster
        self.rendered = rendered
        self.out = out
        self.poll = poll
        self.heartbeat = heartbeat
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.deadline = self.loop.time() + timeout
        self.result = InstallResult()

    def _left(self) -> str:
        done = [name for name, _ in self.result.applied]
        if not done:
            return "; nothing was applied"
        shown = ", ".join(done[:6]) + (f" and {len(done) - 6} more" if len(done) > 6 else "")
        return (f"; applied before this failure: {shown}. Fix the cause and run `ambit "
                "install` again (it continues where it stopped), or `ambit uninstall` to "
                "remove them")

    def fail(self, e: ApiError, doing: str) -> InstallError:
        return InstallError(explain(e, doing, self.cluster.server) + self._left())

    async def resolve(self, order: list[Manifest]) -> dict[int, ApiResource]:
        crds = _crd_kinds(order)
        found: dict[int, ApiResource] = {}
        for m in order:
            try:
                res = await self.cluster.resource(m.api_version, m.kind)
            except ApiError as e:
                raise self.fail(e, f"reading the API discovery for {m.api_version}") from None
            if res is None:
                if (m.group, m.kind) in crds:
                    continue  # served once its CRD, applied earlier, is established
                raise InstallError(f"{m.source}: {m.describe()}: the cluster does not serve "
                                   f"{m.kind} in {m.api_version} (a missing CRD or an older "
                                   "Kubernetes); nothing was applied")
            if res.namespaced and not m.namespace:
                raise InstallError(f"{m.source}: {m.describe()} has no metadata.namespace; "
                                   "nothing was applied")
            found[id(m)] = res
        return found

    async def apply_one(self, res: ApiResource, obj: Mapping[str, Any], what: str,
                        ref: str) -> str:
        meta = obj["metadata"]
        try:
            before = await self.cluster.get(res, meta.get("namespace"), meta["name"])
            after = await self.cluster.apply(res, obj)
        except ApiError as e:
            raise self.fail(e, f"applying {what}") from None
        outcome = "created" if before is None else \
            "unchanged" if _rv(before) == _rv(after) else "configured"
        self.result.applied.append((ref, outcome))
        self.out(f"{ref} {outcome}")
        return outcome

    async def wait_established(self, crd: Manifest) -> None:
        res = await self.cluster.resource(crd.api_version, crd.kind)
        assert res is not None
        said = False
        attempt = 0
        while True:
            try:
                obj = await self.cluster.get(res, None, crd.name)
            except ApiError as e:
                raise self.fail(e, f"reading {crd.describe()}") from None
            cond = _condition(obj or {}, "Established")
            if cond is not None and cond.get("status") == "True":
                return
            names = _condition(obj or {}, "NamesAccepted")
            if names is not None and names.get("status") == "False":
                raise InstallError(f"{crd.describe()} ({crd.source}): its names are not "
                                   f"accepted: {names.get('message')}" + self._left())
            if not said:
                self.out(f"waiting for {crd.ref()} to be established")
                said = True
            if self.loop.time() >= self.deadline:
                raise InstallError(f"timed out after {self.timeout:.0f} s waiting for "
                                   f"{crd.describe()} to be established; check `kubectl get "
                                   f"crd {crd.name} -o yaml`" + self._left())
            await asyncio.sleep(poll_interval(self.poll, attempt))
            attempt += 1

    async def apply_manifests(self) -> None:
        order = apply_order(self.rendered.manifests)
        self.cluster.forget()  # discovery is read afresh on every install
        resolved = await self.resolve(order)
        crds = _crd_kinds(order)
        await self.check_namespaces(order, resolved)
        await self.note_mesh_root()
        for m in order:
            res = resolved.get(id(m))
            if res is None:
                await self.wait_established(crds[(m.group, m.kind)])
                self.cluster.forget(m.api_version)
                res = await self.cluster.resource(m.api_version, m.kind)
                if res is None:
                    raise InstallError(f"{m.source}: {m.describe()}: {m.kind} is still not "
                                       "served after its CRD was established" + self._left())
            await self.apply_one(res, m.obj, f"{m.describe()} ({m.source})", m.ref())

    async def check_namespaces(self, order: list[Manifest],
                               resolved: dict[int, ApiResource]) -> None:
        """Refuse to start while a namespace of ours is still being deleted (an uninstall in
        progress): nothing could be created in it."""
        for m in order:
            if m.kind != "Namespace" or id(m) not in resolved:
                continue
            try:
                live = await self.cluster.get(resolved[id(m)], None, m.name)
            except ApiError as e:
                raise self.fail(e, f"reading {m.describe()}") from None
            if live is not None and (live.get("metadata") or {}).get("deletionTimestamp"):
                raise InstallError(f"namespace {m.name} is being deleted (an uninstall in "
                                   f"progress?); wait until `kubectl get namespace {m.name}` "
                                   "finds nothing, then run `ambit install` again; nothing "
                                   "was applied")

    async def note_mesh_root(self) -> None:
        """Say so when the user brought their own mesh root (or a previous install made it)."""
        secrets = await self.cluster.resource("v1", "Secret")
        if secrets is None:
            return
        try:
            found = await self.cluster.get(secrets, NAMESPACE, "ambit-ca")
        except ApiError as e:
            if e.status == 0:
                raise self.fail(e, "connecting") from None
            return  # forbidden to read secrets: the controller will tell
        if found is not None:
            self.out(f"using the existing mesh root in Secret {NAMESPACE}/ambit-ca")

    async def apply_gateway_class(self) -> None:
        try:
            res = await self.cluster.served(GATEWAY_API_VERSION, "gatewayclasses")
            live = await self.cluster.get(res, None, GATEWAY_CLASS) if res else None
        except ApiError as e:
            raise self.fail(e, f"reading GatewayClass {GATEWAY_CLASS}") from None
        if res is None:
            self.result.gateway_class = "skipped"
            self.out(f"the cluster does not serve the Gateway API: GatewayClass {GATEWAY_CLASS} "
                     "not created (only waypoints need it; to use them install the Gateway "
                     f"API CRDs: {GATEWAY_API_INSTALL}, then run `ambit install` again)")
            return
        theirs = ((live or {}).get("spec") or {}).get("controllerName")
        if live is not None and theirs != WAYPOINT_CONTROLLER_NAME:
            self.result.gateway_class = "foreign"
            self.out(f"GatewayClass {GATEWAY_CLASS} exists with controllerName {theirs}, not "
                     f"{WAYPOINT_CONTROLLER_NAME}: left alone (another installation owns it; "
                     "Ambit waypoints will not be deployed until it is removed)")
            return
        obj = gateway_class()
        ref = f"gatewayclass.gateway.networking.k8s.io/{GATEWAY_CLASS}"
        self.result.gateway_class = await self.apply_one(
            res, obj, f"GatewayClass {GATEWAY_CLASS}", ref)

    async def wait_crds(self) -> None:
        for m in apply_order(self.rendered.manifests):
            if m.kind == "CustomResourceDefinition":
                await self.wait_established(m)

    async def wait_workloads(self) -> None:
        workloads = [m for m in self.rendered.manifests
                     if m.kind in WORKLOAD_KINDS and m.group == "apps"]
        pending = {m.ref(): m for m in workloads}
        resources = {ref: await self.cluster.resource(m.api_version, m.kind)
                     for ref, m in pending.items()}
        last_said: dict[str, str] = {}
        last_line = self.loop.time()
        start = last_line
        attempt = 0
        if pending:
            self.out(f"waiting for {', '.join(pending)} to roll out (up to "
                     f"{self.timeout:.0f} s; --no-wait skips this)")
        while pending:
            for ref, m in list(pending.items()):
                res = resources[ref]
                assert res is not None
                try:
                    obj = await self.cluster.get(res, m.namespace, m.name)
                    done, state = rollout_state(obj or {})
                except ApiError as e:
                    raise InstallError(explain(e, f"reading {m.describe()}",
                                               self.cluster.server)) from None
                except RolloutFailed as e:
                    await self.diagnose(m)
                    raise InstallError(f"{m.describe()} failed to roll out: {e}; see `kubectl "
                                       f"-n {m.namespace} describe {m.kind.lower()} {m.name}`"
                                       ) from None
                if obj is None:
                    raise InstallError(f"{m.describe()} disappeared while waiting for it "
                                       "(deleted by someone else?); run `ambit install` again")
                self.result.rollouts[ref] = state
                if state != last_said.get(ref):
                    self.out(f"  {ref}: {state}")
                    last_said[ref] = state
                    last_line = self.loop.time()
                if done:
                    del pending[ref]
            if not pending:
                return
            now = self.loop.time()
            if now >= self.deadline:
                for m in pending.values():
                    await self.diagnose(m)
                names = ", ".join(f"{ref} ({last_said.get(ref, '?')})" for ref in pending)
                ns = next(iter(pending.values())).namespace or NAMESPACE
                raise InstallError(
                    f"timed out after {self.timeout:.0f} s waiting for {names}. Everything "
                    "is applied and the rollout goes on in the cluster: follow it with "
                    f"`ambit status` or `kubectl -n {ns} get pods`; raise --timeout, or fix "
                    "what the pods above wait for and run `ambit install` again")
            if now - last_line >= self.heartbeat:
                for ref in pending:
                    self.out(f"  {ref}: still {last_said.get(ref, 'waiting')} "
                             f"({now - start:.0f} s)")
                last_line = now
            await asyncio.sleep(min(poll_interval(self.poll, attempt),
                                    max(0.0, self.deadline - now)))
            attempt += 1

    async def diagnose(self, m: Manifest) -> None:
        """Print why the workload's pods are not ready (best effort)."""
        selector = ((m.obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        pods_res = await self.cluster.resource("v1", "Pod")
        if not selector or pods_res is None:
            return
        text = ",".join(f"{k}={v}" for k, v in selector.items())
        try:
            pods = await self.cluster.list(pods_res, m.namespace, text)
        except ApiError:
            return
        problems = pod_problems(pods)
        if not pods:
            self.out(f"  {m.ref()}: no pods exist yet (`kubectl -n {m.namespace} describe "
                     f"{m.kind.lower()} {m.name}` shows why)")
        for line in problems:
            self.out(f"  {line}")

    def summary(self, waited: bool) -> None:
        r = self.rendered
        images = sorted({str(c.get("image")) for m in r.manifests for t in pod_templates(m.obj)
                         for c in ((t.get("spec") or {}).get("containers") or [])
                         if isinstance(c, Mapping)})
        counts: dict[str, int] = {}
        for _, outcome in self.result.applied:
            counts[outcome] = counts.get(outcome, 0) + 1
        done = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
        self.out(f"Ambit {ambit.__version__} {'is running' if waited else 'is applied'} "
                 f"({done}).")
        self.out(f"  image {', '.join(images) or '?'}; {CONFIG_MAP}: "
                 + ", ".join(f"{k}={v}" for k, v in sorted(r.config.items())))
        for m in r.manifests:
            if m.kind in WORKLOAD_KINDS:
                state = self.result.rollouts.get(m.ref(), "not waited for")
                self.out(f"  {m.describe()}: {state}")
            elif m.kind == "Service" and m.api_version == "v1":
                ports = ", ".join(f"{p.get('name', '?')} {p.get('port')}"
                                  for p in (m.obj.get("spec") or {}).get("ports") or [])
                self.out(f"  Service {m.name}.{m.namespace}.svc: {ports}")
        gc = self.result.gateway_class
        self.out(f"  waypoints: GatewayClass {GATEWAY_CLASS} "
                 + ("not created (no Gateway API in this cluster)" if gc == "skipped" else
                    "belongs to another controller" if gc == "foreign" else "ready"))
        self.out("Next:")
        self.out("  put a namespace's pods in the mesh:  kubectl label namespace NAME "
                 f"{DATAPLANE_MODE_LABEL}=ambient")
        self.out("  check the installation:             ambit status"
                 + ("" if waited else "  (the rollout was not waited for)"))
        if gc != "skipped":
            self.out("  add an L7 waypoint to a namespace:  ambit waypoint apply --namespace "
                     "NAME --name waypoint --kubeconfig ...")


async def install(cluster: Cluster, rendered: Rendered, *, wait: bool = True,
                  wait_timeout: float = 300.0, poll: float = 2.0, heartbeat: float = 30.0,
                  out: Out = print) -> InstallResult:
    """Apply ``rendered`` (and the GatewayClass when the Gateway API is served); with
    ``wait``, until everything runs. Raises ``InstallError``."""
    i = _Installer(cluster, rendered, out, timeout=wait_timeout, poll=poll, heartbeat=heartbeat)
    out(f"installing Ambit {ambit.__version__} into {cluster.server} from "
        f"{rendered.source_dir} (overrides: {rendered.overrides.describe()})")
    await i.apply_manifests()
    await i.apply_gateway_class()
    if wait:
        await i.wait_crds()
        await i.wait_workloads()
    i.summary(wait)
    return i.result

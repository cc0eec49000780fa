"""``ambit uninstall``: remove everything ``ambit install`` and the controller added.

Why this order (pinned in the install contract), rather than ``kubectl delete -k``:

1. the node DaemonSet first, with ``propagationPolicy: Foreground``, and wait until its pods
   are gone. Each node's agent, stopping, sees its DaemonSet being deleted and removes what it
   put on the node: the CNI chain entry (new pods would otherwise fail to start on a plugin
   whose server is gone), the ``ambit-cni`` binary and the capture rules/programs. The
   controller and the RBAC must still exist while they do;
2. the rest of the manifests in reverse apply order; a workload (the controller Deployment) is
   deleted in the foreground too and waited for, so no controller is left running to recreate
   the waypoint objects removed next;
3. what the controller created outside ``ambit-system``: waypoint ServiceAccounts, Deployments,
   Services and ``ambit-ca-root`` ConfigMaps, found by the label
   ``ambit.dev/managed-by=ambit-controller`` in every namespace (users' Gateways, HTTPRoutes and
   policies are theirs and stay, unless the CRDs go);
4. the GatewayClass ``ambit-waypoint``, only when its controllerName is Ambit's;
5. the CRDs unless ``--keep-crds`` (saying how many custom resources go with them);
6. the namespace last (with the mesh root Secret ``ambit-ca`` in it), waiting until it is gone.

Idempotent: anything already gone (404, or a kind no longer served) is reported as such, so
an interrupted uninstall is finished by running it again. ``dry_run`` reads the cluster and
lists what would be deleted, deleting nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ambit.install.apply import GATEWAY_API_VERSION, WORKLOAD_KINDS, poll_interval
from ambit.install.kube import ApiError, ApiResource, Cluster, explain
from ambit.install.names import (
    AMBIENT,
    DATAPLANE_MODE_LABEL,
    GATEWAY_CLASS,
    NAMESPACE,
    WAYPOINT_CONTROLLER_NAME,
    WAYPOINT_LABEL,
    WAYPOINT_LABEL_VALUE,
)
from ambit.install.render import Manifest, apply_order

__all__ = ["UninstallError", "UninstallResult", "uninstall"]

Out = Callable[[str], None]
# What the controller's waypoint deployer creates (controller/waypoint/k8s_deployer.py),
# workloads first so their pods stop before their identity goes.
WAYPOINT_KINDS = (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ServiceAccount"),
                  ("v1", "ConfigMap"))
MESH_ROOT_SECRET = "ambit-ca"


class UninstallError(Exception):
    """The uninstall stopped; the message says where, why and how to continue."""


@dataclass
class UninstallResult:
    deleted: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    would_delete: list[str] = field(default_factory=list)  # dry run


def _ref(kind: str, api_version: str, name: str) -> str:
    group = api_version.rpartition("/")[0]
    return f"{kind.lower()}{'.' + group if group else ''}/{name}"


def _selector(obj: Mapping[str, Any] | None) -> str:
    labels = (((obj or {}).get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class _Uninstaller:
    def __init__(self, cluster: Cluster, out: Out, *, dry_run: bool, timeout: float,
                 poll: float, heartbeat: float) -> None:
        self.cluster = cluster
        self.out = out
        self.dry_run = dry_run
        self.poll = poll
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + timeout
        self.result = UninstallResult()

    def fail(self, e: ApiError, doing: str) -> UninstallError:
        done = self.result.deleted
        so_far = (f"; deleted so far: {', '.join(done[:6])}"
                  + (f" and {len(done) - 6} more" if len(done) > 6 else "")) if done else ""
        return UninstallError(explain(e, doing, self.cluster.server) + so_far
                              + "; fix the cause and run `ambit uninstall` again to continue")

    async def resource(self, api_version: str, kind: str) -> ApiResource | None:
        try:
            return await self.cluster.resource(api_version, kind)
        except ApiError as e:
            raise self.fail(e, f"reading the API discovery for {api_version}") from None

    async def delete(self, res: ApiResource | None, namespace: str | None, name: str, ref: str,
                     *, propagation: str = "Background", why: str = "") -> bool:
        """Delete one object (or in a dry run, say so if it exists); whether it existed."""
        try:
            if res is None:
                live = None
            elif self.dry_run:
                live = await self.cluster.get(res, namespace, name)
            else:
                live = await self.cluster.delete(res, namespace, name, propagation)
        except ApiError as e:
            raise self.fail(e, f"deleting {ref}") from None
        if live is None:
            self.result.already_gone.append(ref)
            self.out(f"{ref} {'not found' if self.dry_run else 'already gone'}")
            return False
        if self.dry_run:
            self.result.would_delete.append(ref)
            self.out(f"would delete {ref}{why}")
        else:
            self.result.deleted.append(ref)
            self.out(f"{ref} deleted{why}")
        return True

    async def wait_gone(self, res: ApiResource, namespace: str | None, name: str, ref: str,
                        pod_selector: str = "", what_pods_do: str = "") -> None:
        """Until the object and (with ``pod_selector``) its pods no longer exist."""
        pods_res = await self.resource("v1", "Pod") if pod_selector else None
        said, last_line, start = "", self.loop.time(), self.loop.time()
        attempt = 0
        while True:
            try:
                obj = await self.cluster.get(res, namespace, name)
                pods = await self.cluster.list(pods_res, namespace, pod_selector) \
                    if pods_res is not None else []
            except ApiError as e:
                raise self.fail(e, f"waiting for {ref} to be deleted") from None
            if obj is None and not pods:
                return
            if pods:
                nodes = sorted({str((p.get("spec") or {}).get("nodeName") or "?")
                                for p in pods})
                state = (f"{len(pods)} pod{'s' if len(pods) != 1 else ''} left on "
                         f"{', '.join(nodes[:5])}{' ...' if len(nodes) > 5 else ''}"
                         f"{what_pods_do}")
            elif obj is not None and ((obj.get("status") or {}).get("phase") == "Terminating"):
                state = "terminating (its objects are being removed)"
            else:
                state = "waiting for the deletion to complete"
            now = self.loop.time()
            if state != said or now - last_line >= self.heartbeat:
                suffix = f" ({now - start:.0f} s)" if state == said else ""
                self.out(f"  {ref}: {state}{suffix}")
                said, last_line = state, now
            if now >= self.deadline:
                hint = (f"`kubectl -n {namespace} get pods -l {pod_selector}` shows them; a pod "
                        "on a node that is down stays until the node is removed"
                        if pods else f"`kubectl get {ref} -o yaml` shows what holds it "
                        "(finalizers)")
                raise UninstallError(f"timed out after {self.timeout:.0f} s waiting for {ref} "
                                     f"to be deleted: {state}; {hint}; run `ambit uninstall` "
                                     "again to continue")
            await asyncio.sleep(min(poll_interval(self.poll, attempt),
                                    max(0.0, self.deadline - now)))
            attempt += 1

    async def remove_workload(self, m: Manifest, what_pods_do: str = "") -> None:
        res = await self.resource(m.api_version, m.kind)
        ref = m.ref()
        live = None
        if res is not None:
            try:
                live = await self.cluster.get(res, m.namespace, m.name)
            except ApiError as e:
                raise self.fail(e, f"reading {ref}") from None
        selector = _selector(live) or _selector(m.obj)
        why = " (in the foreground: its pods go first)" if live is not None else ""
        existed = await self.delete(res, m.namespace, m.name, ref, propagation="Foreground",
                                    why=why)
        if self.dry_run:
            return
        if res is not None and (existed or selector):
            await self.wait_gone(res, m.namespace, m.name, ref, selector, what_pods_do)
            if existed:
                self.out(f"{ref} and its pods are gone")

    async def remove_waypoint_objects(self) -> None:
        selector = f"{WAYPOINT_LABEL}={WAYPOINT_LABEL_VALUE}"
        found = 0
        for api_version, kind in WAYPOINT_KINDS:
            res = await self.resource(api_version, kind)
            if res is None:
                continue
            try:
                items = await self.cluster.list(res, None, selector)
            except ApiError as e:
                raise self.fail(e, f"listing {res.resource_name()} labelled {selector}") from None
            for obj in items:
                meta = obj.get("metadata") or {}
                ns, name = meta.get("namespace"), str(meta.get("name"))
                ref = f"{_ref(kind, api_version, name)} -n {ns}" if ns else \
                    _ref(kind, api_version, name)
                found += 1
                await self.delete(res, ns, name, ref, why=" (waypoint, created by the "
                                  "controller)" if kind == "Deployment" else "")
        if not found:
            self.out(f"no waypoint objects (labelled {selector}) in any namespace")

    async def remove_gateway_class(self) -> None:
        res = await self.resource(GATEWAY_API_VERSION, "GatewayClass")
        ref = f"gatewayclass.gateway.networking.k8s.io/{GATEWAY_CLASS}"
        if res is None:
            self.out(f"{ref}: the Gateway API is not served, nothing to remove")
            return
        try:
            live = await self.cluster.get(res, None, GATEWAY_CLASS)
        except ApiError as e:
            raise self.fail(e, f"reading {ref}") from None
        owner = ((live or {}).get("spec") or {}).get("controllerName")
        if live is not None and owner != WAYPOINT_CONTROLLER_NAME:
            self.result.kept.append(ref)
            self.out(f"{ref} left alone: its controllerName is {owner}, not Ambit's")
            return
        await self.delete(res if live is not None else None, None, GATEWAY_CLASS, ref)

    async def count_custom_resources(self, crd: Manifest) -> int | None:
        spec = crd.obj.get("spec") or {}
        versions = [v for v in spec.get("versions") or [] if isinstance(v, Mapping)]
        served = [str(v.get("name")) for v in versions if v.get("served", True)]
        plural = str((spec.get("names") or {}).get("plural"))
        for version in served:
            res = await self.resource(f"{spec.get('group')}/{version}", str(
                (spec.get("names") or {}).get("kind")))
            if res is not None and res.plural == plural:
                try:
                    return len(await self.cluster.list(res))
                except ApiError:
                    return None
        return None

    async def remove_crd(self, crd: Manifest, keep: bool) -> None:
        count = await self.count_custom_resources(crd)
        if count is None:
            with_them = ""
        else:
            with_them = f" ({count} custom resource{'s' if count != 1 else ''})"
        if keep:
            self.result.kept.append(crd.ref())
            self.out(f"{crd.ref()} kept (--keep-crds){with_them}")
            return
        res = await self.resource(crd.api_version, crd.kind)
        goes = f" with its {count} custom resource{'s' if count != 1 else ''}" if count else ""
        await self.delete(res, None, crd.name, crd.ref(), why=goes)

    async def remove_namespace(self, m: Manifest) -> None:
        res = await self.resource(m.api_version, m.kind)
        secrets = await self.resource("v1", "Secret")
        if secrets is not None and m.name == NAMESPACE:
            try:
                root = await self.cluster.get(secrets, m.name, MESH_ROOT_SECRET)
            except ApiError:
                root = None
            if root is not None:
                self.out(f"note: the mesh root (Secret {m.name}/{MESH_ROOT_SECRET}) goes with "
                         "the namespace; to keep the mesh identities for a later install, "
                         f"save it first: kubectl -n {m.name} get secret {MESH_ROOT_SECRET} "
                         "-o yaml > ambit-ca.yaml")
        existed = await self.delete(res, None, m.name, m.ref())
        if existed and not self.dry_run and res is not None:
            await self.wait_gone(res, None, m.name, m.ref())
            self.out(f"{m.ref()} is gone")

    async def mesh_namespaces(self) -> list[str]:
        res = await self.resource("v1", "Namespace")
        if res is None:
            return []
        try:
            items = await self.cluster.list(res, None, f"{DATAPLANE_MODE_LABEL}={AMBIENT}")
        except ApiError:
            return []
        return [str((i.get("metadata") or {}).get("name")) for i in items]

    async def run(self, manifests: Sequence[Manifest], keep_crds: bool) -> None:
        self.cluster.forget()  # discovery is read afresh on every run
        order = apply_order(list(manifests))
        reverse = list(reversed(order))
        for m in reverse:
            if m.kind == "DaemonSet" and m.group == "apps":
                await self.remove_workload(m, "; each agent removes the CNI configuration and "
                                              "its capture from its node as it stops")
        for m in reverse:
            if m.kind in ("Namespace", "CustomResourceDefinition") \
                    or (m.kind == "DaemonSet" and m.group == "apps"):
                continue
            if m.kind in WORKLOAD_KINDS and m.group == "apps":
                await self.remove_workload(m)
            else:
                await self.delete(await self.resource(m.api_version, m.kind), m.namespace,
                                  m.name, m.ref())
        await self.remove_waypoint_objects()
        await self.remove_gateway_class()
        for m in reverse:
            if m.kind == "CustomResourceDefinition":
                await self.remove_crd(m, keep_crds)
        for m in reverse:
            if m.kind == "Namespace":
                await self.remove_namespace(m)

    async def summary(self) -> None:
        r = self.result
        if self.dry_run:
            self.out(f"dry run: {len(r.would_delete)} objects would be deleted, "
                     f"{len(r.already_gone)} not found, {len(r.kept)} kept; nothing was "
                     "changed")
            return
        self.out(f"Ambit removed: {len(r.deleted)} objects deleted, {len(r.already_gone)} "
                 f"already gone{f', {len(r.kept)} kept' if r.kept else ''}.")
        for ref in r.kept:
            self.out(f"  kept: {ref}")
        mesh = await self.mesh_namespaces()
        if mesh:
            self.out(f"namespaces still labelled {DATAPLANE_MODE_LABEL}={AMBIENT} (harmless "
                     f"without Ambit): {', '.join(mesh)}; remove the label with kubectl label "
                     f"namespace NAME {DATAPLANE_MODE_LABEL}-")


async def uninstall(cluster: Cluster, manifests: Sequence[Manifest], *, keep_crds: bool = False,
                    dry_run: bool = False, wait_timeout: float = 300.0, poll: float = 2.0,
                    heartbeat: float = 30.0, out: Out = print) -> UninstallResult:
    """Remove Ambit (see the module docstring for the order); raises ``UninstallError``."""
    u = _Uninstaller(cluster, out, dry_run=dry_run, timeout=wait_timeout, poll=poll,
                     heartbeat=heartbeat)
    out(f"{'dry run: what ambit uninstall would remove from' if dry_run else 'removing Ambit from'}"
        f" {cluster.server}")
    await u.run(manifests, keep_crds)
    await u.summary()
    return u.result

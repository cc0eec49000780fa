"""Kubernetes mode: the registry filled from the Kubernetes API, as a stream of snapshots.

Why this shape: the controller's config push wants whole, consistent ``RegistrySnapshot``s
(the same type the embedded SQLite registry produces), not a stream of individual objects. So
one reflector per kind (``k8s_watch``) mirrors the API into memory, any change wakes
``snapshots()``, which waits briefly for a burst of changes to settle (a rollout, a relist),
rebuilds the snapshot from the caches (``k8s_convert``) and yields it only if it differs from
the last one, with the next revision. Membership rules are not applied here: that is
``translate.mesh_config``'s job for both registries.

Watched: Namespaces, Pods, Services, EndpointSlices (to resolve named target ports),
ServiceAccounts (cached for identity checks, see ``service_accounts``), Ambit's
``security.ambit.dev/v1`` AuthorizationPolicies and PeerAuthentications, and for waypoints
the Gateway API's ``gateway.networking.k8s.io/v1`` Gateways, HTTPRoutes and GRPCRoutes and
``v1alpha2`` TCPRoutes (the upstream CRDs, installed by the user) and Ambit's
``networking.ambit.dev/v1alpha1`` HTTPFaults. Every CRD kind is optional: one that is not
installed reads as empty (and is retried), so a cluster without the Gateway API still gets its
L4 mesh. See docs/kubernetes.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from types import TracebackType

from kubernetes_asyncio import client, config

from controller.registry.k8s_auth import TokenReviewAuthenticator
from controller.registry.k8s_convert import build_snapshot
from controller.registry.k8s_watch import Backoff, ListFn, Reflector, stop_tasks
from controller.registry.model import RegistrySnapshot

__all__ = ["KubernetesRegistry", "ResourceKind", "TokenReviewAuthenticator", "api_client",
           "watched_kinds"]

log = logging.getLogger(__name__)

CRD_GROUP = "security.ambit.dev"
CRD_VERSION = "v1"
GATEWAY_API_GROUP = "gateway.networking.k8s.io"
GATEWAY_API_VERSION = "v1"
FAULT_GROUP = "networking.ambit.dev"
FAULT_VERSION = "v1alpha1"


@dataclass(frozen=True)
class ResourceKind:
    plural: str
    list_fn: Callable[[client.ApiClient], ListFn]
    optional: bool = False  # a CRD: may not be installed (see Reflector)


def _custom(plural: str, group: str = CRD_GROUP,
            version: str = CRD_VERSION) -> Callable[[client.ApiClient], ListFn]:
    def make(api: client.ApiClient) -> ListFn:
        return functools.partial(client.CustomObjectsApi(api).list_cluster_custom_object,
                                 group, version, plural)
    return make


def watched_kinds() -> tuple[ResourceKind, ...]:
    return (
        ResourceKind("namespaces", lambda a: client.CoreV1Api(a).list_namespace),
        ResourceKind("pods", lambda a: client.CoreV1Api(a).list_pod_for_all_namespaces),
        ResourceKind("services", lambda a: client.CoreV1Api(a).list_service_for_all_namespaces),
        ResourceKind("endpointslices",
                     lambda a: client.DiscoveryV1Api(a).list_endpoint_slice_for_all_namespaces),
        ResourceKind("serviceaccounts",
                     lambda a: client.CoreV1Api(a).list_service_account_for_all_namespaces),
        ResourceKind("authorizationpolicies", _custom("authorizationpolicies"), optional=True),
        ResourceKind("peerauthentications", _custom("peerauthentications"), optional=True),
        ResourceKind("gateways", _custom("gateways", GATEWAY_API_GROUP, GATEWAY_API_VERSION),
                     optional=True),
        ResourceKind("httproutes", _custom("httproutes", GATEWAY_API_GROUP,
                                           GATEWAY_API_VERSION), optional=True),
        ResourceKind("grpcroutes", _custom("grpcroutes", GATEWAY_API_GROUP,
                                           GATEWAY_API_VERSION), optional=True),
        # Experimental channel only: most clusters do not have it, and read it as empty.
        ResourceKind("tcproutes", _custom("tcproutes", GATEWAY_API_GROUP, "v1alpha2"),
                     optional=True),
        ResourceKind("httpfaults", _custom("httpfaults", FAULT_GROUP, FAULT_VERSION),
                     optional=True),
    )


async def api_client(kubeconfig: str | None = None, context: str | None = None) \
        -> client.ApiClient:
    """A client from a kubeconfig file, or the pod's in-cluster service account if None."""
    cfg = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig, context=context,
                                      client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    return client.ApiClient(configuration=cfg)


class KubernetesRegistry:
    """Mirror the cluster and yield ``RegistrySnapshot``s; use as ``async with``.

    ``debounce``: how long after a change to wait for more before building a snapshot.
    """

    def __init__(
        self,
        api: client.ApiClient,
        *,
        debounce: float = 0.1,
        backoff: Callable[[], Backoff] = Backoff,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        kinds: tuple[ResourceKind, ...] | None = None,
    ) -> None:
        self._debounce = debounce
        self._changed = asyncio.Event()
        self._generation = 0
        self.reflectors: dict[str, Reflector] = {
            k.plural: Reflector(k.plural, k.list_fn(api), self._on_change, backoff=backoff(),
                                watch_timeout=watch_timeout, optional=k.optional)
            for k in (kinds if kinds is not None else watched_kinds())
        }
        self._tasks: list[asyncio.Task[None]] = []
        self._built_generation = -1
        self._snapshot = RegistrySnapshot()
        self._revision = 0
        self._problems: set[str] = set()

    async def __aenter__(self) -> KubernetesRegistry:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(r.run(), name=f"reflector-{plural}")
                       for plural, r in self.reflectors.items()]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks = []

    def _on_change(self) -> None:
        self._generation += 1
        self._changed.set()

    async def wait_synced(self) -> None:
        """Until every kind has been listed once (an uninstalled CRD counts as listed)."""
        for r in self.reflectors.values():
            await r.synced.wait()

    def _report(self, problems: set[str]) -> Callable[[str], None]:
        def report(message: str) -> None:
            # Log a problem when it appears, not again on every rebuild while it persists.
            if message not in self._problems and message not in problems:
                log.warning("%s", message)
            problems.add(message)
        return report

    def snapshot(self) -> RegistrySnapshot:
        """The snapshot of the caches now; the revision moves only when the content does."""
        if self._built_generation == self._generation:
            return self._snapshot
        problems: set[str] = set()
        caches = {plural: r.cache for plural, r in self.reflectors.items()}
        built = build_snapshot(caches, self._revision, self._report(problems))
        self._problems = problems
        self._built_generation = self._generation
        if replace(built, revision=0) != replace(self._snapshot, revision=0) \
                or self._revision == 0:
            self._revision += 1
            self._snapshot = replace(built, revision=self._revision)
        return self._snapshot

    async def snapshots(self) -> AsyncIterator[RegistrySnapshot]:
        """The first complete snapshot once synced, then one per distinct change."""
        await self.wait_synced()
        last = -1
        while True:
            # snapshot() may also be called elsewhere (the issuance policy), so compare
            # revisions: a snapshot built there still has to be yielded here.
            snap = self.snapshot()
            if snap.revision != last:
                last = snap.revision
                yield snap
                continue
            self._changed.clear()
            if self._built_generation == self._generation:
                await self._changed.wait()
            await asyncio.sleep(self._debounce)

    def service_accounts(self) -> frozenset[tuple[str, str]]:
        """(namespace, name) of every ServiceAccount, for identity checks by the CA."""
        r = self.reflectors.get("serviceaccounts")
        if r is None:
            return frozenset()
        return frozenset((str(o["metadata"].get("namespace")), str(o["metadata"].get("name")))
                         for o in r.cache.values())

"""Kubernetes mode's three views for the controller, as ``embedded.py`` is for SQLite.

The state feed (each registry snapshot translated to mesh state), the node authenticator (the
ztunnel's service-account token, checked with TokenReview) and the issuance policy (a node may
get certificates only for identities of mesh pods scheduled on it). The issuance policy reads
the registry's in-memory caches, so certificate checks never call the API server.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from controller.registry.k8s_auth import TokenReviewAuthenticator
from controller.registry.kubernetes import KubernetesRegistry
from controller.registry.model import RegistrySnapshot
from controller.registry.translate import (
    Membership,
    node_hosts_identity,
    pod_membership,
    translate,
)
from controller.waypoint.k8s_deployer import GatewayDeployer
from mesh.spiffe import SpiffeId
from mesh.state.model import MeshConfig

log = logging.getLogger("controller.kubernetes")


class KubernetesFeed:
    def __init__(self, registry: KubernetesRegistry, authenticator: TokenReviewAuthenticator,
                 trust_domain: str) -> None:
        self.registry = registry
        self.authenticator = authenticator
        self.trust_domain = trust_domain
        self.snapshot: RegistrySnapshot | None = None  # the one the last state came from
        # Renders waypoint Gateways' Deployments (controller --waypoint-image); None: off.
        self.deployer: GatewayDeployer | None = None

    async def states(self) -> AsyncIterator[MeshConfig]:
        async for snap in self.registry.snapshots():
            self.snapshot = snap
            result = translate(snap, self.trust_domain, snap.revision)
            for problem in result.problems:
                log.warning("registry revision %d: %s", snap.revision, problem)
            yield result.config

    # NodeAuthenticator
    async def authenticate(self, token: str) -> str | None:
        return await self.authenticator.authenticate(token)

    # IssuancePolicy
    def may_issue(self, node: str, identity: SpiffeId) -> bool:
        snap = self.registry.snapshot()
        return node_hosts_identity(snap, node, identity, self.trust_domain)

    # NodeService
    def pod_membership(self, node: str, namespace: str, name: str) -> Membership:
        return pod_membership(self.registry.snapshot(), node, namespace, name)

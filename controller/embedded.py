"""Embedded mode: the controller's registry is the SQLite database the ``ambit`` commands
write, instead of a Kubernetes API server.

Three views of the same registry: the state feed (each revision translated to mesh state),
the node authenticator (node tokens from ``ambit node join``) and the issuance policy (a node may
get certificates only for identities of mesh pods scheduled on it), which reads the feed's
latest snapshot so certificate checks never hit the database.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from controller.registry.model import RegistrySnapshot
from controller.registry.sqlite import EmbeddedRegistry
from controller.registry.translate import (
    Membership,
    node_hosts_identity,
    pod_membership,
    translate,
)
from mesh.spiffe import SpiffeId
from mesh.state.model import MeshConfig

log = logging.getLogger("controller.embedded")


class EmbeddedFeed:
    def __init__(self, registry: EmbeddedRegistry, trust_domain: str,
                 interval: float = 0.1) -> None:
        self.registry = registry
        self.trust_domain = trust_domain
        self.interval = interval
        self.snapshot: RegistrySnapshot | None = None

    async def states(self) -> AsyncIterator[MeshConfig]:
        async for snap in self.registry.watch(self.interval):
            self.snapshot = snap
            result = translate(snap, self.trust_domain, snap.revision)
            for problem in result.problems:
                log.warning("registry revision %d: %s", snap.revision, problem)
            yield result.config

    # NodeAuthenticator
    def authenticate(self, token: str) -> str | None:
        return self.registry.node_for_token(token)

    # IssuancePolicy
    def may_issue(self, node: str, identity: SpiffeId) -> bool:
        snap = self.snapshot if self.snapshot is not None else self.registry.snapshot()
        if node_hosts_identity(snap, node, identity, self.trust_domain):
            return True
        # Pod start: the ztunnel asks for a new pod's certificate right at its CNI ADD, often
        # before the watch has seen the pod; read through before refusing (as pod_membership).
        return node_hosts_identity(self.registry.snapshot(), node, identity, self.trust_domain)

    # NodeService
    def pod_membership(self, node: str, namespace: str, name: str) -> Membership:
        # Read through, not from the watch's last snapshot: the pod was usually written a
        # moment before its CNI ADD, and one read per pod start costs nothing.
        return pod_membership(self.registry.snapshot(), node, namespace, name)

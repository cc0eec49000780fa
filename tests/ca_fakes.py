"""TEST HELPER ONLY: an in-memory node directory for the CA's two protocols.

Production plugs the registry (node tokens from ``ambit node join``, workloads per node) or the
Kubernetes source (TokenReview, pods per node) into ``controller.ca_service``. Tests use this
dict-backed double instead: ``tokens`` maps a bearer token to its node, ``identities`` maps a
node to the SPIFFE IDs of the workloads scheduled on it. Tests mutate both freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.spiffe import SpiffeId


@dataclass
class InMemoryNodeDirectory:
    """Implements ``NodeAuthenticator`` and ``IssuancePolicy`` from two dicts."""

    tokens: dict[str, str] = field(default_factory=dict)
    identities: dict[str, set[SpiffeId]] = field(default_factory=dict)

    def authenticate(self, token: str) -> str | None:
        return self.tokens.get(token)

    def may_issue(self, node: str, identity: SpiffeId) -> bool:
        return identity in self.identities.get(node, set())

    def add(self, node: str, token: str, *identities: SpiffeId) -> None:
        self.tokens[token] = node
        self.identities.setdefault(node, set()).update(identities)

"""SPIFFE identities, the one name every component uses for a workload.

A workload's identity is ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``, the same
shape Istio uses, so policies written for Istio (``cluster.local/ns/default/sa/sleep``) carry over.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEME = "spiffe://"


class SpiffeError(ValueError):
    """A string that is not an Ambit workload SPIFFE ID."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://td/ns/N/sa/S`` (or the Istio principal form without the scheme)."""
        body = text[len(SCHEME) :] if text.startswith(SCHEME) else text
        parts = body.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
            raise SpiffeError(
                f"{text!r} is not a workload identity; expected "
                "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )
        return cls(parts[0], parts[2], parts[4])

    @property
    def principal(self) -> str:
        """The Istio-style principal used in authorization policies (no scheme)."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return SCHEME + self.principal

"""Which waypoint's config an ADS stream may read: a pure decision, tested as a table.

Why exact: a waypoint's config lists every service bound to it, their backends, routes and L7
policies; only that waypoint's own Envoy needs it. So the stream's client certificate must be
exactly the identity of that Gateway's pods, ``spiffe://<mesh td>/ns/<gateway ns>/sa/<gateway
name>``: nothing broader (no other service account of the namespace, no other trust domain,
no prefix match), and a certificate of one waypoint never reads another's config.

The service account is the Gateway's name wherever a waypoint is run: the Kubernetes Deployment
the controller renders (``controller/waypoint/deploy.py``: ``serviceAccountName`` = the name),
``ambit dev cluster``'s waypoint pods and ``ambit waypoint run``'s default (``waypoint/config.py``).
An earlier rule also admitted the service account of any pod labelled with the Gateway's name;
anyone who may create a pod in the namespace can put that label on it, so that rule is gone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from mesh.spiffe import TRUST_DOMAIN, PeerIdentityError, SpiffeId, check_trust_domain

# ``XdsDecision.label`` values (``ambit_xds_denied_total{reason}``).
METADATA = "metadata"
NO_CERTIFICATE = "no_certificate"
IDENTITY = "identity"
OTHER_GATEWAY = "other_gateway"
UNKNOWN_GATEWAY = "unknown_gateway"


@dataclass(frozen=True)
class XdsDecision:
    """``key``: the cache key to serve ("NAMESPACE/GATEWAY"), None when refused; ``reason``:
    why, in words (the PERMISSION_DENIED message); ``label``: the refusal's metric label."""

    key: str | None
    reason: str = ""
    label: str = ""

    @property
    def allowed(self) -> bool:
        return self.key is not None


def waypoint_identity(trust_domain: str, namespace: str, gateway: str) -> SpiffeId:
    """The one identity that may read waypoint ``namespace/gateway``'s config."""
    return SpiffeId(trust_domain, namespace, gateway)


def _deny(label: str, reason: str) -> XdsDecision:
    return XdsDecision(None, reason, label)


def decide_waypoint(metadata: Mapping[str, str], identity: SpiffeId | None,
                    gateways: Collection[tuple[str, str]], trust_domain: str,
                    insecure: bool = False) -> XdsDecision:
    """May a proxy with node ``metadata`` (NAMESPACE, GATEWAY) and client certificate
    ``identity`` (None: none presented) read that waypoint's config? ``gateways``: the
    waypoints the registry knows, as (namespace, name). ``insecure``: the controller serves
    plaintext on loopback only (``--insecure``), so a proxy without a certificate is trusted
    by its metadata; a certificate, when present, is still checked."""
    namespace, name = metadata.get("NAMESPACE", ""), metadata.get("GATEWAY", "")
    if not namespace or not name:
        return _deny(METADATA, "node metadata must name NAMESPACE and GATEWAY (the waypoint "
                     "agent's bootstrap sets them)")
    waypoint = f"{namespace}/{name}"
    if identity is None:
        if not insecure:
            return _deny(NO_CERTIFICATE, "no client certificate: waypoints read their config "
                         "on the xDS port (15011), presenting the waypoint's mesh certificate")
    else:
        # The identity is judged before the waypoint is looked up, so a refused client learns
        # nothing about which waypoints exist.
        expected = waypoint_identity(trust_domain, namespace, name)
        try:
            check_trust_domain(identity, trust_domain)
        except PeerIdentityError as e:
            return _deny(TRUST_DOMAIN, f"{identity} may not read waypoint {waypoint}'s config: "
                         f"{e}")
        if identity != expected:
            if identity.namespace == namespace and \
                    (identity.namespace, identity.service_account) in gateways:
                return _deny(OTHER_GATEWAY, f"{identity} is waypoint {identity.namespace}/"
                             f"{identity.service_account}'s identity, but the node metadata "
                             f"names waypoint {waypoint}: a waypoint reads only its own "
                             "config; check the pod's --gateway (GATEWAY in the bootstrap)")
            return _deny(IDENTITY, f"{identity} may not read waypoint {waypoint}'s config: "
                         f"only {expected} may (the waypoint's pods run as the service "
                         f"account named after the Gateway: run it as {name!r}, the default "
                         "of `ambit waypoint run`)")
    if (namespace, name) not in gateways:
        return _deny(UNKNOWN_GATEWAY, f"no waypoint {waypoint} in the registry (create it with "
                     f"`ambit waypoint apply -n {namespace} --name {name}`)")
    return XdsDecision(waypoint)

"""L4 authorization semantics (Istio's), as a table."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from mesh.state.model import AuthorizationPolicy
from mesh.state.parse import parse_authorization_spec
from ztunnel.authz import ConnectionInfo, authorize

SLEEP = "cluster.local/ns/default/sa/sleep"
OTHER = "cluster.local/ns/other/sa/other"


def pol(name: str, spec: dict[str, Any]) -> AuthorizationPolicy:
    return parse_authorization_spec(name, "default", spec, "spec")


def conn(principal: str | None = SLEEP, ip: str = "10.0.1.1", port: int = 8080) -> ConnectionInfo:
    ns = principal.split("/")[2] if principal else None
    return ConnectionInfo(ipaddress.ip_address(ip), port, principal, ns)


ALLOW_SLEEP = pol("allow-sleep", {"rules": [{"from": [{"source": {"principals": [SLEEP]}}]}]})
DENY_OTHER_NS = pol("deny-other", {"action": "DENY",
                                   "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]})
DENY_PORT = pol("deny-9090", {"action": "DENY", "rules": [{"to": [{"operation": {
    "ports": ["9090"]}}]}]})
ALLOW_NOTHING = pol("allow-nothing", {})
ALLOW_ALL = pol("allow-all", {"rules": [{}]})
ALLOW_BLOCK = pol("allow-block", {"rules": [{"from": [{"source": {
    "ipBlocks": ["10.0.1.0/24"], "notIpBlocks": ["10.0.1.66/32"]}}]}]})
ALLOW_NOT_PRINCIPAL = pol("allow-not", {"rules": [{"from": [{"source": {
    "notPrincipals": ["*/sa/other"]}}], "to": [{"operation": {"notPorts": [22]}}]}]})
AUDIT_ALL = pol("audit", {"action": "AUDIT", "rules": [{}]})
ALLOW_PREFIX = pol("allow-prefix", {"rules": [{"from": [{"source": {
    "principals": ["cluster.local/ns/default/*"]}}]}]})
DENY_NOTHING = pol("deny-no-rules", {"action": "DENY"})

CASES = [
    ("no policies allow", (), conn(), True),
    ("allow matching principal", (ALLOW_SLEEP,), conn(), True),
    ("allow policy, other principal", (ALLOW_SLEEP,), conn(OTHER), False),
    ("allow policy, plaintext has no principal", (ALLOW_SLEEP,), conn(None), False),
    ("deny wins over allow", (ALLOW_ALL, DENY_OTHER_NS), conn(OTHER), False),
    ("deny not matching", (DENY_OTHER_NS,), conn(), True),
    ("deny by port", (DENY_PORT,), conn(port=9090), False),
    ("deny by port, other port", (DENY_PORT,), conn(port=8080), True),
    ("allow with no rules allows nothing", (ALLOW_NOTHING,), conn(), False),
    ("empty rule matches all", (ALLOW_ALL,), conn(None), True),
    ("ip block", (ALLOW_BLOCK,), conn(ip="10.0.1.5"), True),
    ("ip block, excluded ip", (ALLOW_BLOCK,), conn(ip="10.0.1.66"), False),
    ("ip block, outside", (ALLOW_BLOCK,), conn(ip="10.0.2.5"), False),
    ("notPrincipals suffix", (ALLOW_NOT_PRINCIPAL,), conn(OTHER), False),
    ("notPrincipals other", (ALLOW_NOT_PRINCIPAL,), conn(), True),
    ("notPorts", (ALLOW_NOT_PRINCIPAL,), conn(port=22), False),
    ("audit alone allows", (AUDIT_ALL,), conn(), True),
    ("principal prefix", (ALLOW_PREFIX,), conn(), True),
    ("principal prefix, other ns", (ALLOW_PREFIX,), conn(OTHER), False),
    ("any of several allows", (ALLOW_SLEEP, ALLOW_BLOCK), conn(OTHER, ip="10.0.1.5"), True),
    ("deny without rules never matches", (DENY_NOTHING,), conn(), True),
]


@pytest.mark.parametrize(("name", "policies", "c", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_authorize(name: str, policies: tuple[AuthorizationPolicy, ...], c: ConnectionInfo,
                   allowed: bool) -> None:
    decision = authorize(policies, c)
    assert decision.allowed is allowed, decision.reason
    assert decision.reason


def test_audit_is_reported() -> None:
    decision = authorize((AUDIT_ALL, ALLOW_SLEEP), conn())
    assert decision.audit == ("default/audit",)
    assert decision.policy == "default/allow-sleep"


def test_deny_names_the_policy() -> None:
    decision = authorize((DENY_OTHER_NS,), conn(OTHER))
    assert decision.policy == "default/deny-other"
    assert "deny-other" in decision.reason

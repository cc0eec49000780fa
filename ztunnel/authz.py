"""L4 authorization, as a pure function of the connection and the policies selecting its
destination.

Semantics follow Istio: DENY policies are evaluated first and any match denies; AUDIT matches
only mark the connection for logging; if any ALLOW policy selects the workload, one of them must
match, otherwise the connection is allowed. A policy with no rules matches nothing; a rule with
no ``from``/``to`` matches everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.state.model import (
    Action,
    AuthorizationPolicy,
    IPAddress,
    Operation,
    Rule,
    Source,
    StringMatch,
)


@dataclass(frozen=True)
class ConnectionInfo:
    """What is known about a connection when it is authorized."""

    source_ip: IPAddress
    destination_port: int
    source_principal: str | None = None  # None for plaintext (no peer identity)
    source_namespace: str | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str = ""  # "namespace/name" of the deciding policy, if any
    reason: str = ""
    audit: tuple[str, ...] = ()


def _any(matches: tuple[StringMatch, ...], value: str | None) -> bool:
    return value is not None and any(m.matches(value) for m in matches)


def _source_matches(s: Source, c: ConnectionInfo) -> bool:
    if s.principals and not _any(s.principals, c.source_principal):
        return False
    if s.not_principals and _any(s.not_principals, c.source_principal):
        return False
    if s.namespaces and not _any(s.namespaces, c.source_namespace):
        return False
    if s.not_namespaces and _any(s.not_namespaces, c.source_namespace):
        return False
    if s.ip_blocks and not any(c.source_ip in n for n in s.ip_blocks):
        return False
    return not (s.not_ip_blocks and any(c.source_ip in n for n in s.not_ip_blocks))


def _operation_matches(o: Operation, c: ConnectionInfo) -> bool:
    if o.ports and c.destination_port not in o.ports:
        return False
    return not (o.not_ports and c.destination_port in o.not_ports)


def rule_matches(rule: Rule, c: ConnectionInfo) -> bool:
    if rule.sources and not any(_source_matches(s, c) for s in rule.sources):
        return False
    return not (rule.operations and not any(_operation_matches(o, c) for o in rule.operations))


def policy_matches(policy: AuthorizationPolicy, c: ConnectionInfo) -> bool:
    return any(rule_matches(r, c) for r in policy.rules)


def authorize(policies: tuple[AuthorizationPolicy, ...], c: ConnectionInfo) -> Decision:
    audit = tuple(p.key for p in policies if p.action is Action.AUDIT and policy_matches(p, c))
    for p in policies:
        if p.action is Action.DENY and policy_matches(p, c):
            return Decision(False, p.key, f"denied by DENY policy {p.key}", audit)
    allows = [p for p in policies if p.action is Action.ALLOW]
    if not allows:
        return Decision(True, "", "no ALLOW policy selects the workload", audit)
    for p in allows:
        if policy_matches(p, c):
            return Decision(True, p.key, f"allowed by {p.key}", audit)
    names = ",".join(p.key for p in allows)
    return Decision(False, names, f"no ALLOW policy matched (checked {names})", audit)

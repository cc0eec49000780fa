"""The mesh state on the wire: ``MeshConfig`` to and from ``ambit.v1.StateUpdate``.

Both ends of the config push use this one module, so the controller and the ztunnel cannot
disagree on encoding. Policies travel as their Istio-shaped spec (JSON) and are parsed on the
ztunnel with the same parser as the state file and the CRDs; ``authorization_spec`` and
``peer_authentication_spec`` are the exact inverses of those parsers (tested as round trips).
Deltas carry upserts and removals by key, so one changed pod costs one workload on the wire.
A service's waypoint binding travels as ``Service.waypoint`` (``{namespace, name}``; absent =
not bound).
"""

from __future__ import annotations

import json
from typing import Any

from mesh.api.ambit.v1 import state_pb2
from mesh.state.model import (
    AuthorizationPolicy,
    MeshConfig,
    PeerAuthentication,
    Protocol,
    Service,
    Source,
    Workload,
)
from mesh.state.parse import (
    StateError,
    parse_authorization_spec,
    parse_peer_authentication_spec,
    parse_service,
    parse_workload,
    string,
)

# -- policies: model -> Istio-shaped spec ------------------------------------------------------


def _selector(sel: tuple[tuple[str, str], ...] | None) -> dict[str, Any]:
    return {} if sel is None else {"selector": {"matchLabels": dict(sel)}}


def _source(s: Source) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, values in (("principals", s.principals), ("notPrincipals", s.not_principals),
                        ("namespaces", s.namespaces), ("notNamespaces", s.not_namespaces)):
        if values:
            out[key] = [m.value for m in values]
    for key, nets in (("ipBlocks", s.ip_blocks), ("notIpBlocks", s.not_ip_blocks)):
        if nets:
            out[key] = [str(n) for n in nets]
    return {"source": out}


def authorization_spec(p: AuthorizationPolicy) -> dict[str, Any]:
    rules = []
    for r in p.rules:
        rule: dict[str, Any] = {}
        if r.sources:
            rule["from"] = [_source(s) for s in r.sources]
        if r.operations:
            ops = []
            for o in r.operations:
                op: dict[str, Any] = {}
                if o.ports:
                    op["ports"] = [str(x) for x in o.ports]
                if o.not_ports:
                    op["notPorts"] = [str(x) for x in o.not_ports]
                ops.append({"operation": op})
            rule["to"] = ops
        rules.append(rule)
    return {**_selector(p.selector), "action": p.action.value, "rules": rules}


def peer_authentication_spec(p: PeerAuthentication) -> dict[str, Any]:
    spec: dict[str, Any] = {**_selector(p.selector), "mtls": {"mode": p.mode.value}}
    if p.port_modes:
        spec["portLevelMtls"] = {str(port): {"mode": m.value} for port, m in p.port_modes}
    return spec


# -- model -> proto -----------------------------------------------------------------------------

def workload_pb(w: Workload) -> state_pb2.Workload:
    return state_pb2.Workload(
        uid=w.uid, name=w.name, namespace=w.namespace, service_account=w.service_account,
        node=w.node, addresses=[str(a) for a in w.addresses], labels=dict(w.labels),
        workload_name=w.workload_name,
        protocol=state_pb2.PROTOCOL_TCP if w.protocol is Protocol.TCP
        else state_pb2.PROTOCOL_HBONE,
        healthy=w.healthy,
    )


def service_pb(s: Service) -> state_pb2.Service:
    msg = state_pb2.Service(
        name=s.name, namespace=s.namespace, hostname=s.hostname, vips=[str(v) for v in s.vips],
        ports=[state_pb2.ServicePort(port=p.port, target_port=p.target_port) for p in s.ports],
        selector=dict(s.selector),
    )
    if s.waypoint is not None:
        msg.waypoint.namespace = s.waypoint.namespace
        msg.waypoint.name = s.waypoint.name
    return msg


def _policy_pb(name: str, namespace: str, spec: dict[str, Any]) -> state_pb2.Policy:
    return state_pb2.Policy(name=name, namespace=namespace,
                            spec_json=json.dumps(spec, sort_keys=True, separators=(",", ":")))


def full_update(config: MeshConfig) -> state_pb2.StateUpdate:
    return state_pb2.StateUpdate(
        version=config.version, full=True, trust_domain=config.trust_domain,
        workloads=[workload_pb(w) for w in config.workloads],
        services=[service_pb(s) for s in config.services],
        authorization_policies=[_policy_pb(p.name, p.namespace, authorization_spec(p))
                                for p in config.policies],
        peer_authentications=[_policy_pb(p.name, p.namespace, peer_authentication_spec(p))
                              for p in config.peer_authentications],
    )


def _changed(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[Any], list[str]]:
    upserts = [v for k, v in new.items() if old.get(k) != v]
    removed = sorted(k for k in old if k not in new)
    return upserts, removed


def delta_update(old: MeshConfig, new: MeshConfig) -> state_pb2.StateUpdate | None:
    """What turns ``old`` into ``new``; None when nothing changed. A trust-domain change is
    sent as a full update (every identity changes)."""
    if old.trust_domain != new.trust_domain:
        return full_update(new)
    w_up, w_rm = _changed({w.uid: w for w in old.workloads}, {w.uid: w for w in new.workloads})
    s_up, s_rm = _changed({s.key: s for s in old.services}, {s.key: s for s in new.services})
    a_up, a_rm = _changed({p.key: p for p in old.policies}, {p.key: p for p in new.policies})
    p_up, p_rm = _changed({p.key: p for p in old.peer_authentications},
                          {p.key: p for p in new.peer_authentications})
    if not any((w_up, w_rm, s_up, s_rm, a_up, a_rm, p_up, p_rm)):
        return None
    return state_pb2.StateUpdate(
        version=new.version, full=False, trust_domain=new.trust_domain,
        workloads=[workload_pb(w) for w in w_up], removed_workloads=w_rm,
        services=[service_pb(s) for s in s_up], removed_services=s_rm,
        authorization_policies=[_policy_pb(p.name, p.namespace, authorization_spec(p))
                                for p in a_up],
        removed_authorization_policies=a_rm,
        peer_authentications=[_policy_pb(p.name, p.namespace, peer_authentication_spec(p))
                              for p in p_up],
        removed_peer_authentications=p_rm,
    )


# -- proto -> model -----------------------------------------------------------------------------


# Decoding goes through the state-file parsers, so a workload or service pushed by the
# controller is validated by exactly the rules a state file is.


def workload_from_pb(m: state_pb2.Workload, trust_domain: str, path: str) -> Workload:
    return parse_workload({
        "uid": m.uid or None,
        "name": m.name or None,
        "namespace": m.namespace or None,
        "serviceAccount": m.service_account or None,
        "node": m.node or None,
        "addresses": list(m.addresses),
        "labels": dict(m.labels),
        "workloadName": m.workload_name or None,
        "protocol": Protocol.TCP.value if m.protocol == state_pb2.PROTOCOL_TCP
        else Protocol.HBONE.value,
        "status": "Healthy" if m.healthy else "Unhealthy",
    }, path, trust_domain)


def _waypoint_doc(m: state_pb2.Service) -> dict[str, Any] | None:
    if not m.HasField("waypoint"):
        return None
    return {"namespace": m.waypoint.namespace or None, "name": m.waypoint.name or None}


def service_from_pb(m: state_pb2.Service, path: str) -> Service:
    return parse_service({
        "name": m.name or None,
        "namespace": m.namespace or None,
        "hostname": m.hostname or None,
        "vips": list(m.vips),
        "ports": [{"port": p.port, "targetPort": p.target_port or None} for p in m.ports],
        "selector": dict(m.selector),
        "waypoint": _waypoint_doc(m),
    }, path)


def _spec(m: state_pb2.Policy, path: str) -> Any:
    try:
        return json.loads(m.spec_json or "{}")
    except json.JSONDecodeError as e:
        raise StateError(f"{path}.spec_json", f"not JSON: {e}") from None
    except RecursionError:
        # json.loads recurses per nesting level: "[[[[..." is an invalid policy, not a crash.
        raise StateError(f"{path}.spec_json", "not usable JSON: nested too deeply") from None


def _named(m: state_pb2.Policy, path: str) -> tuple[str, str]:
    # Required, as in a state file (an empty name or namespace is proto3's "not set").
    return string(m.name or None, f"{path}.name"), string(m.namespace or None, f"{path}.namespace")


def authz_from_pb(m: state_pb2.Policy, path: str) -> AuthorizationPolicy:
    return parse_authorization_spec(*_named(m, path), _spec(m, path), f"{path}.spec")


def peer_auth_from_pb(m: state_pb2.Policy, path: str) -> PeerAuthentication:
    return parse_peer_authentication_spec(*_named(m, path), _spec(m, path), f"{path}.spec")


def apply_update(current: MeshConfig, u: state_pb2.StateUpdate) -> MeshConfig:
    """The state after ``u``; raises ``StateError`` (naming the field) and changes nothing if
    any part of the update is invalid."""
    td = u.trust_domain or current.trust_domain
    if not u.full and td != current.trust_domain:
        # Every identity depends on it: the workloads the delta does not name would keep the
        # old one. delta_update sends a trust-domain change as a full update.
        raise StateError("trust_domain", f"{td!r} differs from the current "
                         f"{current.trust_domain!r}; only a full update can change it")
    base = MeshConfig(trust_domain=td) if u.full else current
    workloads = {w.uid: w for w in base.workloads}
    services = {s.key: s for s in base.services}
    policies = {p.key: p for p in base.policies}
    peers = {p.key: p for p in base.peer_authentications}
    for key in u.removed_workloads:
        workloads.pop(key, None)
    for key in u.removed_services:
        services.pop(key, None)
    for key in u.removed_authorization_policies:
        policies.pop(key, None)
    for key in u.removed_peer_authentications:
        peers.pop(key, None)
    for i, wm in enumerate(u.workloads):
        w = workload_from_pb(wm, td, f"workloads[{i}]")
        workloads[w.uid] = w
    for i, sm in enumerate(u.services):
        s = service_from_pb(sm, f"services[{i}]")
        services[s.key] = s
    for i, pm in enumerate(u.authorization_policies):
        a = authz_from_pb(pm, f"authorization_policies[{i}]")
        policies[a.key] = a
    for i, pm in enumerate(u.peer_authentications):
        pa = peer_auth_from_pb(pm, f"peer_authentications[{i}]")
        peers[pa.key] = pa
    owners: dict[Any, str] = {}
    for w in workloads.values():
        for ip in w.addresses:
            if ip in owners:  # another workload's, or listed twice (a state file refuses both)
                raise StateError("workloads", f"{ip} is claimed by {owners[ip]} and {w.uid}")
            owners[ip] = w.uid
    # As in a state file (parse_state): a VIP names one service and is no pod's address, or
    # the ztunnel's by-VIP index would silently pick one.
    vips: dict[Any, str] = {}
    for s in services.values():
        for vip in s.vips:
            if vip in vips or vip in owners:
                other = f"service {vips[vip]}" if vip in vips else f"workload {owners[vip]}"
                raise StateError("services", f"{vip} of service {s.key} is already used by "
                                 f"{other}")
            vips[vip] = s.key
    return MeshConfig(
        trust_domain=td, workloads=tuple(workloads.values()), services=tuple(services.values()),
        policies=tuple(policies.values()), peer_authentications=tuple(peers.values()),
        version=u.version,
    )



"""Registry snapshot to mesh state: the membership rules, as one pure function.

Why pure and separate: both registry sources (embedded SQLite and Kubernetes) feed it, the
config push sends its output to every ztunnel, and the rules are easiest to get right as a
table of inputs and expected outputs. Nothing here does I/O or reads a clock.

Rules (docs/registry.md):

* a pod is in the mesh (protocol HBONE) when its namespace is labelled
  ``ambit.dev/dataplane-mode=ambient`` and the pod is not labelled
  ``ambit.dev/dataplane-mode=none``; every other pod is still listed, as protocol TCP, so
  mesh clients reach it by plain passthrough instead of failing;
* a pod labelled ``gateway.networking.k8s.io/gateway-name`` is a waypoint instance: it
  terminates HBONE itself, so it is never captured (protocol TCP), yet the CA issues it a
  certificate for its own service account on its node;
* identity = the pod's service account; ``healthy`` = the pod is ready;
* pods without an IP yet are left out (nothing can address them);
* a service is bound to a waypoint by ``ambit.dev/use-waypoint`` on the Service, else on its
  Namespace (``none`` on the Service unbinds it), in the namespace
  ``ambit.dev/use-waypoint-namespace`` on the same object names (default: its own); a
  binding to a missing or non-service waypoint is still sent (the ztunnels then refuse the
  traffic: fail closed) and reported;
* AuthorizationPolicies with ``targetRefs`` belong to waypoints and are not sent to ztunnels.

The Kubernetes API does not stop two objects from claiming one address, or a policy from being
malformed when no admission webhook runs, so this function never fails on content: conflicts
are resolved deterministically and invalid policies fail closed, each with a line in
``Translation.problems`` for the caller to log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.registry.model import (
    AMBIENT,
    DATAPLANE_MODE_LABEL,
    OPT_OUT,
    Pod,
    RegistrySnapshot,
    Service,
)
from controller.waypoint.model import (
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_CLASS,
    WAYPOINT_FOR_LABEL,
)
from controller.waypoint.parse import has_target_refs
from mesh.ports import GATEWAY_NAME_LABEL
from mesh.spiffe import SpiffeId
from mesh.state.model import (
    Action,
    AuthorizationPolicy,
    IPAddress,
    MeshConfig,
    MtlsMode,
    PeerAuthentication,
    Protocol,
    Rule,
    ServicePort,
    WaypointRef,
    Workload,
)
from mesh.state.model import Service as MeshService
from mesh.state.parse import StateError, parse_authorization_spec, parse_peer_authentication_spec

DEFAULT_DOMAIN_SUFFIX = "cluster.local"


@dataclass(frozen=True)
class Translation:
    config: MeshConfig
    # One sentence per object that was dropped, trimmed or replaced; empty when all is well.
    problems: tuple[str, ...] = ()


def mesh_config(snapshot: RegistrySnapshot, trust_domain: str, revision: int) -> MeshConfig:
    """The mesh state for ``snapshot``; ``version`` is ``str(revision)``."""
    return translate(snapshot, trust_domain, revision).config


def translate(snapshot: RegistrySnapshot, trust_domain: str, revision: int,
              domain_suffix: str = DEFAULT_DOMAIN_SUFFIX) -> Translation:
    """Like ``mesh_config``, also reporting what had to be resolved or replaced."""
    problems: list[str] = []
    workloads = _workloads(snapshot, trust_domain, problems)
    taken = {ip: f"workload {w.uid}" for w in workloads for ip in w.addresses}
    services = _services(snapshot, domain_suffix, taken, problems)
    # Policies with targetRefs are enforced by waypoints (controller/waypoint), not ztunnels.
    policies = tuple(_authorization(p.name, p.namespace, p.spec, problems)
                     for p in sorted(snapshot.authorization_policies, key=lambda p: p.key)
                     if not has_target_refs(p.spec))
    peer = tuple(_peer_authentication(p.name, p.namespace, p.spec, problems)
                 for p in sorted(snapshot.peer_authentications, key=lambda p: p.key))
    return Translation(
        MeshConfig(
            trust_domain=trust_domain,
            workloads=workloads,
            services=services,
            policies=policies,
            peer_authentications=peer,
            version=str(revision),
        ),
        tuple(problems),
    )


def waypoint_of(pod: Pod) -> str | None:
    """The Gateway a pod is an instance of (its gateway-name label), or None."""
    return dict(pod.labels).get(GATEWAY_NAME_LABEL) or None


def in_mesh(pod: Pod, snapshot: RegistrySnapshot) -> bool:
    """Captured by the mesh (protocol HBONE). Waypoint instances are not: they terminate
    HBONE themselves."""
    ns = snapshot.namespace(pod.namespace)
    return (ns is not None and ns.ambient and not pod.opted_out
            and waypoint_of(pod) is None)


def _workloads(snapshot: RegistrySnapshot, trust_domain: str,
               problems: list[str]) -> tuple[Workload, ...]:
    # An address several pods claim (a deleted pod still listed and the pod the CNI gave its IP
    # to, or a terminating pod and its replacement) is given to none of them until only one
    # claims it: neither readiness nor names say which pod holds it now, and giving it to the
    # wrong one would carry one pod's traffic under the other's identity. The data plane then
    # treats the address as unknown (mesh/state/store.py applies the same rule to any state).
    claims: dict[IPAddress, list[str]] = {}
    for pod in snapshot.pods:
        for ip in dict.fromkeys(pod.ips):
            claims.setdefault(ip, []).append(pod.key)
    contested = {ip: sorted(keys) for ip, keys in claims.items() if len(keys) > 1}
    for ip, keys in sorted(contested.items(), key=lambda kv: str(kv[0])):
        problems.append(f"address {ip} is claimed by pods {', '.join(keys)}; given to none of "
                        "them until one alone claims it")
    out: list[Workload] = []
    for pod in sorted(snapshot.pods, key=lambda p: (p.namespace, p.name)):
        ips = [ip for ip in dict.fromkeys(pod.ips) if ip not in contested]
        if not ips:
            continue
        out.append(Workload(
            uid=pod.key,
            name=pod.name,
            namespace=pod.namespace,
            service_account=pod.service_account,
            node=pod.node,
            addresses=tuple(ips),
            trust_domain=trust_domain,
            labels=pod.labels,
            workload_name=pod.workload_name,
            protocol=Protocol.HBONE if in_mesh(pod, snapshot) else Protocol.TCP,
            healthy=pod.ready,
        ))
    return tuple(sorted(out, key=lambda w: w.uid))


def waypoint_binding(snapshot: RegistrySnapshot, service: Service) \
        -> tuple[WaypointRef | None, str]:
    """The waypoint ``service`` is bound to, and which object's label says so ("service
    NS/NAME" or "namespace NS"; "" when unbound). The Service's own label wins, so
    ``ambit.dev/use-waypoint=none`` on it opts it out of its namespace's waypoint."""
    labels = dict(service.labels)
    if GATEWAY_NAME_LABEL in labels:
        # A waypoint's own Service (rendered in Kubernetes): binding it to a waypoint, e.g.
        # by a namespace-wide label, would send the waypoint's traffic to itself.
        return None, ""
    source = f"service {service.key}"
    if USE_WAYPOINT_LABEL not in labels:
        ns = snapshot.namespace(service.namespace)
        labels = dict(ns.labels) if ns is not None else {}
        source = f"namespace {service.namespace}"
    name = labels.get(USE_WAYPOINT_LABEL)
    if not name or name == OPT_OUT:
        return None, ""
    namespace = labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or service.namespace
    return WaypointRef(namespace, name), source


def _binding_problem(snapshot: RegistrySnapshot, service: Service, ref: WaypointRef,
                     source: str) -> str | None:
    gateway = snapshot.gateway(ref.namespace, ref.name)
    what = (f"service {service.key} is bound to waypoint {ref.key} ({USE_WAYPOINT_LABEL} on "
            f"{source})")
    if gateway is None:
        return (f"{what}, but there is no Gateway {ref.key} of class {WAYPOINT_CLASS}; its "
                "traffic is refused until you create that Gateway or remove the label")
    if gateway.waypoint_for not in ("service", "all"):
        return (f"{what}, but that Gateway serves {gateway.waypoint_for!r} traffic "
                f"({WAYPOINT_FOR_LABEL}); its traffic fails closed until you label the "
                f"Gateway {WAYPOINT_FOR_LABEL}=service (or all) or remove the binding")
    return None


def _services(snapshot: RegistrySnapshot, domain_suffix: str,
              taken: dict[IPAddress, str], problems: list[str]) -> tuple[MeshService, ...]:
    taken = dict(taken)
    out: list[MeshService] = []
    for s in sorted(snapshot.services, key=lambda s: s.key):
        ports = tuple(ServicePort(p.port, p.target_port) for p in s.ports
                      if p.protocol.upper() == "TCP")
        if not s.cluster_ips or not ports:
            # Headless or UDP-only: there is no TCP virtual IP for a ztunnel to resolve.
            continue
        vips: list[IPAddress] = []
        for ip in s.cluster_ips:
            if ip in taken:
                problems.append(f"service {s.key}: virtual IP {ip} is already used by "
                                f"{taken[ip]}; left out")
            else:
                taken[ip] = f"service {s.key}"
                vips.append(ip)
        if not vips:
            continue
        waypoint, source = waypoint_binding(snapshot, s)
        if waypoint is not None:
            problem = _binding_problem(snapshot, s, waypoint, source)
            if problem:
                problems.append(problem)
        out.append(MeshService(
            name=s.name,
            namespace=s.namespace,
            hostname=f"{s.name}.{s.namespace}.svc.{domain_suffix}",
            vips=tuple(vips),
            ports=ports,
            selector=s.selector,
            waypoint=waypoint,
        ))
    return tuple(out)


def _authorization(name: str, namespace: str, spec: Mapping[str, Any],
                   problems: list[str]) -> AuthorizationPolicy:
    try:
        return parse_authorization_spec(name, namespace, spec, "spec")
    except StateError as e:
        error = e
    # Fail closed, as Istio does for rules the ztunnel cannot enforce: an ALLOW policy that
    # matches nothing denies everything it selects (any ALLOW policy present means one must
    # match), and a DENY policy with one empty rule denies everything it selects.
    raw_action = spec.get("action") if isinstance(spec, Mapping) else None
    action = Action.DENY if str(raw_action).upper() == "DENY" else Action.ALLOW
    selector = _selector_or_namespace(name, namespace, spec)
    rules = (Rule(),) if action is Action.DENY else ()
    scope = "its namespace" if selector is None else "the workloads it selects"
    problems.append(f"AuthorizationPolicy {namespace}/{name}: {error}; denying all traffic to "
                    f"{scope} until it is fixed")
    return AuthorizationPolicy(name, namespace, action, rules, selector)


def _peer_authentication(name: str, namespace: str, spec: Mapping[str, Any],
                         problems: list[str]) -> PeerAuthentication:
    try:
        return parse_peer_authentication_spec(name, namespace, spec, "spec")
    except StateError as e:
        error = e
    # Fail closed: STRICT refuses plaintext, the one thing a broken policy must not let in.
    selector = _selector_or_namespace(name, namespace, spec)
    problems.append(f"PeerAuthentication {namespace}/{name}: {error}; enforcing STRICT mTLS "
                    "until it is fixed")
    return PeerAuthentication(name, namespace, MtlsMode.STRICT, selector)


def _selector_or_namespace(name: str, namespace: str,
                           spec: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """The policy's selector if that part is valid, else None (the whole namespace)."""
    if not isinstance(spec, Mapping) or spec.get("selector") is None:
        return None
    try:
        return parse_authorization_spec(name, namespace, {"selector": spec["selector"]},
                                        "spec").selector
    except StateError:
        return None


@dataclass(frozen=True)
class Membership:
    """The node agent's question at CNI ADD: capture this pod?"""

    known: bool
    in_mesh: bool
    reason: str
    # The pod's identity and labels (known pods): the agent hands the workload to its ztunnel.
    service_account: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    workload_name: str = ""


def pod_membership(snapshot: RegistrySnapshot, node: str, namespace: str,
                   name: str) -> Membership:
    """Whether pod ``namespace/name``, being started on ``node``, is in the mesh.

    Asked by name because at CNI ADD the pod has no IP in the registry yet. A pod the registry
    does not know, or knows on another node, is ``known=False``: the agent fails closed and
    the kubelet retries the sandbox once the registry has caught up.
    """
    key = f"{namespace}/{name}"
    pod = next((p for p in snapshot.pods if p.namespace == namespace and p.name == name), None)
    if pod is None:
        return Membership(False, False, f"pod {key} is not in the registry (yet)")
    if pod.node != node:
        return Membership(False, False, f"pod {key} is scheduled on {pod.node or 'no node'}, "
                          f"not {node}")
    ns = snapshot.namespace(namespace)
    gateway = waypoint_of(pod)
    if gateway is not None:
        return Membership(True, False, f"pod {key} is a waypoint (gateway {gateway}): it "
                          "terminates HBONE itself")
    if pod.opted_out:
        return Membership(True, False, f"pod {key} is labelled "
                          f"{DATAPLANE_MODE_LABEL}={OPT_OUT}")
    if ns is None or not ns.ambient:
        return Membership(True, False, f"namespace {namespace} is not labelled "
                          f"{DATAPLANE_MODE_LABEL}={AMBIENT}")
    return Membership(True, True, f"namespace {namespace} is ambient", pod.service_account,
                      pod.labels, pod.workload_name)


def node_hosts_identity(snapshot: RegistrySnapshot, node: str, identity: SpiffeId,
                        trust_domain: str) -> bool:
    """The CA's issuance rule: ``node`` runs a mesh pod, or a waypoint instance, whose
    identity is ``identity`` (its namespace and service account)."""
    if identity.trust_domain != trust_domain:
        return False
    return any(
        pod.node == node and pod.namespace == identity.namespace
        and pod.service_account == identity.service_account
        and (in_mesh(pod, snapshot) or waypoint_of(pod) is not None)
        for pod in snapshot.pods
    )

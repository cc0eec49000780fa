"""Registry snapshot -> MeshConfig: membership, identity, health, conflicts, bad policies."""

from __future__ import annotations

import ipaddress

import pytest

from controller.registry.model import (
    AuthorizationPolicy,
    Namespace,
    PeerAuthentication,
    Pod,
    RegistrySnapshot,
    Service,
    ServicePort,
)
from controller.registry.translate import (
    Membership,
    in_mesh,
    mesh_config,
    node_hosts_identity,
    pod_membership,
    translate,
    waypoint_binding,
)
from controller.waypoint.model import Gateway
from mesh.spiffe import SpiffeId
from mesh.state.model import Action, MtlsMode, Protocol, Rule, WaypointRef
from mesh.state.store import StateSnapshot

AMBIENT = Namespace("mesh", (("ambit.dev/dataplane-mode", "ambient"),))
PLAIN = Namespace("plain", (("team", "x"),))
OPTED_OUT = Namespace("optout", (("ambit.dev/dataplane-mode", "none"),))


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def pod(name: str, namespace: str = "mesh", *, ips: tuple[str, ...] = ("10.0.0.1",),
        labels: dict[str, str] | None = None, ready: bool = True, sa: str = "default",
        node: str = "n1", owner: str = "") -> Pod:
    return Pod(name, namespace, sa, node, tuple(ip(i) for i in ips),
               tuple(sorted((labels or {}).items())), ready, owner)


@pytest.mark.parametrize(("namespaces", "p", "protocol"), [
    ((AMBIENT,), pod("a"), Protocol.HBONE),
    ((AMBIENT,), pod("a", labels={"ambit.dev/dataplane-mode": "none"}), Protocol.TCP),
    # Any other value of the pod label does not opt out.
    ((AMBIENT,), pod("a", labels={"ambit.dev/dataplane-mode": "ambient"}), Protocol.HBONE),
    ((AMBIENT,), pod("a", labels={"app": "x"}), Protocol.HBONE),
    ((PLAIN,), pod("a", "plain"), Protocol.TCP),
    ((OPTED_OUT,), pod("a", "optout"), Protocol.TCP),
    # A namespace nobody registered is not in the mesh; its pods are still reachable.
    ((), pod("a", "mesh"), Protocol.TCP),
    ((PLAIN,), pod("a", "plain", labels={"ambit.dev/dataplane-mode": "ambient"}), Protocol.TCP),
])
def test_membership(namespaces: tuple[Namespace, ...], p: Pod, protocol: Protocol) -> None:
    cfg = mesh_config(RegistrySnapshot(namespaces=namespaces, pods=(p,)), "td", 1)
    (w,) = cfg.workloads
    assert w.protocol is protocol


@pytest.mark.parametrize(("p", "expected"), [
    (pod("a", sa="web", ready=True, owner="web-deploy", node="n2"),
     ("mesh/a", "spiffe://td/ns/mesh/sa/web", True, "web-deploy", "n2")),
    (pod("b", ready=False), ("mesh/b", "spiffe://td/ns/mesh/sa/default", False, "b", "n1")),
])
def test_identity_health_and_owner(p: Pod, expected: tuple[str, str, bool, str, str]) -> None:
    (w,) = mesh_config(RegistrySnapshot(namespaces=(AMBIENT,), pods=(p,)), "td", 7).workloads
    assert (w.uid, str(w.identity), w.healthy, w.owner_name, w.node) == expected


def test_version_trust_domain_and_labels() -> None:
    p = pod("a", ips=("10.0.0.1", "fd00::1"), labels={"app": "a"})
    cfg = mesh_config(RegistrySnapshot(namespaces=(AMBIENT,), pods=(p,), revision=3), "ex.org",
                      42)
    assert cfg.version == "42" and cfg.trust_domain == "ex.org"
    assert cfg.workloads[0].addresses == (ip("10.0.0.1"), ip("fd00::1"))
    assert cfg.workloads[0].label_map == {"app": "a"}


def test_pods_without_ips_are_left_out() -> None:
    assert mesh_config(RegistrySnapshot(pods=(pod("a", ips=()),)), "td", 1).workloads == ()


@pytest.mark.parametrize(("old_ready", "new_ready"), [
    (False, True), (True, False), (True, True), (False, False)])
def test_duplicate_ip_goes_to_no_pod(old_ready: bool, new_ready: bool) -> None:
    """A deleted pod still listed and the pod that reuses its IP: neither readiness nor names
    say which holds it now, so neither gets it until one alone claims it (issue 19)."""
    snap = RegistrySnapshot(namespaces=(AMBIENT,), pods=(
        pod("old", ips=("10.0.0.1", "10.0.0.9"), ready=old_ready),
        pod("new", ips=("10.0.0.1",), ready=new_ready),
        pod("z-same", ips=("10.0.0.2",)),
        pod("a-same", ips=("10.0.0.2",)),
    ))
    t = translate(snap, "td", 1)
    owners = {str(a): w.name for w in t.config.workloads for a in w.addresses}
    assert owners == {"10.0.0.9": "old"}
    assert [w.name for w in t.config.workloads] == ["old"]
    assert t.problems == (
        "address 10.0.0.1 is claimed by pods mesh/new, mesh/old; given to none of them until "
        "one alone claims it",
        "address 10.0.0.2 is claimed by pods mesh/a-same, mesh/z-same; given to none of them "
        "until one alone claims it")
    # The result is a state the ztunnel indexes unambiguously.
    StateSnapshot.build(t.config)
    # Once the old pod is gone, the new one has its address.
    settled = translate(RegistrySnapshot(namespaces=(AMBIENT,), pods=(
        pod("new", ips=("10.0.0.1",), ready=new_ready),)), "td", 2)
    assert [(w.name, str(w.addresses[0])) for w in settled.config.workloads] == [
        ("new", "10.0.0.1")]


def test_services() -> None:
    snap = RegistrySnapshot(
        pods=(pod("a", ips=("10.0.0.1",)),),
        services=(
            Service("web", "mesh", (ip("10.96.0.1"),),
                    (ServicePort(80, 8080, "http"), ServicePort(53, 53, "dns", "UDP")),
                    (("app", "web"),)),
            Service("headless", "mesh", (), (ServicePort(80, 80),)),
            Service("udp-only", "mesh", (ip("10.96.0.2"),), (ServicePort(53, 53, "", "UDP"),)),
            Service("clash", "mesh", (ip("10.0.0.1"), ip("10.96.0.3")), (ServicePort(1, 1),)),
            # Two services on one VIP: the first by namespace/name keeps it.
            Service("x-clash", "mesh", (ip("10.96.0.1"),), (ServicePort(1, 1),)),
        ))
    t = translate(snap, "td", 1, domain_suffix="corp.example")
    by_name = {s.name: s for s in t.config.services}
    assert set(by_name) == {"web", "clash"}
    web = by_name["web"]
    assert web.hostname == "web.mesh.svc.corp.example"
    assert web.vips == (ip("10.96.0.1"),) and web.target_port(80) == 8080
    assert web.target_port(53) is None and web.selector == (("app", "web"),)
    assert by_name["clash"].vips == (ip("10.96.0.3"),)
    assert any("10.0.0.1 is already used by workload mesh/a" in p for p in t.problems)
    assert any("x-clash" in p and "service mesh/web" in p for p in t.problems)


def test_valid_policies_parse_with_the_ztunnel_parser() -> None:
    snap = RegistrySnapshot(
        authorization_policies=(AuthorizationPolicy("allow", "mesh", {
            "selector": {"matchLabels": {"app": "a"}}, "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["td/ns/mesh/sa/c"]}}],
                       "to": [{"operation": {"ports": ["8080"]}}]}]}),),
        peer_authentications=(PeerAuthentication("strict", "mesh", {"mtls": {"mode": "STRICT"}}),))
    t = translate(snap, "td", 1)
    assert t.problems == ()
    (p,) = t.config.policies
    assert p.key == "mesh/allow" and p.selector == (("app", "a"),)
    assert p.rules[0].operations[0].ports == (8080,)
    assert t.config.peer_authentications[0].mode is MtlsMode.STRICT


@pytest.mark.parametrize(("spec", "action", "rules", "selector"), [
    # An ALLOW that cannot be read matches nothing: everything it selects is denied.
    ({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
      "selector": {"matchLabels": {"app": "a"}}}, Action.ALLOW, (), (("app", "a"),)),
    # A DENY that cannot be read denies everything it selects.
    ({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["x"]}}]}]},
     Action.DENY, (Rule(),), None),
    # A bad selector widens the policy to the namespace rather than dropping it.
    ({"selector": {"matchLabels": "app=a"}, "rules": [{}]}, Action.ALLOW, (), None),
    ({"action": "SOMETIMES"}, Action.ALLOW, (), None),
])
def test_invalid_authorization_policy_fails_closed(
        spec: dict[str, object], action: Action, rules: tuple[Rule, ...],
        selector: tuple[tuple[str, str], ...] | None) -> None:
    t = translate(RegistrySnapshot(authorization_policies=(
        AuthorizationPolicy("bad", "mesh", spec),)), "td", 1)
    (p,) = t.config.policies
    assert (p.action, p.rules, p.selector) == (action, rules, selector)
    assert len(t.problems) == 1 and t.problems[0].startswith("AuthorizationPolicy mesh/bad: spec.")


def test_invalid_peer_authentication_fails_closed_to_strict() -> None:
    t = translate(RegistrySnapshot(peer_authentications=(PeerAuthentication(
        "bad", "mesh", {"mtls": {"mode": "LOOSE"}, "selector": {"matchLabels": {"a": "b"}}}),)),
        "td", 1)
    (p,) = t.config.peer_authentications
    assert (p.mode, p.selector) == (MtlsMode.STRICT, (("a", "b"),))
    assert "spec.mtls.mode: 'LOOSE' is not one of" in t.problems[0]


def test_output_does_not_depend_on_input_order() -> None:
    pods = (pod("b", ips=("10.0.0.2",)), pod("a", ips=("10.0.0.1",)))
    one = mesh_config(RegistrySnapshot(namespaces=(AMBIENT,), pods=pods), "td", 1)
    two = mesh_config(RegistrySnapshot(namespaces=(AMBIENT,), pods=pods[::-1]), "td", 1)
    assert one == two


def test_node_hosts_identity_is_the_issuance_rule() -> None:
    import ipaddress

    from controller.registry.model import Namespace, Pod, RegistrySnapshot
    from controller.registry.translate import node_hosts_identity
    from mesh.spiffe import SpiffeId

    snap = RegistrySnapshot(
        namespaces=(Namespace("shop", (("ambit.dev/dataplane-mode", "ambient"),)),
                    Namespace("plain", ())),
        pods=(Pod("web", "shop", "web", "node-a", (ipaddress.ip_address("10.0.0.1"),)),
              Pod("old", "plain", "old", "node-a", (ipaddress.ip_address("10.0.0.2"),))),
    )
    web = SpiffeId("cluster.local", "shop", "web")
    assert node_hosts_identity(snap, "node-a", web, "cluster.local")
    assert not node_hosts_identity(snap, "node-b", web, "cluster.local")  # other node
    assert not node_hosts_identity(snap, "node-a", SpiffeId("cluster.local", "plain", "old"),
                                   "cluster.local")  # pod not in the mesh
    assert not node_hosts_identity(snap, "node-a", SpiffeId("other.td", "shop", "web"),
                                   "cluster.local")  # foreign trust domain


# --- pod membership at CNI ADD (NodeService) -----------------------------------------------

@pytest.mark.parametrize(("namespaces", "p", "ask", "expected"), [
    ((AMBIENT,), pod("a", ips=()), ("n1", "mesh", "a"), (True, True, "namespace mesh is ambient")),
    ((AMBIENT,), pod("a", ips=(), labels={"ambit.dev/dataplane-mode": "none"}),
     ("n1", "mesh", "a"), (True, False, "pod mesh/a is labelled ambit.dev/dataplane-mode=none")),
    ((PLAIN,), pod("a", "plain", ips=()), ("n1", "plain", "a"),
     (True, False, "namespace plain is not labelled ambit.dev/dataplane-mode=ambient")),
    ((), pod("a", "ghost", ips=()), ("n1", "ghost", "a"),
     (True, False, "namespace ghost is not labelled ambit.dev/dataplane-mode=ambient")),
    ((AMBIENT,), pod("a", ips=()), ("n2", "mesh", "a"),
     (False, False, "pod mesh/a is scheduled on n1, not n2")),
    ((AMBIENT,), pod("a"), ("n1", "mesh", "b"), (False, False, "pod mesh/b is not in the "
                                                   "registry (yet)")),
])
def test_pod_membership(namespaces: tuple[Namespace, ...], p: Pod,
                        ask: tuple[str, str, str], expected: tuple[bool, bool, str]) -> None:
    snap = RegistrySnapshot(namespaces=namespaces, pods=(p,))
    m = pod_membership(snap, *ask)
    assert (m.known, m.in_mesh, m.reason) == expected


def test_a_pod_without_ip_is_not_in_the_mesh_state_yet() -> None:
    snap = RegistrySnapshot(namespaces=(AMBIENT,), pods=(pod("a", ips=()),))
    assert mesh_config(snap, "td", 1).workloads == ()


# --- waypoints (issue 5) ---------------------------------------------------------------------

WAYPOINT_POD_LABELS = {"gateway.networking.k8s.io/gateway-name": "waypoint"}


def waypoint_snapshot(*, services: tuple[Service, ...] = (),
                      namespaces: tuple[Namespace, ...] = (AMBIENT,),
                      gateways: tuple[Gateway, ...] = (Gateway("waypoint", "mesh"),),
                      pods: tuple[Pod, ...] = ()) -> RegistrySnapshot:
    return RegistrySnapshot(namespaces=namespaces, services=services, gateways=gateways,
                            pods=pods)


def svc(name: str = "web", namespace: str = "mesh", vip: str = "10.96.0.1",
        labels: dict[str, str] | None = None) -> Service:
    return Service(name, namespace, (ip(vip),), (ServicePort(80, 8080),), (("app", name),),
                   tuple(sorted((labels or {}).items())))


def test_a_waypoint_pod_is_never_captured_but_listed() -> None:
    p = pod("waypoint-abc", labels=WAYPOINT_POD_LABELS, sa="waypoint")
    snap = waypoint_snapshot(pods=(p,))
    (w,) = mesh_config(snap, "td", 1).workloads
    assert w.protocol is Protocol.TCP  # it terminates HBONE itself
    assert w.label_map == WAYPOINT_POD_LABELS  # ztunnels find instances by this label
    assert pod_membership(snap, "n1", "mesh", "waypoint-abc") == Membership(
        True, False, "pod mesh/waypoint-abc is a waypoint (gateway waypoint): it terminates "
        "HBONE itself")
    assert not in_mesh(p, snap)


@pytest.mark.parametrize(("namespaces", "p", "identity", "node", "issued"), [
    # A waypoint instance gets its own identity on its node, ambient namespace or not ...
    ((AMBIENT,), pod("wp", labels=WAYPOINT_POD_LABELS, sa="waypoint"), ("mesh", "waypoint"),
     "n1", True),
    ((PLAIN,), pod("wp", "plain", labels=WAYPOINT_POD_LABELS, sa="waypoint"),
     ("plain", "waypoint"), "n1", True),
    # ... but not on another node, nor another service account's or namespace's identity.
    ((AMBIENT,), pod("wp", labels=WAYPOINT_POD_LABELS, sa="waypoint"), ("mesh", "waypoint"),
     "n2", False),
    ((AMBIENT,), pod("wp", labels=WAYPOINT_POD_LABELS, sa="waypoint"), ("mesh", "default"),
     "n1", False),
    ((AMBIENT,), pod("wp", labels=WAYPOINT_POD_LABELS, sa="waypoint"), ("other", "waypoint"),
     "n1", False),
    # Without the label, a pod in a plain namespace still gets nothing.
    ((PLAIN,), pod("wp", "plain", sa="waypoint"), ("plain", "waypoint"), "n1", False),
])
def test_waypoint_instances_get_their_certificate(
        namespaces: tuple[Namespace, ...], p: Pod, identity: tuple[str, str], node: str,
        issued: bool) -> None:
    snap = RegistrySnapshot(namespaces=namespaces, pods=(p,))
    assert node_hosts_identity(snap, node, SpiffeId("td", *identity), "td") is issued


MESH_BOUND = Namespace("mesh", (("ambit.dev/dataplane-mode", "ambient"),
                                ("ambit.dev/use-waypoint", "waypoint")))


@pytest.mark.parametrize(("namespaces", "service_labels", "gateways", "expected"), [
    # Unbound: no label anywhere.
    ((AMBIENT,), {}, (Gateway("waypoint", "mesh"),), None),
    # The service's own label.
    ((AMBIENT,), {"ambit.dev/use-waypoint": "waypoint"}, (Gateway("waypoint", "mesh"),),
     WaypointRef("mesh", "waypoint")),
    # The namespace's label binds every service of it ...
    ((MESH_BOUND,), {}, (Gateway("waypoint", "mesh"),), WaypointRef("mesh", "waypoint")),
    # ... the service's own label wins over it ...
    ((MESH_BOUND,), {"ambit.dev/use-waypoint": "other"},
     (Gateway("waypoint", "mesh"), Gateway("other", "mesh")), WaypointRef("mesh", "other")),
    # ... and "none" on the service opts it out.
    ((MESH_BOUND,), {"ambit.dev/use-waypoint": "none"}, (Gateway("waypoint", "mesh"),), None),
    # "none" on a namespace binds nothing.
    ((Namespace("mesh", (("ambit.dev/use-waypoint", "none"),)),), {}, (), None),
    # use-waypoint-namespace on the same object picks the Gateway's namespace.
    ((AMBIENT,), {"ambit.dev/use-waypoint": "shared",
                  "ambit.dev/use-waypoint-namespace": "infra"},
     (Gateway("shared", "infra"),), WaypointRef("infra", "shared")),
    ((Namespace("mesh", (("ambit.dev/use-waypoint", "shared"),
                         ("ambit.dev/use-waypoint-namespace", "infra"))),), {},
     (Gateway("shared", "infra"),), WaypointRef("infra", "shared")),
    # The namespace's use-waypoint-namespace does not apply to the service's own label.
    ((Namespace("mesh", (("ambit.dev/use-waypoint", "shared"),
                         ("ambit.dev/use-waypoint-namespace", "infra"))),),
     {"ambit.dev/use-waypoint": "local"}, (Gateway("local", "mesh"),),
     WaypointRef("mesh", "local")),
    # A waypoint-for "all" Gateway serves services too.
    ((AMBIENT,), {"ambit.dev/use-waypoint": "waypoint"},
     (Gateway("waypoint", "mesh", waypoint_for="all"),), WaypointRef("mesh", "waypoint")),
])
def test_service_waypoint_binding(namespaces: tuple[Namespace, ...],
                                  service_labels: dict[str, str],
                                  gateways: tuple[Gateway, ...],
                                  expected: WaypointRef | None) -> None:
    t = translate(waypoint_snapshot(namespaces=namespaces, gateways=gateways,
                                    services=(svc(labels=service_labels),)), "td", 1)
    (s,) = t.config.services
    assert s.waypoint == expected
    assert t.problems == ()
    StateSnapshot.build(t.config)


@pytest.mark.parametrize(("namespaces", "labels", "gateways", "problem"), [
    ((AMBIENT,), {"ambit.dev/use-waypoint": "ghost"}, (),
     "service mesh/web is bound to waypoint mesh/ghost (ambit.dev/use-waypoint on service "
     "mesh/web), but there is no Gateway mesh/ghost of class ambit-waypoint; its traffic is "
     "refused until you create that Gateway or remove the label"),
    ((MESH_BOUND,), {}, (Gateway("waypoint", "elsewhere"),),
     "service mesh/web is bound to waypoint mesh/waypoint (ambit.dev/use-waypoint on "
     "namespace mesh), but there is no Gateway mesh/waypoint"),
    ((AMBIENT,), {"ambit.dev/use-waypoint": "waypoint"},
     (Gateway("waypoint", "mesh", waypoint_for="workload"),),
     "service mesh/web is bound to waypoint mesh/waypoint (ambit.dev/use-waypoint on service "
     "mesh/web), but that Gateway serves 'workload' traffic (ambit.dev/waypoint-for); its "
     "traffic fails closed until you label the Gateway ambit.dev/waypoint-for=service (or "
     "all) or remove the binding"),
    ((AMBIENT,), {"ambit.dev/use-waypoint": "waypoint"},
     (Gateway("waypoint", "mesh", waypoint_for="none"),), "serves 'none' traffic"),
])
def test_binding_to_a_missing_or_wrong_waypoint_fails_closed_and_is_reported(
        namespaces: tuple[Namespace, ...], labels: dict[str, str],
        gateways: tuple[Gateway, ...], problem: str) -> None:
    t = translate(waypoint_snapshot(namespaces=namespaces, gateways=gateways,
                                    services=(svc(labels=labels),)), "td", 1)
    (s,) = t.config.services
    assert s.waypoint is not None  # still bound: the ztunnels refuse rather than bypass
    assert len(t.problems) == 1 and problem in t.problems[0]


def test_waypoint_binding_reports_its_source() -> None:
    snap = waypoint_snapshot(namespaces=(MESH_BOUND,))
    assert waypoint_binding(snap, svc()) == (WaypointRef("mesh", "waypoint"), "namespace mesh")
    assert waypoint_binding(snap, svc(labels={"ambit.dev/use-waypoint": "none"})) == (None, "")
    # A waypoint's own Service is never bound (it would send the waypoint's traffic to itself).
    own = svc(labels={"gateway.networking.k8s.io/gateway-name": "waypoint"})
    assert waypoint_binding(snap, own) == (None, "")


def test_waypoint_policies_are_not_sent_to_ztunnels() -> None:
    t = translate(RegistrySnapshot(authorization_policies=(
        AuthorizationPolicy("l7", "mesh", {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                            "name": "waypoint"}],
            "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        # Even an invalid one: waypoint_policies() makes it fail closed at the waypoint.
        AuthorizationPolicy("l7-bad", "mesh", {"targetRef": {"kind": "Pod"}}),
        AuthorizationPolicy("l4", "mesh", {"action": "DENY"}),
    )), "td", 1)
    assert [p.key for p in t.config.policies] == ["mesh/l4"] and t.problems == ()

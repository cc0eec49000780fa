"""Which waypoint's config an ADS stream may read, as a table:
(node metadata, client certificate identity, known waypoints) -> key or refusal with reason."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from controller.registry.model import RegistrySnapshot
from controller.waypoint.model import Gateway
from controller.waypoint.publisher import WaypointPublisher
from controller.xds import XdsCache, XdsDenied, decide_waypoint, waypoint_identity
from mesh.spiffe import SpiffeId

TD = "cluster.local"
GATEWAYS = {("ns1", "gw"), ("ns1", "gw2"), ("ns2", "gw")}
GW = {"NAMESPACE": "ns1", "GATEWAY": "gw"}


def sa(namespace: str, account: str, td: str = TD) -> SpiffeId:
    return SpiffeId(td, namespace, account)


# name: (metadata, identity, insecure, expected key, or (label, words in the reason))
CASES: dict[str, tuple[dict[str, str], SpiffeId | None, bool, str | tuple[str, str]]] = {
    "the gateway's own identity": (GW, sa("ns1", "gw"), False, "ns1/gw"),
    "another gateway, its own identity": ({"NAMESPACE": "ns2", "GATEWAY": "gw"},
                                          sa("ns2", "gw"), False, "ns2/gw"),
    # Nothing broader than the exact identity.
    "another service account of the namespace": (
        GW, sa("ns1", "default"), False,
        ("identity", f"spiffe://{TD}/ns/ns1/sa/default may not read waypoint ns1/gw's config: "
                     f"only spiffe://{TD}/ns/ns1/sa/gw may")),
    "a service account extending the name": (GW, sa("ns1", "gw-evil"), False,
                                             ("identity", "only spiffe://cluster.local/ns/ns1/"
                                              "sa/gw may")),
    "a prefix of the name": (GW, sa("ns1", "g"), False, ("identity", "may not read")),
    "the same name in another namespace": (GW, sa("ns2", "gw"), False,
                                           ("identity", "may not read waypoint ns1/gw's")),
    "a namespace extending the name": (GW, sa("ns10", "gw"), False, ("identity", "may not")),
    "another trust domain": (
        GW, sa("ns1", "gw", "evil.example"), False,
        ("trust_domain", "trust domain 'evil.example' presented (spiffe://evil.example/ns/ns1/"
                         "sa/gw), expected 'cluster.local'")),
    "a trust domain extending ours": (GW, sa("ns1", "gw", "cluster.local.evil"), False,
                                      ("trust_domain", "'cluster.local.evil' presented")),
    # One waypoint's certificate never reads another's config.
    "metadata names a sibling gateway": (
        {"NAMESPACE": "ns1", "GATEWAY": "gw2"}, sa("ns1", "gw"), False,
        ("other_gateway", f"spiffe://{TD}/ns/ns1/sa/gw is waypoint ns1/gw's identity, but the "
                          "node metadata names waypoint ns1/gw2")),
    "metadata names a gateway in another namespace": (
        {"NAMESPACE": "ns2", "GATEWAY": "gw"}, sa("ns1", "gw"), False,
        ("identity", "may not read waypoint ns2/gw's config")),
    "metadata names an unknown gateway the identity matches": (
        {"NAMESPACE": "ns1", "GATEWAY": "ghost"}, sa("ns1", "ghost"), False,
        ("unknown_gateway", "no waypoint ns1/ghost in the registry (create it with `ambit "
                            "waypoint apply -n ns1 --name ghost`)")),
    # The identity is judged first: a refused client cannot probe which waypoints exist.
    "unknown gateway, wrong identity": ({"NAMESPACE": "ns1", "GATEWAY": "ghost"},
                                        sa("ns1", "default"), False,
                                        ("identity", "may not read")),
    "unknown gateway, a sibling's identity": ({"NAMESPACE": "ns1", "GATEWAY": "ghost"},
                                              sa("ns1", "gw"), False,
                                              ("other_gateway", "names waypoint ns1/ghost")),
    "no certificate": (GW, None, False, ("no_certificate", "xDS port (15011)")),
    "no certificate, insecure controller": (GW, None, True, "ns1/gw"),
    "insecure still checks a certificate": (GW, sa("ns1", "default"), True,
                                            ("identity", "may not read")),
    "insecure, unknown gateway": ({"NAMESPACE": "ns1", "GATEWAY": "ghost"}, None, True,
                                  ("unknown_gateway", "no waypoint ns1/ghost")),
    "no metadata": ({}, sa("ns1", "gw"), False, ("metadata", "NAMESPACE and GATEWAY")),
    "no GATEWAY": ({"NAMESPACE": "ns1"}, sa("ns1", "gw"), False, ("metadata", "GATEWAY")),
    "empty NAMESPACE": ({"NAMESPACE": "", "GATEWAY": "gw"}, sa("ns1", "gw"), False,
                        ("metadata", "NAMESPACE")),
    # A slash cannot splice another key together: the identity can never match it.
    "a slash in the metadata": ({"NAMESPACE": "ns1", "GATEWAY": "gw/x"}, sa("ns1", "gw"), False,
                                ("other_gateway", "names waypoint ns1/gw/x")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decide_waypoint(name: str) -> None:
    metadata, identity, insecure, expected = CASES[name]
    decision = decide_waypoint(metadata, identity, GATEWAYS, TD, insecure)
    if isinstance(expected, str):
        assert (decision.allowed, decision.key, decision.reason, decision.label) == (
            True, expected, "", "")
        return
    label, words = expected
    assert not decision.allowed and decision.key is None
    assert decision.label == label
    assert words in decision.reason


def test_waypoint_identity_is_the_gateway_named_service_account() -> None:
    assert str(waypoint_identity(TD, "ns1", "gw")) == "spiffe://cluster.local/ns/ns1/sa/gw"


def test_publisher_serves_only_waypoint_gateways_and_raises_the_decision() -> None:
    publisher = WaypointPublisher(XdsCache(), CollectorRegistry(), trust_domain=TD)
    publisher.snapshot = RegistrySnapshot(gateways=(
        Gateway("gw", "ns1"), Gateway("ingress", "ns1", gateway_class="istio")))
    assert publisher.authorize(GW, sa("ns1", "gw")) == "ns1/gw"
    with pytest.raises(XdsDenied) as err:  # a Gateway of another class is no waypoint
        publisher.authorize({"NAMESPACE": "ns1", "GATEWAY": "ingress"}, sa("ns1", "ingress"))
    assert err.value.label == "unknown_gateway"
    with pytest.raises(XdsDenied) as err:
        publisher.authorize(GW, sa("ns1", "default"))
    assert err.value.label == "identity" and "only spiffe://" in err.value.reason
    with pytest.raises(XdsDenied) as err:  # before the first registry state: nothing known
        WaypointPublisher(XdsCache(), CollectorRegistry(), trust_domain=TD).authorize(
            GW, sa("ns1", "gw"))
    assert err.value.label == "unknown_gateway"

"""The ztunnel's baggage header (ztunnel/peer_metadata.py): Istio's keys, from the mesh state,
encoded and bounded."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from mesh.state.model import Workload
from ztunnel.peer_metadata import MAX_BAGGAGE_LENGTH, baggage_headers, baggage_value


def pod(name: str = "web-1", owner: str = "", **labels: str) -> Workload:
    return Workload(uid=f"shop/{name}", name=name, namespace="shop", service_account="web",
                    node="node-1", addresses=(ip_address("10.0.0.5"),),
                    trust_domain="cluster.local", workload_name=owner,
                    labels=tuple(sorted(labels.items())))


@pytest.mark.parametrize(("workload", "want"), [
    # an owned pod is named by its deployment; app and version from the usual labels
    (pod(owner="web", app="web", version="v2"),
     "k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web,service.version=v2"),
    # a bare pod: its own name, and Istio's defaults (workload name, "latest")
    (pod(), "k8s.namespace.name=shop,k8s.pod.name=web-1,service.name=web-1,"
            "service.version=latest"),
    # Istio's canonical labels win over app/version
    (pod(app="a", version="1", **{"service.istio.io/canonical-name": "canon",
                                  "app.kubernetes.io/version": "2"}),
     "k8s.namespace.name=shop,k8s.pod.name=web-1,service.name=canon,service.version=2"),
    # a label value with characters baggage reserves is percent-encoded
    (pod(app="a,b=c d"),
     "k8s.namespace.name=shop,k8s.pod.name=web-1,service.name=a%2Cb%3Dc%20d,"
     "service.version=latest"),
])
def test_baggage_value(workload: Workload, want: str) -> None:
    assert baggage_value(workload) == want


def test_cluster_name_comes_first_when_known() -> None:
    assert baggage_value(pod(), cluster="east").startswith("k8s.cluster.name=east,")


def test_header_is_bounded_and_never_cut_inside_a_pair() -> None:
    value = baggage_value(pod(app="a" * 1000, version="b" * 1000))
    assert len(value) <= MAX_BAGGAGE_LENGTH
    for item in value.split(","):
        _, _, val = item.partition("=")
        assert val and len(val) <= 253
    assert value.startswith("k8s.namespace.name=shop,k8s.pod.name=web-1,")


def test_unknown_source_sends_no_header() -> None:
    assert baggage_headers(None) == []
    assert baggage_headers(pod()) == [("baggage", baggage_value(pod()))]

"""Envoy access log entries (as ALS delivers them) to Istio's request metrics: labels, the
fallbacks, response flags, observations, the cardinality cap and the ALS servicer."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2
from prometheus_client import CollectorRegistry

from controller.waypoint import peer_baggage
from mesh.state.model import Workload
from waypoint.als import (
    LABELS,
    MAX_BAGGAGE_LENGTH,
    PEER_BAGGAGE_KEY,
    PEER_PRINCIPAL_KEY,
    RESPONSE_FLAGS,
    AlsServer,
    IstioMetrics,
    PeerBaggage,
    parse_baggage,
    request_record,
    response_flags,
    service_from_cluster,
)

CLIENT = "spiffe://cluster.local/ns/client-ns/sa/client"


def string_state(text: str) -> Any:
    a = any_pb2.Any()
    a.Pack(wrappers_pb2.StringValue(value=text))
    return a


def entry(principal: str | None = CLIENT,
          cluster: str = "outbound|80||echo.default.svc.cluster.local", code: int | None = 200,
          tags: dict[str, str] | None = None, headers: dict[str, str] | None = None,
          baggage: str | None = None, **flags: bool) -> Any:
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.upstream_cluster = cluster
    if principal is not None:
        c.filter_state_objects[PEER_PRINCIPAL_KEY].CopyFrom(string_state(principal))
    if baggage is not None:
        c.filter_state_objects[PEER_BAGGAGE_KEY].CopyFrom(string_state(baggage))
    for k, v in (tags if tags is not None else {
            "destination_workload": "echo-v1", "destination_workload_namespace": "default",
            "destination_principal": "spiffe://cluster.local/ns/default/sa/echo",
            "destination_app": "echo"}).items():
        c.custom_tags[k] = v
    for name, value in flags.items():
        setattr(c.response_flags, name, value)
    c.duration.FromMilliseconds(42)
    if code is not None:
        e.response.response_code.value = code
    e.request.request_headers_bytes = 100
    e.request.request_body_bytes = 23
    e.response.response_headers_bytes = 80
    e.response.response_body_bytes = 5
    for k, v in (headers or {}).items():
        e.request.request_headers[k] = v
    return e


def test_full_entry_maps_to_istio_labels() -> None:
    r = request_record(entry())
    assert r.labels == {
        "reporter": "waypoint",
        "source_workload": "unknown",
        "source_workload_namespace": "client-ns",
        "source_principal": CLIENT,
        "source_app": "unknown",
        "destination_workload": "echo-v1",
        "destination_workload_namespace": "default",
        "destination_principal": "spiffe://cluster.local/ns/default/sa/echo",
        "destination_app": "echo",
        "destination_service": "echo.default.svc.cluster.local",
        "destination_service_name": "echo",
        "destination_service_namespace": "default",
        "request_protocol": "http",
        "response_code": "200",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    assert set(r.labels) == set(LABELS)
    assert (r.duration_ms, r.request_bytes, r.response_bytes) == (42.0, 123, 85)


def test_missing_fields_fall_back_to_unknown() -> None:
    r = request_record(entry(principal=None, cluster="", code=None, tags={}))
    for name in ("source_principal", "source_workload_namespace", "destination_workload",
                 "destination_workload_namespace", "destination_principal", "destination_app",
                 "destination_service", "destination_service_name",
                 "destination_service_namespace"):
        assert r.labels[name] == "unknown", name
    assert r.labels["response_code"] == "0"


def test_principal_falls_back_to_the_tls_peer_and_tolerates_junk() -> None:
    e = entry(principal=None)
    e.common_properties.tls_properties.peer_certificate_properties.subject_alt_name.add(
        uri="spiffe://cluster.local/ns/tls-ns/sa/x")
    r = request_record(e)
    assert r.labels["source_principal"] == "spiffe://cluster.local/ns/tls-ns/sa/x"
    assert r.labels["source_workload_namespace"] == "tls-ns"
    # "-" (Envoy's empty) and a non-SPIFFE value.
    assert request_record(entry(principal="-")).labels["source_principal"] == "unknown"
    odd = request_record(entry(principal="not-a-spiffe-id")).labels
    assert odd["source_principal"] == "not-a-spiffe-id"
    assert odd["source_workload_namespace"] == "unknown"
    # A filter state object of another type is not a principal.
    other = entry(principal=None)
    a = any_pb2.Any()
    a.Pack(struct_pb2.Struct())
    other.common_properties.filter_state_objects[PEER_PRINCIPAL_KEY].CopyFrom(a)
    assert request_record(other).labels["source_principal"] == "unknown"


def test_values_are_truncated() -> None:
    r = request_record(entry(tags={"destination_workload": "w" * 1000}))
    assert r.labels["destination_workload"] == "w" * 256


def test_service_from_cluster_names() -> None:
    assert service_from_cluster("outbound|8080||reviews.bookinfo.svc.cluster.local") == (
        "reviews.bookinfo.svc.cluster.local", "reviews", "bookinfo")
    assert service_from_cluster("outbound|80|v1|a.b") == ("a.b", "a", "b")
    assert service_from_cluster("outbound|80||single") == ("single", "single", "unknown")
    assert service_from_cluster("plain-cluster") == ("unknown", "unknown", "unknown")
    assert service_from_cluster("outbound|80||") == ("unknown", "unknown", "unknown")


def test_grpc_protocol_from_content_type() -> None:
    assert request_record(entry(headers={"content-type": "application/grpc+proto"})) \
        .labels["request_protocol"] == "grpc"
    assert request_record(entry(headers={"content-type": "application/json"})) \
        .labels["request_protocol"] == "http"


def test_response_flags_short_strings_in_envoy_order() -> None:
    assert response_flags(accesslog_pb2.ResponseFlags()) == "-"
    r = request_record(entry(upstream_retry_limit_exceeded=True,
                             upstream_connection_failure=True))
    assert r.labels["response_flags"] == "UF,URX"
    flags = accesslog_pb2.ResponseFlags()
    flags.unauthorized_details.reason = accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
    assert response_flags(flags) == "UAEX"
    # Every flag Envoy's ALS proto has is mapped.
    fields = {f.name for f in accesslog_pb2.ResponseFlags.DESCRIPTOR.fields}
    assert fields == {name for name, _ in RESPONSE_FLAGS}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    total = 0.0
    for family in registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_observations_land_in_the_four_metrics_with_istio_buckets() -> None:
    registry = CollectorRegistry()
    m = IstioMetrics(registry)
    m.observe_entry(entry())
    m.observe_entry(entry(code=503, upstream_connection_failure=True))
    assert value(registry, "istio_requests_total", response_code="200") == 1
    assert value(registry, "istio_requests_total", response_code="503",
                 response_flags="UF") == 1
    assert value(registry, "istio_request_duration_milliseconds_bucket", le="50.0",
                 response_code="200") == 1
    assert value(registry, "istio_request_duration_milliseconds_bucket", le="25.0") == 0
    assert value(registry, "istio_request_bytes_sum") == 246
    assert value(registry, "istio_response_bytes_sum") == 170
    les = {s.labels["le"] for f in registry.collect() for s in f.samples
           if s.name == "istio_request_duration_milliseconds_bucket"}
    assert {"0.5", "3.6e+06", "+Inf"} <= les


def test_label_sets_beyond_the_cap_fold_into_overflow() -> None:
    registry = CollectorRegistry()
    m = IstioMetrics(registry, max_series=2)
    for i in range(5):
        m.observe_entry(entry(tags={"destination_workload": f"w{i}"}))
    assert value(registry, "istio_requests_total", destination_workload="w0") == 1
    assert value(registry, "istio_requests_total", destination_workload="w1") == 1
    assert value(registry, "istio_requests_total", destination_workload="overflow",
                 source_principal="overflow", response_code="200") == 3
    assert value(registry, "ambit_waypoint_metric_overflow_total") == 3


async def test_als_stream_records_http_entries_and_ignores_tcp() -> None:
    registry = CollectorRegistry()
    server = AlsServer(IstioMetrics(registry))
    first = als_pb2.StreamAccessLogsMessage()
    first.identifier.log_name = "ambit-waypoint"
    first.http_logs.log_entry.add().CopyFrom(entry())
    first.http_logs.log_entry.add().CopyFrom(entry(code=404))
    second = als_pb2.StreamAccessLogsMessage()
    second.tcp_logs.log_entry.add()

    async def messages() -> Any:
        for msg in (first, second):
            yield msg

    class Ctx:
        def peer(self) -> str:
            return "unix:test"

    resp = await server.StreamAccessLogs(messages(), Ctx())  # type: ignore[arg-type]
    assert isinstance(resp, als_pb2.StreamAccessLogsResponse)
    assert value(registry, "istio_requests_total") == 2
    assert value(registry, "ambit_waypoint_access_log_entries_total", kind="http",
                 outcome="recorded") == 2
    assert value(registry, "ambit_waypoint_access_log_entries_total", kind="tcp",
                 outcome="ignored") == 1


# --- the source's peer metadata (baggage on the CONNECT) ------------------------------------

ISTIO_BAGGAGE = ("k8s.cluster.name=K1,k8s.namespace.name=client-ns,k8s.deployment.name=client,"
                 "service.name=client-app,service.version=v1")


@pytest.mark.parametrize(("text", "want"), [
    (ISTIO_BAGGAGE, PeerBaggage("client-ns", "client", "client-app", "v1", "K1")),
    # every workload kind Istio's ztunnel writes
    ("k8s.namespace.name=n,k8s.pod.name=p", PeerBaggage("n", "p")),
    ("k8s.namespace.name=n,k8s.cronjob.name=c", PeerBaggage("n", "c")),
    # properties, spaces and percent-encoding (W3C baggage)
    ("k8s.namespace.name = n ;prop=1, service.name=a%2Cb", PeerBaggage("n", app="a,b")),
    # empty values, entries without '=', unknown keys: ignored
    ("k8s.namespace.name=,service.name,foo=bar,=x", PeerBaggage()),
    # nothing, junk, "-" (Envoy's empty %REQ%), undecodable bytes
    (None, PeerBaggage()), ("", PeerBaggage()), ("-", PeerBaggage()),
    (",,,;;;===", PeerBaggage()), ("service.name=%FF%FE", PeerBaggage()),
    # too long as a whole, or one value longer than a label may be
    ("service.name=a," + "x" * MAX_BAGGAGE_LENGTH, PeerBaggage()),
    ("service.name=" + "a" * 300 + ",k8s.pod.name=p", PeerBaggage(workload="p")),
    # entries past the cap are not read
    (",".join(["foo=1"] * 40) + ",k8s.pod.name=p", PeerBaggage()),
])
def test_parse_baggage(text: str | None, want: PeerBaggage) -> None:
    assert parse_baggage(text) == want


def test_baggage_names_the_source_workload_and_app() -> None:
    r = request_record(entry(baggage=ISTIO_BAGGAGE))
    assert r.labels["source_workload"] == "client"
    assert r.labels["source_app"] == "client-app"
    assert r.labels["source_workload_namespace"] == "client-ns"


@pytest.mark.parametrize(("principal", "baggage"), [
    # the baggage claims another namespace than the certificate proves
    (CLIENT, "k8s.namespace.name=other,k8s.pod.name=spoof,service.name=spoof"),
    # no verified identity at all: a claim alone is not a label
    (None, ISTIO_BAGGAGE),
    # bad baggage is ignored, never fatal
    (CLIENT, "\x00\xff garbage ;;; ,,"),
])
def test_baggage_that_cannot_be_trusted_is_ignored(principal: str | None, baggage: str) -> None:
    r = request_record(entry(principal=principal, baggage=baggage))
    assert r.labels["source_workload"] == "unknown" and r.labels["source_app"] == "unknown"


def test_what_the_ztunnel_sends_the_waypoint_reads() -> None:
    from ipaddress import ip_address

    from ztunnel.peer_metadata import BAGGAGE_HEADER, baggage_headers

    w = Workload(uid="client-ns/client-7d9f", name="client-7d9f", namespace="client-ns",
                 service_account="client", node="node-1", addresses=(ip_address("10.0.0.1"),),
                 trust_domain="cluster.local", workload_name="client",
                 labels=(("app", "client-app"), ("version", "v2")))
    ((name, value),) = baggage_headers(w)
    assert name == BAGGAGE_HEADER
    assert value == ("k8s.namespace.name=client-ns,k8s.deployment.name=client,"
                     "service.name=client-app,service.version=v2")
    assert parse_baggage(value) == PeerBaggage("client-ns", "client", "client-app", "v2")
    r = request_record(entry(baggage=value))
    assert (r.labels["source_workload"], r.labels["source_app"]) == ("client", "client-app")
    # the Envoy side stores the header under the key the agent reads
    assert peer_baggage.PEER_BAGGAGE_KEY == PEER_BAGGAGE_KEY

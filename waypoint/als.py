"""Istio's request metrics from Envoy's access logs (ALS), with reporter="waypoint".

Why it exists: dashboards, alerts and Kiali-style graphs are written against
``istio_requests_total`` and friends, not Envoy's own stats. Istio computes them inside Envoy
with its stats filter; stock Envoy has none, so the controller's HTTP connection manager sends
one ``HTTPAccessLogEntry`` per request over ALS to this agent (log name ``ambit-waypoint``), and
``request_record`` maps it, purely, to labels and observations:

* ``source_principal``: filter state ``io.istio.peer_principal`` (a string accessor, which Envoy
  serializes as ``google.protobuf.StringValue`` in ``filter_state_objects``), else the downstream
  TLS peer's URI SAN, else ``unknown``; ``source_workload_namespace`` is parsed from it;
* ``source_workload``/``source_app``: the CONNECT's ``baggage`` header (the ztunnel's peer
  metadata, Istio's keys ``k8s.<kind>.name``, ``service.name``; filter state
  ``ambit.peer_baggage``), parsed by ``parse_baggage``; trusted only when its
  ``k8s.namespace.name`` is the namespace the peer's certificate proves (the header is the
  client side's claim, the certificate is not), else ``unknown``;
* ``destination_workload``/``_namespace``/``_principal``/``_app``: the entry's ``custom_tags``
  of those names (read by the HCM from the upstream host's ``ambit`` metadata);
* ``destination_service``: the hostname of the upstream cluster ``outbound|<port>||<host>``,
  split into ``destination_service_name`` and ``_namespace`` (``<name>.<ns>.svc...``);
* ``request_protocol``: ``grpc`` when the request's ``content-type`` is ``application/grpc*``
  (logged when the HCM lists it in ``additional_request_headers_to_log``), else ``http``;
* ``response_flags``: Envoy's short flags (``UF,URX``), ``-`` for none;
* duration: the entry's ``duration`` (first byte in to last byte out), else time to the last
  downstream byte sent; bytes: headers + body, as Istio counts them.

Label values come from the mesh's own configuration and certificates, so cardinality is bounded
by the mesh; still, values are truncated and the number of label sets is capped
(``max_series``): past it, new sets fold into one per status whose source and destination
labels read ``overflow``, counted in ``ambit_waypoint_metric_overflow_total``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import wrappers_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram

from mesh.spiffe import SpiffeError, SpiffeId
from mesh.telemetry import PEER_LABELS

log = logging.getLogger("waypoint.als")

REPORTER = "waypoint"
LOG_NAME = "ambit-waypoint"
PEER_PRINCIPAL_KEY = "io.istio.peer_principal"
PEER_BAGGAGE_KEY = "ambit.peer_baggage"  # controller/waypoint/peer_baggage.py sets it
MAX_BAGGAGE_LENGTH = 4096
MAX_BAGGAGE_ENTRIES = 32
# Istio's ztunnel names the workload by its kind (baggage.rs accepts these four).
WORKLOAD_KEYS = frozenset({"k8s.deployment.name", "k8s.cronjob.name", "k8s.pod.name",
                           "k8s.job.name"})
UNKNOWN = "unknown"
OVERFLOW = "overflow"
MAX_LABEL_LENGTH = 256

LABELS = (*PEER_LABELS, "request_protocol", "response_code", "response_flags",
          "connection_security_policy")
# Kept as they are when a label set folds into the overflow set.
_KEPT_ON_OVERFLOW = frozenset({"reporter", "request_protocol", "response_code",
                               "response_flags", "connection_security_policy"})
DESTINATION_TAGS = ("destination_workload", "destination_workload_namespace",
                    "destination_principal", "destination_app")
# Envoy's default histogram buckets, which Istio's three histograms use.
DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                    300000, 600000, 1800000, 3600000)
BYTES_BUCKETS = DURATION_BUCKETS

# AccessLogCommon.ResponseFlags fields -> Envoy's short strings, in Envoy's order.
RESPONSE_FLAGS = (
    ("failed_local_healthcheck", "LH"),
    ("no_healthy_upstream", "UH"),
    ("upstream_request_timeout", "UT"),
    ("local_reset", "LR"),
    ("upstream_remote_reset", "UR"),
    ("upstream_connection_failure", "UF"),
    ("upstream_connection_termination", "UC"),
    ("upstream_overflow", "UO"),
    ("no_route_found", "NR"),
    ("delay_injected", "DI"),
    ("fault_injected", "FI"),
    ("rate_limited", "RL"),
    ("unauthorized_details", "UAEX"),
    ("rate_limit_service_error", "RLSE"),
    ("downstream_connection_termination", "DC"),
    ("upstream_retry_limit_exceeded", "URX"),
    ("stream_idle_timeout", "SI"),
    ("invalid_envoy_request_headers", "IH"),
    ("downstream_protocol_error", "DPE"),
    ("upstream_max_stream_duration_reached", "UMSDR"),
    ("response_from_cache_filter", "RFCF"),
    ("no_filter_config_found", "NFCF"),
    ("duration_timeout", "DT"),
    ("upstream_protocol_error", "UPE"),
    ("no_cluster_found", "NC"),
    ("overload_manager", "OM"),
    ("dns_resolution_failure", "DF"),
    ("downstream_remote_reset", "DR"),
)


@dataclass(frozen=True)
class RequestRecord:
    """What one access log entry contributes: a label set and three observations."""

    labels: dict[str, str]
    duration_ms: float
    request_bytes: int
    response_bytes: int


def _clean(value: str | None) -> str:
    if value is None:
        return UNKNOWN
    value = value.strip()
    if not value or value == "-":
        return UNKNOWN
    return value[:MAX_LABEL_LENGTH]


def response_flags(flags: Any) -> str:
    """Envoy's ``%RESPONSE_FLAGS%`` for an ``AccessLogCommon.ResponseFlags``: ``UF,URX``."""
    out = []
    for field, short in RESPONSE_FLAGS:
        if field == "unauthorized_details":
            if flags.HasField(field):
                out.append(short)
        elif getattr(flags, field):
            out.append(short)
    return ",".join(out) or "-"


def filter_state_string(value: Any) -> str | None:
    """The text of a filter state object as Envoy logs it (``google.protobuf.Any``): a string
    accessor arrives as ``StringValue``; ``BytesValue`` is accepted too."""
    if value.Is(wrappers_pb2.StringValue.DESCRIPTOR):
        s = wrappers_pb2.StringValue()
        value.Unpack(s)
        return str(s.value)
    if value.Is(wrappers_pb2.BytesValue.DESCRIPTOR):
        b = wrappers_pb2.BytesValue()
        value.Unpack(b)
        return bytes(b.value).decode("utf-8", "replace")
    return None


def source_principal(common: Any) -> str:
    objects = common.filter_state_objects
    if PEER_PRINCIPAL_KEY in objects:
        text = filter_state_string(objects[PEER_PRINCIPAL_KEY])
        if text and text.strip() and text.strip() != "-":
            return _clean(text)
    if common.HasField("tls_properties"):
        for san in common.tls_properties.peer_certificate_properties.subject_alt_name:
            if san.uri:
                return _clean(san.uri)
    return UNKNOWN


@dataclass(frozen=True)
class PeerBaggage:
    """What a ``baggage`` header says about the source workload (None: not said)."""

    namespace: str | None = None
    workload: str | None = None
    app: str | None = None
    version: str | None = None
    cluster: str | None = None


def parse_baggage(text: str | None) -> PeerBaggage:
    """The peer metadata in a W3C ``baggage`` value (``k=v,k=v;prop``), as Istio's ztunnel
    writes it. Never raises: a value longer than ``MAX_BAGGAGE_LENGTH``, entries past
    ``MAX_BAGGAGE_ENTRIES``, entries without ``=``, unknown keys and empty or oversized values
    are ignored; values are percent-decoded."""
    if not text or len(text) > MAX_BAGGAGE_LENGTH:
        return PeerBaggage()
    found: dict[str, str] = {}
    for entry in text.split(",")[:MAX_BAGGAGE_ENTRIES]:
        key, sep, value = entry.split(";", 1)[0].partition("=")
        key, value = key.strip(), unquote(value.strip(), errors="replace")
        if not sep or not value or len(value) > MAX_LABEL_LENGTH or "\ufffd" in value:
            continue
        if key in WORKLOAD_KEYS:
            key = "workload"
        found[key] = value
    return PeerBaggage(namespace=found.get("k8s.namespace.name"), workload=found.get("workload"),
                       app=found.get("service.name"), version=found.get("service.version"),
                       cluster=found.get("k8s.cluster.name"))


def source_baggage(common: Any, principal_ns: str) -> PeerBaggage:
    """The CONNECT's baggage from the access log, if it names the namespace the peer's
    certificate proves; else nothing (a claim the identity contradicts is not a label)."""
    objects = common.filter_state_objects
    if PEER_BAGGAGE_KEY not in objects:
        return PeerBaggage()
    bag = parse_baggage(filter_state_string(objects[PEER_BAGGAGE_KEY]))
    if principal_ns == UNKNOWN or bag.namespace != principal_ns:
        return PeerBaggage()
    return bag


def principal_namespace(principal: str) -> str:
    try:
        return SpiffeId.parse(principal).namespace
    except SpiffeError:
        return UNKNOWN


def service_from_cluster(cluster: str) -> tuple[str, str, str]:
    """(destination_service, _name, _namespace) from an Istio-style cluster name
    ``outbound|<port>|<subset>|<hostname>``; ``unknown`` for anything else."""
    parts = cluster.split("|")
    if len(parts) != 4 or not parts[3]:
        return UNKNOWN, UNKNOWN, UNKNOWN
    host = _clean(parts[3])
    labels = host.split(".")
    name = labels[0] or UNKNOWN
    namespace = labels[1] if len(labels) > 1 and labels[1] else UNKNOWN
    return host, name, namespace


def request_protocol(request: Any, tags: Mapping[str, str]) -> str:
    content_type = ""
    for key, value in request.request_headers.items():
        if key.lower() == "content-type":
            content_type = value
    if not content_type:
        content_type = tags.get("content_type", "")
    return "grpc" if content_type.lower().startswith("application/grpc") else "http"


def _ms(duration: Any) -> float:
    return float(duration.seconds) * 1000.0 + float(duration.nanos) / 1e6


def request_record(entry: Any) -> RequestRecord:
    """Istio labels and observations for one ``HTTPAccessLogEntry``; pure."""
    common = entry.common_properties
    tags = dict(common.custom_tags)
    principal = source_principal(common)
    principal_ns = principal_namespace(principal)
    peer = source_baggage(common, principal_ns)
    service, service_name, service_namespace = service_from_cluster(common.upstream_cluster)
    if service == UNKNOWN:
        # No upstream (denied, no route, fault stage): the backend's service from the host
        # metadata when there was a host, else the service the client addressed.
        fallback = tags.get("destination_service") or tags.get("addressed_service") or ""
        if fallback:
            service, service_name, service_namespace = service_from_cluster(
                f"outbound|0||{fallback}")
    code = entry.response.response_code.value if entry.response.HasField("response_code") \
        else 0
    labels = {
        "reporter": REPORTER,
        "source_workload": _clean(peer.workload),
        "source_workload_namespace": principal_ns,
        "source_principal": principal,
        "source_app": _clean(peer.app),
        **{tag: _clean(tags.get(tag)) for tag in DESTINATION_TAGS},
        "destination_service": service,
        "destination_service_name": service_name,
        "destination_service_namespace": service_namespace,
        "request_protocol": request_protocol(entry.request, tags),
        "response_code": str(code) if 0 <= code < 1000 else "0",
        "response_flags": response_flags(common.response_flags),
        "connection_security_policy": "mutual_tls",
    }
    if common.HasField("duration"):
        duration = _ms(common.duration)
    elif common.HasField("time_to_last_downstream_tx_byte"):
        duration = _ms(common.time_to_last_downstream_tx_byte)
    else:
        duration = 0.0
    req, resp = entry.request, entry.response
    return RequestRecord(labels, max(duration, 0.0),
                         int(req.request_headers_bytes) + int(req.request_body_bytes),
                         int(resp.response_headers_bytes) + int(resp.response_body_bytes))


class IstioMetrics:
    """The four istio_* request metrics, with a cap on distinct label sets."""

    def __init__(self, registry: CollectorRegistry, max_series: int = 10000) -> None:
        self.max_series = max_series
        self._series: set[tuple[str, ...]] = set()
        self._overflow_logged = False
        self.requests = Counter("istio_requests", "Requests through the waypoint", LABELS,
                                registry=registry)
        self.duration = Histogram("istio_request_duration_milliseconds",
                                  "Request duration (milliseconds)", LABELS,
                                  buckets=DURATION_BUCKETS, registry=registry)
        self.request_bytes = Histogram("istio_request_bytes",
                                       "Request size, headers and body (bytes)", LABELS,
                                       buckets=BYTES_BUCKETS, registry=registry)
        self.response_bytes = Histogram("istio_response_bytes",
                                        "Response size, headers and body (bytes)", LABELS,
                                        buckets=BYTES_BUCKETS, registry=registry)
        self.overflow = Counter("ambit_waypoint_metric_overflow",
                                "Requests recorded under overflow labels because the label "
                                "set limit was reached", registry=registry)
        self.entries = Counter("ambit_waypoint_access_log_entries",
                               "Access log entries received over ALS, by kind (http, tcp) and "
                               "outcome (recorded, ignored, error)", ("kind", "outcome"),
                               registry=registry)

    def _label_values(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        values = tuple(labels[name] for name in LABELS)
        if values in self._series:
            return values
        if len(self._series) < self.max_series:
            self._series.add(values)
            return values
        self.overflow.inc()
        if not self._overflow_logged:
            self._overflow_logged = True
            log.warning("more than %d label sets in the istio_* metrics; further ones are "
                        "recorded with source/destination labels 'overflow'", self.max_series)
        folded = tuple(v if name in _KEPT_ON_OVERFLOW else OVERFLOW
                       for name, v in zip(LABELS, values, strict=True))
        self._series.add(folded)
        return folded

    def observe(self, record: RequestRecord) -> None:
        values = self._label_values(record.labels)
        self.requests.labels(*values).inc()
        self.duration.labels(*values).observe(record.duration_ms)
        self.request_bytes.labels(*values).observe(record.request_bytes)
        self.response_bytes.labels(*values).observe(record.response_bytes)

    def observe_entry(self, entry: Any) -> None:
        """Record one ``HTTPAccessLogEntry``; a malformed one is counted and skipped."""
        try:
            record = request_record(entry)
        except Exception:
            self.entries.labels("http", "error").inc()
            log.exception("cannot map an access log entry to metrics; skipped")
            return
        self.observe(record)
        self.entries.labels("http", "recorded").inc()


class AlsServer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """``envoy.service.accesslog.v3.AccessLogService``: HTTP entries become istio_* metrics;
    TCP entries are counted and ignored (the ztunnel reports L4)."""

    def __init__(self, metrics: IstioMetrics) -> None:
        self.metrics = metrics

    def add_to_server(self, server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self, server)

    async def StreamAccessLogs(self, request_iterator: Any,
                               context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        log_name = ""
        async for message in request_iterator:
            if message.HasField("identifier"):
                log_name = message.identifier.log_name
                log.debug("ALS stream from %s (log %r)", context.peer(), log_name)
            if message.HasField("http_logs"):
                for entry in message.http_logs.log_entry:
                    self.metrics.observe_entry(entry)
            elif message.HasField("tcp_logs"):
                self.metrics.entries.labels("tcp", "ignored").inc(
                    len(message.tcp_logs.log_entry))
        return als_pb2.StreamAccessLogsResponse()

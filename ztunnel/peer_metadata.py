"""The ``baggage`` header a ztunnel puts on each HBONE CONNECT: who the source workload is.

Why it exists: a waypoint terminates the client's tunnel and knows the client's SPIFFE identity
(from mTLS), but not its workload, app or version, so its ``istio_requests_total`` said
``source_workload="unknown"``. Istio's ztunnel carries the source's peer metadata across the
HBONE hop as a W3C ``baggage`` header on the CONNECT (istio/ztunnel ``baggage.rs``), with
OpenTelemetry's resource keys; Ambit sends the same keys, so a waypoint (ours, which parses it in
``waypoint/als.py``, or Istio's) fills in the full source labels:

    k8s.namespace.name=default,k8s.deployment.name=client,service.name=client,service.version=v1

The values come from the mesh state (the registry's pod, its labels), never from the pod's
traffic. The receiver treats them as a claim: the waypoint keeps the namespace its mTLS peer
proves and drops baggage that names another one.
"""

from __future__ import annotations

from urllib.parse import quote

from mesh.state.model import Workload

BAGGAGE_HEADER = "baggage"
# Header values stay well under any HTTP/2 peer's header list limit; a value that would make the
# header longer than this is left out (the key with it), never cut in half.
MAX_BAGGAGE_LENGTH = 1024
MAX_VALUE_LENGTH = 253  # the longest Kubernetes name

# Istio's canonical service and revision: the first of these labels the pod has.
SERVICE_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
VERSION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
DEFAULT_VERSION = "latest"  # Istio's canonical revision when the pod names none

# Characters a baggage value may carry unencoded (W3C baggage: no comma, semicolon, equals,
# whitespace, quote or backslash); anything else is percent-encoded.
_SAFE = "!#$&'()*+-./:<>?@[]^_`{|}~"


def _first(labels: dict[str, str], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if labels.get(key):
            return labels[key]
    return None


def baggage_fields(source: Workload, cluster: str | None = None) -> list[tuple[str, str]]:
    """The (key, value) pairs for ``source``, in Istio's order. The workload kind is
    ``deployment`` when the registry names an owning workload, else ``pod``."""
    labels = source.label_map
    kind = "deployment" if source.workload_name else "pod"
    fields = [("k8s.cluster.name", cluster)] if cluster else []
    fields += [
        ("k8s.namespace.name", source.namespace),
        (f"k8s.{kind}.name", source.owner_name),
        ("service.name", _first(labels, SERVICE_LABELS) or source.owner_name),
        ("service.version", _first(labels, VERSION_LABELS) or DEFAULT_VERSION),
    ]
    return [(k, v) for k, v in fields if v]


def baggage_value(source: Workload, cluster: str | None = None) -> str:
    """The header's value: ``key=value`` pairs joined by commas, values percent-encoded where
    they hold characters baggage reserves, each at most ``MAX_VALUE_LENGTH``, the whole at most
    ``MAX_BAGGAGE_LENGTH`` (later pairs are dropped whole to stay under it)."""
    out: list[str] = []
    size = 0
    for key, value in baggage_fields(source, cluster):
        item = f"{key}={quote(value[:MAX_VALUE_LENGTH], safe=_SAFE)}"
        if size + len(item) + (1 if out else 0) > MAX_BAGGAGE_LENGTH:
            continue
        size += len(item) + (1 if out else 0)
        out.append(item)
    return ",".join(out)


def baggage_headers(source: Workload | None) -> list[tuple[str, str]]:
    """The CONNECT's baggage header for ``source``, or none when the source is not known."""
    if source is None:
        return []
    value = baggage_value(source)
    return [(BAGGAGE_HEADER, value)] if value else []

"""Requests and expected responses of the Mesh conformance tests, and the judge (pure).

Why here and pure: each upstream test (kubernetes-sigs/gateway-api ``conformance/tests/mesh``)
is a list of ``http.ExpectedResponse`` values checked by ``echo.MeshPod``'s comparison. These
records carry the same expectations (status, backend pod, request headers the backend saw,
response headers, absent ones) and two the upstream mesh client leaves out, which the issue
asks for: the path the backend saw, and the redirect's ``Location`` (scheme, host, port, path,
with the Gateway API rules ``http.go`` applies to Gateways). ``judge`` returns the first
mismatch as a sentence, or None; it is unit-tested in test_expect.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Req:
    """What the client pod sends. ``host`` is what upstream's client dials: a Service name
    (``echo``, ``echo-v1:8080``) or an address, and the Host header unless ``headers`` has
    one (MeshFrontendHostname)."""

    host: str = "echo"
    path: str = "/"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    protocol: str = "http"  # http, grpc or tcp

    @property
    def name_and_port(self) -> tuple[str, int]:
        name, _, port = self.host.rpartition(":") if ":" in self.host else (self.host, "", "")
        default = {"http": 80, "grpc": 7070, "tcp": 9090}[self.protocol]
        return name, int(port) if port else default


@dataclass(frozen=True)
class Location:
    """An expected redirect: unset parts default as upstream's ``setRedirectRequestDefaults``
    does (scheme http, the request's host and path; no port means the scheme's own)."""

    scheme: str | None = None
    host: str | None = None
    port: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class Expect:
    status: int = 200
    backend: str = ""  # the answering pod's name starts with this
    path: str | None = None  # the path (and query) the backend saw
    request_headers: Mapping[str, str] = field(default_factory=dict)
    absent_request_headers: tuple[str, ...] = ()
    response_headers: Mapping[str, str] = field(default_factory=dict)
    absent_response_headers: tuple[str, ...] = ()
    redirect: Location | None = None


@dataclass(frozen=True)
class Case:
    name: str
    req: Req
    expect: Expect
    client: str = "echo-v1"  # the pod that sends it (upstream: ConnectToApp)


WELL_KNOWN = {"http": "80", "https": "443"}


def _joined(headers: Mapping[str, Any], name: str) -> str | None:
    """A header's values joined with ',' (upstream joins Go's value lists the same way)."""
    values = {k.lower(): v for k, v in headers.items()}.get(name.lower())
    if values is None:
        return None
    return ",".join(values) if isinstance(values, list) else str(values)


def judge(case: Case, result: Mapping[str, Any]) -> str | None:
    """None when ``result`` (one client.py answer) meets the case's expectations."""
    e, req = case.expect, case.req
    if result.get("status") != e.status:
        return f"status {result.get('status')} ({result.get('error', '')}), expected " \
               f"{e.status}"
    headers: Mapping[str, Any] = result.get("headers") or {}
    for name, value in e.response_headers.items():
        got = _joined(headers, name)
        if got != value:
            return f"response header {name}: {got!r}, expected {value!r}"
    for name in e.absent_response_headers:
        if _joined(headers, name) is not None:
            return f"response header {name} is set ({_joined(headers, name)!r}), expected none"
    if e.redirect is not None:
        return _judge_redirect(req, e.redirect, _joined(headers, "location"))
    if e.status != 200:
        return None
    body = result.get("body")
    if not isinstance(body, Mapping):
        return f"the backend's answer is not JSON: {body!r}"
    if not str(body.get("pod", "")).startswith(e.backend):
        return f"answered by {body.get('pod')!r}, expected a pod named {e.backend}*"
    if e.path is not None and body.get("path") != e.path:
        return f"the backend saw path {body.get('path')!r}, expected {e.path!r}"
    seen: Mapping[str, Any] = body.get("headers") or {}
    for name, value in e.request_headers.items():
        got = _joined(seen, name)
        if got != value:
            return f"the backend saw header {name}: {got!r}, expected {value!r}"
    for name in e.absent_request_headers:
        if _joined(seen, name) is not None:
            return f"the backend saw header {name}: {_joined(seen, name)!r}, expected none"
    return None


def _judge_redirect(req: Req, want: Location, location: str | None) -> str | None:
    if not location:
        return "no Location header in the redirect"
    got = urlsplit(location)
    scheme = want.scheme or "http"
    host = want.host or req.host.split(":")[0]
    path = want.path or req.path.split("?")[0]
    port = "" if got.port is None else str(got.port)
    if got.scheme != scheme:
        return f"Location {location!r}: scheme {got.scheme!r}, expected {scheme!r}"
    if got.hostname != host:
        return f"Location {location!r}: host {got.hostname!r}, expected {host!r}"
    if want.port is not None:
        if port != want.port:
            return f"Location {location!r}: port {port!r}, expected {want.port!r}"
    elif port not in ("", WELL_KNOWN.get(scheme, "")):
        return f"Location {location!r}: port {port!r}, expected none or " \
               f"{WELL_KNOWN.get(scheme)} for {scheme}"
    if got.path != path:
        return f"Location {location!r}: path {got.path!r}, expected {path!r}"
    return None

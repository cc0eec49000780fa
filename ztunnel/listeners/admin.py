"""Admin (15000), metrics (15020) and readiness (15021) endpoints.

``/config_dump`` is the first stop when debugging: the exact state this ztunnel acts on
(workloads, services with their endpoints and waypoint instances, policies, peer
authentication), its version and age, and the certificates it holds with their expiry.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import time
from collections.abc import Callable
from typing import Any

from mesh.http_server import Response
from ztunnel.proxy import ProxyContext


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                         for v in value):
            return {k: _jsonable(v) for k, v in value}
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address |
                  ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value


def config_dump(ctx: ProxyContext) -> dict[str, Any]:
    state = ctx.store.current
    cfg = state.config
    return {
        "node": ctx.node,
        "version": state.version,
        "loaded": ctx.store.ready,
        "state_age_seconds": round(time.time() - state.loaded_at, 3) if ctx.store.ready
        else None,
        "trust_domain": cfg.trust_domain,
        "workloads": [{**_jsonable(w), "identity": str(w.identity)} for w in cfg.workloads],
        "services": [{**_jsonable(s), "endpoints": [w.uid for w in state.service_endpoints(s)],
                      **({"waypoint_instances": [w.uid for w in state.waypoint_instances(
                          s.waypoint)]} if s.waypoint is not None else {})}
                     for s in cfg.services],
        "authorization_policies": [_jsonable(p) for p in cfg.policies],
        "peer_authentications": [_jsonable(p) for p in cfg.peer_authentications],
        "certificates": [
            {"identity": str(c.identity), "serial": c.serial,
             "expires": c.not_after.isoformat(),
             "expires_in_seconds": round(c.not_after.timestamp() - time.time())}
            for c in ctx.secrets.certificates()
        ],
        "hbone_pool_connections": ctx.pool.size if ctx.pool else 0,
    }


def admin_routes(ctx: ProxyContext) -> Callable[[str, str], Response]:
    def route(method: str, target: str) -> Response:
        path = target.split("?", 1)[0]
        if method != "GET":
            return Response(405, b"only GET\n")
        if path == "/config_dump":
            body = json.dumps(config_dump(ctx), indent=2).encode()
            return Response(200, body, "application/json")
        if path == "/":
            return Response(200, b"ambit ztunnel admin: /config_dump\n")
        return Response(404, f"no such endpoint {path}; try /config_dump\n".encode())

    return route


def stats_routes(ctx: ProxyContext, is_ready: Callable[[], tuple[bool, str]]) \
        -> Callable[[str, str], Response]:
    def route(method: str, target: str) -> Response:
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return Response(200, ctx.metrics.render(),
                            "text/plain; version=0.0.4; charset=utf-8")
        if path in ("/healthz/ready", "/ready"):
            ok, why = is_ready()
            return Response(200 if ok else 503, (why + "\n").encode())
        if path == "/healthz/live":
            # Liveness: the event loop answers. Not readiness: a ztunnel waiting for the
            # controller must not be restarted for it (that would not bring the controller).
            return Response(200, b"live\n")
        return Response(404, b"try /metrics, /healthz/ready or /healthz/live\n")

    return route

"""The controller's Aggregated Discovery Service: Envoy waypoints get their config here.

Why our own server: waypoint config is derived from the same registry the ztunnel state comes
from, and it has to reach Envoy with Envoy's own ACK/NACK discipline, so a bad generated
resource is rejected by Envoy, counted and logged here, while the last good config keeps
serving. This is State-of-the-World ADS only (one gRPC stream per Envoy carrying every type);
the incremental (delta) variant is refused with UNIMPLEMENTED.

One stream, in order:

1. The first request must carry the node (Envoy sends it on the first message only).
   ``authorize(node, identity)`` -- identity being the SPIFFE ID of the client certificate,
   None without one -- returns the cache key to serve, or raises ``XdsDenied(reason)``: the
   stream is aborted with PERMISSION_DENIED and that reason (Envoy logs it and retries). A
   client certificate of another trust domain than the mesh's, or without exactly one
   workload SPIFFE ID, is refused the same way before ``authorize`` is asked.
2. Per type URL the stream tracks what Envoy asked for (CDS and LDS are wildcard: every
   resource of the type; EDS, RDS, SDS: exactly the requested names that exist), the version
   and nonce of the last response, and Envoy's answer to it. A request whose nonce is not the
   last one sent for its type is stale and ignored (a newer response is on its way and Envoy
   will answer that one). A NACK (last nonce + ``error_detail``) is logged with the node id and
   Envoy's message and counted in ``ambit_xds_rejected_total{type}``; the rejected content is
   not sent again, only a later change (or a change of the requested names) is.
3. A response is sent when a type is first requested, when its requested names change, and
   when a cache change alters what that type would carry (an unchanged type is not resent).
   The version is the cache snapshot's version. On a cache change types go out in the order
   CDS, EDS, LDS, RDS (then SDS and others); a cluster that disappears is removed only after
   the routes have moved away from it: first clusters old+new, then EDS/LDS/RDS, then the
   final cluster set (Envoy's make-before-break advice for ADS).

Every stream is its own task: a broken or disconnecting Envoy ends its stream only.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.any_pb2 import Any as AnyProto
from prometheus_client import CollectorRegistry, Counter, Gauge

from controller.xds.cache import (
    CLUSTER_TYPE,
    WILDCARD_TYPES,
    Snapshot,
    XdsCache,
    push_order,
    short_type,
)
from mesh.spiffe import PeerIdentityError, SpiffeId, peer_identity_pem

__all__ = ["DELTA_REFUSED", "AdsServer", "Authorize", "StreamStatus", "TypeStatus", "XdsCache",
           "XdsDenied", "peer_identity"]

log = logging.getLogger("controller.xds")

# `authorize(node, identity)`: node is an envoy.config.core.v3.base_pb2.Node. May be async.
Authorize = Callable[[Any, SpiffeId | None], str | Awaitable[str]]

DELTA_REFUSED = ("ambit's xDS server speaks State-of-the-World ADS only: set "
                 "dynamic_resources.ads_config.api_type to GRPC, not DELTA_GRPC")


class XdsDenied(Exception):
    """Raised by an authorize callable: this client may not have xDS config; ``reason`` goes
    back to the client as the PERMISSION_DENIED status message, ``label`` is the ``reason``
    label of ``ambit_xds_denied_total``."""

    def __init__(self, reason: str, label: str = "denied") -> None:
        super().__init__(reason)
        self.reason = reason
        self.label = label


class _HasAuthContext(Protocol):
    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


def peer_identity(context: _HasAuthContext, trust_domain: str) -> SpiffeId | None:
    """The SPIFFE ID in the client certificate of this call, or None when there is no client
    certificate (plaintext, or the server TLS port that does not ask for one).

    A certificate that does not prove exactly one workload identity of ``trust_domain`` (the
    mesh's) raises ``PeerIdentityError`` (``mesh.spiffe``, the check the ztunnels use too):
    such a client is refused, not served as if anonymous.

    gRPC has already verified the certificate against the server's root when it is present;
    note that grpcio only asks for one when ``require_client_auth`` is true."""
    pems = list(context.auth_context().get("x509_pem_cert", ()))
    if not pems:
        return None
    return peer_identity_pem(pems[0], trust_domain)


@dataclass(frozen=True)
class TypeStatus:
    """One type URL on one stream, for debugging and tests."""

    type_url: str
    names: tuple[str, ...]  # requested names (empty for wildcard types)
    sent_version: str  # version of the last response ("" before any)
    acked_version: str  # what Envoy says it runs (the request's version_info)
    rejected_version: str  # version of the last NACKed response, "" once a later one is ACKed
    error: str  # Envoy's message for that NACK


@dataclass(frozen=True)
class StreamStatus:
    node_id: str
    key: str
    identity: SpiffeId | None
    types: tuple[TypeStatus, ...]


@dataclass
class _TypeState:
    subscribed: bool = False
    names: frozenset[str] = frozenset()
    nonce: str = ""
    sent: dict[str, AnyProto] | None = None  # what the last response carried, by name
    sent_names: frozenset[str] = frozenset()
    sent_version: str = ""
    acked_version: str = ""
    rejected_version: str = ""
    rejected_nonce: str = ""
    error: str = ""


class _Signal(enum.Enum):
    CHANGED = "changed"
    CLOSED = "closed"


async def _resolve(value: str | Awaitable[str]) -> str:
    if isinstance(value, str):
        return value
    return await value


@dataclass(eq=False)  # identity semantics: streams live in a set
class _Stream:
    server: AdsServer
    node: Any
    identity: SpiffeId | None
    key: str
    context: grpc.aio.ServicerContext[Any, Any]
    types: dict[str, _TypeState] = field(default_factory=dict)
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    change_queued: bool = False
    nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def node_id(self) -> str:
        return str(self.node.id)

    def status(self) -> StreamStatus:
        return StreamStatus(self.node_id, self.key, self.identity, tuple(
            TypeStatus(t, tuple(sorted(st.names)), st.sent_version, st.acked_version,
                       st.rejected_version, st.error)
            for t, st in sorted(self.types.items())))

    def _on_change(self) -> None:
        if not self.change_queued:
            self.change_queued = True
            self.queue.put_nowait(_Signal.CHANGED)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                self.queue.put_nowait(request)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a broken stream: end this one only
            log.info("xDS stream of %s broke: %s: %s", self.node_id, type(e).__name__, e)
        finally:
            self.queue.put_nowait(_Signal.CLOSED)

    async def run(self, first: Any, requests: AsyncIterator[Any]) -> None:
        cancel_watch = self.server.cache.watch(self.key, self._on_change)
        reader = asyncio.create_task(self._read(requests))
        try:
            await self._on_request(first)
            while True:
                item = await self.queue.get()
                if item is _Signal.CLOSED:
                    return
                if item is _Signal.CHANGED:
                    self.change_queued = False
                    await self._push_all()
                else:
                    await self._on_request(item)
        finally:
            cancel_watch()
            reader.cancel()

    def _content(self, snapshot: Snapshot, type_url: str,
                 st: _TypeState) -> dict[str, AnyProto]:
        packed = snapshot.packed_of(type_url)
        if type_url in WILDCARD_TYPES:
            return dict(packed)
        return {n: packed[n] for n in sorted(st.names) if n in packed}

    def _needs_send(self, st: _TypeState, content: dict[str, AnyProto]) -> bool:
        return st.sent is None or st.sent_names != st.names or st.sent != content

    async def _send(self, type_url: str, st: _TypeState, version: str,
                    content: dict[str, AnyProto]) -> None:
        nonce = str(next(self.nonces))
        st.nonce, st.sent, st.sent_names, st.sent_version = nonce, content, st.names, version
        response = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url,
                                                   nonce=nonce)
        response.resources.extend(content.values())
        await self.context.write(response)
        self.server.pushes.labels(short_type(type_url)).inc()
        log.debug("xDS %s v%s (%d resources, nonce %s) -> %s", short_type(type_url), version,
                  len(content), nonce, self.node_id)

    async def _on_request(self, request: Any) -> None:
        type_url = str(request.type_url)
        if not type_url:
            log.warning("xDS request from %s without type_url ignored (ADS needs it)",
                        self.node_id)
            return
        st = self.types.setdefault(type_url, _TypeState())
        nonce = str(request.response_nonce)
        if nonce and st.nonce:
            if nonce != st.nonce:
                log.debug("stale %s request from %s (nonce %s, last sent %s) ignored",
                          short_type(type_url), self.node_id, nonce, st.nonce)
                return
            st.acked_version = str(request.version_info)
            if request.HasField("error_detail"):
                self._rejected(type_url, st, nonce, str(request.error_detail.message))
            elif st.rejected_version:
                st.rejected_version, st.rejected_nonce, st.error = "", "", ""
        st.subscribed = True
        if type_url not in WILDCARD_TYPES:
            st.names = frozenset(request.resource_names)
        if self.change_queued:
            return  # the queued push sends this type too, in push order
        snapshot = self.server.cache.get(self.key)
        if snapshot is None:
            return  # nothing known for this key yet: answer on the first `set`
        content = self._content(snapshot, type_url, st)
        if self._needs_send(st, content):
            await self._send(type_url, st, snapshot.version, content)

    def _rejected(self, type_url: str, st: _TypeState, nonce: str, message: str) -> None:
        if st.rejected_nonce == nonce:
            return  # the same NACK repeated with a new subscription: counted once
        st.rejected_version, st.rejected_nonce, st.error = st.sent_version, nonce, message
        self.server.rejected.labels(short_type(type_url)).inc()
        log.warning("xDS %s version %s REJECTED by %s (key %s); it keeps its last good "
                    "config (version %s): %s", short_type(type_url), st.sent_version,
                    self.node_id, self.key, st.acked_version or "none", message)

    async def _push_all(self) -> None:
        snapshot = self.server.cache.get(self.key)
        if snapshot is None:
            return  # key removed: Envoy keeps what it has until the next `set`
        final_clusters: dict[str, AnyProto] | None = None
        for type_url in push_order({t for t, st in self.types.items() if st.subscribed}):
            st = self.types[type_url]
            content = self._content(snapshot, type_url, st)
            if not self._needs_send(st, content):
                continue
            if type_url == CLUSTER_TYPE and st.sent is not None:
                removed = st.sent.keys() - content.keys()
                if removed:
                    # Keep the clusters that go away until routes and listeners have moved.
                    final_clusters = content
                    interim = {**content, **{n: st.sent[n] for n in sorted(removed)}}
                    if interim != st.sent:
                        await self._send(type_url, st, snapshot.version, interim)
                    continue
            await self._send(type_url, st, snapshot.version, content)
        if final_clusters is not None:
            await self._send(CLUSTER_TYPE, self.types[CLUSTER_TYPE], snapshot.version,
                             final_clusters)


class AdsServer:
    """``envoy.service.discovery.v3.AggregatedDiscoveryService`` over an ``XdsCache``.

    Metrics (in ``metrics_registry``): ``ambit_xds_connected_proxies``,
    ``ambit_xds_pushes_total{type}``, ``ambit_xds_rejected_total{type}``,
    ``ambit_xds_denied_total{reason}`` (streams refused: a client certificate of another trust
    domain or without one workload SPIFFE ID, or by ``authorize``); type = cds/eds/lds/rds/sds.
    """

    def __init__(self, cache: XdsCache, authorize: Authorize,
                 metrics_registry: CollectorRegistry | None = None, *,
                 trust_domain: str) -> None:
        self.cache = cache
        self.authorize = authorize
        # Client certificates of another trust domain are refused before `authorize` runs.
        self.trust_domain = trust_domain
        self._streams: set[_Stream] = set()
        self.connected = Gauge("ambit_xds_connected_proxies",
                               "Envoy proxies with an open, authorized ADS stream",
                               registry=metrics_registry)
        self.pushes = Counter("ambit_xds_pushes", "xDS responses sent, by type", ("type",),
                              registry=metrics_registry)
        self.rejected = Counter("ambit_xds_rejected",
                                "xDS responses an Envoy rejected (NACK), by type; it keeps "
                                "its last good config", ("type",), registry=metrics_registry)
        self.denied = Counter("ambit_xds_denied", "ADS streams refused by authorization, by "
                              "reason (trust_domain, spiffe_san, identity, metadata, ...)",
                              ("reason",), registry=metrics_registry)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)

    def status(self) -> list[StreamStatus]:
        """Every open stream: node, key and per-type versions, ACKs and NACKs."""
        return sorted((s.status() for s in self._streams), key=lambda s: (s.key, s.node_id))

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        if not first.HasField("node") or not first.node.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first DiscoveryRequest of a stream must carry the node "
                                "(with an id)")
        node = first.node
        identity: SpiffeId | None = None
        try:
            try:
                identity = peer_identity(context, self.trust_domain)
            except PeerIdentityError as e:
                raise XdsDenied(f"client certificate refused: {e}", e.reason) from None
            key = await _resolve(self.authorize(node, identity))
        except XdsDenied as e:
            self.denied.labels(e.label).inc()
            log.warning("xDS stream of node %s (identity %s) refused: %s: %s", node.id,
                        identity or "none", e.label, e.reason)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, e.reason)
        except Exception as e:
            log.exception("xDS authorization of node %s failed", node.id)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"authorization failed: {type(e).__name__}: {e}")
        stream = _Stream(self, node, identity, key, context)
        self._streams.add(stream)
        self.connected.set(len(self._streams))
        log.info("xDS stream of node %s (identity %s) opened, serving %s", node.id,
                 identity or "none", key)
        try:
            await stream.run(first, requests)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # e.g. writing to a stream the peer dropped
            log.warning("xDS stream of node %s failed: %s: %s", node.id, type(e).__name__, e)
        finally:
            self._streams.discard(stream)
            self.connected.set(len(self._streams))
            log.info("xDS stream of node %s closed", node.id)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, DELTA_REFUSED)

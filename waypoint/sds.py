"""SDS: the waypoint's certificate and trust bundle, served to Envoy over the agent socket.

Why it exists: the key never touches a disk and Envoy picks up a renewed certificate without a
restart. Two secrets, by the names the bootstrap and the controller's listeners use:

* ``default``: ``tls_certificate`` = the waypoint's chain + key;
* ``ROOTCA``: ``validation_context.trusted_ca`` = the mesh trust bundle from the CA's answer.

The protocol is state-of-the-world xDS on ``StreamSecrets``: every response carries the secrets
the stream asked for, with a version that changes on every new certificate; each open stream
gets the new version when the certificate is renewed. An ACK (nonce of our last response, no
error) needs no answer; a NACK is logged with Envoy's reason and not retried until something
changes; a request with a stale nonce is ignored, as the protocol says. ``FetchSecrets``
(unary) answers from the same store; ``DeltaSecrets`` is not offered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from waypoint.bootstrap import SECRET_DEFAULT, SECRET_ROOTCA
from waypoint.certs import WaypointCertificate

log = logging.getLogger("waypoint.sds")

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
KNOWN_SECRETS = (SECRET_DEFAULT, SECRET_ROOTCA)

_UPDATE = object()
_EOF = object()


def build_secret(name: str, cert: WaypointCertificate) -> Any | None:
    """The ``Secret`` called ``name`` from ``cert``, or None for a name we do not serve."""
    if name == SECRET_DEFAULT:
        return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=cert.chain_pem),
            private_key=base_pb2.DataSource(inline_bytes=cert.key_pem)))
    if name == SECRET_ROOTCA:
        return secret_pb2.Secret(name=name, validation_context=(
            common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(inline_bytes=cert.trust_bundle_pem))))
    return None


def build_sds_response(names: Iterable[str], cert: WaypointCertificate, version: str,
                       nonce: str) -> Any:
    """A ``DiscoveryResponse`` with the secrets among ``names`` we serve (all of them for an
    empty list), in request order, without duplicates."""
    wanted = list(dict.fromkeys(names)) or list(KNOWN_SECRETS)
    resp = discovery_pb2.DiscoveryResponse(version_info=version, type_url=SECRET_TYPE_URL,
                                           nonce=nonce)
    for name in wanted:
        secret = build_secret(name, cert)
        if secret is not None:
            resp.resources.add().Pack(secret)
    return resp


class SecretStore:
    """The certificate to serve and its version; wakes every open stream on a change."""

    def __init__(self) -> None:
        self.current: WaypointCertificate | None = None
        self.version = ""
        self._generation = 0
        self._streams: set[asyncio.Queue[object]] = set()

    def update(self, cert: WaypointCertificate) -> None:
        self._generation += 1
        self.current = cert
        self.version = f"{self._generation}-{cert.serial[:16]}"
        for queue in self._streams:
            queue.put_nowait(_UPDATE)

    def attach(self) -> asyncio.Queue[object]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._streams.add(queue)
        return queue

    def detach(self, queue: asyncio.Queue[object]) -> None:
        self._streams.discard(queue)


class _Stream:
    """One StreamSecrets call's protocol state."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.names: tuple[str, ...] | None = None  # None until the first request
        self.sent_version = ""
        self.sent_nonce = ""
        self.warned: set[str] = set()


class SdsServer(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """``envoy.service.secret.v3.SecretDiscoveryService`` over a ``SecretStore``."""

    def __init__(self, store: SecretStore, registry: CollectorRegistry) -> None:
        self.store = store
        self._nonces = itertools.count(1)
        # The last version Envoy ACKed, by secret name (status and tests).
        self.acked: dict[str, str] = {}
        self.pushes = Counter("ambit_waypoint_sds_pushes", "SDS responses sent to Envoy",
                              registry=registry)
        self.nacks = Counter("ambit_waypoint_sds_nacks", "SDS responses Envoy rejected",
                             registry=registry)
        self.streams = Gauge("ambit_waypoint_sds_streams", "Open SDS streams from Envoy",
                             registry=registry)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self, server)

    async def FetchSecrets(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) \
            -> Any:
        cert = self.store.current
        if cert is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "no certificate yet (waiting for the CA)")
        assert cert is not None
        return build_sds_response(request.resource_names, cert, self.store.version,
                                  str(next(self._nonces)))

    async def StreamSecrets(self, request_iterator: Any,
                            context: grpc.aio.ServicerContext[Any, Any]) -> None:
        queue = self.store.attach()
        stream = _Stream(context.peer())
        reader = asyncio.create_task(self._read(context, queue))
        self.streams.inc()
        try:
            while True:
                item = await queue.get()
                if item is _EOF:
                    return
                if item is _UPDATE:
                    if stream.names is not None and stream.sent_version != self.store.version:
                        await self._respond(context, stream)
                    continue
                if isinstance(item, BaseException):
                    raise item
                await self._on_request(context, stream, item)
        finally:
            self.streams.dec()
            self.store.detach(queue)
            reader.cancel()

    async def _read(self, context: grpc.aio.ServicerContext[Any, Any],
                    queue: asyncio.Queue[object]) -> None:
        try:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    break
                queue.put_nowait(req)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            queue.put_nowait(e)
            return
        queue.put_nowait(_EOF)

    async def _on_request(self, context: grpc.aio.ServicerContext[Any, Any], stream: _Stream,
                          req: Any) -> None:
        if req.type_url and req.type_url != SECRET_TYPE_URL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"this SDS server serves {SECRET_TYPE_URL}, not {req.type_url}")
        if req.response_nonce and req.response_nonce != stream.sent_nonce:
            log.debug("SDS %s: request with stale nonce %s ignored", stream.peer,
                      req.response_nonce)
            return
        names = tuple(req.resource_names)
        changed = names != stream.names
        stream.names = names
        for name in names:
            if name not in KNOWN_SECRETS and name not in stream.warned:
                stream.warned.add(name)
                log.warning("Envoy asked for secret %r, which the waypoint agent does not "
                            "serve (only %s); check the controller's listener TLS config",
                            name, ", ".join(KNOWN_SECRETS))
        if req.response_nonce and req.HasField("error_detail"):
            self.nacks.inc()
            log.error("Envoy rejected secrets %s version %s: %s", ",".join(names),
                      stream.sent_version, req.error_detail.message)
        elif req.response_nonce:
            for name in names:
                self.acked[name] = req.version_info
            log.debug("SDS %s: Envoy acked %s version %s", stream.peer, ",".join(names),
                      req.version_info)
        if changed or not req.response_nonce:
            await self._respond(context, stream)

    async def _respond(self, context: grpc.aio.ServicerContext[Any, Any],
                       stream: _Stream) -> None:
        cert = self.store.current
        if cert is None or stream.names is None:
            return  # answered when the first certificate arrives (_UPDATE)
        nonce = str(next(self._nonces))
        version = self.store.version
        await context.write(build_sds_response(stream.names, cert, version, nonce))
        stream.sent_version, stream.sent_nonce = version, nonce
        self.pushes.inc()
        log.info("SDS: sent %s version %s (certificate serial %s) to Envoy",
                 ",".join(stream.names) or "all secrets", version, cert.serial)

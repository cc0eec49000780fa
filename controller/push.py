"""Config push: stream the mesh state to every subscribed ztunnel.

A subscriber gets a full snapshot first, then deltas (upserts and removals) as the registry
changes, each with the registry's version. The delta for one change is computed once and shared
by all subscribers, so pushing a one-pod change to 100 ztunnels costs one diff and 100 small
messages. A subscriber that falls behind (its queue over ``max_pending``) is not allowed to
hold memory: its queue is dropped and it gets a fresh full snapshot instead.

Only nodes subscribe: ``Subscribe`` takes the node token the CA takes (``authorization: Bearer``
metadata, checked by the same ``NodeAuthenticator``) and it must be the token of the node the
request names.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from controller.ca_service import NodeAuthenticator, NodeAuthError, authenticate_node
from mesh.api.ambit.v1 import state_pb2, state_pb2_grpc
from mesh.ratelimit import RateLimitedLog
from mesh.state.model import MeshConfig
from mesh.state.wire import delta_update, full_update

log = logging.getLogger("controller.push")


class _Subscriber:
    def __init__(self, node: str, max_pending: int) -> None:
        self.node = node
        self.max_pending = max_pending
        self.pending: deque[state_pb2.StateUpdate] = deque()
        self.resync = False
        self.wake = asyncio.Event()

    def offer(self, update: state_pb2.StateUpdate) -> None:
        if self.resync:
            return  # a snapshot is coming anyway
        if len(self.pending) >= self.max_pending:
            self.pending.clear()
            self.resync = True
        else:
            self.pending.append(update)
        self.wake.set()


class StatePublisher:
    """The current state and the set of subscribers; ``publish`` is called by the registry
    watcher whenever the translated state changes."""

    def __init__(self, registry: CollectorRegistry | None = None, max_pending: int = 64) -> None:
        self.config = MeshConfig(version="0")
        self._subscribers: set[_Subscriber] = set()
        self._max_pending = max_pending
        self.ready = asyncio.Event()
        self.pushes = Counter("ambit_controller_pushes", "State updates sent to ztunnels",
                              ("kind",), registry=registry)
        self.subscribers = Gauge("ambit_controller_subscribers", "Subscribed ztunnels",
                                 registry=registry)
        self.version = Gauge("ambit_controller_state_version", "Version of the pushed state",
                             registry=registry)
        self.refused = Counter("ambit_controller_subscriptions_refused", "State subscriptions "
                               "refused, by gRPC status (UNAUTHENTICATED: no or bad node token; "
                               "PERMISSION_DENIED: another node's token; UNAVAILABLE: the "
                               "token could not be checked)", ("code",), registry=registry)

    def publish(self, config: MeshConfig) -> None:
        delta = delta_update(self.config, config)
        self.config = config
        self.ready.set()
        if config.version.isdigit():
            self.version.set(int(config.version))
        if delta is None:
            return
        for sub in self._subscribers:
            sub.offer(delta)

    async def updates(self, node: str) -> AsyncIterator[state_pb2.StateUpdate]:
        """The stream one subscriber receives: a snapshot, then deltas."""
        await self.ready.wait()
        sub = _Subscriber(node, self._max_pending)
        self._subscribers.add(sub)
        self.subscribers.set(len(self._subscribers))
        log.info("ztunnel of node %s subscribed (%d subscribers)", node, len(self._subscribers))
        try:
            self.pushes.labels("full").inc()
            yield full_update(self.config)
            while True:
                await sub.wake.wait()
                sub.wake.clear()
                if sub.resync:
                    sub.resync = False
                    sub.pending.clear()
                    self.pushes.labels("full").inc()
                    yield full_update(self.config)
                    continue
                while sub.pending:
                    self.pushes.labels("delta").inc()
                    yield sub.pending.popleft()
        finally:
            self._subscribers.discard(sub)
            self.subscribers.set(len(self._subscribers))
            log.info("ztunnel of node %s unsubscribed", node)


class StateService(state_pb2_grpc.StateServiceServicer):
    """``Subscribe`` for authenticated nodes only: the stream is the whole mesh (every
    workload, address and policy of every node), so a caller must prove, with the same node
    credential the CA takes, that it is the node it names. This holds on a plaintext
    (``--insecure``) port too: TLS protects the stream, the token says who may read it."""

    def __init__(self, publisher: StatePublisher, authenticator: NodeAuthenticator) -> None:
        self.publisher = publisher
        self.authenticator = authenticator
        # Anyone who reaches the port can be refused as often as they like: one line per
        # refusal code every 10 s (with the count left out), so a flood is no log flood.
        self._refusals = RateLimitedLog(log, what="refused")

    async def Subscribe(
        self, request: state_pb2.SubscribeRequest, context: grpc.aio.ServicerContext[
            state_pb2.SubscribeRequest, state_pb2.StateUpdate],
    ) -> AsyncIterator[state_pb2.StateUpdate]:
        if not request.node:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "node is required: the ztunnel must say which node it serves")
        try:
            await authenticate_node(self.authenticator, context.invocation_metadata(),
                                    claimed_node=request.node)
        except NodeAuthError as e:
            self.publisher.refused.labels(e.code.name).inc()
            self._refusals.log(e.code.name, "refused a state subscription for node %r from %s: "
                               "%s: %s", request.node, context.peer(), e.code.name, e)
            await context.abort(e.code, str(e))
        async for update in self.publisher.updates(request.node):
            yield update

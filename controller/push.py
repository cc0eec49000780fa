"""Config push: stream the mesh state to every subscribed ztunnel.

A subscriber gets a full snapshot first, then deltas (upserts and removals) as the registry
changes, each with the registry's version. The delta for one change is computed once and shared
by all subscribers, so pushing a one-pod change to 100 ztunnels costs one diff and 100 small
messages. A subscriber that falls behind (its queue over ``max_pending``) is not allowed to
hold memory: its queue is dropped and it gets a fresh full snapshot instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.api.ambit.v1 import state_pb2, state_pb2_grpc
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
    def __init__(self, publisher: StatePublisher) -> None:
        self.publisher = publisher

    async def Subscribe(
        self, request: state_pb2.SubscribeRequest, context: grpc.aio.ServicerContext[
            state_pb2.SubscribeRequest, state_pb2.StateUpdate],
    ) -> AsyncIterator[state_pb2.StateUpdate]:
        if not request.node:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "node is required: the ztunnel must say which node it serves")
        async for update in self.publisher.updates(request.node):
            yield update

"""The ztunnel's state source in a mesh with a controller: a gRPC subscription.

It subscribes with the node name and the node's token (``authorization: Bearer`` metadata; the
controller streams the mesh only to the node a token proves), applies the first (full) update
and every delta atomically to the store, and reconnects with jittered exponential backoff when
the stream breaks. While the controller is unreachable the last good state keeps serving;
``ambit_xds_connected`` and ``ambit_state_age_seconds`` tell operators so. An update that does
not validate is rejected whole (field named in the log) and the stream is restarted, which
yields a fresh snapshot. The token is read from its file at every connection attempt, as the
CA client does: projected service-account tokens rotate under a running process.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from mesh.api.ambit.v1 import state_pb2, state_pb2_grpc
from mesh.ca_client import CaError, TokenFile
from mesh.state.parse import StateError
from mesh.state.store import StateStore
from mesh.state.wire import apply_update

log = logging.getLogger("mesh.state.controller")

NODE_TOKEN_FIX = ("pass the node's token with --node-token-file (`ambit node join NODE` in "
                  "embedded mode, the ztunnel's service-account token in Kubernetes)")


class ControllerSource:
    def __init__(
        self,
        target: str,
        node: str,
        store: StateStore,
        credentials: grpc.ChannelCredentials | None = None,
        token_file: Path | None = None,
        on_result: Callable[[bool, str], None] | None = None,
        on_connected: Callable[[bool], None] | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
    ) -> None:
        self.target = target
        self.node = node
        self.store = store
        self.credentials = credentials
        self.token_file = (None if token_file is None else
                           TokenFile(token_file, "node token", NODE_TOKEN_FIX))
        self._on_result = on_result
        self._on_connected = on_connected
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connected = False
        self.last_update = 0.0  # time.time() of the last applied update
        self.last_received = 0.0  # time.monotonic() when the last update arrived
        self.last_error: str | None = None
        if credentials is None:
            log.warning("controller %s: plaintext gRPC (no --ca-root-cert); use this only on "
                        "loopback or a trusted development network", target)
        if token_file is None:
            log.warning("controller %s: no node token, so the controller will refuse the state "
                        "stream (UNAUTHENTICATED); %s", target, NODE_TOKEN_FIX)

    def _set_connected(self, value: bool) -> None:
        if value != self.connected:
            self.connected = value
            if self._on_connected is not None:
                self._on_connected(value)

    def state_age(self) -> float:
        return time.time() - self.last_update if self.last_update else float("nan")

    def _channel(self) -> grpc.aio.Channel:
        options = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000)]
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, self.credentials, options=options)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The node credential, read now (``CaError`` when the file is missing or empty)."""
        if self.token_file is None:
            return ()
        return (("authorization", f"Bearer {self.token_file.read()}"),)

    async def _session(self) -> bool:
        """One subscription; returns True if at least one update was applied."""
        applied = False
        metadata = self._metadata()
        async with self._channel() as channel:
            stub = state_pb2_grpc.StateServiceStub(channel)
            call = stub.Subscribe(state_pb2.SubscribeRequest(
                node=self.node, last_version=self.store.current.version), metadata=metadata)
            async for update in call:
                self.last_received = time.monotonic()
                self._set_connected(True)
                try:
                    config = apply_update(self.store.current.config, update)
                except StateError as e:
                    self.last_error = f"update {update.version}: {e}"
                    log.error("rejected state update from the controller, keeping the last "
                              "good state and resubscribing: %s", self.last_error)
                    if self._on_result:
                        self._on_result(False, self.last_error)
                    call.cancel()
                    return applied
                self.store.replace(config)
                self.last_update = time.time()
                applied = True
                if self._on_result:
                    self._on_result(True, "")
                log.info("applied %s state version %s from the controller",
                         "full" if update.full else "delta", update.version)
        return applied

    async def run(self) -> None:
        delay = self.backoff_initial
        while True:
            try:
                if await self._session():
                    delay = self.backoff_initial
            except grpc.aio.AioRpcError as e:
                self.last_error = f"{e.code().name}: {e.details()}"
                # A refused credential is not an outage: say so, the details carry the fix.
                refused = e.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                       grpc.StatusCode.PERMISSION_DENIED)
                log.warning("controller %s %s (%s); serving the last good state (version %r)",
                            self.target, "refused the subscription" if refused else
                            "unreachable", self.last_error, self.store.current.version)
            except CaError as e:  # the token file: its message names the file and the fix
                self.last_error = str(e)
                log.warning("cannot subscribe to controller %s: %s; serving the last good "
                            "state (version %r)", self.target, e, self.store.current.version)
            self._set_connected(False)
            # Full jitter, so a controller restart is not met by every node at once.
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, self.backoff_max)

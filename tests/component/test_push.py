"""Config push over real gRPC on loopback: snapshot, deltas, controller restarts, and who may
subscribe (only a node, with its own token)."""

from __future__ import annotations

import asyncio
import copy
import logging
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from controller.ca_service import AuthenticatorUnavailable
from controller.push import StatePublisher, StateService
from controller.registry.k8s_auth import WorkloadCaller
from mesh.api.ambit.v1 import state_pb2, state_pb2_grpc
from mesh.state.controller_source import ControllerSource
from mesh.state.parse import parse_state
from mesh.state.store import StateStore
from tests.component.waiting import until
from tests.unit.test_state import GOOD


class Tokens:
    """A ``NodeAuthenticator`` double: token -> node (what ``ambit node join`` issued)."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens

    def authenticate(self, token: str) -> str | None:
        if token == "review-down":
            raise AuthenticatorUnavailable("API server unreachable")
        return self.tokens.get(token)


NODE_TOKENS = {"token-n1": "n1", "token-node-a": "node-a", "token-node-b": "node-b",
               # A waypoint pod's own token in Kubernetes mode: a caller, never a node.
               "token-waypoint": WorkloadCaller("node-a", "shop", "waypoint", "waypoint-0")}


def token_file(tmp: Path, token: str, name: str = "node.token") -> Path:
    path = tmp / name
    path.write_text(token + "\n")
    return path


async def start_server(publisher: StatePublisher, port: int = 0,
                       tokens: Tokens | None = None) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    state_pb2_grpc.add_StateServiceServicer_to_server(
        StateService(publisher, tokens or Tokens(NODE_TOKENS)), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


eventually = partial(until, limit=3.0)


def doc(version: str, **changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(GOOD)
    d["version"] = version
    d.update(changes)
    return d


async def test_snapshot_then_deltas_then_resync_after_restart(tmp_path: Path) -> None:
    publisher = StatePublisher()
    publisher.publish(parse_state(doc("1")))
    server, port = await start_server(publisher)
    store = StateStore()
    connected: list[bool] = []
    source = ControllerSource(f"127.0.0.1:{port}", "n1", store,
                              token_file=token_file(tmp_path, "token-n1"),
                              on_connected=connected.append, backoff_initial=0.05,
                              backoff_max=0.2)
    task = asyncio.create_task(source.run())
    try:
        await eventually(lambda: store.current.version == "1")
        assert len(store.current.config.workloads) == 2 and source.connected

        # A delta: one workload removed, a policy added; applied within a second.
        d2 = doc("2")
        del d2["workloads"][1]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        publisher.publish(parse_state(d2))
        await eventually(lambda: store.current.version == "2", limit=1.0)
        assert loop.time() - t0 < 1.0
        assert [w.name for w in store.current.config.workloads] == ["a"]

        # Controller down: the last good state keeps serving; the source says it is offline.
        await server.stop(grace=None)
        await eventually(lambda: not source.connected)
        assert store.current.version == "2"
        assert connected[-1] is False

        # Controller back (same port) with newer state: the ztunnel resyncs from a snapshot.
        publisher2 = StatePublisher()
        publisher2.publish(parse_state(doc("3")))
        server, _ = await start_server(publisher2, port)
        await eventually(lambda: store.current.version == "3", limit=5.0)
        assert len(store.current.config.workloads) == 2 and source.connected
    finally:
        task.cancel()
        await server.stop(grace=None)


async def test_slow_subscriber_gets_a_snapshot_instead_of_a_backlog() -> None:
    publisher = StatePublisher(max_pending=2)
    publisher.publish(parse_state(doc("1")))
    stream = publisher.updates("n1")
    first = await anext(stream)
    assert first.full and first.version == "1"
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # the subscriber is now registered and waiting
    for v in range(2, 7):  # five changes while the subscriber does not read
        d = doc(str(v))
        d["workloads"][0]["labels"] = {"app": "a", "v": str(v)}
        publisher.publish(parse_state(d))
    nxt = await asyncio.wait_for(pending, 1)
    assert nxt.version in ("2", "6")
    rest = []
    while True:
        try:
            rest.append(await asyncio.wait_for(anext(stream), 0.1))
        except TimeoutError:
            break
    assert (rest or [nxt])[-1].version == "6"
    assert any(u.full for u in [nxt, *rest])  # the backlog was replaced by a snapshot
    await stream.aclose()  # type: ignore[attr-defined]


async def subscribe(port: int, node: str, authorization: str | None) \
        -> tuple[list[state_pb2.StateUpdate], grpc.aio.AioRpcError | None]:
    """One raw Subscribe: what arrived (within a second), and the error that ended it."""
    metadata = () if authorization is None else (("authorization", authorization),)
    got: list[state_pb2.StateUpdate] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = state_pb2_grpc.StateServiceStub(channel).Subscribe(
            state_pb2.SubscribeRequest(node=node), metadata=metadata, timeout=1.0)
        try:
            async for update in call:
                got.append(update)
                return got, None  # the snapshot is enough
        except grpc.aio.AioRpcError as e:
            return got, e
    return got, None


@pytest.mark.parametrize(("node", "authorization", "code", "says"), [
    ("node-a", None, grpc.StatusCode.UNAUTHENTICATED, "pass the node's token with "
     "--node-token-file"),
    ("node-a", "Bearer not-a-token", grpc.StatusCode.UNAUTHENTICATED,
     "the node token is not valid"),
    ("node-a", "Basic token-node-a", grpc.StatusCode.UNAUTHENTICATED, "no node credential"),
    ("node-b", "Bearer token-node-a", grpc.StatusCode.PERMISSION_DENIED,
     "this credential belongs to node node-a, not 'node-b'"),
    ("node-a", "Bearer token-waypoint", grpc.StatusCode.PERMISSION_DENIED,
     "belongs to node node-a (pod shop/waypoint-0"),
    ("node-a", "Bearer review-down", grpc.StatusCode.UNAVAILABLE, "retry"),
])
async def test_subscribe_without_the_nodes_own_token_gets_no_state(
        node: str, authorization: str | None, code: grpc.StatusCode, says: str) -> None:
    metrics = CollectorRegistry()
    publisher = StatePublisher(metrics)
    publisher.publish(parse_state(doc("1")))
    server, port = await start_server(publisher)
    try:
        got, err = await subscribe(port, node, authorization)
    finally:
        await server.stop(grace=None)
    assert got == []  # not one workload, address or policy
    assert err is not None and err.code() is code, err
    assert says in (err.details() or "")
    assert metrics.get_sample_value("ambit_controller_subscriptions_refused_total",
                                    {"code": code.name}) == 1
    assert metrics.get_sample_value("ambit_controller_subscribers") == 0


async def test_a_flood_of_refused_subscriptions_is_no_log_flood(
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = CollectorRegistry()
    publisher = StatePublisher(metrics)
    publisher.publish(parse_state(doc("1")))
    server, port = await start_server(publisher)
    try:
        with caplog.at_level(logging.WARNING, logger="controller.push"):
            for i in range(100):
                got, err = await subscribe(port, "node-a", None if i % 2 else "Bearer forged")
                assert got == [] and err is not None
    finally:
        await server.stop(grace=None)
    assert metrics.get_sample_value("ambit_controller_subscriptions_refused_total",
                                    {"code": "UNAUTHENTICATED"}) == 100
    lines = [r.getMessage() for r in caplog.records if "refused a state subscription" in
             r.getMessage()]
    assert len(lines) == 1, lines  # one code, one line per 10 s; the rest are counted


async def test_subscribe_with_the_nodes_token_gets_the_snapshot() -> None:
    publisher = StatePublisher()
    publisher.publish(parse_state(doc("1")))
    server, port = await start_server(publisher)
    try:
        got, err = await subscribe(port, "node-b", "Bearer token-node-b")
    finally:
        await server.stop(grace=None)
    assert err is None
    assert [(u.full, u.version) for u in got] == [(True, "1")]
    assert len(got[0].workloads) == 2


async def test_source_rereads_its_token_file_on_every_attempt(tmp_path: Path) -> None:
    """The token file is read per connection attempt: a missing file, then a wrong token,
    then a rotated one; the source subscribes as soon as the file holds a valid token, and
    after a further rotation (the old token revoked) it resubscribes with the new one."""
    publisher = StatePublisher()
    publisher.publish(parse_state(doc("1")))
    tokens = Tokens({"first": "node-a"})
    server, port = await start_server(publisher, tokens=tokens)
    store = StateStore()
    path = tmp_path / "node.token"
    source = ControllerSource(f"127.0.0.1:{port}", "node-a", store, token_file=path,
                              backoff_initial=0.02, backoff_max=0.05)
    task = asyncio.create_task(source.run())
    try:
        await eventually(lambda: source.last_error is not None)
        assert source.last_error is not None
        assert "cannot read the node token file" in source.last_error
        assert "--node-token-file" in source.last_error
        path.write_text("revoked\n")
        await eventually(lambda: "UNAUTHENTICATED" in (source.last_error or ""))
        assert not store.ready
        path.write_text("first\n")
        await eventually(lambda: store.current.version == "1")

        # Rotation: the old token is revoked and the controller restarts; the source reads
        # the new token when it reconnects.
        tokens.tokens = {"second": "node-a"}
        path.write_text("second\n")
        await server.stop(grace=None)
        publisher.publish(parse_state(doc("2")))
        server, _ = await start_server(publisher, port, tokens=tokens)
        await eventually(lambda: store.current.version == "2", limit=5.0)
        assert source.connected
    finally:
        task.cancel()
        await server.stop(grace=None)

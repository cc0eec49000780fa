"""Config push over real gRPC on loopback: snapshot, deltas, controller restarts."""

from __future__ import annotations

import asyncio
import copy
from functools import partial
from typing import Any

import grpc

from controller.push import StatePublisher, StateService
from mesh.api.ambit.v1 import state_pb2_grpc
from mesh.state.controller_source import ControllerSource
from mesh.state.parse import parse_state
from mesh.state.store import StateStore
from tests.component.waiting import until
from tests.unit.test_state import GOOD


async def start_server(publisher: StatePublisher, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    state_pb2_grpc.add_StateServiceServicer_to_server(StateService(publisher), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


eventually = partial(until, limit=3.0)


def doc(version: str, **changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(GOOD)
    d["version"] = version
    d.update(changes)
    return d


async def test_snapshot_then_deltas_then_resync_after_restart() -> None:
    publisher = StatePublisher()
    publisher.publish(parse_state(doc("1")))
    server, port = await start_server(publisher)
    store = StateStore()
    connected: list[bool] = []
    source = ControllerSource(f"127.0.0.1:{port}", "n1", store, on_connected=connected.append,
                              backoff_initial=0.05, backoff_max=0.2)
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

"""The dashboard's server (ambit/dashboard/server.py) with a source that gathers a fixed mesh:
the page and its CSP, the static allowlist, the model, raw answers, and live updates over
server-sent events."""

from __future__ import annotations

import asyncio
import json

from aiohttp.test_utils import TestClient, TestServer

from ambit.dashboard import server
from ambit.dashboard.model import Gathered, NodeRaw

CONFIG = {"version": "3", "workloads": [
    {"name": "client", "namespace": "default", "node": "node-1", "addresses": ["10.0.0.2"],
     "labels": {"app": "client"}, "service_account": "client"}]}


class FakeSource:
    description = "a fixed mesh"

    def __init__(self) -> None:
        self.version = 0

    async def gather(self, raw: dict[str, bytes]) -> Gathered:
        self.version += 1
        raw["/raw/node/node-1/config_dump"] = json.dumps(CONFIG).encode()
        return Gathered(at=float(self.version), nodes=[NodeRaw("node-1", config=CONFIG)],
                        source=self.description)


async def _client(hub: server.Hub) -> TestClient:  # type: ignore[type-arg]
    client = TestClient(TestServer(server.make_app(hub)))
    await client.start_server()
    return client


async def test_page_model_raw_and_allowlist() -> None:
    hub = server.Hub(FakeSource(), interval=0.05)
    client = await _client(hub)
    try:
        r = await client.get("/api/model")
        assert r.status == 503  # before the first gather
        await hub.gather_once()
        r = await client.get("/")
        assert r.status == 200 and "Content-Security-Policy" in r.headers
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        assert "<script src=\"/static/app.js\">" in await r.text()
        model = await (await client.get("/api/model")).json()
        assert [w["id"] for w in model["workloads"]] == ["default/client"]
        assert model["gather"] == 1
        r = await client.get("/raw/node/node-1/config_dump")
        assert r.status == 200 and (await r.json())["version"] == "3"
        assert (await client.get("/raw/node/node-9/config_dump")).status == 404
        assert (await client.get("/static/app.js")).status == 200
        # only the allowlisted files: not the package files, not a path out of web/
        for path in ("/static/package.json", "/static/..%2Fserver.py", "/static/index.html"):
            assert (await client.get(path)).status == 404, path
        assert (await client.post("/api/model")).status == 405  # read-only
    finally:
        await client.close()


async def test_events_stream_each_new_model() -> None:
    hub = server.Hub(FakeSource(), interval=0.05)
    await hub.gather_once()
    client = await _client(hub)
    task = asyncio.create_task(hub.run())
    try:
        r = await client.get("/api/events")
        assert r.headers["Content-Type"] == "text/event-stream"
        seen: list[int] = []
        async with asyncio.timeout(5):
            while len(seen) < 3:
                line = (await r.content.readline()).decode()
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:])["gather"])
        # the newest model at once, then each new one, in order
        assert seen == sorted(seen) and len(set(seen)) == 3
        r.close()
    finally:
        task.cancel()
        await client.close()

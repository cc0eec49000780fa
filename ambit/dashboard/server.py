"""The dashboard's web server (aiohttp): the page, the model as JSON, live updates over SSE.

Why it exists: one process gathers (``gather``) every ``interval`` seconds, builds the model
(``model.build`` plus rates over the last ``model.RATE_WINDOW`` seconds) and hands it to every
open page as a server-sent event, so pages update without reloads or polling, however many are
open, and the mesh is asked once per interval whatever the number of viewers.

Read-only by construction: every route is a GET; nothing here writes to the registry or talks
to a component except to read what it already exposes. The page and its scripts are served by
this process (the graph library from ``web/node_modules``, installed by ``make``), with a
Content-Security-Policy of ``'self'``: the page works offline and loads nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from aiohttp import web

from ambit.dashboard import model
from ambit.dashboard.gather import Source

log = logging.getLogger("ambit.dashboard")

WEB_DIR = Path(__file__).parent / "web"
# The files the page may load, by URL name: nothing else under web/ is served.
STATIC = {
    "app.js": (WEB_DIR / "app.js", "text/javascript"),
    "style.css": (WEB_DIR / "style.css", "text/css"),
    "cytoscape.min.js": (WEB_DIR / "node_modules" / "cytoscape" / "dist" / "cytoscape.min.js",
                         "text/javascript"),
}
MAX_SUBSCRIBERS = 64
# cytoscape injects one fixed stylesheet for its container; its hash (for the version pinned in
# web/package-lock.json) is allowed, nothing else inline. The browser tests fail on any CSP
# violation, so a new version with another stylesheet is noticed.
CYTOSCAPE_STYLE = "'sha256-pgvDUBa4IjFA2yuSJ2cqcyxmNYJMborsd0ORcRv9vw8='"
CSP = (f"default-src 'self'; script-src 'self'; style-src 'self' {CYTOSCAPE_STYLE}; "
       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'")


class Hub:
    """The latest model, the raw answers it was built from, and the open event streams."""

    def __init__(self, source: Source, interval: float = 1.0) -> None:
        self.source = source
        self.interval = interval
        self.model: dict[str, Any] | None = None
        self.model_json = b""
        self.raw: dict[str, bytes] = {}
        self.history: deque[dict[str, Any]] = deque()
        self.subscribers: set[asyncio.Queue[bytes]] = set()
        self.gathers = 0

    async def gather_once(self) -> None:
        raw: dict[str, bytes] = {}
        g = await self.source.gather(raw)
        m = model.build(g)
        while self.history and m["at"] - self.history[0]["at"] > model.RATE_WINDOW:
            self.history.popleft()
        model.with_rates(m, self.history[0] if self.history else None)
        self.history.append(m)
        m["gather"] = self.gathers = self.gathers + 1
        self.model, self.raw = m, raw
        self.model_json = json.dumps(m, separators=(",", ":")).encode()
        for q in self.subscribers:
            if q.full():  # a slow page gets the newest model, never a backlog
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(self.model_json)

    async def run(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self.gather_once()
            except Exception:
                log.exception("gather failed; trying again")
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - t0)))


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers={
        "Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": CSP,
        "Cache-Control": "no-store"})


async def _static(request: web.Request) -> web.StreamResponse:
    entry = STATIC.get(request.match_info["name"])
    if entry is None:
        raise web.HTTPNotFound(text="no such file")
    path, ctype = entry
    if not path.exists():
        raise web.HTTPNotFound(text=f"{path} is missing: run `make setup` (it installs the "
                                    "dashboard's graph library with npm ci)")
    return web.FileResponse(path, headers={"Content-Type": ctype})


HUB = web.AppKey("hub", Hub)


def _hub(request: web.Request) -> Hub:
    return request.app[HUB]


async def _model(request: web.Request) -> web.StreamResponse:
    hub = _hub(request)
    if hub.model is None:
        raise web.HTTPServiceUnavailable(text="first gather not finished yet")
    return web.Response(body=hub.model_json, content_type="application/json")


async def _events(request: web.Request) -> web.StreamResponse:
    hub = _hub(request)
    if len(hub.subscribers) >= MAX_SUBSCRIBERS:
        raise web.HTTPServiceUnavailable(text=f"more than {MAX_SUBSCRIBERS} open pages")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-store"})
    await resp.prepare(request)
    q: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
    hub.subscribers.add(q)
    try:
        if hub.model_json:
            await resp.write(b"event: model\ndata: " + hub.model_json + b"\n\n")
        while True:
            try:
                data = await asyncio.wait_for(q.get(), timeout=15)
            except TimeoutError:
                await resp.write(b": keepalive\n\n")  # lets the page notice a dead server
                continue
            await resp.write(b"event: model\ndata: " + data + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        hub.subscribers.discard(q)
    return resp


async def _raw(request: web.Request) -> web.StreamResponse:
    body = _hub(request).raw.get(request.path)
    if body is None:
        raise web.HTTPNotFound(text=f"{request.path}: not in the last gather")
    ctype = "application/json" if body[:1] in (b"{", b"[") else "text/plain"
    return web.Response(body=body, content_type=ctype)


async def _healthz(request: web.Request) -> web.StreamResponse:
    hub = _hub(request)
    return web.json_response({"gathers": hub.gathers, "source": hub.source.description})


def make_app(hub: Hub) -> web.Application:
    app = web.Application()
    app[HUB] = hub
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/api/model", _model)
    app.router.add_get("/api/events", _events)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/raw/{tail:.+}", _raw)
    return app


async def serve(source: Source, host: str, port: int, interval: float = 1.0,
                ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled; the first gather runs before the port opens."""
    hub = Hub(source, interval)
    with contextlib.suppress(Exception):
        await hub.gather_once()
    runner = web.AppRunner(make_app(hub), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.warning("ambit dashboard on http://%s:%d/ (%s)", host, port, source.description)
    if ready is not None:
        ready.set()
    task = asyncio.create_task(hub.run())
    try:
        await asyncio.Event().wait()
    finally:
        task.cancel()
        await runner.cleanup()

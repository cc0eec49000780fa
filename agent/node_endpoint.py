"""The node metrics endpoint (15022): one scrape target per node for the agent and ztunnel.

Why it exists: Prometheus, ``ambit status`` and kubelet probes should not need to know that a
node runs two processes. ``GET /metrics`` serves the agent's registry followed by the ztunnel's
own ``/metrics`` (fetched from its loopback stats port on every scrape), with any family the
agent already exposes dropped from the ztunnel part so the merged text has no duplicates. When
the ztunnel does not answer, the agent part is still served, plus
``ambit_agent_ztunnel_scrape_up 0``, so a dead ztunnel is an alert rather than a failed scrape.
``/healthz/ready`` and ``/debug/pods`` answer from callables the agent supplies.

It reuses the ztunnel's h11 server (``serve_http``, which awaits a coroutine route, since
``/metrics`` awaits the ztunnel fetch) and ``Listener``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from agent.config import ZTUNNEL_METRICS_URL
from agent.node_metrics import NodeMetrics
from mesh.http_server import Response, serve_http
from mesh.listener import Listener, bind_socket
from mesh.ports import NODE_METRICS_PORT

log = logging.getLogger("agent.node_endpoint")

ZTUNNEL_FETCH_TIMEOUT = 1.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_UP = "ambit_agent_ztunnel_scrape_up"
ROUTES = ("/metrics", "/healthz/ready", "/healthz/live", "/debug/pods")

ReadyFn = Callable[[], tuple[bool, str]]
StatusFn = Callable[[], dict[str, Any]]

# Sample-name suffixes that belong to the family named in the preceding # HELP/# TYPE.
_SUFFIXES = ("_total", "_created", "_bucket", "_sum", "_count", "_info", "_gsum", "_gcount")


def _sample_name(line: str) -> str:
    end = len(line)
    for stop in ("{", " ", "\t"):
        i = line.find(stop)
        if i != -1:
            end = min(end, i)
    return line[:end]


def _header_name(line: str) -> str | None:
    """The metric name of a ``# HELP``/``# TYPE`` line, else None."""
    parts = line.split(None, 3)
    if len(parts) >= 3 and parts[0] == "#" and parts[1] in ("HELP", "TYPE"):
        return parts[2]
    return None


def _belongs(sample: str, family: str) -> bool:
    return sample == family or any(sample == family + s for s in _SUFFIXES)


def exposed_names(text: str) -> set[str]:
    """Every family name (from ``# HELP``/``# TYPE``) and sample name in an exposition."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#"):
            name = _header_name(line)
            if name is not None:
                names.add(name)
        elif line.strip():
            names.add(_sample_name(line))
    return names


def merge_exposition(agent: str, ztunnel: str | None) -> str:
    """The agent's exposition, ``ambit_agent_ztunnel_scrape_up`` (0 when ``ztunnel`` is None,
    i.e. unreachable), then the ztunnel's lines minus every family (header lines and samples)
    the agent part already has."""
    head = agent if not agent or agent.endswith("\n") else agent + "\n"
    head += (f"# HELP {SCRAPE_UP} 1 if the ztunnel's /metrics answered this scrape\n"
             f"# TYPE {SCRAPE_UP} gauge\n"
             f"{SCRAPE_UP} {0 if ztunnel is None else 1}\n")
    if not ztunnel:
        return head
    taken = exposed_names(head)
    out: list[str] = []
    family: str | None = None
    drop = False
    for line in ztunnel.splitlines():
        if not line.strip() or line.strip() == "# EOF":
            continue
        if line.startswith("#"):
            name = _header_name(line)
            if name is not None and name != family:
                family, drop = name, name in taken
            if not drop:
                out.append(line)
            continue
        sample = _sample_name(line)
        if family is None or not _belongs(sample, family):  # a sample without a header
            family, drop = sample, sample in taken
        if not drop and sample not in taken:
            out.append(line)
    return head + "".join(line + "\n" for line in out)


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


class NodeEndpoint:
    """``/metrics``, ``/healthz/ready`` and ``/debug/pods`` on ``host:port``.

    ``ready`` and ``status`` run on the event loop, so they must be quick; the registry is
    rendered in a worker thread (it reads the capture backend). ``ztunnel_metrics_url`` None
    serves the agent's metrics alone. ``port`` is the bound port once ``start`` returned.
    """

    def __init__(self, metrics: NodeMetrics, host: str = "0.0.0.0",
                 port: int = NODE_METRICS_PORT,
                 ztunnel_metrics_url: str | None = ZTUNNEL_METRICS_URL,
                 ready: ReadyFn | None = None, status: StatusFn | None = None) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.ztunnel_metrics_url = ztunnel_metrics_url
        self._ready = ready or (lambda: (True, "ready"))
        self._status = status or dict
        self._listener: Listener | None = None
        self._ztunnel_up: bool | None = None  # for logging state changes only

    async def start(self) -> None:
        """Bind and serve; raises ``mesh.listener.BindError`` if the port is taken."""
        sock = bind_socket(self.host, self.port)
        self._listener = Listener("node-metrics", sock, serve_http(self.route))
        self.port = self._listener.address[1]
        self._listener.start()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.drain(1.0)
            self._listener = None

    async def route(self, method: str, target: str) -> Response:
        path = target.split("?", 1)[0]
        if path not in ROUTES:
            return Response(404, f"no such endpoint {path}; try {', '.join(ROUTES)}\n".encode())
        if method != "GET":
            return Response(405, b"only GET\n")
        if path == "/metrics":
            return Response(200, await self.render_metrics(), METRICS_CONTENT_TYPE)
        if path == "/healthz/live":
            # The event loop answers; readiness (controller state, the ztunnel's listeners) is
            # not a reason to restart the agent.
            return Response(200, b"live\n")
        if path == "/healthz/ready":
            try:
                ok, why = self._ready()
            except Exception as e:
                ok, why = False, f"readiness check failed: {type(e).__name__}: {e}"
            return Response(200 if ok else 503, (why + "\n").encode())
        body = json.dumps(self._status(), indent=2, sort_keys=True, default=_json_default)
        return Response(200, (body + "\n").encode(), "application/json")

    async def render_metrics(self) -> bytes:
        render = asyncio.to_thread(self.metrics.render)
        if self.ztunnel_metrics_url is None:
            return await render
        agent, ztunnel = await asyncio.gather(render, self.fetch_ztunnel())
        return merge_exposition(agent.decode(), ztunnel).encode()

    async def fetch_ztunnel(self) -> str | None:
        """The ztunnel's exposition text, or None if it did not answer 200 within the timeout."""
        assert self.ztunnel_metrics_url is not None
        url, why = self.ztunnel_metrics_url, ""
        text: str | None = None
        try:
            timeout = aiohttp.ClientTimeout(total=ZTUNNEL_FETCH_TIMEOUT)
            async with aiohttp.ClientSession(timeout=timeout) as session, \
                    session.get(url) as resp:
                if resp.status == 200:
                    text = await resp.text(encoding="utf-8", errors="replace")
                else:
                    why = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        up = text is not None
        if up != self._ztunnel_up:
            if up:
                log.info("node endpoint: ztunnel metrics at %s answer", url)
            else:
                log.warning("node endpoint: ztunnel metrics at %s unavailable: %s", url, why)
            self._ztunnel_up = up
        return text

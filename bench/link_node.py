"""What the benchmark's capture drivers (bench/ebpf_node.py, bench/inpod_node.py) share.

Why it exists: both play the node agent's part in a bench node namespace, so both serve the
agent's ``ZtunnelLinkServer`` until SIGTERM and report their progress in JSON files the bench
polls; one copy of that keeps the two drivers about their capture mode only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from agent.ztunnel_link import OnListeners, ZtunnelLinkServer


def write_json(path: Path, doc: object) -> None:
    """Whole or absent: the bench polls for the file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


@contextlib.asynccontextmanager
async def serving_link(socket_path: Path,
                       on_listeners: OnListeners) -> AsyncIterator[tuple[ZtunnelLinkServer,
                                                                          asyncio.Event]]:
    """The agent's link server on ``socket_path`` (the ztunnel's ``--agent-socket``), and an
    event set by SIGTERM or SIGINT; the server is closed on the way out."""
    link = ZtunnelLinkServer(socket_path, on_listeners, uids=None)
    await link.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield link, stop
    finally:
        await link.close()

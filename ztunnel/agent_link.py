"""The ztunnel's end of the link to the node agent: hand over the capture listeners.

Why it exists: in eBPF redirect mode the agent's tc programs deliver captured connections
straight into the ztunnel's listening sockets (``bpf_sk_assign``), so the agent must hold them
in a SOCKMAP. With ``--agent-socket`` the ztunnel connects after binding, sends one JSON line
``{"listeners": [names]}`` with the sockets attached (SCM_RIGHTS), waits for ``{"ok": true}``
and keeps the connection open; when it breaks (the agent restarted) it reconnects with backoff
and sends them again. In iptables mode the link is harmless: TPROXY finds listeners by port.
The agent's side is ``agent/ztunnel_link.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("ztunnel.agent_link")


class AgentLink:
    def __init__(self, path: Path, listeners: Mapping[str, socket.socket],
                 backoff_initial: float = 0.2, backoff_max: float = 5.0) -> None:
        self.path = path
        self.listeners = dict(listeners)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.registered = asyncio.Event()
        self.last_error = ""

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, str(self.path))
            names = list(self.listeners)
            payload = json.dumps({"listeners": names}).encode() + b"\n"
            fds = [self.listeners[n].fileno() for n in names]
            # Small and the socket is fresh: sendmsg completes at once.
            socket.send_fds(sock, [payload], fds)
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
                if not chunk:
                    raise ConnectionError("the agent closed the link before answering")
                answer += chunk
            reply = json.loads(answer)
            if not reply.get("ok"):
                raise ConnectionError(f"the agent refused the listeners: {reply.get('error')}")
            self.registered.set()
            self.last_error = ""
            log.info("handed the capture listeners (%s) to the node agent at %s",
                     ", ".join(names), self.path)
            while await loop.sock_recv(sock, 1024):
                pass
            log.warning("the node agent closed the link; reconnecting")
        finally:
            self.registered.clear()
            sock.close()

    async def run(self) -> None:
        delay = self.backoff_initial
        while True:
            try:
                await self._session()
                delay = self.backoff_initial
            except asyncio.CancelledError:
                raise
            except (TimeoutError, OSError, ValueError) as e:
                if str(e) != self.last_error:
                    log.warning("node agent at %s: %s; retrying", self.path, e)
                self.last_error = str(e)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.backoff_max)

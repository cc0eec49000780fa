"""The agent's CNI endpoint: ``ambit-cni`` (a chained CNI plugin) reports pods here.

Why it exists: a CNI plugin is a short-lived process the container runtime runs for every pod
sandbox, with no state of its own. It forwards what the runtime told it (pod name and
namespace, network namespace, the IPs and host-side interface the main plugin created) to the
long-lived agent over a Unix socket and waits for the answer, so a mesh pod's containers start
only once its capture is in place. One request per connection: a JSON object and a newline
each way. The plugin's side is ``agent/cni/plugin.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("agent.cni")

MAX_REQUEST = 64 * 1024
OPS = ("add", "del", "check")


class CniRequestError(ValueError):
    """A malformed request from the plugin; answered with ok=false."""


@dataclass(frozen=True)
class CniRequest:
    op: str
    container_id: str
    netns: str
    ifname: str
    pod_name: str
    pod_namespace: str
    pod_uid: str
    ips: tuple[str, ...]
    host_iface: str

    @property
    def uid(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}"

    @classmethod
    def parse(cls, raw: Any) -> CniRequest:
        if not isinstance(raw, dict):
            raise CniRequestError("expected a JSON object")
        op = raw.get("op")
        if op not in OPS:
            raise CniRequestError(f"op: {op!r} is not one of {', '.join(OPS)}")

        def text(key: str, required: bool = False) -> str:
            value = raw.get(key, "")
            if not isinstance(value, str):
                raise CniRequestError(f"{key}: expected a string")
            if required and not value:
                raise CniRequestError(f"{key}: required for {op}")
            return value

        ips = raw.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
            raise CniRequestError("ips: expected a list of strings")
        need_pod = op != "del"
        return cls(op=op, container_id=text("containerId", True), netns=text("netns"),
                   ifname=text("ifname"), pod_name=text("podName", need_pod),
                   pod_namespace=text("podNamespace", need_pod), pod_uid=text("podUid"),
                   ips=tuple(ips), host_iface=text("hostIface"))


Handler = Callable[[CniRequest], Awaitable[dict[str, Any]]]


class CniServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, str(self.path),
                                                       limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
                request = CniRequest.parse(json.loads(line))
            except (ValueError, asyncio.LimitOverrunError) as e:
                answer: dict[str, Any] = {"ok": False, "error": f"bad request: {e}"}
            except TimeoutError:
                return
            else:
                try:
                    answer = await self.handler(request)
                except Exception as e:  # one bad pod must not take the endpoint down
                    log.exception("CNI %s for %s failed", request.op, request.uid)
                    answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

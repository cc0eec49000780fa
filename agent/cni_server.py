"""The agent's CNI endpoint: the CNI plugin reports pods here, in one of two shapes.

Why it exists: a CNI plugin is a short-lived process the container runtime runs for every pod
sandbox, with no state of its own. It forwards what the runtime told it (pod name and
namespace, network namespace, the IPs and host-side interface the main plugin created) to the
long-lived agent over a Unix socket and waits for the answer, so a mesh pod's containers start
only once its capture is in place. One request per connection: a JSON object and a newline
each way.

Two kinds of request share the socket:

* the agent protocol (``op`` add/del/check, answered ``{"ok": ..., "captured", "reason",
  "error"}``): sent by the ``ambit-cni`` Python executable (``agent/cni/plugin.py``), which
  ran the CNI logic itself;
* ``{"op": "exec", "env": {"CNI_COMMAND": ..., ...}, "stdin": "<network config>"}``: sent by
  the static host binary (``agent/cni/shim/ambit-cni.c``), which the runtime executes on a
  real node where no Python exists. The agent runs the plugin itself (``plugin.handle``, in a
  worker thread, asking its own handler in-process instead of over the socket) and answers
  ``{"exit": N, "stdout": "...", "stderr": "..."}``: what the plugin process would have
  printed and returned. Strings carry bytes as Python's ``surrogateescape`` does (valid UTF-8
  as text, any other byte as ``\\udcXX``), so ``env`` is what ``os.environ`` would hold and
  ``stdin`` encodes back to the exact bytes the runtime wrote. A malformed exec request is
  answered ``{"ok": false, "error": "bad request: ..."}``, which the shim reports as an
  invalid answer (code 101, failure policy applies), as it does for an agent too old to know
  ``exec``.

Who may ask: the socket is 0600 and only peers whose uid the agent allows (``SO_PEERCRED``:
root, which the runtime runs the plugin as, and the agent's own user; ``--socket-uid`` for
more) are served. Anyone else gets ``{"ok": false, "error": ...}`` naming the reason and is
closed, logged (rate limited) and counted (``refusals``), without reaching the handler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import io
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cni import plugin, spec
from mesh.jsonline import decode_json
from mesh.unix import RefusalLog, allowed_uids, bind_unix, peer_cred, uid_problem

log = logging.getLogger("agent.cni")

# An exec request carries the whole network config (the shim reads at most 1 MiB of it, which
# JSON escaping can grow six-fold); agent-protocol requests are a few hundred bytes.
MAX_REQUEST = 16 * 1024 * 1024
OPS = ("add", "del", "check")
EXEC_OP = "exec"
# Plugin runs at once; each blocks a thread for at most its config's timeoutSeconds.
EXEC_WORKERS = 16
SOCKET_MODE = 0o600
UID_FLAG = "--socket-uid"


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


@dataclass(frozen=True)
class ExecRequest:
    """What the host binary was given: its ``CNI_*`` variables and the bytes of its stdin."""

    env: Mapping[str, str]
    stdin: bytes

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ExecRequest:
        env = raw.get("env")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise CniRequestError("env: expected an object of strings")
        stdin = raw.get("stdin", "")
        if not isinstance(stdin, str):
            raise CniRequestError("stdin: expected a string")
        try:
            data = stdin.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as e:
            raise CniRequestError(f"stdin: not a surrogateescape string ({e})") from None
        # Only the CNI variables: the plugin reads nothing else from its environment.
        return cls({k: v for k, v in env.items() if k.startswith("CNI_")}, data)


def decode_request(line: bytes) -> Any:
    """A request line as JSON; ``CniRequestError`` (a ``ValueError``) if it is not JSON.

    ``json.loads`` raises ``RecursionError``, not ``ValueError``, on deeply nested input
    (``[[[...``): that is a malformed request like any other, not a crash of the endpoint.
    """
    try:
        return decode_json(line)
    except ValueError as e:
        raise CniRequestError(str(e)) from None


Handler = Callable[[CniRequest], Awaitable[dict[str, Any]]]


class CniServer:
    def __init__(self, path: Path, handler: Handler, *, uids: Set[int] | None = None) -> None:
        self.path = path
        self.handler = handler
        self.uids = allowed_uids() if uids is None else frozenset(uids)
        self.refusals = RefusalLog(log)
        self._server: asyncio.AbstractServer | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        # 0600 from creation (mesh/unix.py): the plugin runs as root, run by the runtime.
        sock = bind_unix(self.path, SOCKET_MODE)
        self._pool = concurrent.futures.ThreadPoolExecutor(EXEC_WORKERS, "cni-exec")
        self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                       limit=MAX_REQUEST)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            problem = self._peer_problem(writer)
            if problem is not None:
                self.refusals.refused(f"CNI socket: {problem}")
                writer.write(json.dumps({"ok": False, "error": problem}).encode() + b"\n")
                await writer.drain()
                return
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
                raw = decode_request(line)
            except (ValueError, asyncio.LimitOverrunError) as e:
                answer: dict[str, Any] = {"ok": False, "error": f"bad request: {e}"}
            except TimeoutError:
                return
            else:
                if isinstance(raw, dict) and raw.get("op") == EXEC_OP:
                    answer = await self._exec(raw)
                else:
                    answer = await self.answer(raw)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _peer_problem(self, writer: asyncio.StreamWriter) -> str | None:
        """Why the peer on this connection may not use the socket (None: it may)."""
        sock = writer.get_extra_info("socket")
        if sock is None:
            return "cannot read the peer's credentials (no socket)"
        return uid_problem(peer_cred(sock), self.uids, str(self.path), UID_FLAG)

    async def answer(self, raw: Any) -> dict[str, Any]:
        """The answer to one agent-protocol request (already decoded from JSON)."""
        try:
            request = CniRequest.parse(raw)
        except CniRequestError as e:
            return {"ok": False, "error": f"bad request: {e}"}
        try:
            return await self.handler(request)
        except Exception as e:  # one bad pod must not take the endpoint down
            log.exception("CNI %s for %s failed", request.op, request.uid)
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    async def _exec(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        try:
            req = ExecRequest.parse(raw)
        except CniRequestError as e:
            return {"ok": False, "error": f"bad request: {e}"}
        assert self._pool is not None  # start() ran: we are serving
        loop = asyncio.get_running_loop()
        err = io.StringIO()
        run = functools.partial(plugin.handle, req.env, req.stdin, self._ask_in_process(loop),
                                err_out=err)
        try:
            stdout, code = await loop.run_in_executor(self._pool, run)
        except RuntimeError as e:  # the pool is shut down: the agent is stopping
            return {"ok": False, "error": f"the node agent is shutting down ({e})"}
        stderr = err.getvalue()
        for line in stderr.splitlines():
            log.info("CNI %s (host binary): %s", req.env.get("CNI_COMMAND", "?"), line)
        return {"exit": code, "stdout": stdout.decode("utf-8", "surrogateescape"),
                "stderr": stderr}

    def _ask_in_process(self, loop: asyncio.AbstractEventLoop) -> plugin.AskAgent:
        """``AskAgent`` for ``plugin.handle`` in a worker thread: the handler, on our loop.

        Same contract as the socket call: the same request validation and error answers
        (``answer``), the answer decoded by ``spec.parse_agent_response``, and no answer
        within ``timeoutSeconds`` is ``AgentUnavailable`` with the socket call's wording. As
        on the socket, a handler that overruns the timeout is not cancelled.
        """

        def ask(conf: spec.NetConf, request: Mapping[str, Any]) -> spec.AgentAnswer:
            try:
                future = asyncio.run_coroutine_threadsafe(self.answer(dict(request)), loop)
            except RuntimeError:  # the loop is closed
                raise plugin.AgentUnavailable("the node agent is shutting down") from None
            try:
                answer = future.result(min(conf.timeout_seconds, plugin.MAX_WAIT_SECONDS))
            except TimeoutError:
                raise plugin.AgentUnavailable(
                    f"no answer within {conf.timeout_seconds:g}s"
                ) from None
            except concurrent.futures.CancelledError:
                raise plugin.AgentUnavailable("the node agent is shutting down") from None
            return spec.parse_agent_response(json.dumps(answer).encode())

        return ask

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.path.unlink(missing_ok=True)

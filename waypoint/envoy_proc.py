"""The Envoy child process and its admin API, as the waypoint agent uses them.

Why it exists: the agent owns Envoy's lifecycle the way pilot-agent does. Envoy runs in its own
session (a terminal's Ctrl-C reaches the agent only, which then drains Envoy) and gets SIGTERM
if the agent dies (``PR_SET_PDEATHSIG``), so a killed agent never leaves an Envoy holding the
waypoint's ports. Envoy's log (stderr and stdout) is parsed line by line into the agent's log
under ``waypoint.envoy`` at Envoy's own level, and the last lines are kept to explain an
unexpected exit. Hot restart is disabled: each Envoy is alone with its agent, and several
waypoints on one host must not share a shared-memory region.

``EnvoyAdmin`` is the small slice of the admin API (loopback only) the agent needs: readiness
(``/ready``, ``/listeners``), draining (``/drain_listeners?graceful``), certificates
(``/certs``) and stats (``/stats/prometheus``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import logging
import math
import re
import shlex
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("waypoint.envoy")

# "[%l][%n] %v": level and logger name first, so lines map to our levels.
LOG_FORMAT = "[%l][%n] %v"
_LINE = re.compile(r"^\[(?P<level>[a-z]+)\]\[(?P<logger>[^\]]*)\] ?(?P<msg>.*)$")
_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
_PR_SET_PDEATHSIG = 1
TAIL_LINES = 20


def envoy_command(binary: str, bootstrap: Path, concurrency: int, log_level: str,
                  drain_seconds: float) -> list[str]:
    """The Envoy command line for a waypoint."""
    return [binary, "-c", str(bootstrap), "--concurrency", str(concurrency),
            "--log-level", log_level, "--log-format", LOG_FORMAT,
            "--drain-time-s", str(max(0, math.ceil(drain_seconds))),
            "--drain-strategy", "gradual", "--disable-hot-restart"]


def parse_log_line(line: str) -> tuple[int, str]:
    """(logging level, message) of one Envoy log line in ``LOG_FORMAT``; anything else
    (a crash dump, a line from before logging started) is a warning, as is."""
    m = _LINE.match(line)
    if m is None or m["level"] not in _LEVELS:
        return logging.WARNING, line
    return _LEVELS[m["level"]], f"[{m['logger']}] {m['msg']}"


def _death_signal() -> Callable[[], None] | None:
    """A preexec function that asks the kernel to SIGTERM the child when we die. The ctypes
    function is resolved here, before the fork, so the child only makes one call."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return preexec


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"


class EnvoyProcess:
    """One Envoy: start, watch, drain, stop."""

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._pump: asyncio.Task[None] | None = None
        self.stopping = False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        log.info("starting Envoy: %s", shlex.join(self.command))
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=_death_signal())
        self._pump = asyncio.create_task(self._read_log())

    async def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        stream = self.proc.stdout
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream limit: take what is there
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not line:
                continue
            self.tail.append(line)
            level, msg = parse_log_line(line)
            if self.stopping:  # streams closing because we stopped it are not news
                level = min(level, logging.INFO)
            log.log(level, "%s", msg)

    async def wait(self) -> int:
        """Wait for Envoy to exit and for its last log lines; its return code."""
        assert self.proc is not None
        code = await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._pump), 2)
        return code

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM (Envoy exits at once, closing connections), SIGKILL after ``grace``."""
        self.stopping = True
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                log.warning("Envoy (pid %d) did not exit %.0fs after SIGTERM; killing it",
                            self.proc.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        code = await self.wait()
        if self._pump is not None:
            self._pump.cancel()
        return code


class EnvoyAdmin:
    """Envoy's admin API on 127.0.0.1:``port``."""

    def __init__(self, port: int, timeout: float = 2.0) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str) -> tuple[int, str]:
        """(status, body); raises ``OSError``-like errors (``aiohttp.ClientError``,
        ``TimeoutError``) when the admin port does not answer."""
        async with self._client().request(method, self.base + path) as resp:
            return resp.status, await resp.text(encoding="utf-8", errors="replace")

    async def server_state(self) -> str:
        """``LIVE``, ``PRE_INITIALIZING``, ``INITIALIZING`` or ``DRAINING``."""
        _, body = await self.request("GET", "/ready")
        return body.strip()

    async def listeners(self) -> list[str]:
        status, body = await self.request("GET", "/listeners?format=json")
        if status != 200:
            raise aiohttp.ClientError(f"/listeners answered HTTP {status}")
        doc = json.loads(body)
        return [str(item.get("name", "")) for item in doc.get("listener_statuses", [])]

    async def certs(self) -> dict[str, Any]:
        _, body = await self.request("GET", "/certs")
        result: dict[str, Any] = json.loads(body)
        return result

    async def drain_listeners(self) -> None:
        status, body = await self.request("POST", "/drain_listeners?graceful")
        if status != 200:
            raise aiohttp.ClientError(f"/drain_listeners answered HTTP {status}: "
                                      f"{body.strip()}")

    async def stats_prometheus(self) -> str:
        status, body = await self.request("GET", "/stats/prometheus")
        if status != 200:
            raise aiohttp.ClientError(f"/stats/prometheus answered HTTP {status}")
        return body

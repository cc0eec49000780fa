"""The agent's end of the ztunnel link: the node's ztunnel hands over its listening sockets.

Why it exists: in eBPF mode the tc programs steer packets into the ztunnel's listeners with
``bpf_sk_assign``, which needs those sockets in a SOCKMAP, and only a process holding the
sockets can put them there. The ztunnel connects to ``<run dir>/ztunnel.sock`` after binding
and sends one JSON line naming its capture listeners, with their descriptors attached
(SCM_RIGHTS); the agent stores them in the pinned SOCKMAP and answers ``{"ok": true}``. The
connection stays open: the ztunnel re-sends after a restart of either side, and the agent
learns the ztunnel's pid (SO_PEERCRED) for the node metrics. The SOCKMAP holds its own
reference, so the agent closes its copies right away; when the ztunnel exits, the kernel
drops its sockets from the map and new captured connections fail closed until it is back.

What it accepts: exactly the capture listeners (``LISTENER_SLOTS``: outbound, inbound,
inbound_plaintext), each a listening TCP socket (``registration_problem``); anything else is
answered with the reason and leaves the SOCKMAP as it was.

Who may register: the socket is 0600 and the agent serves only peers whose uid it allows
(``SO_PEERCRED``: root and its own user, ``--socket-uid`` for more), and, unless
``--ztunnel-peer-check off``, only a peer that is an ``ambit ztunnel`` process
(``ztunnel_problem``). Anyone else is answered with the reason, closed, logged (rate limited)
and counted (``refusals``); the SOCKMAP is not touched.

Pod start: once registered, the link also carries the agent's requests the other way
(``pod_added`` at CNI ADD, ``pod_deleted`` at DEL), one JSON line each, answered by the ztunnel
with a line carrying the request's ``id`` (``request``). ADD of a mesh pod returns only after the
ztunnel has the pod's workload in its store and has started fetching its certificate, so the
pod's first connection is never refused as "unknown source".

Wire format (both sides): ``ztunnel/agent_link.py`` is the client.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.capture.base import LISTENER_SLOTS
from mesh.ratelimit import RateLimitedLog
from mesh.unix import PeerCred, RefusalLog, allowed_uids, bind_unix, peer_cred, uid_problem

log = logging.getLogger("agent.ztunnel_link")

MAX_MESSAGE = 4096
# The longest request line (ztunnel/agent_link.py has the same limit; layers never import each
# other) and answer line read back.
MAX_REQUEST = 16384
MAX_FDS = 8
SOCKET_MODE = 0o600
PEER_CHECK_CMDLINE = "cmdline"
PEER_CHECK_OFF = "off"
PEER_CHECKS = (PEER_CHECK_CMDLINE, PEER_CHECK_OFF)
UID_FLAG = "--socket-uid"
# Interpreter options that take a value in the next argument (``python -X dev ambit ...``).
_PYTHON_VALUE_OPTIONS = frozenset({"-X", "-W", "--check-hash-based-pycs"})

OnListeners = Callable[[Mapping[str, int], int], Awaitable[None]]  # (name -> fd, pid)


def _recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - (len(data) % fds.itemsize)
            fds.frombytes(data[:usable])
    return msg, list(fds)


@dataclass(frozen=True)
class SocketKind:
    """What the kernel says a received descriptor is (``SO_DOMAIN``, ``SO_TYPE``,
    ``SO_PROTOCOL``, ``SO_ACCEPTCONN``)."""

    family: int
    type: int
    protocol: int
    listening: bool


TCP_LISTENER = SocketKind(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, True)


def socket_kind(fd: int) -> SocketKind | None:
    """The kind of socket ``fd`` is; None if it is not a socket."""
    # Work on a duplicate, closed here; ``fd`` itself stays open. (Not socket.fromfd: it
    # leaks its duplicate when ``fd`` is not a socket.)
    dup = os.dup(fd)
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=dup)
    except OSError:
        os.close(dup)
        return None
    with sock:
        try:
            return SocketKind(sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN),
                              sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
                              sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL),
                              sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
        except OSError:  # ENOTSOCK: a pipe, a file, ...
            return None


def listener_names_problem(names: Sequence[str]) -> str | None:
    """Why ``names`` is not a listener set the agent accepts (None: it is).

    Exactly the capture listeners (``LISTENER_SLOTS``), each once: the backend empties the slot
    of a name it is not given, so a partial or empty set would quietly stop capture for the
    missing listeners, and an unknown name has no slot.
    """
    expected = ", ".join(LISTENER_SLOTS)
    fix = (f"the ztunnel must hand over exactly its capture listeners ({expected}), one "
           "descriptor each: run it with --inbound-bind shared, at the agent's version")
    if not names:
        return f"no listeners (it would empty every SOCKMAP slot); {fix}"
    twice = sorted({n for n in names if names.count(n) > 1})
    missing = [n for n in LISTENER_SLOTS if n not in names]
    unknown = sorted({n for n in names if n not in LISTENER_SLOTS})
    wrong = [f"{what}: {', '.join(which)}" for what, which in
             (("missing", missing), ("unknown", unknown), ("named twice", twice)) if which]
    return f"{'; '.join(wrong)}; {fix}" if wrong else None


def listener_fd_problem(name: str, kind: SocketKind | None) -> str | None:
    """Why the descriptor sent for ``name`` cannot go into the SOCKMAP (None: it can)."""
    if kind is None:
        return f"{name}: the descriptor is not a socket"
    if kind.family not in (socket.AF_INET, socket.AF_INET6) or \
            kind.type != socket.SOCK_STREAM or kind.protocol != socket.IPPROTO_TCP:
        return (f"{name}: not a TCP socket (family {kind.family}, type {kind.type}, protocol "
                f"{kind.protocol})")
    if not kind.listening:
        return f"{name}: a TCP socket that is not listening (listen() before handing it over)"
    return None


def registration_problem(names: Sequence[str], kinds: Sequence[SocketKind | None]) -> str | None:
    """Why a registration of ``names`` with descriptors of ``kinds`` (in the same order) is
    refused; None if the agent may put them into the SOCKMAP."""
    problem = listener_names_problem(names)
    if problem is not None:
        return problem
    if len(kinds) != len(names):
        return (f"{len(names)} listener name(s) but {len(kinds)} descriptor(s); send one "
                "descriptor per name, in the same order (SCM_RIGHTS)")
    fd_problems = [p for n, k in zip(names, kinds, strict=True)
                   if (p := listener_fd_problem(n, k)) is not None]
    return "; ".join(fd_problems) or None


def is_ztunnel_argv(argv: Sequence[str]) -> bool:
    """``argv`` runs ``ambit ztunnel``: the ``ambit`` script itself, the script run by a Python
    interpreter (``python3 /usr/local/bin/ambit ztunnel ...``, how a console script shows in
    /proc), or ``python -m ambit.cli ztunnel``."""
    args = list(argv)
    if args and os.path.basename(args[0]).startswith("python"):
        args.pop(0)
        while args and args[0].startswith("-") and args[0] != "-m":
            option = args.pop(0)
            if option == "-c" or option == "-":  # code from the command line or stdin
                return False
            if option in _PYTHON_VALUE_OPTIONS and args:
                args.pop(0)
        if args[:1] == ["-m"]:
            return args[1:2] in (["ambit"], ["ambit.cli"]) and args[2:3] == ["ztunnel"]
    return (len(args) >= 2 and os.path.basename(args[0]) == "ambit"
            and args[1] == "ztunnel")


def read_cmdline(pid: int) -> list[str] | None:
    """The command line of ``pid`` from /proc, None if it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else None


def ztunnel_problem(peer: PeerCred, argv: Sequence[str] | None) -> str | None:
    """Why ``peer`` (whose command line is ``argv``, None if unreadable) is not the node's
    ztunnel; None if it is.

    Why the command line: the uid cannot tell the ztunnel apart (it runs as root, like every
    process that could reach a 0600 root socket), and its pid is not known in advance (it
    restarts on its own), but its command line is: ``ambit ztunnel``. A process that is not
    one (a stray tool, a test client, a mistaken ``socat``) cannot replace or clear the
    capture listeners. It is not a boundary against root, who could exec ``ambit ztunnel``
    with its own listeners or write the pinned maps directly; the 0600 mode and the uid check
    keep everyone else out.
    """
    off = f"--ztunnel-peer-check {PEER_CHECK_OFF} skips this check"
    if peer.pid == 0:
        return (f"a peer with uid {peer.uid} in a PID namespace the agent cannot see (SO_PEERCRED "
                "pid 0), so the agent cannot tell it is `ambit ztunnel`: run the agent and the "
                "ztunnel in one PID namespace (one pod with shareProcessNamespace: true, as "
                f"deploy/daemonset/node.yaml does, or both on the host), or {off}")
    if argv is None:
        return (f"pid {peer.pid} (uid {peer.uid}) exited or hid /proc/{peer.pid}/cmdline before "
                "the agent could check it is `ambit ztunnel`")
    if is_ztunnel_argv(argv):
        return None
    shown = " ".join(argv)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    return (f"pid {peer.pid} (uid {peer.uid}) is not an `ambit ztunnel` process (its command "
            f"line: {shown!r}); only the node's ztunnel may register capture listeners ({off})")


class LinkUnavailable(Exception):
    """A request to the ztunnel could not be carried out: no ztunnel linked, no answer in
    time, or refused (the message says which, and what to do)."""


@dataclass
class _Session:
    """One registered ztunnel's link: requests sent on it wait for their answer here."""

    conn: socket.socket
    pid: int
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def parse_answer(line: bytes) -> tuple[int, str | None]:
    """A ztunnel's answer line: (request id, None if ok else the reason it refused)."""
    doc = json.loads(line)
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), int):
        raise ValueError(f"not an answer to a request: {line[:200]!r}")
    if doc.get("ok") is True:
        return doc["id"], None
    return doc["id"], str(doc.get("error", "refused without a reason"))[:1000]


class ZtunnelLinkServer:
    def __init__(self, path: Path, on_listeners: OnListeners, *,
                 uids: Set[int] | None = None,
                 peer_check: str = PEER_CHECK_CMDLINE) -> None:
        if peer_check not in PEER_CHECKS:
            raise ValueError(f"peer_check: {peer_check!r} is not one of {', '.join(PEER_CHECKS)}")
        self.path = path
        self.on_listeners = on_listeners
        self.uids = allowed_uids() if uids is None else frozenset(uids)
        self.peer_check = peer_check
        self.refusals = RefusalLog(log)
        # Bad registrations and lines: a process that passes the peer check can still send
        # rubbish as fast as it likes; one line per kind every 10 s, the rest counted.
        self.bad_messages = RateLimitedLog(log, what="refused")
        self.ztunnel_pid: int | None = None
        self.registrations = 0
        self._server: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._session: _Session | None = None
        self._linked = asyncio.Event()
        self._next_id = 0

    async def request(self, message: Mapping[str, Any], within: float) -> None:
        """Send ``message`` (an ``op`` and its fields; the id is added here) to the registered
        ztunnel and wait for its answer, for at most ``within`` seconds in all, including the
        wait for a ztunnel to register. Raises ``LinkUnavailable`` with the reason."""
        deadline = time.monotonic() + within
        try:
            await asyncio.wait_for(self._linked.wait(), within)
        except TimeoutError:
            raise LinkUnavailable(
                f"no ztunnel has registered on {self.path} within {within:g}s: is the node's "
                "ztunnel running with --agent-socket pointing here (and --inbound-bind "
                "shared)?") from None
        session = self._session
        assert session is not None
        self._next_id += 1
        request_id = self._next_id
        line = json.dumps({**message, "id": request_id}).encode() + b"\n"
        if len(line) > MAX_REQUEST:
            raise LinkUnavailable(f"{message.get('op')} request of {len(line)} bytes is over "
                                  f"the link's {MAX_REQUEST}-byte limit (too many labels?)")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        session.pending[request_id] = fut
        loop = asyncio.get_running_loop()
        try:
            async with session.write_lock:  # one line at a time, never interleaved
                await asyncio.wait_for(loop.sock_sendall(session.conn, line),
                                       max(0.0, deadline - time.monotonic()))
            reply = await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise LinkUnavailable(
                f"the ztunnel (pid {session.pid}) did not answer {message.get('op')} within "
                f"{within:g}s; see its log") from None
        except OSError as e:
            raise LinkUnavailable(f"the link to the ztunnel (pid {session.pid}) broke: "
                                  f"{e}") from None
        finally:
            session.pending.pop(request_id, None)
        if reply.get("error") is not None:
            raise LinkUnavailable(f"the ztunnel refused {message.get('op')}: {reply['error']}")

    async def start(self) -> None:
        # 0600 from creation (mesh/unix.py): the ztunnel runs as root, like the agent.
        self._server = bind_unix(self.path, SOCKET_MODE, backlog=8)
        self._task = asyncio.create_task(self._accept())

    async def _accept(self) -> None:
        assert self._server is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._server)
            try:
                peer = peer_cred(conn)
            except OSError:
                conn.close()
                continue
            problem = self.peer_problem(peer)
            if problem is not None:
                self.refusals.refused(f"ztunnel link: {problem}")
                with contextlib.suppress(OSError):  # fresh socket, empty buffer: never blocks
                    conn.send(json.dumps({"ok": False, "error": problem}).encode() + b"\n")
                conn.close()
                continue
            task = asyncio.create_task(self._serve(conn, peer.pid))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    def peer_problem(self, peer: PeerCred) -> str | None:
        """Why ``peer`` may not use the link (None: it may)."""
        problem = uid_problem(peer, self.uids, str(self.path), UID_FLAG)
        if problem is None and self.peer_check == PEER_CHECK_CMDLINE:
            # Read at accept time: the pid is the one that connected, still connected.
            problem = ztunnel_problem(peer, read_cmdline(peer.pid) if peer.pid else None)
        return problem

    async def _serve(self, conn: socket.socket, pid: int) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        registered = False
        try:
            conn.setblocking(False)
            await asyncio.wait_for(_readable(conn), 10)
            msg, fds = _recv_with_fds(conn)
            request = json.loads(msg.decode().strip() or "null")
            names = request.get("listeners") if isinstance(request, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"expected {{\"listeners\": [names]}} with one descriptor "
                                 f"each; got {msg[:200]!r} with {len(fds)} descriptor(s)")
            # Checked before anything reaches the SOCKMAP: a refused registration leaves the
            # current listeners in place (the backend empties the slot of a missing name).
            problem = registration_problem(names, [socket_kind(fd) for fd in fds])
            if problem is not None:
                raise ValueError(f"registration from pid {pid} refused: {problem}")
            await self.on_listeners(dict(zip(names, fds, strict=True)), pid)
            self.ztunnel_pid = pid
            registered = True
            self.registrations += 1
            log.info("ztunnel pid %d registered its listeners: %s", pid, ", ".join(names))
            await loop.sock_sendall(conn, b'{"ok": true}\n')
            # Keep the link open until the ztunnel goes away, so its pid stays current; it
            # carries the requests (pod start) and their answers from now on.
            session = _Session(conn, pid)
            self._session = session
            self._linked.set()
            try:
                await self._read_answers(session)
            finally:
                for fut in session.pending.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("the ztunnel closed the link"))
                if self._session is session:
                    self._session = None
                    self._linked.clear()
            log.info("ztunnel pid %d closed the link", pid)
        except Exception as e:  # a bad message, or the SOCKMAP update failed: keep serving
            bad_input = isinstance(e, TimeoutError | OSError | ValueError)
            if bad_input:
                self.bad_messages.log("registration", "ztunnel link: %s", e)
            else:
                log.error("ztunnel link: cannot use the listeners: %s", e)
            with contextlib.suppress(OSError):
                await loop.sock_sendall(conn, json.dumps({"ok": False, "error": str(e)})
                                        .encode() + b"\n")
        finally:
            if registered and self.ztunnel_pid == pid:  # its link is gone, so is it
                self.ztunnel_pid = None
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    async def _read_answers(self, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        buffer = b""
        while chunk := await loop.sock_recv(session.conn, 65536):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    request_id, problem = parse_answer(line)
                except ValueError as e:
                    self.bad_messages.log("answer", "ztunnel link: ignoring a line from pid %d: "
                                          "%s", session.pid, e)
                    continue
                fut = session.pending.get(request_id)
                if fut is not None and not fut.done():
                    fut.set_result({"error": problem})
            if len(buffer) > MAX_REQUEST:
                raise ValueError(f"the ztunnel (pid {session.pid}) sent a line over "
                                 f"{MAX_REQUEST} bytes")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for t in list(self._conns):
            t.cancel()
        if self._server is not None:
            self._server.close()
        self.path.unlink(missing_ok=True)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())

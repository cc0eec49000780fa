"""The agent's end of the ztunnel link: the node's ztunnel hands over its listening sockets.

Why it exists: in eBPF mode the tc programs steer packets into the ztunnel's listeners with
``bpf_sk_assign``, which needs those sockets in a SOCKMAP, and only a process holding the
sockets can put them there. The ztunnel connects to ``<run dir>/ztunnel.sock`` after binding
and sends one JSON line naming its capture listeners, with their descriptors attached
(SCM_RIGHTS); the agent stores them in the pinned SOCKMAP and answers ``{"ok": true}``. The
connection stays open: the ztunnel re-sends after a restart of either side, and the agent
learns the ztunnel's pid (SO_PEERCRED) for the node metrics.

Lossless ztunnel restarts (issue 15): the agent is the keeper of the node's capture listeners.
It keeps its copies of the registered sockets (``HeldListeners``) after the ztunnel that
registered them goes, so the listening sockets (and the SOCKMAP entries, and the ports TPROXY
finds) outlive any one ztunnel: connections that arrive while no ztunnel accepts wait in the
kernel's accept queue instead of being refused. A starting ztunnel first asks for them
(``{"op": "take"}``, answered with the same sockets attached) and serves those instead of
binding new ones, so the next ztunnel accepts from the very queue the last one left. When a
ztunnel registers while another is linked (a restart that overlaps: the new one is ready), the
agent tells the old one ``superseded``: it stops accepting (the new one already does, on the
same sockets) and drains its established connections. With no ztunnel linked for
``hold_seconds`` the agent lets them go, and capture fails closed again as before.

What it accepts: the capture listeners (``LISTENER_SLOTS``: outbound, inbound,
inbound_plaintext), each a listening TCP socket, each name at least once and at most
``MAX_GROUP`` times (a ztunnel with worker processes registers every member of each
SO_REUSEPORT group; the SOCKMAP gets the first, the kernel picks the member), all members of
one name on one address (``registration_problem``); anything else is answered with the reason
and leaves the SOCKMAP as it was.

Who may register: the socket is 0600 and the agent serves only peers whose uid it allows
(``SO_PEERCRED``: root and its own user, ``--socket-uid`` for more), and, unless
``--ztunnel-peer-check off``, only a peer that is an ``ambit ztunnel`` process
(``ztunnel_problem``). Anyone else is answered with the reason, closed, logged (rate limited)
and counted (``refusals``); the SOCKMAP is not touched and nothing held is handed out.

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
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.capture.base import LISTENER_SLOTS
from mesh.ratelimit import RateLimitedLog
from mesh.unix import (
    LineReader,
    PeerCred,
    RefusalLog,
    allowed_uids,
    bind_unix,
    peer_cred,
    send_line,
    uid_problem,
)

log = logging.getLogger("agent.ztunnel_link")

# The longest request line (ztunnel/agent_link.py has the same limit; layers never import each
# other) and answer line read back; a registration line is read in one message of this size.
MAX_REQUEST = 16384
MAX_MESSAGE = MAX_REQUEST
# Members of one listener's SO_REUSEPORT group the agent takes (the ztunnel's --workers limit).
MAX_GROUP = 64
MAX_FDS = MAX_GROUP * 3
# How long the agent keeps the capture listeners with no ztunnel linked (``--listener-hold``).
DEFAULT_HOLD_SECONDS = 60.0
OP_TAKE = "take"
OP_SUPERSEDED = "superseded"
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
    ``SO_PROTOCOL``, ``SO_ACCEPTCONN``) and where it is bound (``getsockname``)."""

    family: int
    type: int
    protocol: int
    listening: bool
    address: str = ""


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
            family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
            name = sock.getsockname() if family in (socket.AF_INET, socket.AF_INET6) else ""
            return SocketKind(family,
                              sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
                              sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL),
                              sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1,
                              f"{name[0]}:{name[1]}" if name else "")
        except OSError:  # ENOTSOCK: a pipe, a file, ...
            return None


def listener_names_problem(names: Sequence[str]) -> str | None:
    """Why ``names`` is not a listener set the agent accepts (None: it is).

    Every capture listener (``LISTENER_SLOTS``), each at least once and at most ``MAX_GROUP``
    times (the members of a ztunnel's SO_REUSEPORT group, one per worker): the backend empties
    the slot of a name it is not given, so a partial or empty set would quietly stop capture
    for the missing listeners, and an unknown name has no slot.
    """
    expected = ", ".join(LISTENER_SLOTS)
    fix = (f"the ztunnel must hand over exactly its capture listeners ({expected}), one "
           "descriptor each: run it with --inbound-bind shared, at the agent's version")
    if not names:
        return f"no listeners (it would empty every SOCKMAP slot); {fix}"
    many = sorted({n for n in names if names.count(n) > MAX_GROUP})
    missing = [n for n in LISTENER_SLOTS if n not in names]
    unknown = sorted({n for n in names if n not in LISTENER_SLOTS})
    wrong = [f"{what}: {', '.join(which)}" for what, which in
             (("missing", missing), ("unknown", unknown),
              (f"named more than {MAX_GROUP} times", many)) if which]
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
    if fd_problems:
        return "; ".join(fd_problems)
    # The members of one name are one SO_REUSEPORT group: one address.
    addresses: dict[str, set[str]] = {}
    for n, k in zip(names, kinds, strict=True):
        assert k is not None
        addresses.setdefault(n, set()).add(k.address)
    split = [f"{n} ({', '.join(sorted(a))})" for n, a in addresses.items() if len(a) > 1]
    if split:
        return ("the descriptors of one listener must share its address (one SO_REUSEPORT "
                f"group): {'; '.join(split)}")
    return None


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


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class HeldListeners:
    """The agent's copies of the capture listeners last registered: ``(name, fd)`` in the
    order the ztunnel sent them (a name repeats for each member of its SO_REUSEPORT group).
    ``unlinked_at`` is when the last ztunnel went (monotonic; None while one is linked)."""

    fds: list[tuple[str, int]]
    pid: int
    unlinked_at: float | None = None

    def close(self) -> None:
        _close_all(fd for _, fd in self.fds)
        self.fds = []

    def alive(self) -> bool:
        """Every held socket is still a listening socket (nobody shut one down)."""
        return bool(self.fds) and all(
            (k := socket_kind(fd)) is not None and k.listening for _, fd in self.fds)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, _ in self.fds:
            out[name] = out.get(name, 0) + 1
        return out


@dataclass
class PodHandoff:
    """In-pod mode: a pod's network namespace as the agent hands it to each ztunnel (its own
    descriptor) and the listener sockets the ztunnel serves inside it, kept for the next."""

    uid: str
    ips: tuple[str, ...]
    netns: int
    listeners: list[tuple[str, int]] = field(default_factory=list)

    def let_go_of_listeners(self) -> None:
        _close_all(fd for _, fd in self.listeners)
        self.listeners = []

    def close(self) -> None:
        self.let_go_of_listeners()
        _close_all([self.netns])


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
                 peer_check: str = PEER_CHECK_CMDLINE,
                 hold_seconds: float = DEFAULT_HOLD_SECONDS) -> None:
        if peer_check not in PEER_CHECKS:
            raise ValueError(f"peer_check: {peer_check!r} is not one of {', '.join(PEER_CHECKS)}")
        self.path = path
        self.on_listeners = on_listeners
        self.uids = allowed_uids() if uids is None else frozenset(uids)
        self.peer_check = peer_check
        self.hold_seconds = hold_seconds
        self.refusals = RefusalLog(log)
        # Bad registrations and lines: a process that passes the peer check can still send
        # rubbish as fast as it likes; one line per kind every 10 s, the rest counted.
        self.bad_messages = RateLimitedLog(log, what="refused")
        self.ztunnel_pid: int | None = None
        self.registrations = 0
        self.takeovers = 0  # listener sets handed to a starting ztunnel
        self.held: HeldListeners | None = None
        # In-pod mode: the pods handed to the ztunnel (uid -> namespace and its listeners),
        # handed again to every ztunnel that registers.
        self.pods: dict[str, PodHandoff] = {}
        self._server: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._release: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._session: _Session | None = None
        self._linked = asyncio.Event()
        self._next_id = 0

    async def request(self, message: Mapping[str, Any], within: float,
                      fds: Sequence[int] = ()) -> dict[str, Any]:
        """Send ``message`` (an ``op`` and its fields; the id is added here; ``fds``
        attached) to the registered ztunnel and wait for its answer, for at most ``within``
        seconds in all, including the wait for a ztunnel to register. Raises
        ``LinkUnavailable`` with the reason. The answer's ``listeners`` and ``fds`` (the
        caller owns those) are in the result."""
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
        return await self._ask(session, message, within, fds, deadline)

    async def _ask(self, session: _Session, message: Mapping[str, Any], within: float,
                   fds: Sequence[int] = (), deadline: float | None = None) -> dict[str, Any]:
        """One request on ``session``, answered within ``within`` seconds (or by
        ``deadline``, a monotonic time, when the caller already spent some)."""
        deadline = time.monotonic() + within if deadline is None else deadline
        line, request_id = self._line(message)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        session.pending[request_id] = fut
        try:
            async with session.write_lock:  # one line at a time, never interleaved
                await asyncio.wait_for(send_line(session.conn, line, fds),
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
            _close_all(reply.get("fds", ()))
            raise LinkUnavailable(f"the ztunnel refused {message.get('op')}: {reply['error']}")
        return reply

    # -- in-pod mode: pods' network namespaces ----------------------------------------------

    def remember_pod(self, uid: str, ips: Sequence[str], netns: int) -> PodHandoff:
        """Keep pod ``uid``'s namespace (this takes ``netns``) to hand to every ztunnel that
        registers; a different namespace than the one known (a new sandbox) replaces it."""
        from mesh.netns import same_netns

        known = self.pods.get(uid)
        if known is not None and same_netns(known.netns, netns):
            os.close(netns)
            known.ips = tuple(ips)
            return known
        if known is not None:
            known.close()
        record = self.pods[uid] = PodHandoff(uid, tuple(ips), netns)
        return record

    async def hand_pod(self, uid: str, ips: Sequence[str], netns: int, within: float) -> None:
        """Hand pod ``uid``'s namespace (this takes ``netns``) to the ztunnel and wait until
        it serves its listeners there. Raises ``LinkUnavailable``."""
        record = self.remember_pod(uid, ips, netns)
        await self._hand(None, record, within)

    async def _hand(self, session: _Session | None, record: PodHandoff, within: float) -> None:
        names = [n for n, _ in record.listeners]
        message = {"op": "pod_netns", "uid": record.uid, "ips": list(record.ips),
                   "listeners": names, "fds": 1 + len(names)}
        fds = [record.netns, *(fd for _, fd in record.listeners)]
        reply = (await self.request(message, within, fds) if session is None
                 else await self._ask(session, message, within, fds))
        got = list(reply.get("fds", ()))
        served = reply.get("listeners") or []
        if not isinstance(served, list) or len(served) != len(got):
            _close_all(got)
            raise LinkUnavailable(f"pod {record.uid}: the ztunnel answered with "
                                  f"{len(got)} descriptor(s) for listeners {served!r:.200}")
        if self.pods.get(record.uid) is not record:  # deleted meanwhile
            _close_all(got)
            return
        record.let_go_of_listeners()
        record.listeners = list(zip((str(n) for n in served), got, strict=True))

    async def pod_gone(self, uid: str) -> None:
        """Pod ``uid`` went (or is no longer captured): forget it, tell the ztunnel (best
        effort)."""
        record = self.pods.pop(uid, None)
        if record is None:
            return
        record.close()
        if self._session is not None:
            with contextlib.suppress(LinkUnavailable):
                await self.request({"op": "pod_netns_gone", "uid": uid}, 1.0)

    async def _hand_all(self, session: _Session) -> None:
        """Every known pod's namespace to a ztunnel that just registered (a restart: it takes
        the listeners the previous one served)."""
        for record in list(self.pods.values()):
            try:
                await self._hand(session, record, 5.0)
            except LinkUnavailable as e:
                log.warning("pod %s: could not hand its network namespace to the ztunnel "
                            "pid %d: %s", record.uid, session.pid, e)

    def _line(self, message: Mapping[str, Any]) -> tuple[bytes, int]:
        self._next_id += 1
        line = json.dumps({**message, "id": self._next_id}).encode() + b"\n"
        if len(line) > MAX_REQUEST:
            raise LinkUnavailable(f"{message.get('op')} request of {len(line)} bytes is over "
                                  f"the link's {MAX_REQUEST}-byte limit (too many labels?)")
        return line, self._next_id

    async def _tell(self, session: _Session, message: Mapping[str, Any]) -> None:
        """Send ``message`` on ``session`` without waiting for its answer (best effort)."""
        line, _ = self._line(message)
        with contextlib.suppress(OSError, TimeoutError):
            async with session.write_lock:
                await asyncio.wait_for(send_line(session.conn, line), 2)

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

    # -- the listeners the agent keeps -----------------------------------------------------

    def _hand_over(self, conn: socket.socket, pid: int) -> None:
        """Answer a starting ztunnel's ``take``: the held listeners (their names, the
        descriptors attached), or none (it binds its own)."""
        held = self.held
        if held is not None and not held.alive():
            log.warning("the held capture listeners are no longer listening; letting them go")
            self._let_go()
            held = None
        names = [n for n, _ in held.fds] if held is not None else []
        payload = json.dumps({"ok": True, "listeners": names}).encode() + b"\n"
        # A fresh connection whose peer waits for this answer: the buffer is empty and the
        # message small, so sendmsg completes at once.
        socket.send_fds(conn, [payload], [fd for _, fd in held.fds] if held else [])
        if held is not None:
            self.takeovers += 1
            log.info("handed the capture listeners (%s) to the starting ztunnel pid %d",
                     ", ".join(f"{n} x{c}" for n, c in held.counts().items()), pid)

    def _hold(self, fds: list[tuple[str, int]], pid: int) -> None:
        """Keep ``fds`` (a registration just put in place) instead of the set held so far."""
        previous = self.held
        self.held = HeldListeners(fds, pid)
        if previous is not None:
            previous.close()  # the same sockets, when the ztunnel took them over: still open
        if self._release is not None:
            self._release.cancel()
            self._release = None

    def _let_go(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None
        for record in self.pods.values():
            record.let_go_of_listeners()

    async def _release_later(self) -> None:
        await asyncio.sleep(self.hold_seconds)
        if self._session is None and self.held is not None:
            log.warning("no ztunnel linked for %gs: letting the capture listeners go (new "
                        "connections of mesh pods fail closed until a ztunnel registers)",
                        self.hold_seconds)
            self._let_go()
        self._release = None

    def _unlinked(self) -> None:
        """The linked ztunnel went and no other is linked: keep its listeners for
        ``hold_seconds`` (its successor takes them), then let them go."""
        if self.held is not None:
            self.held.unlinked_at = time.monotonic()
            if self._release is None:
                self._release = asyncio.create_task(self._release_later())

    def held_status(self) -> dict[str, Any] | None:
        """For ``ambit agent status``: what the agent keeps and since when it has no ztunnel."""
        if self.held is None:
            return None
        unlinked = self.held.unlinked_at
        return {"listeners": self.held.counts(), "registeredBy": self.held.pid,
                "pods": sum(1 for r in self.pods.values() if r.listeners),
                "unlinkedFor": None if unlinked is None else
                round(time.monotonic() - unlinked, 1)}

    # -- one connection --------------------------------------------------------------------

    async def _serve(self, conn: socket.socket, pid: int) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        registered = False
        try:
            conn.setblocking(False)
            await asyncio.wait_for(_readable(conn), 10)
            msg, fds = _recv_with_fds(conn)
            request = json.loads(msg.decode().strip() or "null")
            if isinstance(request, dict) and request.get("op") == OP_TAKE and not fds:
                self._hand_over(conn, pid)
                return
            names = request.get("listeners") if isinstance(request, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"expected {{\"listeners\": [names]}} with one descriptor "
                                 f"each; got {msg[:200]!r} with {len(fds)} descriptor(s)")
            # Checked before anything reaches the SOCKMAP: a refused registration leaves the
            # current listeners in place (the backend empties the slot of a missing name).
            problem = registration_problem(names, [socket_kind(fd) for fd in fds])
            if problem is not None:
                raise ValueError(f"registration from pid {pid} refused: {problem}")
            first: dict[str, int] = {}
            for name, fd in zip(names, fds, strict=True):
                first.setdefault(name, fd)
            await self.on_listeners(first, pid)
            self._hold(list(zip(names, fds, strict=True)), pid)
            fds = []  # held now: closed when replaced or let go, not with this connection
            previous = self._session
            self.ztunnel_pid = pid
            registered = True
            self.registrations += 1
            log.info("ztunnel pid %d registered its listeners: %s", pid,
                     ", ".join(f"{n} x{c}" for n, c in Counter(names).items()))
            await loop.sock_sendall(conn, b'{"ok": true}\n')
            # Keep the link open until the ztunnel goes away, so its pid stays current; it
            # carries the requests (pod start) and their answers from now on.
            session = _Session(conn, pid)
            self._session = session
            self._linked.set()
            answers = asyncio.create_task(self._read_answers(session))
            if self.pods:
                await self._hand_all(session)
            if previous is not None:
                # A restart that overlapped: the new ztunnel serves the same sockets now, so
                # the old one stops accepting and drains. (A ztunnel that reconnected before
                # the agent saw its old link close is told on that dead link: nobody hears.)
                log.info("ztunnel pid %d superseded by pid %d: telling it to drain",
                         previous.pid, pid)
                await self._tell(previous, {"op": OP_SUPERSEDED, "by": pid})
            try:
                await answers
            finally:
                for fut in session.pending.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("the ztunnel closed the link"))
                if self._session is session:
                    self._session = None
                    self._linked.clear()
                    self._unlinked()
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
            if registered and self.ztunnel_pid == pid and self._session is None:
                self.ztunnel_pid = None  # its link is gone, so is it
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    async def _read_answers(self, session: _Session) -> None:
        reader = LineReader(session.conn, MAX_REQUEST)
        try:
            while True:
                try:
                    got = await reader.readline()
                except ValueError:
                    raise ValueError(f"the ztunnel (pid {session.pid}) sent a line over "
                                     f"{MAX_REQUEST} bytes") from None
                if got is None:
                    return
                line, fds = got
                try:
                    request_id, problem = parse_answer(line)
                    listeners = json.loads(line).get("listeners")
                except ValueError as e:
                    _close_all(fds)
                    self.bad_messages.log("answer", "ztunnel link: ignoring a line from pid %d: "
                                          "%s", session.pid, e)
                    continue
                fut = session.pending.get(request_id)
                if fut is not None and not fut.done():
                    fut.set_result({"error": problem, "listeners": listeners, "fds": fds})
                else:
                    _close_all(fds)
        finally:
            reader.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._release is not None:
            self._release.cancel()
        for t in list(self._conns):
            t.cancel()
        if self._server is not None:
            self._server.close()
        self._let_go()
        for record in self.pods.values():
            record.close()
        self.pods.clear()
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

"""The ztunnel's end of the link to the node agent: hand over the capture listeners.

Why it exists: in eBPF redirect mode the agent's tc programs deliver captured connections
straight into the ztunnel's listening sockets (``bpf_sk_assign``), so the agent must hold them
in a SOCKMAP. With ``--agent-socket`` the ztunnel connects after binding, sends one JSON line
``{"listeners": [names]}`` with the sockets attached (SCM_RIGHTS), waits for ``{"ok": true}``
and keeps the connection open; when it breaks (the agent restarted) it reconnects with backoff
and sends them again. In iptables mode the link is harmless: TPROXY finds listeners by port.
The agent's side is ``agent/ztunnel_link.py``.

Pod start (the other direction): once the listeners are registered, the agent sends requests on
the same connection, one JSON line each, and the ztunnel answers each with one line carrying
its ``id``:

- ``{"op": "pod_added", "id": N, "workload": {uid, name, namespace, serviceAccount, node,
  addresses, labels, workloadName}}`` at CNI ADD of a mesh pod: the ztunnel adds the workload
  to its store's provisional overlay (``OverlayStateStore``), which starts the fetch of its
  certificate, then answers ``{"id": N, "ok": true}``; the agent lets ADD return only then, so
  the pod's first connection finds its source known;
- ``{"op": "pod_deleted", "id": N, "uid": "ns/name"}`` at CNI DEL: the provisional entry goes;
- ``{"op": "superseded", "id": N, "by": PID}``: another ztunnel (a restart that overlapped)
  registered the same listeners and accepts on them now; this one stops accepting and drains;
- ``{"op": "pod_netns", "id": N, "uid": "ns/name", "ips": [...], "listeners": [names],
  "fds": K}`` (in-pod redirect mode, ``ztunnel/inpod.py``): the pod's network namespace is the
  first of the K descriptors that come with the line, then the pod's listener sockets a
  previous ztunnel served (named by ``listeners``, kept by the agent; none at a pod's first
  hand-off). The ztunnel serves them, or opens its own inside the namespace, and answers
  ``{"id": N, "ok": true, "listeners": [names]}`` with those sockets attached for the agent
  to keep;
- ``{"op": "pod_netns_gone", "id": N, "uid": "ns/name"}``: the pod went; its listeners close.

Restarts (issue 15): the agent keeps the capture listeners after the ztunnel that registered
them goes. A starting ztunnel first asks for them (``take_listeners``: ``{"op": "take"}`` on a
connection of its own, answered ``{"ok": true, "listeners": [names]}`` with the sockets
attached, or none) and serves those instead of binding new ones, so connections queued while
no ztunnel accepted are served by the next one and none is refused.

A refused request is answered ``{"id": N, "ok": false, "error": "<reason>"}``. Every field is
checked as strictly as the state file's (``parse_link_request``): the link is input from
another process. A line longer than ``MAX_REQUEST`` ends the session (the agent reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import random
import re
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.jsonline import decode_json
from mesh.state.model import IPAddress, Protocol, Workload
from mesh.state.parse import StateError, mapping, parse_workload
from mesh.unix import LineReader, send_line

log = logging.getLogger("ztunnel.agent_link")

# The longest request line the ztunnel reads (the agent's side has the same constant: the two
# layers do not import each other). A pod's workload with its labels is well under 4 KiB.
MAX_REQUEST = 16384
OP_POD_ADDED = "pod_added"
OP_POD_DELETED = "pod_deleted"
OP_SUPERSEDED = "superseded"
OP_POD_NETNS = "pod_netns"
OP_POD_NETNS_GONE = "pod_netns_gone"
OP_TAKE = "take"
POD_LISTENER_NAMES = ("outbound", "inbound_plaintext", "inbound")
TAKE_TIMEOUT = 2.0  # a starting ztunnel waits this long for the agent's listeners
MAX_TAKEN = 3 * 64  # descriptors in a take answer: three listeners, 64 members each at most
MAX_LABELS = 64
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_WORKLOAD_FIELDS = ("uid", "name", "namespace", "serviceAccount", "node", "addresses",
                    "labels", "workloadName")


@dataclass(frozen=True)
class PodAdded:
    workload: Workload


@dataclass(frozen=True)
class PodDeleted:
    uid: str


@dataclass(frozen=True)
class Superseded:
    by: int  # the pid of the ztunnel that took over


@dataclass(frozen=True)
class PodNetns:
    """A pod's network namespace (in-pod mode). ``netns`` and ``listeners`` (name, socket)
    are the descriptors that came with the line, set by the link once it has them."""

    uid: str
    ips: tuple[IPAddress, ...]
    listener_names: tuple[str, ...] = ()
    netns: int = -1
    listeners: tuple[tuple[str, socket.socket], ...] = ()

    @property
    def fd_count(self) -> int:
        return 1 + len(self.listener_names)


@dataclass(frozen=True)
class PodNetnsGone:
    uid: str


LinkRequest = PodAdded | PodDeleted | Superseded | PodNetns | PodNetnsGone


class LinkRequestError(ValueError):
    """A request the ztunnel refuses; ``id`` is the request's, if it could be read."""

    def __init__(self, problem: str, request_id: int | None = None) -> None:
        super().__init__(problem)
        self.request_id = request_id


def _dns(value: str, path: str, pattern: re.Pattern[str], limit: int) -> None:
    if len(value) > limit or not pattern.fullmatch(value):
        raise StateError(path, f"{value[:80]!r} is not a DNS-1123 name (lower case "
                         f"alphanumerics and '-', at most {limit} characters)")


def _pod_address(ip: IPAddress, path: str) -> None:
    # A pod's address from the main plugin's result: never the node itself or a special range
    # (a provisional workload on 127.0.0.1 would make the ztunnel's own connections a pod's).
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local or \
            ip.is_reserved:
        raise StateError(path, f"{ip} is not a pod address (loopback, unspecified, multicast, "
                         "link-local or reserved)")


def parse_workload_message(value: Any, node: str, trust_domain: str) -> Workload:
    """The workload of a ``pod_added`` request, checked like a state file's entry
    (``parse_workload``) and more strictly: only the fields the agent knows at ADD, uid
    ``namespace/name``, DNS-1123 names, this node, 1 or 2 pod addresses, string labels."""
    m = mapping(value, "workload", _WORKLOAD_FIELDS)
    for key in ("uid", "name", "namespace", "node"):
        if key not in m:
            raise StateError(f"workload.{key}", "is required")
    labels = m.get("labels")
    if labels is not None:
        if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
            raise StateError("workload.labels", f"expected a mapping of at most {MAX_LABELS} "
                             "labels")
        for k, v in labels.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k or len(k) > 317 \
                    or len(v) > 63:
                raise StateError("workload.labels", f"label {str(k)[:80]!r}: names are "
                                 "strings of 1-317 characters, values of at most 63")
    workload = parse_workload(m, "workload", trust_domain)
    _dns(workload.namespace, "workload.namespace", _DNS_LABEL, 63)
    _dns(workload.name, "workload.name", _DNS_SUBDOMAIN, 253)
    _dns(workload.service_account, "workload.serviceAccount", _DNS_SUBDOMAIN, 253)
    if workload.workload_name:
        _dns(workload.workload_name, "workload.workloadName", _DNS_SUBDOMAIN, 253)
    if workload.uid != f"{workload.namespace}/{workload.name}":
        raise StateError("workload.uid", f"{workload.uid[:300]!r} is not "
                         f"\"{workload.namespace}/{workload.name}\" (namespace/name)")
    if workload.node != node:
        raise StateError("workload.node", f"{workload.node[:80]!r} is not this ztunnel's node "
                         f"{node!r}: the agent and the ztunnel must run with the same --node")
    if len(workload.addresses) > 2 or len(set(workload.addresses)) != len(workload.addresses):
        raise StateError("workload.addresses", "expected 1 or 2 distinct addresses")
    for i, ip in enumerate(workload.addresses):
        _pod_address(ip, f"workload.addresses[{i}]")
    # Enrolled (the agent only hands over mesh pods) and not ready: a starting pod gets no
    # service traffic until the registry says it is ready.
    return Workload(uid=workload.uid, name=workload.name, namespace=workload.namespace,
                    service_account=workload.service_account, node=workload.node,
                    addresses=workload.addresses, trust_domain=trust_domain,
                    labels=workload.labels, workload_name=workload.workload_name,
                    protocol=Protocol.HBONE, healthy=False)


def parse_link_request(line: bytes, node: str, trust_domain: str) -> tuple[int, LinkRequest]:
    """One request line from the agent: (id, request). Raises ``LinkRequestError`` naming the
    problem (and the id, once it is known)."""
    if len(line) > MAX_REQUEST:
        raise LinkRequestError(f"request of {len(line)} bytes; the limit is {MAX_REQUEST}")
    try:
        doc = decode_json(line)  # deep nesting included: RecursionError is not a ValueError
    except ValueError as e:
        raise LinkRequestError(str(e)) from None
    if not isinstance(doc, dict):
        raise LinkRequestError(f"expected a JSON object, got {type(doc).__name__}")
    request_id = doc.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool) or \
            not 0 <= request_id < 2**53:
        raise LinkRequestError(f"id: expected an integer 0..2^53, got {request_id!r:.80}")
    op = doc.get("op")
    try:
        if op == OP_POD_ADDED:
            m = mapping(doc, "", ("op", "id", "workload"))
            return request_id, PodAdded(parse_workload_message(m.get("workload"), node,
                                                               trust_domain))
        if op == OP_POD_DELETED:
            m = mapping(doc, "", ("op", "id", "uid"))
            return request_id, PodDeleted(_pod_uid(m.get("uid")))
        if op == OP_SUPERSEDED:
            m = mapping(doc, "", ("op", "id", "by"))
            by = m.get("by")
            if not isinstance(by, int) or isinstance(by, bool) or not 0 < by < 2**22:
                raise StateError("by", f"expected a pid, got {by!r:.80}")
            return request_id, Superseded(by)
        if op == OP_POD_NETNS:
            m = mapping(doc, "", ("op", "id", "uid", "ips", "listeners", "fds"))
            uid = _pod_uid(m.get("uid"))
            ips = m.get("ips")
            if not isinstance(ips, list) or not 1 <= len(ips) <= 2:
                raise StateError("ips", "expected 1 or 2 pod addresses")
            addresses = []
            for i, text in enumerate(ips):
                try:
                    ip = ipaddress.ip_address(text if isinstance(text, str) else "")
                except ValueError:
                    raise StateError(f"ips[{i}]", f"{text!r:.80} is not an IP address") \
                        from None
                _pod_address(ip, f"ips[{i}]")
                addresses.append(ip)
            names = m.get("listeners", [])
            if not isinstance(names, list) or len(names) > 3 * 64 or \
                    any(n not in POD_LISTENER_NAMES for n in names):
                raise StateError("listeners", f"expected names of {', '.join(POD_LISTENER_NAMES)}"
                                 " (at most 192)")
            request = PodNetns(uid, tuple(addresses), tuple(names))
            if m.get("fds") != request.fd_count:
                raise StateError("fds", f"expected {request.fd_count} (the namespace and the "
                                 f"listeners named), got {m.get('fds')!r:.80}")
            return request_id, request
        if op == OP_POD_NETNS_GONE:
            m = mapping(doc, "", ("op", "id", "uid"))
            return request_id, PodNetnsGone(_pod_uid(m.get("uid")))
    except StateError as e:
        raise LinkRequestError(str(e), request_id) from None
    raise LinkRequestError(f"op: {op!r:.80} is not one of {OP_POD_ADDED}, {OP_POD_DELETED}, "
                           f"{OP_SUPERSEDED}, {OP_POD_NETNS}, {OP_POD_NETNS_GONE}", request_id)


def _pod_uid(uid: Any) -> str:
    namespace, _, name = uid.partition("/") if isinstance(uid, str) else ("", "", "")
    _dns(namespace, "uid (namespace)", _DNS_LABEL, 63)
    _dns(name, "uid (name)", _DNS_SUBDOMAIN, 253)
    return f"{namespace}/{name}"


# Carries out a request (adds or removes the provisional workload, a pod's namespace, ...);
# raises ValueError with the reason to refuse it. May return sockets to send back with the
# answer (a pod's listeners, for the agent to keep).
OnRequest = Callable[[LinkRequest], Sequence[tuple[str, socket.socket]] | None]


def answer(request_id: int | None, problem: str | None,
           listeners: Sequence[str] = ()) -> bytes:
    reply: dict[str, Any] = {"id": request_id, "ok": problem is None}
    if problem is not None:
        reply["error"] = problem
    if listeners:
        reply["listeners"] = list(listeners)
    return json.dumps(reply).encode() + b"\n"


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _with_fds(request: LinkRequest, fds: list[int]) -> LinkRequest:
    """``request`` with the descriptors that came with its line (they are its now)."""
    if not isinstance(request, PodNetns):
        return request
    if len(fds) != request.fd_count:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"pod_netns for {request.uid}: {len(fds)} descriptor(s) came, "
                         f"{request.fd_count} expected")
    socks = []
    try:
        for name, fd in zip(request.listener_names, fds[1:], strict=True):
            socks.append((name, socket.socket(fileno=fd)))
    except OSError as e:  # not a socket
        for fd in fds[1 + len(socks):]:
            os.close(fd)
        for _, s in socks:
            s.close()
        os.close(fds[0])
        raise ValueError(f"pod_netns for {request.uid}: a listener descriptor is not a "
                         f"socket ({e})") from None
    return dataclasses.replace(request, netns=fds[0], listeners=tuple(socks))


Listeners = Mapping[str, socket.socket | Sequence[socket.socket]]


def _members(listeners: Listeners) -> list[tuple[str, socket.socket]]:
    """(name, socket) for every member of every listener's group, in order."""
    out: list[tuple[str, socket.socket]] = []
    for name, socks in listeners.items():
        out += [(name, s) for s in ([socks] if isinstance(socks, socket.socket) else socks)]
    return out


def taken_problem(names: Sequence[str], socks: Sequence[socket.socket],
                  ports: Mapping[str, int]) -> str | None:
    """Why the listeners the agent handed over cannot be served (None: they can): each a
    listening TCP socket on the port this ztunnel is configured with for its name, every name
    of ``ports`` present."""
    if len(names) != len(socks):
        return f"{len(names)} name(s) but {len(socks)} descriptor(s)"
    for name, sock in zip(names, socks, strict=True):
        if name not in ports:
            return f"unknown listener {name!r:.80}"
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM or \
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1 or \
                    sock.family not in (socket.AF_INET, socket.AF_INET6):
                return f"{name}: not a listening TCP socket"
            port = sock.getsockname()[1]
        except OSError as e:
            return f"{name}: {e}"
        if port != ports[name]:
            return f"{name}: on port {port}, this ztunnel's is {ports[name]}"
    missing = [n for n in ports if n not in names]
    return f"missing: {', '.join(missing)}" if missing else None


async def take_listeners(path: Path, ports: Mapping[str, int],
                         within: float = TAKE_TIMEOUT) -> dict[str, list[socket.socket]]:
    """The capture listeners the agent keeps from the previous ztunnel (name -> the members of
    its group), to serve instead of binding new ones; empty when the agent holds none, cannot
    be reached within ``within`` seconds or hands over something unusable (then this ztunnel
    binds its own; logged)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    received: list[socket.socket] = []
    try:
        async with asyncio.timeout(within):
            await loop.sock_connect(sock, str(path))
            await loop.sock_sendall(sock, json.dumps({"op": OP_TAKE}).encode() + b"\n")
            readable = asyncio.Event()
            loop.add_reader(sock.fileno(), readable.set)
            try:
                await readable.wait()
            finally:
                loop.remove_reader(sock.fileno())
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, MAX_TAKEN)
            received = [socket.socket(fileno=fd) for fd in fds]
        reply = json.loads(msg)
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            raise ValueError(f"the agent refused: {str(reply)[:300]}")
        names = reply.get("listeners")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"not a listener list: {str(names)[:300]}")
        if not names and not received:
            return {}
        problem = taken_problem(names, received, ports)
        if problem is not None:
            raise ValueError(f"unusable listeners from the agent: {problem}")
        out: dict[str, list[socket.socket]] = {}
        for name, s in zip(names, received, strict=True):
            s.setblocking(False)
            out.setdefault(name, []).append(s)
        received = []
        return out
    except (FileNotFoundError, ConnectionRefusedError):
        log.info("no node agent at %s yet: binding the capture listeners", path)
        return {}  # a fresh start (the agent comes up later and gets them registered)
    except (OSError, TimeoutError, ValueError) as e:
        log.warning("could not take the capture listeners from the node agent at %s (%s); "
                    "binding new ones", path, e)
        return {}
    finally:
        sock.close()
        for s in received:
            s.close()


class AgentLink:
    def __init__(self, path: Path, listeners: Listeners,
                 backoff_initial: float = 0.2, backoff_max: float = 5.0, *,
                 node: str = "", trust_domain: str | Callable[[], str] = "cluster.local",
                 on_request: OnRequest | None = None,
                 barrier: Callable[[], Awaitable[None]] | None = None) -> None:
        self.path = path
        # Awaited after a request was carried out and before it is answered: with worker
        # processes (ztunnel/workers.py), until every worker has the change; raises
        # ValueError (the reason) to answer the request as refused.
        self.barrier = barrier
        self.node = node
        self.trust_domain = trust_domain
        self.on_request = on_request
        self.requests = 0
        self.refused = 0
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
            members = _members(self.listeners)
            names = [n for n, _ in members]
            payload = json.dumps({"listeners": names}).encode() + b"\n"
            fds = [s.fileno() for _, s in members]
            # Small and the socket is fresh: sendmsg completes at once.
            socket.send_fds(sock, [payload], fds)
            # One reader for the whole session: the agent's first requests may come in the
            # same read as this answer.
            reader = LineReader(sock, MAX_REQUEST)
            got = await asyncio.wait_for(reader.readline(), 10)
            if got is None:
                raise ConnectionError("the agent closed the link before answering")
            _close_fds(got[1])
            reply = json.loads(got[0])
            if not reply.get("ok"):
                raise ConnectionError(f"the agent refused the listeners: {reply.get('error')}")
            self.registered.set()
            self.last_error = ""
            log.info("handed the capture listeners (%s) to the node agent at %s",
                     ", ".join(dict.fromkeys(names)), self.path)
            await self._serve_requests(sock, reader)
            log.warning("the node agent closed the link; reconnecting")
        finally:
            self.registered.clear()
            sock.close()

    def handle_line(self, line: bytes, fds: Sequence[int] = ()) -> bytes:
        """The answer to one request line (sans-I/O: the session only moves bytes); ``fds``
        came with it (this takes them: used or closed)."""
        return self._handle(line, list(fds))[0]

    def _handle(self, line: bytes, fds: list[int]) -> tuple[bytes, list[socket.socket]]:
        td = self.trust_domain() if callable(self.trust_domain) else self.trust_domain
        request_id: int | None = None
        try:
            try:
                request_id, request = parse_link_request(line, self.node, td)
            except ValueError:
                _close_fds(fds)
                raise
            if isinstance(request, PodNetns):
                request = _with_fds(request, fds)
            else:
                _close_fds(fds)
            if self.on_request is None:
                if isinstance(request, PodNetns):
                    _close_fds([request.netns, *(s.detach() for _, s in request.listeners)])
                raise ValueError("this ztunnel does not take pods from the agent")
            sent = list(self.on_request(request) or ())
        except ValueError as e:
            request_id = e.request_id if isinstance(e, LinkRequestError) else request_id
            self.refused += 1
            log.warning("node agent request refused: %s", e)
            return answer(request_id, str(e)), []
        self.requests += 1
        return answer(request_id, None, [n for n, _ in sent]), [s for _, s in sent]

    async def _answer(self, line: bytes, fds: Sequence[int] = ()) -> bytes:
        """``handle_line``, then, for a request carried out, the barrier."""
        return (await self._answer_with(line, list(fds)))[0]

    async def _answer_with(self, line: bytes, fds: list[int]) \
            -> tuple[bytes, list[socket.socket]]:
        reply, socks = self._handle(line, fds)
        if self.barrier is None:
            return reply, socks
        doc = json.loads(reply)
        if not doc.get("ok"):
            return reply, socks
        try:
            await self.barrier()
        except ValueError as e:
            self.requests -= 1
            self.refused += 1
            log.warning("node agent request not confirmed: %s", e)
            return answer(doc.get("id"), str(e)), []
        return reply, socks

    async def _serve_requests(self, sock: socket.socket, reader: LineReader) -> None:
        try:
            while True:
                try:
                    got = await reader.readline()
                except ValueError:
                    await send_line(sock, answer(None, f"request line over {MAX_REQUEST} "
                                                 "bytes; closing the link"))
                    raise ValueError(f"the node agent sent a line over {MAX_REQUEST} bytes") \
                        from None
                if got is None:
                    return
                line, fds = got
                if line.strip():
                    reply, socks = await self._answer_with(line, fds)
                    await send_line(sock, reply, [s.fileno() for s in socks])
                else:
                    _close_fds(fds)
        finally:
            reader.close()

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

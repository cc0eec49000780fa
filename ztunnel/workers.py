"""``ambit ztunnel --workers N``: one node's ztunnel on several cores, as worker processes.

Why it exists: the data path is Python on one asyncio loop, so one process is capped at one
core for every pod of the node (issue 14, P7). Istio's ztunnel runs a multi-threaded runtime;
Python's threads share one interpreter lock, so Ambit runs processes instead:

* **The parent** (``Supervisor``) creates every data-path listener before any worker starts:
  for each of outbound, inbound plaintext, inbound HBONE (with ``--inbound-bind
  shared``) and SOCKS5, one SO_REUSEPORT socket per worker, all in one
  reuseport group (``mesh.listener.bind_group``), or, after a restart, the capture groups the
  node agent kept from the previous ztunnel (``Ztunnel.taken``; every member is served by
  some worker, ``members_for``). The parent keeps its copies, so a group
  outlives any one worker: connections the kernel hashes to a crashed worker's socket wait in
  its accept queue for the restarted worker instead of being refused. The kernel spreads new
  connections over a group by a hash of the 4-tuple; TPROXY's listener lookup does the same,
  and so does ``bpf_sk_assign`` to one member of the group since Linux 6.5 ("bpf, net:
  Support SO_REUSEPORT sockets with bpf_sk_assign"), so in eBPF mode the agent's SOCKMAP holds
  the group's first socket and the kernel picks the worker.
* **One state feed**: the parent alone subscribes to the controller (or reads the state file)
  and holds the node agent's link (capture listeners, pod start). Each change of its store
  (a push, a provisional pod) is sent whole to every worker over a socketpair; a pod-start
  request is answered only once every running worker has applied it (``barrier``), so the new
  pod's first connection is known whichever worker takes it.
* **Certificates, one fetch per identity**: with the CA, only the parent's CA client runs
  (prefetch, single flight, renewal); each certificate it accepts is pushed to every worker
  (``IssuedPem``), and a worker that lacks one asks the parent (``ParentSecrets``). With an
  identity directory each worker reads the files.
* **One metrics endpoint**: the parent serves admin, metrics and readiness. ``/metrics`` asks
  every worker for its Prometheus text and sums the samples (``merge_metrics``: counters and
  most gauges add up; a few take the minimum or maximum, ``MERGE``), plus its own registry
  and ``ambit_ztunnel_worker_connections_total{worker}`` (connections each worker opened,
  to see the spread). ``/workers`` (admin port) lists each worker's pid, readiness, restarts;
  ``/config_dump`` is the parent's state with every worker's certificates.
* **Readiness** = the parent has state and every worker reports ready. **SIGTERM** drains
  every worker (each runs the single-process drain) and waits for them. A worker that exits
  otherwise is logged, counted (``ambit_ztunnel_worker_restarts_total``) and restarted with
  backoff; a worker whose parent is gone (its control socket closes) drains and exits.

Wire between parent and worker: frames of a 4-byte length and a body; parent to worker is a
pickle (the config, state snapshots: the parent is the worker's own launcher, no trust is
crossed), worker to parent is JSON (a data-path process never makes the parent unpickle).
``--workers 1`` never loads this module: ``ztunnel.app.serve`` runs as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import pickle
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mesh.http_server import Response, serve_http
from mesh.listener import BindError, bind_group
from mesh.spiffe import SpiffeError, SpiffeId
from mesh.state.model import MeshConfig
from mesh.state.store import StateSnapshot
from ztunnel.app import Ztunnel, serve
from ztunnel.config import BIND_WORKLOAD, CONNECTION_LIMIT_SUFFIXES, ZtunnelConfig
from ztunnel.identity import CertInfo, IdentityError, Secrets, context_from_pem
from ztunnel.listeners.admin import admin_routes, config_dump
from ztunnel.metrics import Metrics

log = logging.getLogger("ztunnel.workers")

# The data-path listeners each worker serves from its member of the reuseport group.
DATA_LISTENERS = ("outbound", "inbound_plaintext", "inbound", "socks5")
MAX_FRAME = 64 * 1024 * 1024  # a worker's metrics text or a node's whole state
BARRIER_TIMEOUT = 3.0  # under the agent's 4 s hand-off wait
METRICS_TIMEOUT = 5.0
RESTART_BACKOFF = (0.2, 10.0)  # first delay, cap (doubling while workers die young)
STABLE_AFTER = 30.0  # a worker that ran this long restarts at the first delay again

# -- pure parts ------------------------------------------------------------------------------

# How a family's samples from several processes combine; anything not listed is summed
# (counters, connections open, bytes, CPU seconds, resident memory: the node's total).
MERGE: dict[str, str] = {
    "process_start_time_seconds": "min",  # the oldest process
    "process_max_fds": "min",  # a per-process limit, not a total
    "ambit_certificate_expiry_seconds": "min",  # the first to expire (each worker has its own)
    "ambit_state_workloads": "max",  # the same state in every process
    "ambit_xds_connected": "max",  # only the parent subscribes
    # The parent's: it alone knows when the controller last confirmed the state (a worker
    # counts from when it applied its copy, and its age grows between pushes).
    "ambit_state_age_seconds": "min",
    "ambit_ztunnel_provisional_workloads": "max",  # the parent's count; workers report 0
    "ambit_ztunnel_workers": "max",
    "ambit_ztunnel_workers_ready": "max",
    "python_info": "max",
}


# Per-process limits shared out between the workers: connection admission
# (ztunnel/admission.py) and held pod-start connections (ztunnel/pod_start.py) count in each
# process, so each worker gets limit // N (at least 1; 0 stays unlimited) and the node's total
# never exceeds the configured limit.
SHARED_LIMITS = ("pod_start_hold_max", "pod_start_hold_per_source")


def worker_config(config: ZtunnelConfig) -> ZtunnelConfig:
    """The config a worker runs with: ``config`` with its per-process limits divided by the
    number of workers (``SHARED_LIMITS`` and every connection limit)."""
    n = config.workers
    shared = dataclasses.replace(config)
    for f in dataclasses.fields(config):
        if f.name in SHARED_LIMITS or (f.name.startswith("max_")
                                       and f.name.endswith(CONNECTION_LIMIT_SUFFIXES)):
            value = getattr(config, f.name)
            setattr(shared, f.name, value if value == 0 else max(1, value // n))
    # One peer's shared buffer budget (hbone/conn.py PeerBudget) is counted per process as
    # well: divided so that a peer spread over the workers gets the configured total (down to
    # the smallest valid budget, 256 KiB per worker).
    if config.hbone_peer_buffer:
        shared.hbone_peer_buffer = max(256 * 1024, config.hbone_peer_buffer // n)
    return shared


def members_for(size: int, index: int, workers: int) -> list[int]:
    """The members of a listener group of ``size`` sockets that worker ``index`` (of
    ``workers``) serves: member i by worker i when the counts match (a group this ztunnel
    bound); otherwise every member by at least one worker and every worker at least one
    member (a group taken over from a ztunnel that ran another number of workers)."""
    return list(range(index, size, workers)) or [index % size]


def _combine(how: str, a: float, b: float) -> float:
    if how == "min":
        return min(a, b)
    if how == "max":
        return max(a, b)
    return a + b


def merge_metrics(texts: Iterable[str]) -> list[Metric]:
    """The families of several processes' Prometheus texts, one sample per name and label set:
    summed, or the minimum or maximum where ``MERGE`` says so (``*_created`` timestamps: the
    earliest). Families keep the order in which they first appear."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type,
                                               family.unit)
                values[family.name] = {}
            how = MERGE.get(family.name, "sum")
            into = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                rule = "min" if sample.name.endswith("_created") else how
                into[key] = (_combine(rule, into[key], sample.value) if key in into
                             else sample.value)
    out = []
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        out.append(family)
    return out


def opened_connections(text: str) -> dict[str, float]:
    """Connections one worker opened (its ``istio_tcp_connections_opened_total``), by
    ``reporter/connection_security_policy``: ``source/...`` are outbound (15001, SOCKS5),
    ``destination/mutual_tls`` HBONE tunnels in, ``destination/none`` plaintext in (15006)."""
    out: dict[str, float] = {}
    for f in text_string_to_metric_families(text):
        if f.name == "istio_tcp_connections_opened":
            for s in f.samples:
                if s.name.endswith("_total"):
                    key = (f"{s.labels.get('reporter', '')}/"
                           f"{s.labels.get('connection_security_policy', '')}")
                    out[key] = out.get(key, 0.0) + s.value
    return out


def restart_delay(previous: float, lived: float) -> float:
    """Seconds before restarting a worker that lived ``lived`` seconds; ``previous`` is the
    delay before its last start (0 for the first)."""
    first, cap = RESTART_BACKOFF
    if lived >= STABLE_AFTER or previous <= 0:
        return first
    return min(cap, previous * 2)


class _Merged:
    """A collector over already merged families (``generate_latest`` renders it)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def render_merged(texts: Iterable[str], extra: Sequence[Metric] = ()) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged([*merge_metrics(texts), *extra]))
    out: bytes = generate_latest(registry)
    return out


# -- framing --------------------------------------------------------------------------------

def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """One frame's body; None at a clean end of stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ConnectionError("control channel closed inside a frame header") from None
        return None
    (size,) = struct.unpack("!I", head)
    if size > MAX_FRAME:
        raise ConnectionError(f"control frame of {size} bytes (limit {MAX_FRAME})")
    return await reader.readexactly(size)


def to_parent(message: Mapping[str, Any]) -> bytes:
    return frame(json.dumps(message).encode())


def to_worker(message: Mapping[str, Any]) -> bytes:
    return frame(pickle.dumps(dict(message), protocol=pickle.HIGHEST_PROTOCOL))


# -- certificates: fetched once, by the parent (CA mode) ----------------------------------------

CERT_TIMEOUT = 10.0  # the parent's CA request is bounded by its own 5 s timeout


@dataclass(frozen=True)
class IssuedPem:
    """A certificate the parent accepted from the CA, as the worker needs it."""

    identity: SpiffeId
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    not_after: float
    serial: str


def sharing_ca_secrets(config: ZtunnelConfig, metrics: Metrics,
                       on_issued: Callable[[IssuedPem], None],
                       on_retired: Callable[[SpiffeId], None]) -> Secrets:
    """The parent's CA client (``ztunnel.ca_client``, with its single flight, prefetch,
    renewal and backoff), which also hands every certificate it accepts to ``on_issued`` (the
    workers) and tells ``on_retired`` when it drops one."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from mesh.api.ambit.v1 import ca_pb2
    from mesh.ca_client import accept_issued
    from ztunnel.app import controller_credentials
    from ztunnel.ca_client import CaSecretManager, _Held

    assert config.node_token_file is not None  # validated: they go together

    class SharingCaSecrets(CaSecretManager):
        def _accept(self, identity: SpiffeId, key: ec.EllipticCurvePrivateKey,
                    resp: ca_pb2.CreateCertificateResponse, fetched_at: float) -> _Held:
            held = super()._accept(identity, key, resp, fetched_at)
            issued = accept_issued(identity, key, resp, fetched_at, self.ca_address)
            on_issued(IssuedPem(identity, issued.chain_pem, issued.key_pem, issued.bundle_pem,
                                issued.not_after, issued.serial))
            return held

        def _retire(self, identity: SpiffeId) -> None:
            super()._retire(identity)
            on_retired(identity)

    return SharingCaSecrets(config.ca_address, config.node_token_file, metrics,
                            controller_credentials(config))


@dataclass
class _WorkerCert:
    info: CertInfo
    client: ssl.SSLContext
    server: ssl.SSLContext
    not_after: float


class ParentSecrets:
    """A worker's ``Secrets`` in CA mode: certificates come from the parent, which fetched
    them once for all workers; renewals are pushed. A certificate the worker lacks (a
    connection came before the push) is asked for once per identity, whoever needs it."""

    def __init__(self) -> None:
        self.send: Callable[[bytes], None] | None = None  # set once the control channel is up
        self._held: dict[SpiffeId, _WorkerCert] = {}
        self._asked: dict[SpiffeId, asyncio.Future[None]] = {}

    def install(self, pem: IssuedPem) -> None:
        self._held[pem.identity] = _WorkerCert(
            CertInfo(pem.identity, dt.datetime.fromtimestamp(pem.not_after, dt.UTC),
                     pem.serial),
            context_from_pem(False, pem.chain_pem, pem.key_pem, pem.bundle_pem),
            context_from_pem(True, pem.chain_pem, pem.key_pem, pem.bundle_pem),
            pem.not_after)
        self._answer(pem.identity, None)

    def refused(self, identity: SpiffeId, problem: str) -> None:
        self._answer(identity, IdentityError(problem))

    def drop(self, identity: SpiffeId) -> None:
        self._held.pop(identity, None)

    def _answer(self, identity: SpiffeId, error: IdentityError | None) -> None:
        fut = self._asked.pop(identity, None)
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    async def _get(self, identity: SpiffeId) -> _WorkerCert:
        held = self._held.get(identity)
        if held is not None and held.not_after > time.time():
            return held
        fut = self._asked.get(identity)
        if fut is None:
            if self.send is None:
                raise IdentityError(f"no certificate for {identity} yet (worker starting)")
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._asked[identity] = fut
            self.send(to_parent({"op": "cert", "identity": str(identity)}))
        try:
            await asyncio.wait_for(asyncio.shield(fut), CERT_TIMEOUT)
        except TimeoutError:
            self._asked.pop(identity, None)
            raise IdentityError(f"the ztunnel's parent did not send a certificate for "
                                f"{identity} within {CERT_TIMEOUT:g}s") from None
        return self._held[identity]

    async def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return (await self._get(identity)).client

    async def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return (await self._get(identity)).server

    def certificates(self) -> list[CertInfo]:
        return [h.info for h in self._held.values()]

    def prefetch(self, identities: Collection[SpiffeId]) -> None:
        return  # the parent prefetches and pushes

    async def close(self) -> None:
        for fut in self._asked.values():
            fut.cancel()


# -- the parent ------------------------------------------------------------------------------

@dataclass
class WorkerHandle:
    """One worker slot: its process (replaced on restart) and what the parent knows of it."""

    index: int
    sockets: dict[str, list[socket.socket]]
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    started_at: float = 0.0
    ready: bool = False
    why: str = "starting"
    applied: int = -1  # last state sequence number the worker applied
    restarts: int = 0
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    last_connections: dict[str, float] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def send(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)


class Supervisor(Ztunnel):
    """The parent: state sources, the agent link, admin/metrics/readiness, the workers."""

    def __init__(self, config: ZtunnelConfig) -> None:
        self.issued: dict[SpiffeId, IssuedPem] = {}
        self.workers: list[WorkerHandle] = []
        super().__init__(config)
        self.groups: dict[str, list[socket.socket]] = {}
        self.seq = 0
        self._changed = asyncio.Event()
        self._next_id = 0
        self.worker_tasks: list[asyncio.Task[None]] = []
        self.worker_config = worker_config(config)
        self._cert_tasks: set[asyncio.Task[None]] = set()

    # The parent carries no connections: its store feeds the workers, and in CA mode its CA
    # client fetches each certificate once for them all.

    def _make_secrets(self) -> Secrets:
        if not self.config.ca_address:
            return super()._make_secrets()  # each worker reads the identity directory
        return sharing_ca_secrets(self.config, self.metrics, self._issued, self._retired)

    def _issued(self, pem: IssuedPem) -> None:
        self.issued[pem.identity] = pem
        message = to_worker({"op": "cert", "identity": pem.identity, "pem": pem})
        for w in self.workers:
            w.send(message)

    def _retired(self, identity: SpiffeId) -> None:
        self.issued.pop(identity, None)
        message = to_worker({"op": "cert_drop", "identity": identity})
        for w in self.workers:
            w.send(message)

    async def _serve_cert(self, w: WorkerHandle, text: str) -> None:
        """A worker asks for a certificate it does not have: the parent's (single flight
        per identity, so N workers asking make one CA request)."""
        try:
            identity = SpiffeId.parse(text)
        except SpiffeError as e:
            log.error("worker %d asked for a certificate of %r: %s", w.index, text[:200], e)
            return
        try:
            await self.secrets.server_context(identity)
            pem = self.issued.get(identity)
            if pem is None:
                raise IdentityError(f"no certificate for {identity} to share")
        except IdentityError as e:
            w.send(to_worker({"op": "cert", "identity": identity, "pem": None,
                              "error": str(e)}))
            return
        w.send(to_worker({"op": "cert", "identity": identity, "pem": pem}))

    def _open_groups(self) -> None:
        c = self.config
        specs = [("outbound", c.bind_host, c.outbound_port, c.transparent),
                 ("socks5", c.socks5_host, c.socks5_port, False)]
        if c.inbound_bind != BIND_WORKLOAD:
            specs += [("inbound_plaintext", c.bind_host, c.inbound_plaintext_port,
                       c.transparent),
                      ("inbound", c.bind_host, c.inbound_port, c.transparent)]
        try:
            for name, host, port, transparent in specs:
                if not port:
                    continue
                taken = self.taken.get(name)
                if taken:
                    self.groups[name] = taken
                    self.capture[name] = taken
                    log.info("serving %s on %s:%d: the %d socket(s) taken over from the "
                             "previous ztunnel (%d workers)", name, host, port, len(taken),
                             c.workers)
                    continue
                self.groups[name] = bind_group(host, port, c.workers, transparent)
                if name != "socks5":
                    self.capture[name] = self.groups[name]
                log.info("listening: %s on %s:%d (%d workers, SO_REUSEPORT)", name, host,
                         port, c.workers)
        except BindError:
            self._close_groups()
            raise

    def _close_groups(self) -> None:
        for group in self.groups.values():
            for sock in group:
                with contextlib.suppress(OSError):
                    sock.close()

    def _open_static(self) -> None:
        c = self.config
        self._open_groups()
        stats = serve_http(self.stats_route)
        specs = [("admin", c.admin_host, c.admin_port, serve_http(self.admin_route)),
                 ("metrics", c.stats_host, c.metrics_port, stats)]
        if c.readiness_port != c.metrics_port:
            specs.append(("readiness", c.stats_host, c.readiness_port, stats))
        for name, host, port, handler in specs:
            if port:
                self._open_port(name, host, port, handler)

    def _reconcile_workload_listeners(self, _old: StateSnapshot, new: StateSnapshot) -> None:
        return  # each worker opens its own per-workload listeners

    def _after_state(self, old: StateSnapshot, new: StateSnapshot) -> None:
        if self.config.ca_address:
            super()._after_state(old, new)  # prefetch: the workers get them pushed
        else:  # each worker reads the identity directory itself
            self.metrics.state_workloads.set(len(new.config.workloads))

    def _fan_out(self, _old: StateSnapshot, new: StateSnapshot) -> None:
        self.seq += 1
        message = self._state_message(new)
        for w in self.workers:
            w.send(message)

    def _state_message(self, snapshot: StateSnapshot) -> bytes:
        return to_worker({"op": "state", "seq": self.seq, "config": snapshot.config,
                          "ready": self.store.ready})

    async def barrier(self) -> None:
        """Until every running worker has applied the latest state (a pod-start request is
        answered only then). A worker starting meanwhile gets the state with its start."""
        target = self.seq
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while True:
            behind = [w for w in self.workers if w.writer is not None and w.applied < target]
            if not behind:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ValueError("worker(s) " + ", ".join(str(w.index) for w in behind) +
                                 f" did not apply the change within {BARRIER_TIMEOUT:g}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def readiness(self) -> tuple[bool, str]:
        ok, why = super().readiness()
        if not ok:
            return ok, why
        for w in self.workers:
            if not w.ready:
                return False, f"worker {w.index} not ready: {w.why}"
        return True, "ready"

    async def start(self) -> None:
        self.metrics.workers.set(self.config.workers)
        self.store.subscribe(self._fan_out)
        await super().start()
        n = self.config.workers
        for i in range(n):
            handle = WorkerHandle(i, {name: [g[j] for j in members_for(len(g), i, n)]
                                      for name, g in self.groups.items()})
            self.workers.append(handle)
            self.worker_tasks.append(asyncio.create_task(self._keep_running(handle)))

    def _start_agent_link(self, barrier: Callable[[], Awaitable[None]] | None = None) -> None:
        super()._start_agent_link(self.barrier)

    # -- one worker's life ------------------------------------------------------------------

    async def _keep_running(self, w: WorkerHandle) -> None:
        delay = 0.0
        while not self.draining:
            lived = await self._run_once(w)
            if self.draining:
                return
            delay = restart_delay(delay, lived)
            w.restarts += 1
            self.metrics.worker_restarts.inc()
            log.error("worker %d will be restarted in %.1fs (restart %d)", w.index, delay,
                      w.restarts)
            await asyncio.sleep(delay)

    async def _run_once(self, w: WorkerHandle) -> float:
        """Start worker ``w``, serve its control channel until it exits; returns how long it
        ran."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = {name: [sock.fileno() for sock in socks] for name, socks in w.sockets.items()}
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ztunnel.workers", str(child_end.fileno()),
                pass_fds=[child_end.fileno(), *(fd for group in fds.values() for fd in group)],
                start_new_session=False)
        except OSError as e:
            parent_end.close()
            child_end.close()
            log.error("cannot start worker %d: %s", w.index, e)
            return 0.0
        finally:
            child_end.close()
        started = time.monotonic()
        w.started_at = time.time()
        w.ready, w.why, w.applied = False, "starting", -1
        reader, writer = await asyncio.open_connection(sock=parent_end)
        w.writer = writer
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)
        writer.write(to_worker({"op": "init", "index": w.index, "config": self.worker_config,
                                "listeners": fds, "defer": bool(self.taken)}))
        if self.store.ready or self.store.overlay:
            writer.write(self._state_message(self.store.current))
        for pem in self.issued.values():
            writer.write(to_worker({"op": "cert", "identity": pem.identity, "pem": pem}))
        if self.draining:  # SIGTERM came while it was starting
            writer.write(to_worker({"op": "drain"}))
        reading = asyncio.create_task(self._read_worker(w, reader))
        status = await w.proc.wait()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        w.writer = None
        writer.close()
        w.ready, w.why = False, "exited"
        for fut in w.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"worker {w.index} exited"))
        w.pending.clear()
        self._changed.set()
        lived = time.monotonic() - started
        how = (f"signal {signal.Signals(-status).name}" if status < 0
               else f"status {status}")
        if self.draining and status == 0:
            log.info("worker %d (pid %d) drained and exited", w.index, w.proc.pid)
        else:
            log.error("worker %d (pid %d) exited with %s after %.1fs", w.index, w.proc.pid,
                      how, lived)
        return lived

    async def _read_worker(self, w: WorkerHandle, reader: asyncio.StreamReader) -> None:
        try:
            while (body := await read_frame(reader)) is not None:
                msg = json.loads(body)
                op = msg.get("op")
                if op == "applied":
                    w.applied = int(msg["seq"])
                    w.ready, w.why = bool(msg["ready"]), str(msg.get("why", ""))
                    self._changed.set()
                elif op == "cert":
                    task = asyncio.create_task(self._serve_cert(w, str(msg["identity"])))
                    self._cert_tasks.add(task)
                    task.add_done_callback(self._cert_tasks.discard)
                elif op == "reply":
                    fut = w.pending.pop(int(msg["id"]), None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
        except (ConnectionError, ValueError, KeyError, TypeError) as e:
            # A worker that speaks nonsense is not trusted to serve: it is restarted.
            log.error("worker %d: bad control message (%s); killing it", w.index, e)
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()

    async def ask(self, w: WorkerHandle, op: str) -> dict[str, Any]:
        self._next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        w.pending[self._next_id] = fut
        w.send(to_worker({"op": op, "id": self._next_id}))
        try:
            return await asyncio.wait_for(fut, METRICS_TIMEOUT)
        finally:
            w.pending.pop(self._next_id, None)

    # -- endpoints --------------------------------------------------------------------------

    async def metrics_text(self) -> bytes:
        live = [w for w in self.workers if w.writer is not None]
        answers = await asyncio.gather(*(self.ask(w, "metrics") for w in live),
                                       return_exceptions=True)
        self.metrics.workers_ready.set(sum(1 for w in self.workers if w.ready))
        texts = [self.metrics.render().decode()]
        per_worker = Metric("ambit_ztunnel_worker_connections",
                            "Connections each worker process opened (istio_tcp_connections_"
                            "opened_total of that worker, since its start)", "counter")
        for w, a in zip(live, answers, strict=True):
            if isinstance(a, BaseException):
                log.warning("worker %d did not send its metrics: %s", w.index, a)
                continue
            text = str(a["text"])
            texts.append(text)
            w.last_connections = opened_connections(text)
        for w in self.workers:
            per_worker.add_sample("ambit_ztunnel_worker_connections_total",
                                  {"worker": str(w.index)}, sum(w.last_connections.values()))
        return render_merged(texts, [per_worker])

    async def stats_route(self, method: str, target: str) -> Response:
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return Response(200, await self.metrics_text(),
                            "text/plain; version=0.0.4; charset=utf-8")
        if path in ("/healthz/ready", "/ready"):
            ok, why = self.readiness()
            return Response(200 if ok else 503, (why + "\n").encode())
        if path == "/healthz/live":
            return Response(200, b"live\n")
        return Response(404, b"try /metrics, /healthz/ready or /healthz/live\n")

    def workers_status(self) -> list[dict[str, Any]]:
        return [{"worker": w.index, "pid": w.pid if w.writer is not None else None,
                 "ready": w.ready, "why": w.why, "restarts": w.restarts,
                 "connections": sum(w.last_connections.values()),
                 "by_kind": w.last_connections} for w in self.workers]

    async def admin_route(self, method: str, target: str) -> Response:
        path = target.split("?", 1)[0]
        if method == "GET" and path == "/workers":
            await self.metrics_text()  # refreshes each worker's connection count
            return Response(200, json.dumps(self.workers_status(), indent=2).encode(),
                            "application/json")
        if method == "GET" and path == "/config_dump":
            doc = config_dump(self.ctx)
            # The parent holds the state; certificates and HBONE pools are the workers'.
            doc["certificates"], doc["hbone_pool_connections"] = [], 0
            live = [w for w in self.workers if w.writer is not None]
            answers = await asyncio.gather(*(self.ask(w, "config") for w in live),
                                           return_exceptions=True)
            for w, a in zip(live, answers, strict=True):
                if isinstance(a, BaseException):
                    log.warning("worker %d did not send its config: %s", w.index, a)
                    continue
                doc["certificates"] += [{**c, "worker": w.index} for c in a["certificates"]]
                doc["hbone_pool_connections"] += int(a["hbone_pool_connections"])
            doc["workers"] = self.workers_status()
            return Response(200, json.dumps(doc, indent=2).encode(), "application/json")
        return admin_routes(self.ctx)(method, target)

    # -- drain ------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Drain every worker (each runs the single-process drain), then the parent."""
        if self.draining:
            return
        self.draining = True
        log.info("draining %d worker(s) for up to %.1fs", len(self.workers),
                 self.config.drain_seconds)
        self._begin_drain()
        for w in self.workers:
            w.send(to_worker({"op": "drain"}))
        # The workers stop accepting now; the parent's copies must not keep the listening
        # sockets open meanwhile (connections would queue where nobody accepts, and be reset
        # at exit): the node agent keeps them for the next ztunnel, or they close.
        self._close_groups()
        procs = [w.proc for w in self.workers if w.proc is not None and w.writer is not None]
        waits = [asyncio.create_task(p.wait()) for p in procs]
        if waits:
            _, late = await asyncio.wait(waits, timeout=self.config.drain_seconds + 5)
            for p in procs:
                if p.returncode is None:
                    log.error("worker pid %d did not finish draining: killed", p.pid)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            if late:
                await asyncio.wait(late, timeout=5)
        for t in self.worker_tasks:  # those waiting to restart a worker stop waiting
            t.cancel()
        await asyncio.gather(*self.worker_tasks, return_exceptions=True)
        self._close_groups()
        self.draining = False  # let the base drain run (it returns when already draining)
        await super().shutdown()


async def supervise(config: ZtunnelConfig, stop: asyncio.Event | None = None) -> None:
    """``ambit ztunnel --workers N`` (N > 1): run the parent until SIGTERM or SIGINT."""
    await serve(config, stop, Supervisor(config))


# -- a worker --------------------------------------------------------------------------------

class Worker(Ztunnel):
    """A ztunnel whose data-path listeners come from the parent and whose state the parent
    sends; it opens no admin/metrics port and subscribes to nothing."""

    def __init__(self, config: ZtunnelConfig, index: int,
                 sockets: Mapping[str, Sequence[socket.socket]], defer: bool = False) -> None:
        super().__init__(config)
        self.index = index
        self.sockets = {name: list(socks) for name, socks in sockets.items()}
        # Sockets taken over from a previous ztunnel: accepted on once this worker is ready.
        self.defer = defer
        self.reuseport = True  # per-workload listeners: one per worker, in a group

    def _make_secrets(self) -> Secrets:
        if not self.config.ca_address:
            return super()._make_secrets()  # the identity directory, read here
        return ParentSecrets()  # the parent's CA client fetched them for every worker

    def _open_static(self) -> None:
        handlers = self._capture_handlers()
        from functools import partial

        from ztunnel.listeners import socks5

        handlers["socks5"] = partial(socks5.handle, self.ctx)
        for name, socks in self.sockets.items():
            self._serve_sockets(name, socks, handlers[name], defer=self.defer)

    def _ready_to_serve(self) -> bool:
        return self.store.ready

    def _start_sources(self) -> None:
        return  # the parent's store feeds this one

    def _links_agent(self) -> bool:
        return False  # the parent holds the link (and took the listeners over)

    def _start_agent_link(self, barrier: Callable[[], Awaitable[None]] | None = None) -> None:
        return  # the parent holds the link

    def apply(self, config: MeshConfig, ready: bool) -> None:
        self.store.replace(config)
        self.store.ready = ready


async def _worker_main(index: int, config: ZtunnelConfig, fds: Mapping[str, Sequence[int]],
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       defer: bool = False) -> None:
    sockets = {name: [socket.socket(fileno=fd) for fd in group] for name, group in fds.items()}
    zt = Worker(config, index, sockets, defer)
    if isinstance(zt.secrets, ParentSecrets):
        zt.secrets.send = writer.write
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the whole process group: the parent decides when workers drain.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    await zt.start()

    async def control() -> None:
        while (body := await read_frame(reader)) is not None:
            msg = pickle.loads(body)  # the parent that started us
            op = msg["op"]
            if op == "state":
                zt.apply(msg["config"], msg["ready"])
                ok, why = zt.readiness()
                writer.write(to_parent({"op": "applied", "seq": msg["seq"], "ready": ok,
                                        "why": why}))
            elif op == "cert" and isinstance(zt.secrets, ParentSecrets):
                if msg["pem"] is not None:
                    zt.secrets.install(msg["pem"])
                else:
                    zt.secrets.refused(msg["identity"], msg["error"])
            elif op == "cert_drop" and isinstance(zt.secrets, ParentSecrets):
                zt.secrets.drop(msg["identity"])
            elif op == "config":
                dump = config_dump(zt.ctx)
                writer.write(to_parent({"op": "reply", "id": msg["id"],
                                        "certificates": dump["certificates"],
                                        "hbone_pool_connections":
                                            dump["hbone_pool_connections"]}))
            elif op == "metrics":
                writer.write(to_parent({"op": "reply", "id": msg["id"],
                                        "text": zt.metrics.render().decode()}))
            elif op == "drain":
                return
        log.error("worker %d: the parent is gone; draining", index)

    reading = asyncio.create_task(control())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
    for t in (reading, stopping):
        t.cancel()
    await zt.shutdown()


def worker_main(argv: Sequence[str]) -> int:
    """``python -m ztunnel.workers FD``: a worker, started by the parent."""
    ctl = socket.socket(fileno=int(argv[0]))
    ctl.setblocking(True)
    head = _recv_exactly(ctl, 4)
    init = pickle.loads(_recv_exactly(ctl, struct.unpack("!I", head)[0]))
    config: ZtunnelConfig = init["config"]
    index = int(init["index"])
    logging.basicConfig(level=getattr(logging, config.log_level.upper()),
                        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")
    ctl.setblocking(False)
    import uvloop

    from ztunnel.allocator import tune

    tune()  # a fresh interpreter: the parent's mallopt does not carry over

    async def main() -> None:
        reader, writer = await asyncio.open_connection(sock=ctl)
        await _worker_main(index, config, init["listeners"], reader, writer,
                           bool(init.get("defer")))

    uvloop.run(main())
    return 0


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise SystemExit("worker: the parent closed the control channel before init")
        data += chunk
    return data


if __name__ == "__main__":
    # Through the module's own name, so what the parent pickles (``ztunnel.workers.*``) and
    # what this process runs are one set of classes, not a copy under ``__main__``.
    from ztunnel.workers import worker_main as main

    sys.exit(main(sys.argv[1:]))

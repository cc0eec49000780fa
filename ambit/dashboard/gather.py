"""Collecting what the mesh already exposes, for one model: the sources the dashboard reads.

Why it exists: the model (``model.build``) is pure; something has to fetch its inputs, each with
a bound, concurrently, and without one slow or dead endpoint holding up the rest. A source says
where the endpoints are:

* ``DevClusterSource`` (``--cluster NAME``): the dev cluster's record (``cluster.json``, read
  again at every gather, so pods and waypoints added later appear) names the namespaces; the
  controller's ``/ready`` (15014) in the control-plane namespace, each node's agent
  ``/metrics`` and ``/debug/pods`` (15022) and ztunnel ``/config_dump`` (15000) in the node's,
  each waypoint's agent ``/metrics`` (15020) in its pod's; the registry from its SQLite file.
* ``EmbeddedSource`` (``--db PATH`` with ``--node NAME=HOST``): an embedded control plane run by
  hand, its endpoints on this machine's addresses.
* ``kube.KubernetesSource`` (``--kubeconfig PATH``): a cluster through its API server and its
  pod proxy; the node and waypoint gathers below take the GET to use (``PortGet``).

Every raw answer is kept (bounded) for the page's "raw" links.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ambit.dashboard import netns_http
from ambit.dashboard.model import Gathered, NodeRaw, WaypointRaw
from mesh.ports import (
    ADMIN_PORT,
    GATEWAY_NAME_LABEL,
    METRICS_PORT,
    MONITORING_PORT,
    NODE_METRICS_PORT,
)

FETCH_TIMEOUT = 3.0
MAX_JSON = 8 << 20


@dataclass(frozen=True)
class Endpoint:
    """Where one node's endpoints answer: a network namespace (or None) and a host."""

    netns: str | None
    host: str = "127.0.0.1"


# A GET of ``path`` on one of a node's or pod's ports: a direct fetch (``at``), or the API
# server's pod proxy (``kube``).
PortGet = Callable[[int, str], Awaitable[bytes]]


class Source(Protocol):
    description: str

    async def gather(self, raw: dict[str, bytes]) -> Gathered:
        """One gather; stores each raw answer in ``raw`` under its ``/raw/...`` path."""
        ...


async def fetch(ep: Endpoint, port: int, path: str) -> bytes:
    """One bounded GET (in a thread: it may enter a network namespace); the socket's own
    timeout bounds each step, this one the whole."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT + 1):
            return await asyncio.to_thread(netns_http.get, ep.netns, ep.host, port, path,
                                           timeout=FETCH_TIMEOUT)
    except TimeoutError:
        raise netns_http.FetchError(f"GET {ep.host}:{port}{path}: no answer within "
                                    f"{FETCH_TIMEOUT + 1:g} s") from None


async def _try(what: Awaitable[bytes | None]) -> tuple[bytes | None, str | None]:
    try:
        return await what, None
    except netns_http.FetchError as e:
        return None, str(e)


def _json(body: bytes | None, what: str) -> tuple[Mapping[str, Any] | None, str | None]:
    if body is None:
        return None, None
    if len(body) > MAX_JSON:
        return None, f"{what}: larger than {MAX_JSON} bytes"
    try:
        doc = json.loads(body)
    except ValueError as e:
        return None, f"{what}: not JSON ({e})"
    return (doc, None) if isinstance(doc, Mapping) else (None, f"{what}: not a JSON object")


def at(ep: Endpoint) -> PortGet:
    """``fetch`` from ``ep``, as the per-port GET the node and waypoint gathers take."""
    return functools.partial(fetch, ep)


async def _nothing() -> bytes | None:
    return None


async def gather_node(name: str, get: PortGet, raw: dict[str, bytes], *,
                      config_dump: bool = True) -> NodeRaw:
    """A node's agent metrics and pods and (``config_dump``) its ztunnel's config dump,
    concurrently."""
    (metrics, m_err), (pods, p_err), (config, c_err) = await asyncio.gather(
        _try(get(NODE_METRICS_PORT, "/metrics")),
        _try(get(NODE_METRICS_PORT, "/debug/pods")),
        _try(get(ADMIN_PORT, "/config_dump")) if config_dump else _try(_nothing()))
    node = NodeRaw(name)
    for key, body, err in (("metrics", metrics, m_err), ("pods", pods, p_err),
                           ("config_dump", config, c_err)):
        if body is not None:
            raw[f"/raw/node/{name}/{key}"] = body
        if err:
            node.errors[key] = err
    node.metrics = metrics.decode("utf-8", "replace") if metrics is not None else None
    node.pods, err = _json(pods, "/debug/pods")
    if err:
        node.errors["pods"] = err
    node.config, err = _json(config, "/config_dump")
    if err:
        node.errors["config_dump"] = err
    return node


async def gather_waypoint(wp: WaypointRaw, get: PortGet, raw: dict[str, bytes]) -> WaypointRaw:
    body, err = await _try(get(METRICS_PORT, "/metrics"))
    if body is not None:
        raw[f"/raw/waypoint/{wp.namespace}/{wp.pod}/metrics"] = body
        wp.metrics = body.decode("utf-8", "replace")
    wp.error = err
    return wp


class RegistryReader:
    """The registry's documents, read from its SQLite file. Opened once (opening runs the
    schema's CREATE IF NOT EXISTS, which changes nothing in an existing registry); only an
    existing file is opened, never created."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self._registry: Any = None

    def read(self) -> tuple[list[Mapping[str, Any]], int]:
        from controller.registry.documents import to_document
        from controller.registry.sqlite import EmbeddedRegistry

        if self._registry is None:
            if not self.db.exists():
                raise FileNotFoundError(f"{self.db} does not exist")
            self._registry = EmbeddedRegistry(self.db, timeout=2.0)
        snap = self._registry.snapshot()
        records = [*snap.namespaces, *snap.services, *snap.authorization_policies,
                   *snap.peer_authentications, *snap.gateways, *snap.http_routes]
        return [to_document(r) for r in records], int(snap.revision)

    async def gather(self, g: Gathered, raw: dict[str, bytes]) -> None:
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                docs, g.registry_revision = await asyncio.to_thread(self.read)
        except Exception as e:  # a registry that cannot be read is shown, not fatal
            g.registry_error = f"{self.db}: {e or type(e).__name__}"
            return
        g.registry = docs
        for d in docs:
            meta = d.get("metadata") or {}
            raw[f"/raw/registry/{d.get('kind')}/{meta.get('namespace')}/{meta.get('name')}"] = \
                json.dumps(d, indent=1).encode()


async def _controller(g: Gathered, ep: Endpoint) -> None:
    _, err = await _try(fetch(ep, MONITORING_PORT, "/ready"))
    g.controller_ready = err is None
    g.controller_error = err


class DevClusterSource:
    """A dev cluster (``ambit dev cluster``, ``make demo KEEP=1``) by name."""

    def __init__(self, name: str, root: Path | None = None) -> None:
        from ambit.dev.cluster_state import STATE_ROOT

        self.name = name
        self.root = root or STATE_ROOT
        self.description = f"dev cluster {name!r} ({self.root / name})"
        self.registry = RegistryReader(self.root / name / "registry.db")

    def _record(self) -> Any:
        from ambit.dev.cluster_state import ClusterState

        return ClusterState.load(self.name, root=self.root, out=lambda _line: None)

    async def gather(self, raw: dict[str, bytes]) -> Gathered:
        g = Gathered(at=time.time(), source=self.description)
        try:
            c = await asyncio.to_thread(self._record)
        except Exception as e:
            g.controller_error = f"cannot read the cluster's record: {e}"
            return g
        waypoints = [WaypointRaw(p.namespace, p.labels[GATEWAY_NAME_LABEL], p.name, p.node)
                     for p in c.pods.values() if GATEWAY_NAME_LABEL in p.labels]
        pod_ns = {p.name: f"/var/run/netns/{p.netns}" for p in c.pods.values()}
        nodes, wps, _, _ = await asyncio.gather(
            asyncio.gather(*(gather_node(n.name, at(Endpoint(f"/var/run/netns/{n.netns}")), raw)
                             for n in c.nodes)),
            asyncio.gather(*(gather_waypoint(wp, at(Endpoint(pod_ns[wp.pod])), raw)
                             for wp in waypoints)),
            _controller(g, Endpoint(f"/var/run/netns/{c.cp_ns}")),
            self.registry.gather(g, raw))
        g.nodes, g.waypoints = list(nodes), list(wps)
        return g


class EmbeddedSource:
    """A control plane run by hand (``ambit controller --db``), nodes named with their
    addresses (``--node NAME=HOST``); the controller's monitoring port on ``controller``."""

    def __init__(self, db: Path, nodes: Mapping[str, str], controller: str = "127.0.0.1") \
            -> None:
        self.nodes = dict(nodes)
        self.controller = controller
        self.description = f"registry {db}, nodes {', '.join(self.nodes) or 'none'}"
        self.registry = RegistryReader(db)

    async def gather(self, raw: dict[str, bytes]) -> Gathered:
        g = Gathered(at=time.time(), source=self.description)
        nodes, _, _ = await asyncio.gather(
            asyncio.gather(*(gather_node(name, at(Endpoint(None, host)), raw)
                             for name, host in self.nodes.items())),
            _controller(g, Endpoint(None, self.controller)),
            self.registry.gather(g, raw))
        g.nodes = list(nodes)
        return g

"""Two controller replicas against the in-repo API-server double: leader election on the Lease,
the mesh root's Secret, and the leader-only work (``ambit-ca-root``, the waypoint deployer).

Each replica reaches the double through its own recording proxy (``Proxy``), so a test knows
which replica sent which request (the double's own log cannot tell two clients with the same
token apart) and can cut one replica off (a partition: its requests hang) or hold its writes to
stage a race. Everything else is real: ``kubernetes_asyncio`` over loopback HTTP, the double's
optimistic concurrency (409 on a stale ``resourceVersion``, AlreadyExists), and at the end two
``ambit controller --mode kubernetes`` processes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from kubernetes_asyncio import client

from controller import main
from controller.ca import CertificateAuthority
from controller.ca_store import CaStoreError
from controller.k8s_ca import keep_ca_root, load_or_create_ca
from controller.leader import LeaderElector, Timings, parse_lease
from controller.registry.kubernetes import api_client
from controller.waypoint.deploy import CA_ROOT_CONFIGMAP, CA_ROOT_KEY
from controller.waypoint.k8s_apply import Rest
from controller.waypoint.model import Gateway
from controller.waypoint.parse import parse_gateway
from mesh.state.controller_source import ControllerSource
from mesh.state.store import StateStore
from tests.component.harness import free_port
from tests.component.test_controller_kubernetes import ztunnel_token_file
from tests.k8s_double import objects
from tests.k8s_double.server import ADMIN_TOKEN, ApiServerDouble

NS = "ambit-system"
TD = "cluster.local"
FAST = Timings(lease_duration=1, renew_deadline=0.6, retry_period=0.1)
# A lease that expires slowly, to tell a clean handover from an expiry.
SLOW_EXPIRY = Timings(lease_duration=4, renew_deadline=3.0, retry_period=0.1)


# --- a recording, partitionable proxy per replica ---------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    status: int = 0  # 0: not answered (yet)


@dataclass
class Proxy:
    """One replica's way to the double: every request recorded with its answer's status."""

    upstream: str
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    _open: asyncio.Event = field(default_factory=asyncio.Event)
    _holds: dict[str, asyncio.Event] = field(default_factory=dict)
    _held: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> Proxy:
        self._open.set()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self._runner.setup()
        port = free_port("127.0.0.1")
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def close(self) -> None:
        self._open.set()
        for gate in self._holds.values():
            gate.set()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig that reaches the double through this proxy."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "proxy",
            "clusters": [{"name": "proxy", "cluster": {"server": self.url}}],
            "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "admin"}}],
        }))
        return path

    def partition(self) -> None:
        """From now on requests hang (a replica cut off from the API server)."""
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def hold(self, method: str) -> None:
        """Hold requests of ``method`` until ``release(method)``."""
        self._holds[method] = asyncio.Event()

    def release(self, method: str) -> None:
        self._holds.pop(method).set()

    def held(self, method: str) -> int:
        return self._held.count(method)

    def writes(self, plural: str) -> list[Seen]:
        return [s for s in self.seen if s.method != "GET"
                and f"/{plural}" in s.path and not s.path.endswith("/tokenreviews")]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(request.method, request.path, dict(request.query))
        self.seen.append(seen)
        await self._open.wait()
        gate = self._holds.get(request.method)
        if gate is not None:
            self._held.append(request.method)
            await gate.wait()
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k in ("Authorization", "Content-Type", "Accept")}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         headers=headers, data=body or None) as up:
            seen.status = up.status
            out = web.StreamResponse(status=up.status, headers={
                "Content-Type": up.headers.get("Content-Type", "application/json")})
            await out.prepare(request)
            with contextlib.suppress(ConnectionError):
                async for chunk in up.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
            return out


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def double(double: ApiServerDouble) -> ApiServerDouble:
    """conftest's double, with the namespace the Lease and the Secret live in."""
    double.apply("namespaces", objects.namespace(NS, ambient=False))
    return double


@dataclass
class Replica:
    name: str
    proxy: Proxy
    api: client.ApiClient
    rest: Rest


@pytest.fixture
async def replicas(double: ApiServerDouble, tmp_path: Path) -> AsyncIterator[list[Replica]]:
    out: list[Replica] = []
    for name in ("ctl-a", "ctl-b"):
        proxy = await Proxy(double.url).start()
        api = await api_client(str(proxy.kubeconfig(tmp_path / f"{name}.kubeconfig")))
        out.append(Replica(name, proxy, api, Rest(api, timeout=5.0)))
    yield out
    for r in out:
        await r.api.close()
        await r.proxy.close()


async def eventually(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"not true within {within}s"
        await asyncio.sleep(0.01)


def lease(double: ApiServerDouble) -> dict[str, Any]:
    obj = double.store.get("leases", "ambit-controller", NS)
    assert obj is not None
    return obj


def holder(double: ApiServerDouble) -> str:
    obj = double.store.get("leases", "ambit-controller", NS)
    return parse_lease(obj).holder if obj is not None else ""


@dataclass
class Transitions:
    """Every (time, replica, leading) transition, and a monitor that no two lead at once."""

    log: list[tuple[float, str, bool]] = field(default_factory=list)
    leading: set[str] = field(default_factory=set)
    overlaps: int = 0

    def hook(self, name: str) -> Callable[[bool], None]:
        def on_change(leading: bool) -> None:
            self.log.append((time.monotonic(), name, leading))
            if leading:
                self.overlaps += bool(self.leading)
                self.leading.add(name)
            else:
                self.leading.discard(name)
        return on_change

    def at(self, name: str, leading: bool) -> float:
        return next(t for t, n, v in self.log if n == name and v == leading)


def leading(e: LeaderElector) -> Callable[[], bool]:
    return lambda: e.is_leader


def holder_of(e: LeaderElector) -> Callable[[], str]:
    return lambda: e.leader


def elector(r: Replica, timings: Timings, transitions: Transitions | None = None,
            lead: Callable[[], Any] | None = None) -> LeaderElector:
    return LeaderElector(r.rest, NS, "ambit-controller", r.name, timings=timings, lead=lead,
                         on_change=transitions.hook(r.name) if transitions else None)


@contextlib.asynccontextmanager
async def campaigning(*electors: LeaderElector) -> AsyncIterator[None]:
    for e in electors:
        e.start()
    try:
        yield
    finally:
        for e in electors:
            await e.close()


# --- leader election ------------------------------------------------------------------------


async def test_exactly_one_leader_and_a_clean_shutdown_hands_over_at_once(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    seen = Transitions()
    a, b = (elector(r, SLOW_EXPIRY, seen) for r in replicas)
    async with campaigning(a, b):
        await eventually(lambda: a.is_leader or b.is_leader)
        leader, follower = (a, b) if a.is_leader else (b, a)
        assert holder(double) == leader.identity
        # Over more than a lease duration's worth of renewals, the follower never leads.
        await asyncio.sleep(1.0)
        assert leader.is_leader and not follower.is_leader
        assert follower.leader == leader.identity
        spec = lease(double)["spec"]
        assert spec["leaseDurationSeconds"] == 4 and spec["leaseTransitions"] == 0
        assert spec["acquireTime"] < spec["renewTime"]
        assert lease(double)["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ambit"

        await leader.close()  # a clean shutdown releases the Lease
        released_at = time.monotonic()
        assert holder(double) == ""
        await eventually(lambda: follower.is_leader, within=1.0)
        # Much sooner than the 4 s the lease would take to expire.
        assert time.monotonic() - released_at < 1.0
        assert holder(double) == follower.identity
        assert lease(double)["spec"]["leaseTransitions"] == 1
    assert seen.overlaps == 0
    assert [(n, v) for _, n, v in seen.log] == [
        (leader.identity, True), (leader.identity, False), (follower.identity, True),
        (follower.identity, False)]


async def test_a_dead_leader_is_replaced_when_its_lease_expires(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    a, b = (elector(r, FAST) for r in replicas)
    task = a.start()
    await eventually(lambda: a.is_leader)
    async with campaigning(b):
        await eventually(lambda: b.leader == a.identity)
        # a dies: no release, no more renewals.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        last_renewal = time.monotonic()
        await eventually(lambda: b.is_leader, within=3.0)
        waited = time.monotonic() - last_renewal
        # Not before the lease (1 s) has stayed unchanged on b's clock, and soon after.
        assert FAST.lease_duration - FAST.retry_period * 2.2 <= waited < 2.5
        assert holder(double) == b.identity
        assert lease(double)["spec"]["leaseTransitions"] == 1


async def test_a_partitioned_leader_stops_leading_before_another_takes_over(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    seen = Transitions()
    working: dict[str, bool] = {}

    def lead_work(name: str) -> Callable[[], Any]:
        async def lead() -> None:
            working[name] = True
            try:
                await asyncio.Event().wait()
            finally:
                working[name] = False
        return lead

    a, b = (elector(r, FAST, seen, lead_work(r.name)) for r in replicas)
    async with campaigning(a, b):
        await eventually(lambda: a.is_leader or b.is_leader)
        (leader, lr), (follower, _) = sorted(zip((a, b), replicas, strict=True),
                                             key=lambda p: not p[0].is_leader)
        await eventually(lambda: working.get(leader.identity, False))
        lr.proxy.partition()  # its renewals hang: it cannot know whether they land
        await eventually(lambda: follower.is_leader, within=4.0)
        lost, won = seen.at(leader.identity, False), seen.at(follower.identity, True)
        # The old leader stopped its work (renew deadline 0.6 s) before the lease expired
        # (1 s) for the other.
        assert lost < won
        assert not working[leader.identity] and working[follower.identity]
        assert not leader.is_leader  # still running, still campaigning
        lr.proxy.heal()
        await eventually(lambda: leader.leader == follower.identity)
        await asyncio.sleep(0.5)
        assert not leader.is_leader and follower.is_leader
    assert seen.overlaps == 0


async def test_two_replicas_creating_the_lease_at_once_one_gets_409(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    ra, rb = replicas
    a, b = (elector(r, SLOW_EXPIRY) for r in replicas)
    # Both read "no Lease" and both POST: the API server lets one create it.
    for r in replicas:
        r.proxy.hold("POST")
    async with campaigning(a, b):
        await eventually(lambda: ra.proxy.held("POST") == rb.proxy.held("POST") == 1)
        for r in replicas:
            r.proxy.release("POST")
        await eventually(lambda: a.is_leader or b.is_leader)
        await asyncio.sleep(0.3)
        assert a.is_leader != b.is_leader
        posts = sorted(s.status for r in replicas for s in r.proxy.writes("leases")
                       if s.method == "POST")
        assert posts == [201, 409]
        winner, loser = (a, b) if a.is_leader else (b, a)
        assert holder(double) == winner.identity and loser.leader == winner.identity


async def test_two_replicas_taking_a_released_lease_at_once_one_gets_409(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    ra, rb = replicas
    # A Lease released by a leader that shut down cleanly, 3 transitions so far.
    double.apply("leases", {"metadata": {"name": "ambit-controller", "namespace": NS},
                            "spec": {"holderIdentity": "", "leaseDurationSeconds": 1,
                                     "leaseTransitions": 3}})
    a, b = (elector(r, SLOW_EXPIRY) for r in replicas)
    for r in replicas:
        r.proxy.hold("PUT")
    async with campaigning(a, b):
        # Both read the same resourceVersion and PUT from it.
        await eventually(lambda: ra.proxy.held("PUT") == rb.proxy.held("PUT") == 1)
        for r in replicas:
            r.proxy.release("PUT")
        await eventually(lambda: a.is_leader or b.is_leader)
        await asyncio.sleep(0.3)
        assert a.is_leader != b.is_leader
        first = sorted(r.proxy.writes("leases")[0].status for r in replicas)
        assert first == [200, 409]
        assert lease(double)["spec"]["leaseTransitions"] == 4  # one transition, not two


async def test_the_namespace_missing_stops_the_election_with_what_to_do(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    e = LeaderElector(replicas[0].rest, "nowhere", "ambit-controller", "ctl-a", timings=FAST)
    with pytest.raises(Exception, match="namespace nowhere does not exist; install Ambit"):
        await asyncio.wait_for(e.run(), 5)


# --- the mesh root --------------------------------------------------------------------------


async def test_replicas_agree_on_one_root_created_by_the_leader_only(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    electors = [elector(r, FAST) for r in replicas]
    async with campaigning(*electors):
        roots = await asyncio.gather(*(
            load_or_create_ca(r.rest, NS, "ambit-ca", TD, is_leader=leading(e),
                              leader=holder_of(e), poll=0.05)
            for r, e in zip(replicas, electors, strict=True)))
        (ca_a, created_a), (ca_b, created_b) = roots
        assert ca_a.root_pem == ca_b.root_pem and ca_a.key_pem == ca_b.key_pem
        assert sorted([created_a, created_b]) == [False, True]
        creator = replicas[0] if created_a else replicas[1]
        other = replicas[1] if created_a else replicas[0]
        assert [s.status for s in creator.proxy.writes("secrets")] == [201]
        assert other.proxy.writes("secrets") == []  # the follower waited and read it
        secret = double.store.get("secrets", "ambit-ca", NS)
        assert secret is not None and secret["type"] == "Opaque"
        assert base64.b64decode(secret["data"]["root-cert.pem"]) == ca_a.root_pem


async def test_two_would_be_leaders_racing_to_create_the_secret_end_with_one_root(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    # Split brain (both believe they lead): the POST is still the arbiter.
    for r in replicas:
        r.proxy.hold("POST")
    loading = [asyncio.create_task(load_or_create_ca(r.rest, NS, "ambit-ca", TD,
                                                     is_leader=lambda: True, poll=0.05))
               for r in replicas]
    await eventually(lambda: all(r.proxy.held("POST") == 1 for r in replicas))
    for r in replicas:
        r.proxy.release("POST")
    (ca_a, created_a), (ca_b, created_b) = await asyncio.gather(*loading)
    assert ca_a.root_pem == ca_b.root_pem
    assert sorted([created_a, created_b]) == [False, True]
    assert sorted(s.status for r in replicas for s in r.proxy.writes("secrets")) == [201, 409]


async def test_a_user_supplied_secret_is_used_and_never_written(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    user = CertificateAuthority.generate(TD)
    double.apply("secrets", {"metadata": {"name": "ambit-ca", "namespace": NS},
                             "type": "Opaque", "data": {
                                 "root-cert.pem": base64.b64encode(user.root_pem).decode(),
                                 "root-key.pem": base64.b64encode(user.key_pem).decode()}})
    electors = [elector(r, FAST) for r in replicas]
    async with campaigning(*electors):
        await eventually(lambda: any(e.is_leader for e in electors))
        for r, e in zip(replicas, electors, strict=True):
            ca, created = await load_or_create_ca(r.rest, NS, "ambit-ca", TD,
                                                  is_leader=leading(e))
            assert ca.root_pem == user.root_pem and not created
    assert [s for r in replicas for s in r.proxy.writes("secrets")] == []


async def test_a_malformed_secret_is_an_error_and_left_alone(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    double.apply("secrets", {"metadata": {"name": "ambit-ca", "namespace": NS},
                             "data": {"root-cert.pem": base64.b64encode(b"junk").decode(),
                                      "root-key.pem": base64.b64encode(b"junk").decode()}})
    with pytest.raises(CaStoreError) as err:
        await load_or_create_ca(replicas[0].rest, NS, "ambit-ca", TD, is_leader=lambda: True)
    assert "Secret ambit-system/ambit-ca: key root-cert.pem is not PEM" in str(err.value)
    assert replicas[0].proxy.writes("secrets") == []


async def test_the_leader_keeps_the_ca_root_configmap(
        double: ApiServerDouble, replicas: list[Replica]) -> None:
    pem = CertificateAuthority.generate(TD).root_pem
    task = asyncio.create_task(keep_ca_root(replicas[0].rest, NS, pem, resync=0.1))
    try:
        await eventually(lambda: double.store.get("configmaps", CA_ROOT_CONFIGMAP, NS)
                         is not None)
        cm = double.store.get("configmaps", CA_ROOT_CONFIGMAP, NS)
        assert cm is not None and cm["data"] == {CA_ROOT_KEY: pem.decode()}
        assert cm["metadata"]["labels"] == {"app.kubernetes.io/part-of": "ambit",
                                            "app.kubernetes.io/managed-by": "ambit"}
        # Someone edits it: put back at the next check, their extra key kept.
        cm["data"] = {CA_ROOT_KEY: "tampered", "note": "x"}
        double.apply("configmaps", cm)
        await eventually(lambda: (double.store.get("configmaps", CA_ROOT_CONFIGMAP, NS) or {})
                         .get("data") == {CA_ROOT_KEY: pem.decode(), "note": "x"})
        # Deleted: created again.
        double.delete("configmaps", CA_ROOT_CONFIGMAP, NS)
        await eventually(lambda: double.store.get("configmaps", CA_ROOT_CONFIGMAP, NS)
                         is not None)
        methods = [s.method for s in replicas[0].proxy.writes("configmaps")]
        assert methods == ["POST", "PUT", "POST"]
        # Unchanged: only reads.
        await asyncio.sleep(0.3)
        assert len(replicas[0].proxy.writes("configmaps")) == 3
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the controller's wiring (controller.main), two replicas in one event loop ---------------


def controller_args(kubeconfig: Path, ident: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    main.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "controller", "--mode", "kubernetes", "--kubeconfig", str(kubeconfig),
        "--leader-election-id", ident, "--leader-election-lease-duration", "1",
        "--leader-election-renew-deadline", "0.6", "--leader-election-retry-period", "0.1",
        "--waypoint-image", "ghcr.io/ambit/ambit:test", *extra])
    main.resolve_flags(args, "kubernetes", {})
    return args


def waypoints(double: ApiServerDouble) -> list[Gateway]:
    return [parse_gateway(name, ns, (o["metadata"].get("labels") or {}).items(), o["spec"])
            for (ns, name), o in sorted(double.store.objects["gateways"].items())]


async def test_only_the_leader_runs_the_deployer_and_writes_the_trust_bundle(
        double: ApiServerDouble, tmp_path: Path) -> None:
    double.apply("namespaces", objects.namespace("shop"))
    double.apply("gateways", objects.gateway("waypoint", "shop"))
    proxies = [await Proxy(double.url).start() for _ in range(2)]
    modes = [main.KubernetesMode(controller_args(
        p.kubeconfig(tmp_path / f"k{i}"), f"ctl-{i}")) for i, p in enumerate(proxies)]
    stop = asyncio.Event()
    try:
        for m in modes:
            await m.open()
        cas = await asyncio.gather(*(m.load_ca(stop) for m in modes))
        assert cas[0].root_pem == cas[1].root_pem
        for m, ca in zip(modes, cas, strict=True):
            m.feed(ca).deployer.update(waypoints(double))  # as each state does
        leader_i = next(i for i, m in enumerate(modes) if m.elector.is_leader)
        follower_i = 1 - leader_i
        await eventually(lambda: double.store.get("deployments", "waypoint", "shop") is not None)
        await eventually(lambda: double.store.get("configmaps", CA_ROOT_CONFIGMAP, NS)
                         is not None)
        await eventually(lambda: double.store.get("configmaps", CA_ROOT_CONFIGMAP, "shop")
                         is not None)
        cm = double.store.get("configmaps", CA_ROOT_CONFIGMAP, NS)
        assert cm is not None and cm["data"][CA_ROOT_KEY] == cas[0].root_pem.decode()
        await asyncio.sleep(0.5)
        leader_p, follower_p = proxies[leader_i], proxies[follower_i]
        for plural in ("deployments", "services", "serviceaccounts", "configmaps", "secrets",
                       "gateways"):
            assert follower_p.writes(plural) == [], plural
        assert [s.status for s in leader_p.writes("deployments")] == [201]
        # The follower does not even watch what the deployer manages.
        assert not any("deployments" in s.path for s in follower_p.seen)

        # The leader goes (clean shutdown): the other takes over the deployer, which repairs
        # what changed meanwhile.
        await modes[leader_i].close()
        await eventually(lambda: modes[follower_i].elector.is_leader, within=2.0)
        double.delete("deployments", "waypoint", "shop")
        await eventually(lambda: double.store.get("deployments", "waypoint", "shop")
                         is not None)
        assert [s.status for s in follower_p.writes("deployments")] == [201]
    finally:
        for m in modes:
            await m.close()
        for p in proxies:
            await p.close()


async def test_no_leader_election_and_a_root_from_files(double: ApiServerDouble,
                                                        tmp_path: Path) -> None:
    proxy = await Proxy(double.url).start()
    kubeconfig = proxy.kubeconfig(tmp_path / "k")
    stop = asyncio.Event()
    # --no-leader-election: no Lease at all; this replica creates the Secret and the ConfigMap.
    single = main.KubernetesMode(controller_args(kubeconfig, "solo", "--no-leader-election"))
    try:
        await single.open()
        ca = await single.load_ca(stop)
        single.feed(ca)
        await eventually(lambda: double.store.get("configmaps", CA_ROOT_CONFIGMAP, NS)
                         is not None)
        secret = double.store.get("secrets", "ambit-ca", NS)
        assert secret is not None
        assert base64.b64decode(secret["data"]["root-cert.pem"]) == ca.root_pem
        assert double.store.get("leases", "ambit-controller", NS) is None
        assert not any("/leases" in s.path for s in proxy.seen)
    finally:
        await single.close()
    # --ca-cert/--ca-key: the files win; the Secret is not read, the ConfigMap follows them.
    files = CertificateAuthority.generate(TD)
    (tmp_path / "c.pem").write_bytes(files.root_pem)
    (tmp_path / "k.pem").write_bytes(files.key_pem)
    seen = len(proxy.seen)
    override = main.KubernetesMode(controller_args(
        kubeconfig, "solo", "--ca-cert", str(tmp_path / "c.pem"), "--ca-key",
        str(tmp_path / "k.pem")))
    try:
        await override.open()
        ca = await override.load_ca(stop)
        assert ca.root_pem == files.root_pem
        override.feed(ca)
        await eventually(lambda: (double.store.get("configmaps", CA_ROOT_CONFIGMAP, NS) or {})
                         .get("data", {}).get(CA_ROOT_KEY) == files.root_pem.decode())
        assert not any("/secrets" in s.path for s in proxy.seen[seen:])
    finally:
        await override.close()
        await proxy.close()


def test_flags_resolve_from_the_pod_environment() -> None:
    parser = argparse.ArgumentParser()
    main.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["controller"])
    main.resolve_flags(args, "kubernetes", {"POD_NAME": "ambit-controller-x-1",
                                            "POD_NAMESPACE": "mesh"})
    assert args.ca_secret == ("mesh", "ambit-ca")
    assert (args.leader_election_namespace, args.leader_election_id) == (
        "mesh", "ambit-controller-x-1")
    assert args.data_dir is None  # Kubernetes mode writes no files unless asked
    args = parser.parse_args(["controller"])
    main.resolve_flags(args, "kubernetes", {})
    assert args.ca_secret == ("ambit-system", "ambit-ca")
    assert args.leader_election_namespace == "ambit-system"
    args = parser.parse_args(["controller"])
    main.resolve_flags(args, "embedded", {})
    assert args.data_dir == main.DEFAULT_DATA_DIR
    for argv, error in [
        (["--ca-secret", "nope"], "--ca-secret: 'nope' is not NAMESPACE/NAME"),
        (["--ca-secret", "a/b", "--ca-cert", "c", "--ca-key", "k"], "two sources"),
        (["--ca-cert", "c"], "go together"),
        (["--leader-election-renew-deadline", "20"], "longer than the renew deadline"),
    ]:
        args = parser.parse_args(["controller", *argv])
        with pytest.raises(main.ControllerUsageError, match=error):
            main.resolve_flags(args, "kubernetes", {})
    args = parser.parse_args(["controller", "--ca-secret", "a/b"])
    with pytest.raises(main.ControllerUsageError, match="for --mode kubernetes"):
        main.resolve_flags(args, "embedded", {})


# --- two `ambit controller` processes -------------------------------------------------------

_RUNS = itertools.count()


@dataclass
class Process:
    name: str
    proc: asyncio.subprocess.Process
    grpc_port: int
    monitoring_port: int
    proxy: Proxy
    log: Path

    def _metric(self, name: str) -> float | None:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{self.monitoring_port}/metrics",
                                          timeout=2).read().decode()
        except OSError:
            return None
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    async def metric(self, name: str) -> float | None:
        """A sample from /metrics (off the event loop: the proxies live on it)."""
        return await asyncio.to_thread(self._metric, name)

    async def wait_metric(self, name: str, value: float, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while await self.metric(name) != value:
            assert time.monotonic() < deadline, f"{self.name}: {name} != {value}"
            await asyncio.sleep(0.1)


async def spawn(double: ApiServerDouble, tmp_path: Path, name: str,
                *extra: str) -> Process:
    proxy = await Proxy(double.url).start()
    kubeconfig = proxy.kubeconfig(tmp_path / f"{name}.kubeconfig")
    grpc_port, monitoring_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items()
           if k not in ("KUBECONFIG", "AMBIT_DB", "POD_NAMESPACE")}
    env["POD_NAME"] = name
    log = tmp_path / f"{name}-{next(_RUNS)}.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ambit.cli", "controller", "--mode", "kubernetes",
            "--kubeconfig", str(kubeconfig), "--listen-host", "127.0.0.1",
            "--grpc-port", str(grpc_port), "--xds-port", "-1",
            "--monitoring-host", "127.0.0.1", "--monitoring-port", str(monitoring_port),
            "--leader-election-lease-duration", "2", "--leader-election-renew-deadline", "1.5",
            "--leader-election-retry-period", "0.2", *extra,
            env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    return Process(name, proc, grpc_port, monitoring_port, proxy, log)


async def stop_process(p: Process, sig: int | None = signal.SIGTERM) -> tuple[int, str]:
    """Stop it (``sig`` None: wait for it to exit by itself); (exit code, its log)."""
    if sig is not None and p.proc.returncode is None:
        p.proc.send_signal(sig)
    code = await asyncio.wait_for(p.proc.wait(), 15)
    await p.proxy.close()
    return code, p.log.read_text()


async def ztunnel_ready(port: int, root_pem: bytes, token: Path, within: float = 20.0) -> None:
    """A ztunnel that trusts only ``root_pem`` gets its state from the controller at
    ``port`` (presenting node-a's ``token``): the controller serves TLS from that root."""
    store = StateStore()
    source = ControllerSource(f"localhost:{port}", "node-a", store,
                              grpc.ssl_channel_credentials(root_certificates=root_pem),
                              token_file=token, backoff_initial=0.05, backoff_max=0.3)
    task = asyncio.create_task(source.run())
    try:
        await eventually(lambda: store.ready, within=within)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_two_controller_processes_share_the_root_and_one_leads(
        double: ApiServerDouble, tmp_path: Path) -> None:
    double.apply("pods", objects.pod("web-1", "default", "10.1.0.5"))
    procs = [await spawn(double, tmp_path, name) for name in ("ctl-a", "ctl-b")]
    try:
        await eventually(lambda: double.store.get("secrets", "ambit-ca", NS) is not None,
                         within=20)
        secret = double.store.get("secrets", "ambit-ca", NS)
        assert secret is not None
        root = base64.b64decode(secret["data"]["root-cert.pem"])
        token = ztunnel_token_file(double, tmp_path)
        for p in procs:  # both serve, with certificates from the Secret's root
            await ztunnel_ready(p.grpc_port, root, token)
        await eventually(lambda: holder(double) in ("ctl-a", "ctl-b"))
        leader = next(p for p in procs if p.name == holder(double))
        follower = next(p for p in procs if p is not leader)
        await leader.wait_metric("ambit_controller_leader", 1.0)
        assert await follower.metric("ambit_controller_leader") == 0.0
        assert [s.status for s in leader.proxy.writes("secrets")] == [201]
        assert follower.proxy.writes("secrets") == []
        cm = double.store.get("configmaps", CA_ROOT_CONFIGMAP, NS)
        assert cm is not None and cm["data"][CA_ROOT_KEY].encode() == root
        assert follower.proxy.writes("configmaps") == []

        # The leader is killed (no release): the other leads once the lease (2 s) expires.
        leader.proc.kill()
        await eventually(lambda: holder(double) == follower.name, within=10)
        await follower.wait_metric("ambit_controller_leader", 1.0)
        assert lease(double)["spec"]["leaseTransitions"] == 1
        await ztunnel_ready(follower.grpc_port, root, token)
        # A clean stop releases the Lease.
        code, err = await stop_process(follower)
        assert code == 0, err
        assert holder(double) == ""
        assert "became the leader" in err and "released Lease ambit-system/ambit-controller" \
            in err
    finally:
        for p in procs:
            if p.proc.returncode is None:
                p.proc.kill()
                await p.proc.wait()
            await p.proxy.close()


async def test_a_controller_process_refuses_a_bad_secret_and_a_missing_namespace(
        double: ApiServerDouble, tmp_path: Path) -> None:
    double.apply("secrets", {"metadata": {"name": "ambit-ca", "namespace": NS},
                             "data": {"root-cert.pem": base64.b64encode(b"x").decode()}})
    p = await spawn(double, tmp_path, "ctl-a")
    code, err = await stop_process(p, None)
    assert code == 2, err
    assert "Secret ambit-system/ambit-ca has no key root-key.pem" in err
    assert "it is never overwritten" in err
    assert p.proxy.writes("secrets") == []

    p = await spawn(double, tmp_path, "ctl-a", "--ca-secret", "elsewhere/ambit-ca",
                    "--leader-election-namespace", "elsewhere")
    code, err = await stop_process(p, None)
    assert code == 2, err
    assert "namespace elsewhere does not exist" in err

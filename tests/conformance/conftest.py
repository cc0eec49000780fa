"""One dev cluster for the whole conformance tier, laid out like upstream's mesh manifests.

Upstream (``conformance/mesh/manifests.yaml``): namespace ``gateway-conformance-mesh`` with
Deployments echo-v1 and echo-v2 (``app: echo``, ``version: v1|v2``; ports 8080 HTTP, 7070
gRPC, 9090 TCP) and Services ``echo`` (both), ``echo-v1``, ``echo-v2``, each with ports
``http`` 80->8080 (appProtocol http), ``http-alt`` 8080 (appProtocol http), ``https``
443->8443, ``tcp`` 9090 and ``grpc`` 7070 (appProtocol kubernetes.io/h2c on ``echo``); and
namespace ``gateway-conformance-mesh-consumer`` with its own echo-v1, the consumer client.

Here: the same namespaces, Services and ports, in the dev cluster (real ztunnels, capture,
CNI, controller and Envoy); every Service of the mesh namespace is bound to the waypoint
``wp`` by the namespace's ``ambit.dev/use-waypoint`` label, as Istio's ambient conformance
runs do. Pods: echo-v1 and the consumer on node-1, echo-v2 and the waypoint on node-2, so
client -> waypoint -> backend crosses nodes both ways. There is no cluster DNS: a Service
name is resolved to its VIP by the runner, and sent as the Host header as upstream's client
does.

``Mesh.check(docs, cases)`` applies a test's manifests, sends every case from its client pod
(one process per batch) until all pass three times in a row (upstream's "eventually
consistent" responses), then deletes the manifests.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from ambit.dev import mesh as devmesh
from ambit.dev import netns
from ambit.dev.cluster import DevCluster
from tests.conformance.expect import Case, Expect, Req, judge

MESH_NS = "gateway-conformance-mesh"
CONSUMER_NS = "gateway-conformance-mesh-consumer"
WAYPOINT = "wp"
HERE = Path(__file__).resolve().parent
CLIENT = HERE / "client.py"
ECHO = HERE / "echo_server.py"
VIPS = {"echo": "10.96.40.10", "echo-v1": "10.96.40.11", "echo-v2": "10.96.40.12"}
# Upstream's Service ports (mesh/manifests.yaml); targetPort defaults to the port.
PORTS: list[dict[str, Any]] = [
    {"name": "http", "port": 80, "appProtocol": "http", "targetPort": 8080},
    {"name": "http-alt", "port": 8080, "appProtocol": "http"},
    {"name": "https", "port": 443, "targetPort": 8443},
    {"name": "tcp", "port": 9090},
    {"name": "grpc", "port": 7070},
]
TIMEOUT = 30.0  # config travels registry -> controller -> xDS -> Envoy; upstream allows 60 s
CONSECUTIVE = 3


def service(name: str, selector: dict[str, str]) -> dict[str, Any]:
    ports = [dict(p) for p in PORTS]
    if name == "echo":
        ports[-1]["appProtocol"] = "kubernetes.io/h2c"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": MESH_NS},
            "spec": {"clusterIP": VIPS[name], "selector": selector, "ports": ports}}


class Mesh:
    """The running tier: send cases, judge them, apply and remove manifests."""

    def __init__(self, cluster: DevCluster) -> None:
        self.cluster = cluster

    def pod_ip(self, name: str) -> str:
        return self.cluster.pod(name).ip

    def address(self, case: Case) -> tuple[str, int]:
        name, port = case.req.name_and_port
        try:
            return str(ipaddress.ip_address(name)), port
        except ValueError:
            return VIPS[name.split(".")[0]], port

    def send(self, client: str, cases: Sequence[Case], count: int = 1) \
            -> list[list[dict[str, Any]]]:
        """Each case ``count`` times from pod ``client``: the results, in order."""
        batch = []
        for case in cases:
            address, port = self.address(case)
            headers = list(case.req.headers)
            host = next((v for k, v in headers if k.lower() == "host"), case.req.host)
            batch.append({"protocol": case.req.protocol, "address": address, "port": port,
                          "host": host, "method": case.req.method, "path": case.req.path,
                          "headers": [[k, v] for k, v in headers if k.lower() != "host"],
                          "count": count})
        argv = [devmesh.PYTHON, str(CLIENT), json.dumps(batch)]
        res = subprocess.run(netns.ns_argv(self.cluster.pod(client).netns, argv),
                             capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            raise AssertionError(f"client in {client} failed: {res.stderr[-2000:]}")
        out: list[list[dict[str, Any]]] = json.loads(res.stdout)
        return out

    def errors(self, cases: Sequence[Case]) -> list[str]:
        by_client: dict[str, list[Case]] = {}
        for case in cases:
            by_client.setdefault(case.client, []).append(case)
        errors = []
        for client, group in by_client.items():
            for case, (result,) in zip(group, self.send(client, group), strict=True):
                problem = judge(case, result)
                if problem:
                    errors.append(f"{case.name}: {problem}")
        return errors

    def apply(self, docs: Sequence[Mapping[str, Any]]) -> None:
        """Apply a test's manifests and wait until the waypoint's Envoy has their routes: a
        case that would pass under the previous config proves nothing."""
        self.cluster.apply(list(docs))
        self.wait_routes(docs, present=True)

    def remove(self, docs: Sequence[Mapping[str, Any]]) -> None:
        for d in docs:
            self.cluster.delete(str(d["kind"]), str(d["metadata"]["namespace"]),
                                str(d["metadata"]["name"]), missing_ok=True)
        self.wait_routes(docs, present=False)

    def envoy_routes(self) -> str:
        """The waypoint Envoy's route configurations (its admin, on the pod's loopback)."""
        pod = self.cluster.pod(self.cluster.waypoint_pod(WAYPOINT, MESH_NS))
        status, body = devmesh.http_get(
            pod.netns, "http://127.0.0.1:15000/config_dump?resource=dynamic_route_configs")
        if status != 200:
            raise AssertionError(f"waypoint admin: {status} {body[:300]}")
        return body

    def wait_routes(self, docs: Sequence[Mapping[str, Any]], present: bool) -> None:
        # Envoy route names are <namespace>.<route>.<rule> (controller/waypoint).
        names = [f'"{d["metadata"]["namespace"]}.{d["metadata"]["name"]}.'
                 for d in docs if d["kind"] in ("HTTPRoute", "GRPCRoute")]
        deadline = time.monotonic() + TIMEOUT
        while names:
            dump = self.envoy_routes()
            if all((n in dump) == present for n in names):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the waypoint's routes {'lack' if present else 'keep'} "
                                     f"{names} after {TIMEOUT:.0f}s")
            time.sleep(0.2)

    def eventually(self, cases: Sequence[Case], timeout: float = TIMEOUT) -> None:
        """Every case passes ``CONSECUTIVE`` times in a row within ``timeout``."""
        deadline = time.monotonic() + timeout
        streak, errors = 0, ["not tried"]
        while time.monotonic() < deadline:
            errors = self.errors(cases)
            streak = 0 if errors else streak + 1
            if streak == CONSECUTIVE:
                return
            time.sleep(0.05 if not errors else 0.3)
        raise AssertionError("not consistently as expected after "
                             f"{timeout:.0f}s:\n  " + "\n  ".join(errors))

    def check(self, docs: Sequence[Mapping[str, Any]], cases: Sequence[Case]) -> None:
        """A test: its manifests applied, every case eventually met, the manifests removed."""
        self.apply(docs)
        try:
            self.eventually(cases)
        finally:
            self.remove(docs)

    def distribution(self, case: Case, count: int) -> Counter[str]:
        """How many of ``count`` requests each backend pod answered (failures as '!status')."""
        (results,) = self.send(case.client, [case], count)
        got: Counter[str] = Counter()
        for r in results:
            body = r.get("body")
            ok = r.get("status") == 200 and isinstance(body, Mapping)
            got[str(body.get("pod")) if ok and isinstance(body, Mapping)
                else f"!{r.get('status')}"] += 1
        return got


def _start_echo(c: DevCluster, pod: str, namespace: str) -> None:
    ready = c.dir / f"conformance-{pod}.ready"
    ready.unlink(missing_ok=True)
    role = f"pod/{pod}/conformance-echo"
    c.spawn(role, c.pod(pod).netns, [
        devmesh.PYTHON, str(ECHO), "--pod", pod, "--namespace", namespace, "--http", "8080",
        "--grpc", "7070", "--tcp", "9090", "--ready-file", str(ready)],
        cgroup=Path(c.pod(pod).cgroup))
    deadline = time.monotonic() + 20
    while not ready.exists():
        if not c.alive(role) or time.monotonic() > deadline:
            raise AssertionError(f"echo server in {pod} did not start:\n{c.log_tail(role)}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # Short: pod network namespaces are named <prefix><pod>, at most 40 characters, and the
    # waypoint's pod is gateway-conformance-mesh-wp-wp.
    c = DevCluster(f"cf{uuid.uuid4().hex[:2]}", nodes=2,
                   root=tmp_path_factory.mktemp("conformance"), out=lambda _line: None)
    try:
        c.up()
        c.set_namespace(MESH_NS, ambient=True, labels={"ambit.dev/use-waypoint": WAYPOINT})
        c.set_namespace(CONSUMER_NS, ambient=True)
        for pod, node, ns, version in (("echo-v1", 1, MESH_NS, "v1"),
                                       ("echo-v2", 2, MESH_NS, "v2"),
                                       ("echo-v1-consumer", 1, CONSUMER_NS, "v1")):
            c.add_pod(pod, node, namespace=ns, labels={"app": "echo", "version": version})
            _start_echo(c, pod, ns)
        c.apply([service("echo", {"app": "echo"}),
                 service("echo-v1", {"app": "echo", "version": "v1"}),
                 service("echo-v2", {"app": "echo", "version": "v2"})])
        c.add_waypoint(WAYPOINT, MESH_NS, node_ref=2)
        m = Mesh(c)
        # Ready when the echo Service answers through the waypoint (Envoy adds
        # x-request-id; the direct path adds nothing).
        deadline = time.monotonic() + 60
        while True:
            (result,) = m.send("echo-v1", [Case("probe", Req(), Expect())])[0]
            body = result.get("body")
            if isinstance(body, Mapping) and "x-request-id" in body.get("headers", {}):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"traffic to echo does not pass the waypoint: {result}")
            time.sleep(0.3)
        yield m
    finally:
        c.down(quiet=True)
        left = [n for n in netns.list_netns() if n.startswith(c.prefix)]
        assert not left, f"namespaces left behind: {left}"

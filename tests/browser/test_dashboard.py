"""``ambit dashboard`` in a real browser: headless Debian chromium against a dev cluster.

Why a tier of its own: the dashboard's model is table-tested (tests/unit/test_dashboard_model.py),
but what a user sees is the page: the graph library, the live feed, the tables. These tests
bring up a 2-node dev cluster (network namespaces of their own, nothing connected to the
machine's network), make real traffic (an allowed client and a client an AuthorizationPolicy
denies), run ``ambit dashboard`` on loopback and drive chromium with playwright-core
(``dashboard_check.mjs``), which reports what the page shows, every console error and every
request the page tried outside 127.0.0.1 (there must be none: the page works offline).
Screenshots go to docs/img/ (docs/dashboard.md shows them).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambit.dev import mesh, netns
from ambit.dev.cluster import DevCluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

HERE = Path(__file__).parent
REPO = HERE.parent.parent
SHOTS = REPO / "docs" / "img"
PORT = 8080
ALLOW_CLIENT = {
    "apiVersion": "security.ambit.dev/v1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "allow-client", "namespace": "default"},
    "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
             "rules": [{"from": [{"source": {
                 "principals": ["cluster.local/ns/default/sa/client"]}}]}]},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:  # loopback only
        return json.loads(r.read(8 << 20))


def _until(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout:g} s (last: {last!r})")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    if shutil.which("node") is None or not Path("/usr/bin/chromium").exists():
        pytest.fail("the browser tier needs node and /usr/bin/chromium: run make setup")
    if not (HERE / "node_modules" / "playwright-core").exists():
        pytest.fail("tests/browser/node_modules is missing: run make setup (npm ci)")
    name = f"dash{uuid.uuid4().hex[:4]}"
    c = DevCluster(name, nodes=2, root=tmp_path_factory.mktemp("dash"), out=lambda _l: None)
    try:
        c.up()
        c.set_namespace("default", ambient=True)
        c.add_pod("client", "node-1")
        c.add_pod("denied", "node-1")
        server = c.add_pod("server", "node-2")
        c.start_echo("server", PORT)
        c.apply([ALLOW_CLIENT])
        # Real traffic: the client gets through (its first connection waits for the pod's
        # certificate), the denied client is refused once the policy reached node-2.
        _until("client reaches server",
               lambda: mesh.tcp_probe(c.pod("client").netns, server.ip, PORT).ok)
        _until("denied client refused",
               lambda: not mesh.tcp_probe(c.pod("denied").netns, server.ip, PORT).ok)
        for _ in range(3):
            assert mesh.tcp_probe(c.pod("client").netns, server.ip, PORT).ok
        yield c
    finally:
        c.down(quiet=True)
        assert not [n for n in netns.list_netns() if n.startswith(c.prefix)]


@pytest.fixture(scope="module")
def dashboard(cluster: DevCluster) -> Iterator[str]:
    port = _free_port()
    log = cluster.dir / "dashboard.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([*mesh.ambit_command(), "dashboard", "--cluster", cluster.name,
                                 "--cluster-root", str(cluster.dir.parent),
                                 "--listen", f"127.0.0.1:{port}", "--interval", "0.5"],
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"ambit dashboard exited: {log.read_text()[-2000:]}")
            try:
                return int(_get(f"{url}/healthz")["gathers"]) > 0
            except OSError:
                return False
        _until("the dashboard answers", up)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _browse(url: str, scenario: str, *args: str) -> dict[str, Any]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["node", str(HERE / "dashboard_check.mjs"), url, scenario, str(SHOTS),
                          *args], capture_output=True, text=True, timeout=90, cwd=HERE,
                         check=False)
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def _clean(result: dict[str, Any]) -> None:
    assert result["ok"], json.dumps(result)[:4000]
    assert result["consoleErrors"] == [], result["consoleErrors"]
    assert result["blocked"] == [], f"the page tried to load from elsewhere: {result['blocked']}"


def test_allowed_edge_with_mtls_and_denied_edge_with_its_policy(dashboard: str) -> None:
    r = _browse(f"{dashboard}/", "traffic")
    _clean(r)
    d = r["details"]
    assert d["status"] == "live"
    assert d["allowedEdge"]["mtls"] is True and d["allowedEdge"]["label"].startswith("mTLS ")
    assert "denied" not in d["allowedEdge"]["classes"]
    assert "denied" in d["deniedEdge"]["classes"]
    assert d["deniedEdge"]["deniedBy"] == "default/allow-client"
    assert "denied" in d["deniedEdge"]["label"] and "default/allow-client" \
        in d["deniedEdge"]["label"]
    rows = {(row["cells"][0], row["cells"][1]): row for row in d["rows"]}
    denied_row = rows[("default/denied", "default/server")]
    assert denied_row["denied"] and denied_row["cells"][9] == "default/allow-client"
    assert rows[("default/client", "default/server")]["cells"][3] == "mTLS"
    assert d["nodeCards"] == ["node-1", "node-2"]
    (policy,) = d["policies"]
    assert policy[0] == "default/allow-client" and policy[3] == "default/server"
    # denied at least once, counted by node-2's ztunnel
    denials = [line for n in ("node-1", "node-2") for line in urllib.request.urlopen(
        f"{dashboard}/raw/node/{n}/metrics", timeout=5).read().decode().splitlines()
        if line.startswith("ambit_ztunnel_policy_denied_total")]
    assert float(policy[5]) >= 1, (policy, denials)


def test_pod_whose_capture_is_removed_shows_not_captured(dashboard: str,
                                                         cluster: DevCluster) -> None:
    def captured() -> bool:
        m = _get(f"{dashboard}/api/model")
        return any(w["id"] == "default/denied" and w["captured"] is True
                   for w in m["workloads"])
    _until("default/denied shown as captured first", captured)
    proc = subprocess.Popen(["node", str(HERE / "dashboard_check.mjs"), f"{dashboard}/",
                             "capture", str(SHOTS), "default/denied"], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        said = [proc.stderr.readline() for _ in range(1)]
        while said[-1] and said[-1].strip() != "ready" and len(said) < 50:
            said.append(proc.stderr.readline())  # node may warn before the page is up
        assert said[-1].strip() == "ready", "".join(said)
        changed_at = time.time()
        # Out of the mesh: the pod's label; the agent removes its capture.
        cluster.set_pod_labels("denied", {"app": "denied", "ambit.dev/dataplane-mode": "none"})
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    if not r["ok"]:  # say what the dashboard had instead
        m = _get(f"{dashboard}/api/model")
        r["model"] = [w for w in m["workloads"] if w["id"] == "default/denied"]
    _clean(r)
    d = r["details"]
    seen_after = d["seenAt"] - changed_at
    print(f"\nnot captured shown {seen_after:.1f} s after the label change "
          f"(page waited {d['waitedMs']} ms)")
    assert seen_after < 8.0, f"shown as not captured {seen_after:.1f} s after the change"
    assert "not captured" in d["label"]
    assert d["why"]  # the agent's reason


WEB_VIP = "10.96.0.30"


def test_waypoint_edge_names_its_client_through_baggage(dashboard: str,
                                                        cluster: DevCluster) -> None:
    """An L7 edge: the client calls service web through a waypoint (the real Envoy); the
    waypoint's metrics name the client workload because the ztunnel sent its baggage."""
    cluster.add_pod("web", "node-2", labels={"app": "web"})
    cluster.start_http_echo("web", PORT, "v1")
    cluster.apply([{"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "web", "namespace": "default",
                                 "labels": {"ambit.dev/use-waypoint": "waypoint"}},
                    "spec": {"clusterIP": WEB_VIP, "selector": {"app": "web"},
                             "ports": [{"name": "http", "port": 80, "targetPort": PORT}]}}])
    cluster.add_waypoint("waypoint", "default", "node-2")
    client = cluster.pod("client").netns

    def through_waypoint() -> bool:
        # Until the client's ztunnel knows the binding, requests go straight to web: load
        # until the waypoint's own metrics count them.
        out = netns.ns_run(client, [mesh.PYTHON, "-m", "ambit.dev.http_load",
                                    f"http://{WEB_VIP}/", "--count", "10"], timeout=60)
        if json.loads(out)["codes"] != {"200": 10}:
            return False
        try:
            text = urllib.request.urlopen(  # the dashboard's copy of the waypoint's /metrics
                f"{dashboard}/raw/waypoint/default/waypoint-wp/metrics", timeout=5).read()
        except OSError:
            return False
        return b"istio_requests_total{" in text
    _until("the client's requests counted by the waypoint", through_waypoint, timeout=40)
    r = _browse(f"{dashboard}/", "waypoint", "default/web")
    if not r["ok"]:  # say what the dashboard and the waypoint had instead
        r["edges"] = [e for e in _get(f"{dashboard}/api/model")["edges"] if e["kind"] == "http"]
        r["waypoint"] = [line for line in urllib.request.urlopen(
            f"{dashboard}/raw/waypoint/default/waypoint-wp/metrics", timeout=5).read().decode()
            .splitlines() if line.startswith("istio_requests_total")]
    _clean(r)
    d = r["details"]
    assert d["clients"] == ["default/client"], d
    assert d["requests"] >= 10 and d["waypoint"].startswith("waypoint waypoint")

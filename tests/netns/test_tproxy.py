"""The real ztunnel behind TPROXY capture, in one node namespace.

Forwarding is switched off in the node, so a connection between two of its pods can only
succeed by being captured into the ztunnel and re-originated by it. Each test also checks the
other end: the server sees the node's address (the proxy), and the ztunnel's access log names
the listener and the original destination the kernel preserved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ambit.dev import mesh, netns
from ambit.dev.topology import Cluster, Pod

pytestmark = pytest.mark.netns


@dataclass
class Scene:
    cluster: Cluster
    client: Pod
    server: Pod
    workdir: Path
    state: Path
    identity_dir: Path
    access_log: Path

    def start_ztunnel(self) -> mesh.Ztunnel:
        return mesh.start_ztunnel(
            self.cluster,
            self.cluster.node(1),
            state_file=self.state,
            identity_dir=self.identity_dir,
            workdir=self.workdir,
            extra_args=["--access-log", str(self.access_log)],
        )

    def access_records(self, timeout: float = 5.0, **match: Any) -> list[dict[str, Any]]:
        """Access-log records with these fields; records are written when a connection ends."""
        deadline = time.monotonic() + timeout
        while True:
            records = []
            if self.access_log.exists():
                for line in self.access_log.read_text().splitlines():
                    rec = json.loads(line)
                    if all(rec.get(k) == v for k, v in match.items()):
                        records.append(rec)
            if records or time.monotonic() > deadline:
                return records
            time.sleep(0.1)


def _scene(tmp_path: Path, client_protocol: str, server_protocol: str) -> Iterator[Scene]:
    with Cluster(1) as c:
        client = c.add_pod(1, "client")
        server = c.add_pod(1, "server")
        mesh.start_echo(c, server, tmp_path, 8080)
        netns.set_sysctl(c.node(1).netns, "net.ipv4.ip_forward", 0)
        identity_dir = tmp_path / "identity"
        mesh.issue_identities(identity_dir, ["default/client", "default/server"])
        state = mesh.write_state(
            tmp_path / "state.yaml",
            {
                "workloads": [
                    mesh.workload(client, protocol=client_protocol),
                    mesh.workload(server, protocol=server_protocol),
                ]
            },
        )
        yield Scene(c, client, server, tmp_path, state, identity_dir, tmp_path / "access.jsonl")


@pytest.fixture
def outbound_scene(tmp_path: Path) -> Iterator[Scene]:
    # The client is in the mesh; the server is not (protocol TCP), so the ztunnel passes through.
    yield from _scene(tmp_path, client_protocol="HBONE", server_protocol="TCP")


@pytest.fixture
def inbound_scene(tmp_path: Path) -> Iterator[Scene]:
    # The server is in the mesh; the client is not, so it arrives in plaintext.
    yield from _scene(tmp_path, client_protocol="TCP", server_protocol="HBONE")


def test_captured_outbound_is_proxied_to_the_original_destination(outbound_scene: Scene) -> None:
    s = outbound_scene
    node = s.cluster.node(1)
    # The control: with forwarding off and nothing captured, there is no path at all.
    assert not mesh.tcp_probe(s.client.netns, s.server.ip, 8080, timeout=1.0).ok

    zt = s.start_ztunnel()
    s.cluster.enable_capture(node, [s.client.ip], [s.client.host_iface])
    res = mesh.tcp_probe(s.client.netns, s.server.ip, 8080, "via the ztunnel")
    assert res.ok, f"{res.error}; ztunnel log:\n{mesh.log_tail(zt.log)}"
    assert res.answer is not None and res.answer["data"] == "via the ztunnel"
    assert res.answer["local"] == f"{s.server.ip}:8080"
    assert res.peer_ip == node.ip, "the server must be called by the node's ztunnel"

    [rec] = s.access_records(listener="outbound", dst=f"{s.server.ip}:8080")
    assert rec["src"] == s.client.ip
    assert rec["outcome"] == "ok", rec
    assert rec["mtls"] is False  # passthrough to a workload outside the mesh
    dump = zt.config_dump()
    assert dump["node"] == "node-1"
    assert sorted(w["name"] for w in dump["workloads"]) == ["client", "server"]
    status, body = zt.get(zt.admin_port, "/no-such-page")
    assert status == 404, body  # statuses other than 200 come through the probe intact


def test_plaintext_to_enrolled_pod_arrives_via_15006(inbound_scene: Scene) -> None:
    s = inbound_scene
    node = s.cluster.node(1)
    assert not mesh.tcp_probe(s.client.netns, s.server.ip, 8080, timeout=1.0).ok

    zt = s.start_ztunnel()
    # Only the server is enrolled: its inbound is captured, the client's outbound is not.
    s.cluster.enable_capture(node, [s.server.ip], [s.server.host_iface])
    res = mesh.tcp_probe(s.client.netns, s.server.ip, 8080, "plaintext in")
    assert res.ok, f"{res.error}; ztunnel log:\n{mesh.log_tail(zt.log)}"
    assert res.answer is not None and res.answer["local"] == f"{s.server.ip}:8080"
    assert res.peer_ip != s.client.ip, "the connection must have been re-originated"

    [rec] = s.access_records(listener="inbound_plaintext", dst=f"{s.server.ip}:8080")
    assert rec["src"] == s.client.ip
    assert rec["outcome"] == "ok", rec
    assert not s.access_records(timeout=0.0, listener="outbound")


def test_same_node_mesh_call_is_not_captured_twice(tmp_path: Path) -> None:
    # Both pods enrolled: the client's connection is captured at 15001, and the ztunnel calls
    # the server itself (same node). That call is the ztunnel's own traffic and must not be
    # captured into 15006 again, and the server's replies, which enter through the server's
    # captured veth, must reach the ztunnel's socket rather than the outbound listener.
    for s in _scene(tmp_path, client_protocol="HBONE", server_protocol="HBONE"):
        zt = s.start_ztunnel()
        s.cluster.capture_pods([s.client, s.server])
        for i in range(3):
            res = mesh.tcp_probe(s.client.netns, s.server.ip, 8080, f"n{i}")
            assert res.ok, f"{res.error}; ztunnel log:\n{mesh.log_tail(zt.log)}"
            assert res.answer is not None and res.answer["data"] == f"n{i}"
        records = s.access_records(listener="outbound", dst=f"{s.server.ip}:8080")
        deadline = time.monotonic() + 5
        while len(records) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
            records = s.access_records(listener="outbound", dst=f"{s.server.ip}:8080")
        assert [r["outcome"] for r in records] == ["ok"] * 3
        assert not s.access_records(timeout=0.0, listener="inbound_plaintext")

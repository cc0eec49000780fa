"""The TPROXY capture rules against the kernel, with a minimal transparent relay as the proxy.

These pin down the capture contract the ztunnel relies on, independently of the ztunnel:
which listener a connection lands on, that the original destination survives, and that
connections of the proxy itself are not captured again.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambit.dev import netns
from ambit.dev.mesh import start_echo, tcp_probe
from ambit.dev.topology import Cluster, Pod

pytestmark = pytest.mark.netns

RELAY = Path(__file__).with_name("tproxy_relay.py")


def _start_relay(c: Cluster, node: int, tmp_path: Path) -> Path:
    log, ready = tmp_path / f"relay-{node}.jsonl", tmp_path / f"relay-{node}.ready"
    proc = c.spawn(
        c.node(node).netns,
        [sys.executable, str(RELAY), str(log), str(ready), "15001", "15006", "15008"],
        log=tmp_path / f"relay-{node}.out",
    )
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert proc.poll() is None, (tmp_path / f"relay-{node}.out").read_text()
        assert time.monotonic() < deadline, "relay did not start"
        time.sleep(0.05)
    return log


def _entries(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(2) as c:
        yield c


def _pods(c: Cluster) -> tuple[Pod, Pod, Pod]:
    return c.add_pod(1, "enrolled"), c.add_pod(1, "plain"), c.add_pod(2, "remote")


def test_outbound_from_enrolled_pod_goes_to_15001(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    enrolled, _plain, remote = _pods(c)
    start_echo(c, remote, tmp_path)
    rules = c.enable_capture(1, [enrolled.ip], [enrolled.host_iface])
    assert "TPROXY" in rules.iptables_restore
    # With forwarding off, the relay is the only way from node-1 to anywhere.
    netns.set_sysctl(c.node(1).netns, "net.ipv4.ip_forward", 0)
    log = _start_relay(c, 1, tmp_path)

    res = tcp_probe(enrolled.netns, remote.ip, 8080)
    assert res.ok, res.error
    assert res.peer_ip == c.node(1).ip  # the server was called by the node, i.e. the relay
    [entry] = _entries(log)
    assert entry["listener"] == 15001
    assert entry["orig_dst"] == f"{remote.ip}:8080"
    assert entry["peer"].startswith(f"{enrolled.ip}:")


def test_inbound_to_enrolled_pod_plaintext_and_hbone(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    enrolled, plain, remote = _pods(c)
    start_echo(c, enrolled, tmp_path)
    c.enable_capture(1, [enrolled.ip], [enrolled.host_iface])
    log = _start_relay(c, 1, tmp_path)

    # From another node (arrives on eth0) and from a same-node pod that is not enrolled.
    for client in (remote, plain):
        res = tcp_probe(client.netns, enrolled.ip, 8080)
        assert res.ok, res.error
        assert res.peer_ip == c.node(1).ip
    # HBONE's port goes to the HBONE listener (nothing listens behind it, so no answer).
    assert not tcp_probe(remote.netns, enrolled.ip, 15008, timeout=2.0).ok

    entries = _entries(log)
    assert [(e["listener"], e["orig_dst"], e["peer"].split(":")[0]) for e in entries] == [
        (15006, f"{enrolled.ip}:8080", remote.ip),
        (15006, f"{enrolled.ip}:8080", plain.ip),
        (15008, f"{enrolled.ip}:15008", remote.ip),
    ]


def test_pods_that_are_not_enrolled_are_not_captured(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    enrolled, plain, remote = _pods(c)
    start_echo(c, remote, tmp_path)
    c.enable_capture(1, [enrolled.ip], [enrolled.host_iface])
    log = _start_relay(c, 1, tmp_path)
    res = tcp_probe(plain.netns, remote.ip, 8080)
    assert res.ok and res.peer_ip == plain.ip  # routed, not proxied
    assert _entries(log) == []


def test_capture_is_reapplied_idempotently(cluster: Cluster) -> None:
    c = cluster
    enrolled, plain, _remote = _pods(c)
    c.enable_capture(1, [enrolled.ip], [enrolled.host_iface])
    c.enable_capture(1, [plain.ip], [plain.host_iface])
    c.enable_capture(1, [plain.ip], [plain.host_iface])
    node_ns = c.node(1).netns
    rules = netns.ns_run(node_ns, ["iptables", "-t", "mangle", "-S", "AMBIT_PREROUTING"])
    assert rules.count("--on-port 15001") == 2
    assert rules.count("--on-port 15006") == 2
    assert netns.ip(node_ns, ["rule", "show"]).count("lookup 100") == 1
    assert "local default dev lo" in netns.ip(node_ns, ["route", "show", "table", "100"])

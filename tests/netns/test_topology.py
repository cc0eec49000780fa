"""The namespace cluster itself: addressing, routing between nodes, cleanup, host untouched."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ambit.dev import netns
from ambit.dev.mesh import start_echo, tcp_probe
from ambit.dev.topology import Cluster, TopologyError

pytestmark = pytest.mark.netns


def _root_links() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


def test_pods_reach_each_other_across_and_within_nodes(tmp_path: Path) -> None:
    before = _root_links()
    with Cluster(2) as c:
        a = c.add_pod("node-1", "a")
        b = c.add_pod(1, "b")
        srv = c.add_pod("node-2", "srv")
        assert (a.ip, b.ip, srv.ip) == ("10.244.1.2", "10.244.1.3", "10.244.2.2")
        assert c.node(2).ip == "10.100.0.2"
        start_echo(c, srv, tmp_path)
        start_echo(c, b, tmp_path)

        cross = tcp_probe(a.netns, srv.ip, 8080)
        assert cross.ok, cross.error
        # Plain routing, no NAT: the server sees the pod's own address.
        assert cross.peer_ip == a.ip
        assert cross.answer is not None and cross.answer["local"] == f"{srv.ip}:8080"

        same = tcp_probe(a.netns, b.ip, 8080)
        assert same.ok and same.peer_ip == a.ip

        # Nothing was created in the machine's own namespace.
        assert _root_links() == before
        names = [c.net_ns, *(n.netns for n in c.nodes), *(p.netns for p in c.pods.values())]
        assert set(names) <= set(netns.list_netns())
    assert not set(names) & set(netns.list_netns())


def test_forwarding_off_isolates_nodes(tmp_path: Path) -> None:
    with Cluster(2) as c:
        a = c.add_pod(1, "a")
        srv = c.add_pod(2, "srv")
        start_echo(c, srv, tmp_path)
        netns.set_sysctl(c.node(1).netns, "net.ipv4.ip_forward", 0)
        res = tcp_probe(a.netns, srv.ip, 8080, timeout=1.0)
        assert not res.ok  # the control for the TPROXY tests: no proxy, no path


def test_cleanup_runs_on_failure_and_kills_processes(tmp_path: Path) -> None:
    created: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), Cluster(1) as c:
        pod = c.add_pod(1, "a")
        proc = start_echo(c, pod, tmp_path)
        created = [c.net_ns, c.node(1).netns, pod.netns]
        raise RuntimeError("boom")
    assert proc.poll() is not None
    assert not set(created) & set(netns.list_netns())


def test_bad_input_is_explained() -> None:
    with Cluster(1) as c:
        with pytest.raises(TopologyError, match="no node 'node-7'"):
            c.add_pod("node-7", "a")
        with pytest.raises(TopologyError, match="pod name 'Bad_Name'"):
            c.add_pod(1, "Bad_Name")
        with pytest.raises(TopologyError, match="pod name 'much-too-long'"):
            c.add_pod(1, "much-too-long")
        c.add_pod(1, "a")
        with pytest.raises(TopologyError, match="already exists on node-1"):
            c.add_pod(1, "a")
    with pytest.raises(TopologyError, match="nodes: 0"):
        Cluster(0)

"""agent.uplinks: which interfaces `--uplink auto` picks on real node shapes, and the flag."""

from __future__ import annotations

import pytest

from agent import uplinks
from agent.config import AgentConfig, AgentConfigError, parse_uplinks
from agent.uplinks import Link

LO = Link("lo", loopback=True, link_type=772, ipv4=("127.0.0.1",))

# A Vagrant node running flannel (vxlan backend): NAT NIC, private NIC, the overlay device,
# flannel's bridge with a pod's veth on it, and docker's bridge.
FLANNEL_NODE = [
    LO,
    Link("eth0", ipv4=("10.0.2.15",), gateway_routes=True),
    Link("eth1", ipv4=("192.168.56.11",)),
    Link("flannel.1", kind="vxlan", ipv4=("10.244.1.0",)),
    Link("cni0", kind="bridge", ipv4=("10.244.1.1",)),
    Link("veth3a9f21c7", kind="veth"),
    Link("docker0", kind="bridge", up=False, ipv4=("172.17.0.1",)),
]

# A kind node: eth0 is a veth into the docker network (it carries the default route); ptp's
# host-side veths hold the pod gateway address but route only to their pod.
KIND_NODE = [
    LO,
    Link("eth0", kind="veth", ipv4=("172.18.0.2",), gateway_routes=True),
    Link("veth5c1e0d2a", kind="veth", ipv4=("10.244.0.1",)),
    Link("veth77a0b1c3", kind="veth", ipv4=("10.244.0.1",)),
]

# Calico in IP-in-IP mode with kube-proxy IPVS and WireGuard: only ens5 parses as Ethernet.
CALICO_NODE = [
    LO,
    Link("ens5", ipv4=("172.31.4.20",), gateway_routes=True),
    Link("tunl0", kind="ipip", link_type=768, ipv4=("192.168.77.0",)),
    Link("wireguard.cali", kind="wireguard", link_type=65534, ipv4=("192.168.77.1",)),
    Link("kube-ipvs0", kind="dummy", up=False, ipv4=("10.96.0.1", "10.96.0.10")),
    Link("cali1b2c3d4e5f6", kind="veth"),
    Link("vxlan.calico", kind="vxlan", ipv4=("192.168.77.2",)),
]


@pytest.mark.parametrize(("links", "pod_ifaces", "expected"), [
    (FLANNEL_NODE, (), ("eth0", "eth1", "flannel.1")),
    (KIND_NODE, (), ("eth0",)),
    (CALICO_NODE, (), ("ens5", "vxlan.calico")),
    # The host side of a pod the agent knows is never an uplink, whatever it looks like
    # (a macvlan pod interface on the node, say).
    ([*FLANNEL_NODE, Link("macvlan-p1", kind="macvlan", ipv4=("10.9.0.5",))], ("macvlan-p1",),
     ("eth0", "eth1", "flannel.1")),
    ([LO], (), ()),
])  # fmt: skip
def test_select(links: list[Link], pod_ifaces: tuple[str, ...],
                expected: tuple[str, ...]) -> None:
    assert uplinks.select(links, pod_ifaces) == expected


@pytest.mark.parametrize(("link", "reason"), [
    (LO, "loopback"),
    (Link("lo", ipv4=("127.0.0.1",)), "loopback"),
    (Link("eth2"), "no IPv4 address"),
    (Link("eth3", up=False, ipv4=("10.1.1.1",)), "down"),
    (Link("cni0", kind="bridge", ipv4=("10.244.1.1",)), "bridge"),
    (Link("veth1", kind="veth", ipv4=("10.244.0.1",)), "veth without gateway routes"),
    (Link("tunl0", kind="ipip", link_type=768, ipv4=("192.168.0.1",)), "not an Ethernet"),
    (Link("eth0", ipv4=("10.0.0.2",)), None),
])  # fmt: skip
def test_why_not(link: Link, reason: str | None) -> None:
    got = uplinks.why_not(link)
    assert got == reason if reason is None else (got is not None and reason in got)


def test_describe_says_why_each_interface_is_left_out() -> None:
    lines = uplinks.describe(CALICO_NODE)
    assert "tunl0: not an Ethernet device (link type 768)" in lines[1]
    assert not any(line.startswith(("ens5:", "vxlan.calico:")) for line in lines)


@pytest.mark.parametrize(("flags", "links", "expected"), [
    (("eth0",), FLANNEL_NODE, ("eth0",)),  # explicit names are used as given
    (("auto",), FLANNEL_NODE, ("eth0", "eth1", "flannel.1")),
    (("bond0", "auto"), FLANNEL_NODE, ("bond0", "eth0", "eth1", "flannel.1")),
    (("eth1", "auto"), FLANNEL_NODE, ("eth1", "eth0", "flannel.1")),  # no duplicates
    (("auto",), [LO], ()),
])  # fmt: skip
def test_resolve(flags: tuple[str, ...], links: list[Link], expected: tuple[str, ...]) -> None:
    assert uplinks.resolve(flags, links) == expected


@pytest.mark.parametrize(("values", "expected"), [
    ([], ("eth0",)),  # the dev cluster's default stays
    (["auto"], ("auto",)),
    (["eth0,eth1"], ("eth0", "eth1")),
    (["eth0", "eth1,flannel.1"], ("eth0", "eth1", "flannel.1")),
    (["auto, eth5"], ("auto", "eth5")),
    (["eth0,eth0"], ("eth0",)),
])  # fmt: skip
def test_parse_uplinks(values: list[str], expected: tuple[str, ...]) -> None:
    assert parse_uplinks(values) == expected


@pytest.mark.parametrize("value", ["eth0,", ",", "eth0,,eth1"])
def test_parse_uplinks_rejects_empty_names(value: str) -> None:
    with pytest.raises(AgentConfigError, match=r"--uplink: .* empty name"):
        parse_uplinks([value])


def test_config_knows_auto() -> None:
    base = {"node": "n", "controller_address": "c:1"}
    assert AgentConfig(**base, uplinks=("auto", "eth5")).validate().uplinks_auto  # type: ignore[arg-type]
    assert not AgentConfig(**base).validate().uplinks_auto  # type: ignore[arg-type]
    with pytest.raises(AgentConfigError, match="--uplink: 'eth 0'"):
        AgentConfig(**base, uplinks=("eth 0",)).validate()  # type: ignore[arg-type]

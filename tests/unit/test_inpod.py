"""In-pod redirect mode (issue 15): the rules rendered for a pod's namespace, the link's
``pod_netns`` requests, and descriptors travelling with their own line on the link."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import pytest

from agent.capture.inpod import JUMPS, _enroll_script, _remove_script, render_pod_rules
from mesh.unix import LineReader, send_line
from ztunnel.agent_link import (
    LinkRequestError,
    PodNetns,
    PodNetnsGone,
    parse_link_request,
)


def test_pod_rules_redirect_outbound_and_inbound_and_spare_the_ztunnel_and_the_node() -> None:
    rules = render_pod_rules(["10.244.1.1"]).splitlines()
    nat = rules[:rules.index("COMMIT")]
    assert nat == [
        "*nat",
        ":AMBIT_INPOD_PREROUTING - [0:0]",
        ":AMBIT_INPOD_OUTPUT - [0:0]",
        "-A AMBIT_INPOD_PREROUTING -i lo -j RETURN",
        "-A AMBIT_INPOD_PREROUTING -p tcp --dport 15008 -j RETURN",
        "-A AMBIT_INPOD_PREROUTING -s 10.244.1.1/32 -j RETURN",  # kubelet probes
        "-A AMBIT_INPOD_PREROUTING -p tcp -j REDIRECT --to-ports 15006",
        "-A AMBIT_INPOD_OUTPUT -m mark --mark 0x539/0xfff -j RETURN",  # the ztunnel's own
        "-A AMBIT_INPOD_OUTPUT -o lo -j RETURN",
        "-A AMBIT_INPOD_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
    ]
    # Replies to the ztunnel's transparent connections come back to it (connmark).
    assert any("--dst-type LOCAL -j CONNMARK --set-xmark 0x111/0xfff" in r for r in rules)
    assert any("--restore-mark" in r for r in rules)
    assert "-s " not in render_pod_rules([])


def test_the_scripts_add_each_jump_once_and_remove_them_all() -> None:
    enroll, remove = _enroll_script(render_pod_rules()), _remove_script()
    for table, chain, jump in JUMPS:
        assert f"iptables -w -t {table} -C {chain} -j {jump} 2>/dev/null || " in enroll
        assert f"while iptables -w -t {table} -D {chain} -j {jump}" in remove


def request(**fields: Any) -> bytes:
    return json.dumps({"op": "pod_netns", "id": 3, "uid": "default/web",
                       "ips": ["10.244.1.5"], "listeners": [], "fds": 1, **fields}).encode()


def test_pod_netns_requests() -> None:
    request_id, req = parse_link_request(request(), "node-1", "cluster.local")
    assert request_id == 3 and isinstance(req, PodNetns)
    assert req.uid == "default/web" and [str(i) for i in req.ips] == ["10.244.1.5"]
    assert req.fd_count == 1
    _, req = parse_link_request(request(listeners=["outbound", "inbound_plaintext", "inbound",
                                                   "outbound"], fds=5), "node-1", "td")
    assert isinstance(req, PodNetns) and req.fd_count == 5
    _, gone = parse_link_request(b'{"op": "pod_netns_gone", "id": 4, "uid": "default/web"}',
                                 "node-1", "td")
    assert gone == PodNetnsGone("default/web")


@pytest.mark.parametrize("fields, problem", [
    ({"fds": 2}, "fds: expected 1"),
    ({"listeners": ["admin"]}, "listeners: expected names"),
    ({"ips": []}, "1 or 2 pod addresses"),
    ({"ips": ["127.0.0.1"]}, "not a pod address"),
    ({"ips": ["x"]}, "not an IP address"),
    ({"uid": "no-slash"}, "uid (name)"),
    ({"extra": 1}, "unknown field"),
])
def test_bad_pod_netns_requests(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(LinkRequestError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_link_request(request(**fields), "node-1", "td")


async def test_descriptors_arrive_with_their_own_line() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        # Sent back to back: a line without descriptors, one with one, one with two.
        await send_line(a, b"first\n")
        await send_line(a, b"second\n", [r1])
        await send_line(a, b"third\n", [r2, w2])
        a.close()
        reader = LineReader(b, 1024)
        got = []
        while (line := await asyncio.wait_for(reader.readline(), 5)) is not None:
            got.append(line)
        assert [(ln, len(fds)) for ln, fds in got] == [
            (b"first", 0), (b"second", 1), (b"third", 2)]
        for _, fds in got:
            for fd in fds:
                assert os.fstat(fd)  # real descriptors, the receiver's own
                os.close(fd)
    finally:
        b.close()
        for fd in (r1, w1, r2, w2):
            os.close(fd)

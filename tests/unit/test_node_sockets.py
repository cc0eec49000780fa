"""The pure checks behind the node's Unix sockets (mesh/unix.py, agent/ztunnel_link.py): which
uids may connect, which processes are the ztunnel, how refusals are logged, and which listener
sets the ztunnel may register."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import AgentConfig, AgentConfigError
from agent.ztunnel_link import (
    TCP_LISTENER,
    SocketKind,
    ZtunnelLinkServer,
    is_ztunnel_argv,
    listener_fd_problem,
    listener_names_problem,
    read_cmdline,
    registration_problem,
    socket_kind,
    ztunnel_problem,
)
from mesh.unix import PeerCred, RefusalLog, allowed_uids, uid_problem

VENV = "/opt/ambit/venv/bin"


@pytest.mark.parametrize(("argv", "ztunnel"), [
    # How the image and the dev cluster run it: the console script under its interpreter.
    ([f"{VENV}/python", f"{VENV}/ambit", "ztunnel", "--node", "n1"], True),
    (["/usr/bin/python3.11", "/usr/local/bin/ambit", "ztunnel"], True),
    (["python3", "-u", "-X", "dev", "/usr/local/bin/ambit", "ztunnel"], True),
    ([f"{VENV}/ambit", "ztunnel", "--agent-socket", "/var/run/ambit/ztunnel.sock"], True),
    (["python3", "-m", "ambit.cli", "ztunnel"], True),
    (["python3", "-m", "ambit", "ztunnel"], True),
    # Other ambit commands, other programs, and ambit ztunnel only as an argument.
    ([f"{VENV}/python", f"{VENV}/ambit", "agent", "run"], False),
    ([f"{VENV}/python", f"{VENV}/ambit"], False),
    (["python3", "-m", "ambit.cli", "agent", "ztunnel"], False),
    (["python3", "-m", "ambit.cli"], False),
    (["python3", "-c", "import x", "/usr/local/bin/ambit", "ztunnel"], False),
    (["python3", "-", "/usr/local/bin/ambit", "ztunnel"], False),
    (["socat", "-", "UNIX-CONNECT:/var/run/ambit/ztunnel.sock"], False),
    (["/usr/bin/env", "ambit", "ztunnel"], False),
    (["/tmp/not-ambit", "ztunnel"], False),
    (["/usr/bin/python3", "/tmp/x/pytest", "ambit", "ztunnel"], False),
    ([], False),
])
def test_is_ztunnel_argv(argv: list[str], ztunnel: bool) -> None:
    assert is_ztunnel_argv(argv) is ztunnel


ZTUNNEL = [f"{VENV}/python", f"{VENV}/ambit", "ztunnel"]


@pytest.mark.parametrize(("peer", "argv", "fragments"), [
    (PeerCred(42, 0, 0), ZTUNNEL, None),
    (PeerCred(0, 0, 0), ZTUNNEL, ["PID namespace", "shareProcessNamespace: true",
                                  "--ztunnel-peer-check off"]),
    (PeerCred(42, 0, 0), None, ["pid 42", "exited", "/proc/42/cmdline"]),
    (PeerCred(42, 0, 0), ["socat", "-", "UNIX-CONNECT:x"], [
        "pid 42 (uid 0) is not an `ambit ztunnel` process", "'socat - UNIX-CONNECT:x'",
        "--ztunnel-peer-check off"]),
    (PeerCred(42, 0, 0), ["x" * 300], ["x" * 200 + "...'"]),
])
def test_ztunnel_problem(peer: PeerCred, argv: list[str] | None,
                         fragments: list[str] | None) -> None:
    problem = ztunnel_problem(peer, argv)
    if fragments is None:
        assert problem is None
    else:
        assert problem is not None
        for f in fragments:
            assert f in problem


def test_read_cmdline() -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(30)", "a b"]
    proc = subprocess.Popen(argv)
    try:
        for _ in range(200):  # until the child has exec'd
            seen = read_cmdline(proc.pid)
            if seen == argv:
                break
            time.sleep(0.01)
        assert seen == argv
    finally:
        proc.kill()
        proc.wait()
    assert read_cmdline(proc.pid) is None  # reaped: gone
    assert read_cmdline(2**22 + 1) is None  # above pid_max's ceiling: never a process


@pytest.mark.parametrize(("uid", "allowed", "refused"), [
    (0, {0}, False),
    (1000, {0, 1000}, False),
    (65534, {0, 1000}, True),
    (0, {1000}, True),
])
def test_uid_problem(uid: int, allowed: set[int], refused: bool) -> None:
    problem = uid_problem(PeerCred(7, uid, uid), allowed, "/run/x.sock", "--socket-uid")
    if not refused:
        assert problem is None
        return
    assert problem is not None
    assert problem.startswith(f"/run/x.sock: refused a peer with uid {uid} (pid 7)")
    assert ", ".join(str(u) for u in sorted(allowed)) in problem
    assert "--socket-uid" in problem


def test_allowed_uids() -> None:
    assert allowed_uids() == {0, os.geteuid()}
    assert allowed_uids([1000, 1001]) == {0, os.geteuid(), 1000, 1001}


# (clock at each refusal, logged?): the first is logged, then at most one line per 10 s.
@pytest.mark.parametrize(("times", "logged"), [
    ([0.0], [True]),
    ([0.0, 1.0, 9.9, 10.0], [True, False, False, True]),
    ([0.0, 10.0, 20.0], [True, True, True]),
    ([5.0, 6.0, 14.9, 15.1, 15.2], [True, False, False, True, False]),
])
def test_refusal_log(times: list[float], logged: list[bool],
                     caplog: pytest.LogCaptureFixture) -> None:
    now = iter(times)
    refusals = RefusalLog(logging.getLogger("test.refusals"), 10.0, clock=lambda: next(now))
    with caplog.at_level(logging.WARNING, "test.refusals"):
        got = [refusals.refused(f"refused #{i}") for i in range(len(times))]
    assert got == logged
    assert refusals.total == len(times)
    assert len(caplog.records) == sum(logged)


def test_refusal_log_says_how_many_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = iter([0.0, 1.0, 2.0, 11.0])
    refusals = RefusalLog(logging.getLogger("test.refusals"), 10.0, clock=lambda: next(now))
    with caplog.at_level(logging.WARNING, "test.refusals"):
        for i in range(4):
            refusals.refused(f"refused #{i}")
    assert [r.getMessage() for r in caplog.records] == [
        "refused #0", "refused #3 (2 more refused since the last such line)"]


@pytest.mark.parametrize(("changes", "error"), [
    ({"socket_uids": (1000, 65534)}, None),
    ({"socket_uids": (-1,)}, "--socket-uid: -1 is not a uid"),
    ({"ztunnel_peer_check": "off"}, None),
    ({"ztunnel_peer_check": "pid"}, "--ztunnel-peer-check: 'pid' is not one of cmdline, off"),
])
def test_config_socket_settings(changes: dict[str, object], error: str | None) -> None:
    config = AgentConfig(node="n", controller_address="c:1", **changes)  # type: ignore[arg-type]
    if error is None:
        config.validate()
    else:
        with pytest.raises(AgentConfigError, match=error):
            config.validate()


def test_link_server_refuses_an_unknown_peer_check() -> None:
    async def on_listeners(fds: object, pid: int) -> None:
        pass

    with pytest.raises(ValueError, match="peer_check: 'pid'"):
        ZtunnelLinkServer(Path("/nonexistent"), on_listeners, peer_check="pid")


# --- what the ztunnel may register ---------------------------------------------------------

ALL = ["outbound", "inbound", "inbound_plaintext"]
FIX = "one descriptor each: run it with --inbound-bind shared"
TCP6 = SocketKind(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, True)
UNIX = SocketKind(socket.AF_UNIX, socket.SOCK_STREAM, 0, True)
UDP = SocketKind(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, False)
CONNECTED = SocketKind(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, False)


@pytest.mark.parametrize(("names", "fragments"), [
    (ALL, None),
    (["inbound_plaintext", "outbound", "inbound"], None),  # any order
    ([], ["no listeners (it would empty every SOCKMAP slot)", FIX]),
    (["outbound"], ["missing: inbound, inbound_plaintext;", FIX]),
    ([*ALL, "socks5"], ["unknown: socks5;", FIX]),
    # A name repeats for each member of its SO_REUSEPORT group (one per ztunnel worker).
    (["outbound", "outbound", "inbound", "inbound_plaintext"], None),
    ([*ALL * 64], None),
    ([*ALL * 64, "inbound"], ["named more than 64 times: inbound;"]),
    (["outbound", "admin"], ["missing: inbound, inbound_plaintext; unknown: admin;"]),
])
def test_listener_names_problem(names: list[str], fragments: list[str] | None) -> None:
    problem = listener_names_problem(names)
    if fragments is None:
        assert problem is None
        return
    assert problem is not None
    for f in fragments:
        assert f in problem


@pytest.mark.parametrize(("kind", "problem"), [
    (TCP_LISTENER, None),
    (TCP6, None),
    (None, "inbound: the descriptor is not a socket"),
    (UNIX, "inbound: not a TCP socket (family 1, type 1, protocol 0)"),
    (UDP, "inbound: not a TCP socket (family 2, type 2, protocol 17)"),
    (CONNECTED, "inbound: a TCP socket that is not listening (listen() before handing it over)"),
])
def test_listener_fd_problem(kind: SocketKind | None, problem: str | None) -> None:
    assert listener_fd_problem("inbound", kind) == problem


@pytest.mark.parametrize(("names", "kinds", "problem"), [
    (ALL, [TCP_LISTENER] * 3, None),
    # The names are checked first: an empty set is named as such, with or without descriptors.
    ([], [], "no listeners"),
    ([], [TCP_LISTENER], "no listeners"),
    (ALL, [TCP_LISTENER] * 2, "3 listener name(s) but 2 descriptor(s)"),
    (ALL, [TCP_LISTENER, CONNECTED, None],
     "inbound: a TCP socket that is not listening (listen() before handing it over); "
     "inbound_plaintext: the descriptor is not a socket"),
    # The members of one name are one group: one address.
    ([*ALL, "outbound"], [TCP_LISTENER] * 4, None),
    ([*ALL, "outbound"], [TCP_LISTENER, TCP_LISTENER, TCP_LISTENER,
                          dataclasses.replace(TCP_LISTENER, address="0.0.0.0:15002")],
     "the descriptors of one listener must share its address (one SO_REUSEPORT group): "
     "outbound (, 0.0.0.0:15002)"),
])
def test_registration_problem(names: list[str], kinds: list[SocketKind | None],
                              problem: str | None) -> None:
    got = registration_problem(names, kinds)
    if problem is None:
        assert got is None
    else:
        assert got is not None and got.startswith(problem)


def test_socket_kind_of_real_descriptors() -> None:
    with socket.socket() as listening, socket.socket() as fresh, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert socket_kind(listening.fileno()) == dataclasses.replace(
            TCP_LISTENER, address=f"127.0.0.1:{port}")
        # bound nowhere, not listening
        assert socket_kind(fresh.fileno()) == dataclasses.replace(CONNECTED,
                                                                   address="0.0.0.0:0")
        assert socket_kind(udp.fileno()) == dataclasses.replace(UDP, address="0.0.0.0:0")
        fileno = listening.fileno()
        socket_kind(fileno)
        assert listening.fileno() == fileno and listening.getsockname()  # still ours, open
    r, w = os.pipe()
    try:
        before = os.listdir("/proc/self/fd")
        assert socket_kind(r) is None
        assert os.listdir("/proc/self/fd") == before, "no descriptor left behind"
    finally:
        os.close(r)
        os.close(w)

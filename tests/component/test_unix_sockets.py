"""The node's Unix sockets over real sockets in a temporary directory: each socket file has its
final mode from the moment ``bind`` creates it (no ``chmod`` afterwards, so no window in which
another user can connect), and the servers answer only the peers they allow (``SO_PEERCRED``
uid; on the ztunnel link, an ``ambit ztunnel`` process)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.capture.base import LISTENER_SLOTS
from agent.cni_server import CniRequest, CniServer
from agent.ztunnel_link import PEER_CHECK_OFF, ZtunnelLinkServer
from mesh.unix import bind_unix, file_mode
from ztunnel.agent_link import AgentLink


def mode_of(path: Path) -> int:
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode), f"{path} is not a socket"
    return stat.S_IMODE(st.st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The worst case: a process umask that restricts nothing."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def no_chmod(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any chmod of a socket after bind would be the window this change removes: forbid it."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"chmod after bind: {args}")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)
    monkeypatch.setattr(Path, "chmod", refuse)


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_bind_unix_creates_the_socket_with_its_mode(tmp_path: Path, open_umask: None,
                                                    no_chmod: None, mode: int) -> None:
    path = tmp_path / "sub" / "x.sock"
    sock = bind_unix(path, mode)
    try:
        assert mode_of(path) == mode  # right after bind: nothing else ran
        assert os.umask(0) == 0, "the process umask is restored after the bind"
        assert not sock.getblocking()
    finally:
        sock.close()


def test_bind_unix_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    first = bind_unix(path)
    first.close()  # the file stays, as after a crash
    second = bind_unix(path)
    second.close()
    assert mode_of(path) == 0o600


def test_umask_is_restored_when_bind_fails(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with pytest.raises(OSError):
            bind_unix(tmp_path / ("x" * 200) / "y.sock")  # AF_UNIX path too long
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(old)


async def test_cni_socket_is_0600_from_creation(tmp_path: Path, open_umask: None,
                                                no_chmod: None) -> None:
    async def handler(req: CniRequest) -> dict[str, Any]:
        return {"ok": True}

    server = CniServer(tmp_path / "cni.sock", handler)
    await server.start()
    try:
        assert mode_of(tmp_path / "cni.sock") == 0o600
    finally:
        await server.close()


async def test_ztunnel_socket_is_0600_from_creation(tmp_path: Path, open_umask: None,
                                                    no_chmod: None) -> None:
    async def on_listeners(fds: Mapping[str, int], pid: int) -> None:
        pass

    server = ZtunnelLinkServer(tmp_path / "ztunnel.sock", on_listeners)
    await server.start()
    try:
        assert mode_of(tmp_path / "ztunnel.sock") == 0o600
    finally:
        await server.close()


async def test_grpc_unix_socket_under_file_mode_is_0600(tmp_path: Path,
                                                        open_umask: None) -> None:
    """The waypoint agent's SDS/ALS socket: gRPC binds inside ``add_insecure_port``."""
    path = tmp_path / "agent.sock"
    server = grpc.aio.server()
    with file_mode(0o600):
        assert server.add_insecure_port(f"unix:{path}")
    try:
        assert mode_of(path) == 0o600
        await server.start()
        assert mode_of(path) == 0o600
    finally:
        await server.stop(None)


# --- who may talk: SO_PEERCRED ----------------------------------------------------------------

NOBODY = 65534
# The unprivileged client must be able to run its interpreter: the system one, not a venv
# that may live under /root.
SYSTEM_PYTHON = Path("/usr/bin/python3")
REPO = Path(__file__).resolve().parents[2]

CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
try:
    s.sendall(sys.argv[2].encode() + b"\\n")
except (BrokenPipeError, ConnectionResetError):
    pass  # a refused peer may be answered and closed before it has sent anything
answer = b""
while not answer.endswith(b"\\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    answer += chunk
print(answer.decode().strip())
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="ambit-sock-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def widen(path: Path) -> None:
    """The socket is 0600, root's: as if its mode were wrong, so the peer check is what stands
    between the caller and the server."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run a client as another user")
    path.chmod(0o666)


def become_nobody() -> None:  # in the child, before exec
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


async def ask_as(uid: int | None, path: Path, line: str) -> dict[str, Any]:
    """Send ``line`` on ``path`` from a separate process (as ``nobody`` for ``NOBODY``, else
    as we are); its one-line answer, decoded."""
    widen(path)
    proc = await asyncio.create_subprocess_exec(
        str(SYSTEM_PYTHON), "-c", CLIENT, str(path), line, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=become_nobody if uid == NOBODY else None)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    answer: dict[str, Any] = json.loads(out)
    return answer


class Recorder:
    def __init__(self) -> None:
        self.requests: list[CniRequest] = []
        self.registrations: list[tuple[dict[str, int], int]] = []

    async def handle(self, req: CniRequest) -> dict[str, Any]:
        self.requests.append(req)
        return {"ok": True, "captured": False, "reason": "test"}

    async def on_listeners(self, fds: Mapping[str, int], pid: int) -> None:
        self.registrations.append((dict(fds), pid))


DEL = json.dumps({"op": "del", "containerId": "c1"})


async def test_cni_socket_refuses_a_uid_it_does_not_allow(
        shared_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    server = CniServer(shared_dir / "cni.sock", rec.handle)
    await server.start()
    try:
        with caplog.at_level(logging.WARNING, "agent.cni"):
            answer = await ask_as(NOBODY, server.path, DEL)
        assert answer["ok"] is False
        assert f"refused a peer with uid {NOBODY}" in answer["error"]
        assert "--socket-uid" in answer["error"]
        assert rec.requests == [], "the handler never saw it"
        assert server.refusals.total == 1
        assert [r.getMessage()[:40] for r in caplog.records] == [
            f"CNI socket: {server.path}: refused a peer"[:40]]
        # Root is still served, on the same socket.
        answer = await ask_as(0, server.path, DEL)
        assert answer == {"ok": True, "captured": False, "reason": "test"}
        assert [r.container_id for r in rec.requests] == ["c1"]
        assert server.refusals.total == 1
    finally:
        await server.close()


async def test_cni_socket_serves_a_uid_it_was_told_to_allow(shared_dir: Path) -> None:
    rec = Recorder()
    server = CniServer(shared_dir / "cni.sock", rec.handle, uids={0, NOBODY})
    await server.start()
    try:
        answer = await ask_as(NOBODY, server.path, DEL)
        assert answer["ok"] is True
        assert server.refusals.total == 0
    finally:
        await server.close()


async def test_ztunnel_link_refuses_a_uid_it_does_not_allow(shared_dir: Path) -> None:
    rec = Recorder()
    server = ZtunnelLinkServer(shared_dir / "ztunnel.sock", rec.on_listeners,
                               peer_check=PEER_CHECK_OFF)
    await server.start()
    try:
        answer = await ask_as(NOBODY, server.path, '{"listeners": []}')
        assert answer["ok"] is False
        assert f"refused a peer with uid {NOBODY}" in answer["error"]
        assert rec.registrations == []
        assert server.refusals.total == 1
    finally:
        await server.close()


def listening_sockets() -> dict[str, socket.socket]:
    out = {}
    for name in LISTENER_SLOTS:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        out[name] = s
    return out


async def test_ztunnel_link_refuses_a_process_that_is_not_ambit_ztunnel(
        tmp_path: Path) -> None:
    rec = Recorder()
    server = ZtunnelLinkServer(tmp_path / "ztunnel.sock", rec.on_listeners)  # cmdline check
    await server.start()
    listeners = listening_sockets()
    link = AgentLink(server.path, listeners, backoff_initial=0.05, backoff_max=0.1)
    task = asyncio.create_task(link.run())
    try:
        for _ in range(100):
            if link.last_error:
                break
            await asyncio.sleep(0.05)
        # This test process (pytest) is root but not `ambit ztunnel`.
        assert f"pid {os.getpid()} (uid 0) is not an `ambit ztunnel` process" in link.last_error
        assert not link.registered.is_set()
        assert rec.registrations == []
        assert server.refusals.total >= 1
    finally:
        task.cancel()
        await server.close()
        for s in listeners.values():
            s.close()


ZTUNNEL_SCRIPT = """
import asyncio, socket, sys
from ztunnel.agent_link import AgentLink

async def main() -> None:
    listeners = {}
    for name in ("outbound", "inbound", "inbound_plaintext"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        listeners[name] = s
    link = AgentLink(sys.argv[2], listeners, backoff_initial=0.05, backoff_max=0.1)
    task = asyncio.create_task(link.run())
    await asyncio.wait_for(link.registered.wait(), 15)
    print("registered", flush=True)
    await asyncio.sleep(30)  # until killed: the link stays open
    task.cancel()

asyncio.run(main())
"""


async def test_ztunnel_link_accepts_an_ambit_ztunnel_process(tmp_path: Path) -> None:
    """A script named ``ambit`` run as ``python .../ambit ztunnel``: what /proc shows for the
    real console script."""
    script = tmp_path / "bin" / "ambit"
    script.parent.mkdir()
    script.write_text(ZTUNNEL_SCRIPT)
    rec = Recorder()
    server = ZtunnelLinkServer(tmp_path / "ztunnel.sock", rec.on_listeners)
    await server.start()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "ztunnel", str(server.path), env=env,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line == b"registered\n"
        assert [(sorted(fds), pid) for fds, pid in rec.registrations] == [
            (sorted(LISTENER_SLOTS), proc.pid)]
        assert server.ztunnel_pid == proc.pid
        assert server.refusals.total == 0
    finally:
        proc.kill()
        await proc.wait()
        await server.close()

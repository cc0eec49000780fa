"""The node's Unix sockets over real sockets in a temporary directory: each socket file has its
final mode from the moment ``bind`` creates it (no ``chmod`` afterwards, so no window in which
another user can connect)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.cni_server import CniRequest, CniServer
from agent.ztunnel_link import ZtunnelLinkServer
from mesh.unix import bind_unix, file_mode


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

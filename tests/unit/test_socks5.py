"""SOCKS5 message parsing (RFC 1928), including malformed input."""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from ztunnel.admission import ConnectionLimits
from ztunnel.config import ZtunnelConfig
from ztunnel.listeners import socks5
from ztunnel.listeners.socks5 import (
    REP_ATYP_UNSUPPORTED,
    REP_CMD_UNSUPPORTED,
    REP_FAILURE,
    REP_HOST_UNREACHABLE,
    REP_NET_UNREACHABLE,
    REP_NOT_ALLOWED,
    REP_OK,
    REP_REFUSED,
    SocksError,
    SocksRequest,
    greeting_length,
    outcome_reply,
    parse_greeting,
    parse_request,
    reply,
    request_length,
)
from ztunnel.metrics import Metrics


def test_greeting() -> None:
    assert parse_greeting(b"\x05\x02\x00\x02") == [0, 2]


@pytest.mark.parametrize("data", [b"\x04\x01\x00", b"\x05\x02\x00", b"\x05\x00", b"GET /",
                                  b"\x05\x01\x00\x00", b"\x05"])
def test_bad_greeting(data: bytes) -> None:
    with pytest.raises(SocksError):
        parse_greeting(data)


@pytest.mark.parametrize(("data", "expected"), [
    (b"\x05\x01\x00\x01\x0a\x00\x00\x01\x1f\x90", SocksRequest("10.0.0.1", 8080, False)),
    (b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x00\x50", SocksRequest("::1", 80, False)),
    (b"\x05\x01\x00\x03\x07example\x01\xbb", SocksRequest("example", 443, True)),
])
def test_requests(data: bytes, expected: SocksRequest) -> None:
    assert request_length(data[:5]) == len(data)
    assert parse_request(data) == expected


def test_bind_command_is_refused() -> None:
    with pytest.raises(SocksError) as err:
        parse_request(b"\x05\x02\x00\x01\x0a\x00\x00\x01\x1f\x90")
    assert err.value.reply == REP_CMD_UNSUPPORTED


def test_unknown_address_type() -> None:
    with pytest.raises(SocksError) as err:
        request_length(b"\x05\x01\x00\x09\x00")
    assert err.value.reply == REP_ATYP_UNSUPPORTED


def test_truncated_request() -> None:
    with pytest.raises(SocksError):
        parse_request(b"\x05\x01\x00\x01\x0a\x00")


@pytest.mark.parametrize(("head", "length"), [(b"\x05\x01", 3), (b"\x05\xff", 257)])
def test_greeting_length(head: bytes, length: int) -> None:
    assert greeting_length(head) == length


@pytest.mark.parametrize("head", [b"\x04\x01", b"\x05\x00", b"GE", b"\x05"])
def test_bad_greeting_is_refused_from_its_first_two_bytes(head: bytes) -> None:
    with pytest.raises(SocksError):
        greeting_length(head)


def test_port_zero_and_bad_hostnames_are_refused() -> None:
    with pytest.raises(SocksError):
        parse_request(b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x00")
    for name in (b"", b"a\x00b", b"a b", b"-x", b"\xd9\xa8"):
        with pytest.raises(SocksError):
            parse_request(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50")


@pytest.mark.parametrize(("outcome", "error", "code"), [
    ("ok", None, REP_OK),
    ("denied", None, REP_NOT_ALLOWED),
    ("no_route", None, REP_HOST_UNREACHABLE),
    ("connect_failed", ConnectionRefusedError(errno.ECONNREFUSED, "refused"), REP_REFUSED),
    ("connect_failed", OSError(errno.EHOSTUNREACH, "no route"), REP_HOST_UNREACHABLE),
    ("connect_failed", OSError(errno.ENETUNREACH, "no net"), REP_NET_UNREACHABLE),
    # connect_tcp turns a timeout into ConnectionRefusedError(ETIMEDOUT): not "refused"
    ("connect_failed", ConnectionRefusedError(errno.ETIMEDOUT, "timed out"),
     REP_HOST_UNREACHABLE),
    ("connect_failed", None, REP_HOST_UNREACHABLE),  # HBONE peer unreachable or refused
    ("error", OSError(errno.EPIPE, "broken"), REP_FAILURE),
])
def test_outcome_reply(outcome: str, error: BaseException | None, code: int) -> None:
    assert outcome_reply(outcome, error) == code


# -- the handler over a socket pair, with proxy_outbound replaced ---------------------------

CONNECT_10_0_0_1_80 = b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50"


@dataclass
class FakeRecord:
    outcome: str


class FakeOutbound:
    """Stands in for proxy_outbound: answers when the test decides, then echoes once."""

    def __init__(self, outcome: str, error: BaseException | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.decide = asyncio.Event()
        self.entered = asyncio.Event()
        self.called: list[tuple[Any, int]] = []

    async def __call__(self, ctx: Any, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, source: Any, dest: tuple[Any, int],
                       listener: str, answer: Any = None) -> None:
        self.called.append(dest)
        self.entered.set()
        await self.decide.wait()
        rec = FakeRecord(self.outcome)
        if self.outcome == "ok":
            answer(rec, None)
            writer.write(await reader.readexactly(4))  # the "upstream" echoes
            await writer.drain()
        else:
            answer(rec, self.error)
        writer.close()


@pytest.fixture
def ctx() -> Any:
    metrics = Metrics()
    return SimpleNamespace(metrics=metrics,
                           limits=ConnectionLimits(ZtunnelConfig(node="n"), metrics))


async def _run(ctx: Any, fake: FakeOutbound | None, monkeypatch: pytest.MonkeyPatch) \
        -> tuple[asyncio.Task[None], asyncio.StreamReader, asyncio.StreamWriter]:
    if fake is not None:
        monkeypatch.setattr(socks5, "proxy_outbound", fake)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_sock = socket.create_connection(listener.getsockname())
        server_sock, _ = listener.accept()
    server_sock.setblocking(False)
    client_sock.setblocking(False)
    task = asyncio.create_task(socks5.handle(ctx, server_sock))
    reader, writer = await asyncio.open_connection(sock=client_sock)
    return task, reader, writer


@pytest.mark.parametrize("greeting", [
    b"\x05\x01\x02",  # offers only username/password
    b"\x05\x00",  # offers nothing
    b"\x04\x01\x00\x50\x0a\x00\x00\x01\x00",  # SOCKS4
    b"GET / HTTP/1.1\r\n\r\n",
])
async def test_bad_greeting_gets_no_acceptable_method_and_a_close(
        ctx: Any, greeting: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    task, reader, writer = await _run(ctx, None, monkeypatch)
    writer.write(greeting)
    assert await asyncio.wait_for(reader.read(), 5) == bytes([5, 0xFF])  # then EOF
    with pytest.raises(SocksError):
        await task
    writer.close()


@pytest.mark.parametrize(("outcome", "error", "code"), [
    ("denied", None, REP_NOT_ALLOWED),
    ("no_route", None, REP_HOST_UNREACHABLE),
    ("connect_failed", ConnectionRefusedError(errno.ECONNREFUSED, "refused"), REP_REFUSED),
])
async def test_refusal_is_the_reply_then_a_close(
        ctx: Any, outcome: str, error: BaseException | None, code: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeOutbound(outcome, error)
    task, reader, writer = await _run(ctx, fake, monkeypatch)
    writer.write(b"\x05\x01\x00" + CONNECT_10_0_0_1_80)
    assert await reader.readexactly(2) == b"\x05\x00"
    fake.decide.set()
    assert await asyncio.wait_for(reader.read(), 5) == reply(code)  # then EOF
    await task
    writer.close()


async def test_success_is_sent_only_once_the_outcome_is_known(
        ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeOutbound("ok")
    task, reader, writer = await _run(ctx, fake, monkeypatch)
    writer.write(b"\x05\x01\x00" + CONNECT_10_0_0_1_80)
    assert await reader.readexactly(2) == b"\x05\x00"
    await asyncio.wait_for(fake.entered.wait(), 5)
    assert [port for _, port in fake.called] == [80]
    # Routing and policy have not decided: no reply yet.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(1), 0.2)
    fake.decide.set()
    assert await asyncio.wait_for(reader.readexactly(10), 5) == reply(REP_OK)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.read(), 5) == b"ping"
    await task
    writer.close()


async def test_bad_request_after_the_greeting_gets_the_request_reply(
        ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    task, reader, writer = await _run(ctx, None, monkeypatch)
    writer.write(b"\x05\x01\x00" + b"\x05\x02\x00\x01\x0a\x00\x00\x01\x00\x50")  # BIND
    assert await asyncio.wait_for(reader.read(), 5) == b"\x05\x00" + reply(REP_CMD_UNSUPPORTED)
    with pytest.raises(SocksError):
        await task
    writer.close()

"""SOCKS5 message parsing (RFC 1928), including malformed input."""

from __future__ import annotations

import pytest

from ztunnel.listeners.socks5 import (
    REP_ATYP_UNSUPPORTED,
    REP_CMD_UNSUPPORTED,
    SocksError,
    SocksRequest,
    parse_greeting,
    parse_request,
    request_length,
)


def test_greeting() -> None:
    assert parse_greeting(b"\x05\x02\x00\x02") == [0, 2]


@pytest.mark.parametrize("data", [b"\x04\x01\x00", b"\x05\x02\x00", b"\x05\x00", b"GET /"])
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

"""SOCKS5 message parsing (``ztunnel/listeners/socks5.py``): the pure functions the listener
runs on client bytes, ``greeting_length``/``parse_greeting`` and ``request_length``/
``parse_request``.

Input: byte 0 bit 0 picks the message (greeting or request); the rest is the message, also
cut where the listener cuts it (2 or 5 head bytes, then what the head says).

Invariants: the only rejection is ``SocksError`` (with a reply code from RFC 1928); a head the
length function accepts gives a length at least the head's; a parsed greeting lists exactly
the offered methods; a parsed request has a port in 1..65535 and an IP address or a DNS-shaped
ASCII hostname (``_HOSTNAME``), and re-encoding it gives back the input bytes.
"""

from __future__ import annotations

import ipaddress
import struct
import sys

import atheris

with atheris.instrument_imports(include=["ztunnel.listeners.socks5"]):
    from ztunnel.listeners import socks5

REPLIES = {0, 1, 2, 3, 4, 5, 6, 7, 8}


def _greeting(msg: bytes) -> None:
    try:
        total = socks5.greeting_length(msg[:2])
    except socks5.SocksError as e:
        assert e.reply in REPLIES
        return
    assert 3 <= total <= 257
    try:
        methods = socks5.parse_greeting(msg)
    except socks5.SocksError as e:
        assert e.reply in REPLIES
        assert len(msg) != total
        return
    assert len(msg) == total and methods == list(msg[2:])


def _encode(req: socks5.SocksRequest, atyp: int) -> bytes:
    if atyp == socks5.ATYP_DOMAIN:
        host = req.host.encode("ascii")
        addr = bytes([len(host)]) + host
    else:
        addr = ipaddress.ip_address(req.host).packed
    return bytes([5, 1, 0, atyp]) + addr + struct.pack("!H", req.port)


def _request(msg: bytes) -> None:
    try:
        total = socks5.request_length(msg[:5])
    except socks5.SocksError as e:
        assert e.reply in REPLIES
        total = -1
    else:
        assert 7 <= total <= 262
    try:
        req = socks5.parse_request(msg)
    except socks5.SocksError as e:
        assert e.reply in REPLIES
        return
    assert total == len(msg)
    assert 1 <= req.port <= 65535
    if req.is_domain:
        assert socks5._HOSTNAME.fullmatch(req.host), req
    else:
        ipaddress.ip_address(req.host)
    # msg[2] (RSV) is not checked by the parser: compare the rest.
    enc = _encode(req, msg[3])
    assert enc[:2] + enc[3:] == msg[:2] + msg[3:], (enc, msg)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        _request(data[1:])
    else:
        _greeting(data[1:])


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

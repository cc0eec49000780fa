"""The authority and port parsers: ``parse_authority`` (``ztunnel/hbone/core.py``, the
CONNECT ``:authority`` a peer sends) and ``parse_port`` (``mesh/ports.py``, every port read
from text: the wire, state files, CRDs).

Input: UTF-8 text (undecodable bytes replaced); byte 0 bit 0 picks the parser.

Invariants: the only rejection is ``ValueError``. An accepted port text is 1-5 ASCII digits
whose value is the port, in 1..65535, and ``str(port)`` parses back to the same port. An
accepted authority is at most 64 characters, its port text (after the last ':') is accepted
by ``parse_port``, IPv6 is bracketed and IPv4 is not, there is no zone, and
``format_authority`` of the result parses back to the same address and port.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["mesh.ports", "ztunnel.hbone.core"]):
    from mesh.ports import parse_port
    from ztunnel.hbone.core import format_authority, parse_authority


def _port(text: str) -> None:
    try:
        port = parse_port(text)
    except ValueError:
        return
    assert text.isascii() and text.isdigit() and 1 <= len(text) <= 5, text
    assert set(text) <= set("0123456789"), text
    assert int(text) == port and 1 <= port <= 65535, (text, port)
    assert parse_port(str(port)) == port


def _authority(text: str) -> None:
    try:
        addr, port = parse_authority(text)
    except ValueError:
        return
    assert len(text) <= 64, text
    host, _, port_text = text.rpartition(":")
    assert parse_port(port_text) == port, text
    assert "%" not in host, text
    assert (host.startswith("[") and host.endswith("]")) == (addr.version == 6), text
    again = format_authority(addr, port)
    assert parse_authority(again) == (addr, port), (text, again)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    text = data[1:].decode("utf-8", "replace")
    if data[0] & 1:
        _authority(text)
    else:
        _port(text)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

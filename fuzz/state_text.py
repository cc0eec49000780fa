"""The state file (``mesh/state/parse.py``: ``load_state_text``), text in.

Input: the file's bytes, decoded as UTF-8 with undecodable bytes replaced (the ztunnel reads
the file as text).

Invariants: the only rejection is ``StateError`` (the caller keeps its last good state on
exactly that exception; anything else would escape the reload loop). An accepted document gives
a ``MeshConfig`` whose workloads' addresses and services' VIPs are all distinct and whose ports
are in 1..65535.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["mesh.state", "mesh.spiffe", "mesh.ports"]):
    from mesh.state.parse import StateError, load_state_text


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        config = load_state_text(text)
    except StateError:
        return
    ips = [ip for w in config.workloads for ip in w.addresses]
    vips = [ip for s in config.services for ip in s.vips]
    assert len(set(ips + vips)) == len(ips) + len(vips), config
    for s in config.services:
        for p in s.ports:
            assert 1 <= p.port <= 65535 and 1 <= p.target_port <= 65535, s


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

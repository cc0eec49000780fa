"""The concurrent-stream limit over real mTLS: a peer that opens more streams than ztunnel B
advertised loses those streams (REFUSED_STREAM), not the connection and the tunnels on it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import h2.errors

from tests.component.harness import mesh, sample
from tests.component.test_hbone_limits import Attacker, connect_block, served
from tests.unit.test_hbone_limits import (
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PREFACE,
    RST,
    SETTINGS,
    frame,
    frames_of,
)


async def read_until_reset(a: Attacker, sid: int, limit: float) -> list[tuple[int, int, int]]:
    """Frames from the server until it resets ``sid``: (type, stream, first payload word)."""
    async with asyncio.timeout(limit):
        while True:
            data = await a.reader.read(65536)
            a.received += data
            seen = [(f[0], f[2], int.from_bytes(f[3][:4], "big"))
                    for f in frames_of(a.received)]
            if not data or (RST, sid) in [(t, s) for t, s, _ in seen]:
                return seen  # the reset, or the connection closed


async def test_streams_beyond_the_limit_are_refused_and_the_rest_carry_on(
        tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        a = await Attacker.open(m)
        block = connect_block()
        # 101 CONNECTs in one write, none ever finished: the 101st is over the limit of 100.
        await a.send(PREFACE + frame(SETTINGS) + b"".join(
            frame(HEADERS, END_HEADERS, sid, block) for sid in range(1, 203, 2)))
        seen = await read_until_reset(a, 201, 5)
        assert (RST, 201, h2.errors.ErrorCodes.REFUSED_STREAM) in seen
        assert GOAWAY not in [t for t, _, _ in seen]
        assert [s for t, s, _ in seen if t == RST] == [201]
        assert sample(m.b, "ambit_ztunnel_connection_errors_total",
                      reason="too_many_streams") == 1
        assert await served(m)
        # Still open: the attacker's connection and its 100 tunnels were not closed.
        await asyncio.sleep(0.2)
        assert not a.reader.at_eof()
        a.writer.close()

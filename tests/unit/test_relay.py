"""relay._both: when both directions of a tunnel fail at once, one error is raised and the
other is retrieved, so asyncio never reports "Task exception was never retrieved" (once per
tunnel, on stderr: a log flood under attack)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from ztunnel.relay import _both


async def _fail(exc: BaseException) -> None:
    raise exc


async def test_both_directions_failing_leave_no_unretrieved_exception() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        for _ in range(20):
            a = asyncio.create_task(_fail(ConnectionResetError("a")))
            b = asyncio.create_task(_fail(BrokenPipeError("b")))
            await asyncio.sleep(0)  # both finish in the same iteration
            with pytest.raises(OSError) as err:
                await _both(a, b)
            assert str(err.value) in ("a", "b")
            del a, b, err
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert [c.get("message") for c in reported] == []


async def test_one_direction_failing_cancels_the_other() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    other = asyncio.create_task(forever())
    await started.wait()
    with pytest.raises(ConnectionResetError):
        await _both(asyncio.create_task(_fail(ConnectionResetError("x"))), other)
    assert other.cancelled()

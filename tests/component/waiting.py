"""Polling a condition on the running event loop, for the component tests.

Why shared: every component test waits for something another task does (a push applied, a
watch event cached, a file rewritten); one helper keeps the polling and the failure message the
same everywhere. Each test module binds its own default limit (``functools.partial``).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any


async def until(predicate: Callable[[], Any], what: str = "the condition", *, limit: float,
                interval: float = 0.01) -> float:
    """Poll ``predicate`` (sync, or returning an awaitable) until it is true; returns the
    seconds it took. AssertionError naming ``what`` once ``limit`` seconds have passed."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return loop.time() - start
        if loop.time() - start >= limit:
            raise AssertionError(f"{what} not reached within {limit:g}s")
        await asyncio.sleep(interval)

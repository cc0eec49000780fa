"""Waiting for the cluster to converge (config pushed, a link re-opened), for e2e tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "",
          interval: float = 0.1) -> Any:
    """``predicate()``'s first true value, polled every ``interval``; AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)

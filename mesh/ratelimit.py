"""Logging at a bounded rate: a flood of one event becomes one line per interval.

Why it exists: a peer that keeps doing something refused (connecting to a node socket with the
wrong uid, opening connections beyond a ztunnel limit) must not turn the refusal into a log
flood. ``RateLimitedLog`` logs the first occurrence of each key at once; later ones within
``interval`` seconds are only counted, and the next line logged for that key says how many
were left out. Keys are independent (one per reason, say), so a flood of one kind never hides
another. The cost per event is a dict lookup and a clock read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable


class RateLimitedLog:
    """At most one line per key per ``interval`` seconds, with the count left out since."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, level: int = logging.WARNING,
                 what: str = "") -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.level = level
        # Named in the suffix: "(3 more refused since the last such line)".
        self._what = f" {what}" if what else ""
        self.total = 0
        self._last: dict[Hashable, float] = {}
        self._unlogged: dict[Hashable, int] = {}

    def log(self, key: Hashable, message: str, *args: object) -> bool:
        """Count one event of ``key``; log ``message % args`` unless a line for ``key`` was
        logged less than ``interval`` ago. True if it was logged. The message is formatted
        only when it is logged."""
        self.total += 1
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._unlogged[key] = self._unlogged.get(key, 0) + 1
            return False
        left_out = self._unlogged.pop(key, 0)
        self._last[key] = now
        if left_out:
            self.logger.log(self.level, message + " (%d more%s since the last such line)",
                            *args, left_out, self._what)
        else:
            self.logger.log(self.level, message, *args)
        return True

    def suppressed(self, key: Hashable) -> int:
        """Events of ``key`` counted but not logged since its last line."""
        return self._unlogged.get(key, 0)

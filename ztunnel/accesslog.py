"""One JSON line per connection: who talked to whom, how much, how long, and how it ended.

Operators grep these when a connection fails; every refusal carries the reason in words.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

log = logging.getLogger("ztunnel.access")


class AccessLog:
    def __init__(self, target: str) -> None:
        self._stream: IO[str] | None
        if target == "":
            self._stream = None
        elif target == "-":
            self._stream = sys.stderr
        else:
            self._stream = open(target, "a", buffering=1)  # noqa: SIM115 - lives with the process

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is None:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), **record}
        try:
            self._stream.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        except (OSError, ValueError) as e:  # a full disk must not take connections down
            log.warning("cannot write access log: %s", e)

    def close(self) -> None:
        if self._stream not in (None, sys.stderr):
            assert self._stream is not None
            self._stream.close()

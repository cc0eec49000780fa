"""Decoding one JSON message from another process, where any failure is the sender's mistake.

Why shared: the node agent's CNI socket and the ztunnel's side of the agent link both read JSON
lines from another process, and ``json.loads`` raises ``RecursionError``, not ``ValueError``, on
deeply nested input (``[[[[...``); caught in one place, a malformed line is refused like any
other instead of escaping the handler (both were found by the fuzzers in ``fuzz/``).
"""

from __future__ import annotations

import json
from typing import Any


def decode_json(line: bytes | str) -> Any:
    """``line`` as JSON; ``ValueError`` saying why when it is not (bad UTF-8, bad JSON, nested
    too deeply)."""
    try:
        return json.loads(line)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not a JSON line: {e}") from None
    except RecursionError:
        raise ValueError("not a usable JSON line: nested too deeply") from None

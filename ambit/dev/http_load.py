"""A small HTTP load client for pods: N requests, a JSON summary of what came back.

Why it exists: L7 tests and the demo need counts (how many answers came from v2, how many
were 5xx) from inside a pod's network namespace, where the only way in is a process. Requests
reuse one keep-alive connection (reconnecting when the server closes it), as a real client
would, so per-request routing in the waypoint is what is measured.

``python -m ambit.dev.http_load URL --count 1000 [--method POST] [--header K:V]`` prints
``{"codes": {"200": 990, ...}, "versions": {"v1": 900, ...}, "errors": 0, "p50_ms": ...,
"p99_ms": ..., "first_error": "..."}``; ``errors`` counts requests that got no HTTP answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from typing import Any


def run(url: str, count: int, method: str, headers: dict[str, str], timeout: float) \
        -> dict[str, Any]:
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "", u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    codes: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    errors = 0
    first_error = ""
    latencies: list[float] = []
    conn: http.client.HTTPConnection | None = None
    for _ in range(count):
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conn.request(method, path, body=b"" if method in ("POST", "PUT") else None,
                         headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            codes[str(resp.status)] += 1
            try:
                versions[str(json.loads(body).get("version", "?"))] += 1
            except (ValueError, AttributeError):
                versions["-"] += 1
            if resp.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as e:
            errors += 1
            first_error = first_error or f"{type(e).__name__}: {e}"
            if conn is not None:
                conn.close()
            conn = None
        latencies.append((time.monotonic() - t0) * 1000)
    if conn is not None:
        conn.close()
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2) \
            if latencies else 0.0

    return {"codes": dict(codes), "versions": dict(versions), "errors": errors,
            "first_error": first_error, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ambit.dev.http_load")
    p.add_argument("url")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--method", default="GET")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            p.error(f"--header {h!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    print(json.dumps(run(args.url, args.count, args.method.upper(), headers, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

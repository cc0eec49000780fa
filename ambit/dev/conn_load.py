"""A steady rate of new TCP connections plus a few long-lived ones, from inside a pod.

Why it exists: a ztunnel restart must refuse or drop no new connection and let established
ones finish within the drain grace period (issue 15). That is only seen under load: new
connections arriving at a steady rate while the ztunnel is replaced, and long-lived ones that
keep talking across the restart. Each new connection sends one line to an ``ambit.dev.echo``
server and must get its answer; each long-lived one exchanges a line every ``--interval``
seconds for ``--long-seconds``.

``python -m ambit.dev.conn_load HOST PORT --rate 50 --seconds 12 --long 5 --long-seconds 8``
prints one JSON line when done::

    {"new": {"ok": 600, "failed": 0, "errors": {}, "p50_ms": 2.1, "p99_ms": 9.8,
             "max_ms": 30.2, "slow": 0, "first_failures": []},
     "long": {"ok": 5, "failed": 0, "exchanges": 80, "errors": []},
     "peers": {"10.244.1.2": 600}}

``peers`` counts the client address the server reported, so a caller can tell what the server
saw. Exit status 0 when every connection worked, 1 otherwise. ``--ready-file`` is written once
the long-lived connections are up (the load has started).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SLOW_SECONDS = 1.0  # a new connection slower than this is counted as slow (SYN retried, say)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    message: str) -> dict[str, Any]:
    writer.write(message.encode() + b"\n")
    await writer.drain()
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed without an answer")
    answer: dict[str, Any] = json.loads(line)
    if answer.get("data") != message:
        raise ConnectionError(f"wrong answer {line[:100]!r}")
    return answer


def _reason(e: BaseException) -> str:
    return type(e).__name__ + (f": {e}" if str(e) else "")


class Load:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.failures: list[dict[str, Any]] = []
        self.peers: Counter[str] = Counter()
        self.t0 = time.monotonic()

    async def one(self, n: int) -> None:
        started = time.monotonic()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                answer = await _exchange(reader, writer, f"new-{n}")
            self.latencies.append(time.monotonic() - started)
            self.peers[str(answer.get("peer", "")).rsplit(":", 1)[0]] += 1
        except (OSError, TimeoutError, ValueError) as e:
            reason = _reason(e)
            self.errors[reason.split(":")[0]] += 1
            if len(self.failures) < 20:
                self.failures.append({"n": n, "at_s": round(started - self.t0, 3),
                                      "error": reason[:200]})
        finally:
            if writer is not None:
                writer.close()

    async def long_lived(self, i: int, seconds: float, interval: float, up: asyncio.Event,
                         release: asyncio.Event) -> tuple[int, str]:
        """Exchanges made and the error that ended it ('' if it lasted ``seconds``, or until
        ``release`` is set)."""
        exchanges = 0
        opened: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout)
            opened = writer
            await asyncio.wait_for(_exchange(reader, writer, f"long-{i}-0"), self.timeout)
            exchanges += 1
            up.set()
            end = time.monotonic() + seconds
            while time.monotonic() < end and not release.is_set():
                await asyncio.sleep(interval)
                await asyncio.wait_for(_exchange(reader, writer, f"long-{i}-{exchanges}"),
                                       self.timeout)
                exchanges += 1
            return exchanges, ""
        except (OSError, TimeoutError, ValueError) as e:
            up.set()
            return exchanges, (f"long-{i} after {exchanges} exchanges "
                               f"({time.monotonic() - self.t0:.1f}s): {_reason(e)[:200]}")
        finally:
            if opened is not None:
                opened.close()


def summary(load: Load, long_results: Sequence[tuple[int, str]]) -> dict[str, Any]:
    lat = sorted(load.latencies)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1000, 1) if lat else 0.0

    return {
        "new": {"ok": len(lat), "failed": sum(load.errors.values()),
                "errors": dict(load.errors), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                "max_ms": round(lat[-1] * 1000, 1) if lat else 0.0,
                "slow": sum(1 for x in lat if x > SLOW_SECONDS),
                "first_failures": load.failures},
        "long": {"ok": sum(1 for _, e in long_results if not e),
                 "failed": sum(1 for _, e in long_results if e),
                 "exchanges": sum(n for n, _ in long_results),
                 "errors": [e for _, e in long_results if e]},
        "peers": dict(load.peers),
    }


async def run(host: str, port: int, rate: float, seconds: float, long: int,
              long_seconds: float, interval: float, patience: float,
              ready_file: Path | None, long_until: Path | None = None) -> dict[str, Any]:
    load = Load(host, port, patience)
    ups = [asyncio.Event() for _ in range(long)]
    release = asyncio.Event()
    longs = [asyncio.create_task(load.long_lived(i, long_seconds, interval, ups[i], release))
             for i in range(long)]
    watch = asyncio.create_task(_watch(long_until, release)) if long_until else None
    for up in ups:
        await up.wait()
    if ready_file is not None:
        await asyncio.to_thread(ready_file.write_text, "started\n")
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate) + 1
        while n < due:  # catch up after a late wake-up: the rate is kept, not the spacing
            task = asyncio.create_task(load.one(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks)
    results = await asyncio.gather(*longs)
    if watch is not None:
        watch.cancel()
    return summary(load, results)


async def _watch(path: Path, release: asyncio.Event) -> None:
    """Set ``release`` once ``path`` exists (checked every 0.1 s)."""
    while True:
        if await asyncio.to_thread(path.exists):
            release.set()
            return
        await asyncio.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ambit.dev.conn_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--rate", type=float, default=50.0, help="new connections per second")
    p.add_argument("--seconds", type=float, default=10.0, help="how long new ones are opened")
    p.add_argument("--long", type=int, default=5, help="long-lived connections")
    p.add_argument("--long-seconds", type=float, default=8.0,
                   help="how long each long-lived connection keeps talking")
    p.add_argument("--long-until", type=Path,
                   help="the long-lived connections end once this file exists (at the latest "
                   "after --long-seconds)")
    p.add_argument("--interval", type=float, default=0.5,
                   help="seconds between a long-lived connection's exchanges")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="a connection (or one exchange) slower than this failed")
    p.add_argument("--ready-file", type=Path, help="written once the long-lived ones are up")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.long < 0:
        p.error("--rate and --seconds must be positive, --long at least 0")
    result = asyncio.run(run(args.host, args.port, args.rate, args.seconds, args.long,
                             args.long_seconds, args.interval, args.timeout, args.ready_file,
                             args.long_until))
    print(json.dumps(result), flush=True)
    return 0 if result["new"]["failed"] == 0 and result["long"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

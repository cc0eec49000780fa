"""A small fixed-rate request/response latency tool (server echoes, client measures round trips).

Why not an existing tool: we need one TCP connection (or a few) carrying fixed-size requests at a
fixed rate, a latency per request, and a tool that runs unchanged through a plain route, an Envoy
TCP-proxy chain and the ztunnel. Load generators such as wrk/fortio speak HTTP, which the L4
proxies under test do not need to understand, and netperf TCP_RR runs closed-loop (as fast as
possible), which measures saturation instead of latency at a known load.

Usage (each side runs inside its own pod network namespace, started by ``python -m bench``)::

    python -m bench.rr server --bind 10.0.2.2 --port 7000
    python -m bench.rr client --host 10.0.2.2 --port 7000 --rate 1000 --duration 10

The client prints one JSON object on stdout. Each connection sends its share of the rate on an
absolute schedule (start + i * interval); a request waits for the previous response on its
connection, so when a response is slower than the interval the next send is late. A request
held up that way is timed from its *scheduled* send time to the last byte of its echo
(``time.perf_counter_ns``), so its wait is part of its latency: timing from the actual send
would hide exactly the queueing a slow proxy causes (coordinated omission). A request whose
connection was free at its scheduled time is timed from its actual send, so the client's own
timer slack (uvloop: 1 ms resolution) is not charged to the proxy. Sends more than one interval
behind schedule are also counted (``late_sends``). All connections are
opened before the schedule starts, so connection setup is not in the latency.

``python -m bench.rr connrate`` measures new connections per second instead: ``--concurrency``
workers each open a TCP connection, send one request, read its echo and close, again and again,
until ``--duration`` or ``--max-conns`` is reached.

Everything is bounded: the client by ``--duration`` plus a grace period (and connrate by
``--max-conns``), the server by ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from bench.report import percentile

DEFAULT_SIZE = 1024


def _use_uvloop() -> str:
    """Install uvloop when available (lower, steadier per-request overhead than asyncio's loop)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _nodelay(sock: socket.socket | None) -> None:
    # Request/response on small messages: Nagle would add up to a delayed-ACK timeout.
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Echo(asyncio.Protocol):
    """Writes back whatever arrives: the client reads exactly ``size`` bytes per request."""

    transport: asyncio.WriteTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so cast rather than check.
        self.transport = cast(asyncio.WriteTransport, transport)
        _nodelay(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def _write_ready(path: Path, text: str) -> None:
    path.write_text(text)


async def serve(bind: str, port: int, max_seconds: float, ready_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, bind, port, reuse_address=True, backlog=1024)
    if ready_file is not None:
        # Once, at startup, before any client exists: a blocking write is harmless here.
        _write_ready(ready_file, f"{bind}:{port}\n")
    async with server:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.serve_forever(), timeout=max_seconds)


@dataclass
class _ConnStats:
    samples_ns: list[int] = field(default_factory=list)
    # The same requests timed from their actual send (what coordinated omission would report).
    from_send_ns: list[int] = field(default_factory=list)
    late: int = 0
    sent: int = 0


def scheduled_latency(target_ns: int, sent_ns: int, done_ns: int, interval_ns: float,
                      prev_done_ns: int) -> tuple[int, bool]:
    """(latency of one request, whether its send was late).

    If the connection was still waiting for the previous answer at the scheduled time
    (``prev_done_ns > target_ns``), the request was held up by the system under test from
    ``target_ns`` on, and a user of the service would have waited too: latency counts from the
    schedule (not doing so is coordinated omission). Otherwise the connection was free and any
    gap between schedule and send is the load generator's own timer slack (uvloop's timers
    have a resolution of 1 ms), which is not the proxy's: latency counts from the send.
    "Late" means sent more than one interval behind schedule.
    """
    if done_ns < sent_ns:
        raise ValueError("answer before the request was sent")
    start = target_ns if prev_done_ns > target_ns else sent_ns
    return done_ns - min(start, sent_ns), sent_ns - target_ns > interval_ns


async def _connect(host: str, port: int,
                   limit_s: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(limit_s):
        reader, writer = await asyncio.open_connection(host, port)
    _nodelay(writer.get_extra_info("socket"))
    return reader, writer


async def _one_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          rate: float, warmup: float, duration: float, size: int,
                          start_ns: int, stats: _ConnStats) -> None:
    payload = os.urandom(size)
    interval = 1e9 / rate
    measure_from = start_ns + int(warmup * 1e9)
    end = start_ns + int((warmup + duration) * 1e9)
    samples = stats.samples_ns
    perf = time.perf_counter_ns
    i = 0
    prev_done = 0
    try:
        while True:
            target = start_ns + int(i * interval)
            if target >= end:
                break
            i += 1
            now = perf()
            if target > now:
                await asyncio.sleep((target - now) / 1e9)
            t0 = perf()
            writer.write(payload)
            echo = await reader.readexactly(size)
            t1 = perf()
            if echo != payload:
                raise RuntimeError("echo differs from the request: data corrupted in transit")
            stats.sent += 1
            latency, late = scheduled_latency(target, t0, t1, interval, prev_done)
            prev_done = t1
            stats.late += late
            if target >= measure_from:
                samples.append(latency)
                stats.from_send_ns.append(t1 - t0)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def run_client(host: str, port: int, rate: float, duration: float, warmup: float,
                     connections: int, size: int) -> dict[str, object]:
    """Run the fixed-rate load and return the summary (and raw samples in microseconds)."""
    per_conn = rate / connections
    stats = [_ConnStats() for _ in range(connections)]
    t_connect = time.perf_counter_ns()
    # Opened in waves of 100 so a thousand connections do not overflow an accept backlog.
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    async with asyncio.timeout(30.0 + connections / 50):
        for first in range(0, connections, 100):
            conns += await asyncio.gather(*(
                _connect(host, port, 10.0) for _ in range(first, min(connections, first + 100))))
    connect_s = (time.perf_counter_ns() - t_connect) / 1e9
    # All connections share one schedule origin, offset so sends interleave evenly.
    start = time.perf_counter_ns() + 50_000_000
    async with asyncio.timeout(warmup + duration + 15.0):
        await asyncio.gather(*(
            _one_connection(r, w, per_conn, warmup, duration, size,
                            start + int(k * 1e9 / rate), s)
            for k, ((r, w), s) in enumerate(zip(conns, stats, strict=True))
        ))
    samples = [x for s in stats for x in s.samples_ns]
    if not samples:
        raise RuntimeError("no request completed inside the measured window")
    ms = [x / 1e6 for x in samples]
    from_send = [x / 1e6 for s in stats for x in s.from_send_ns]
    return {
        "host": host,
        "port": port,
        "size": size,
        "connections": connections,
        "connect_seconds": connect_s,
        "target_rate": rate,
        "duration": duration,
        "warmup": warmup,
        "timed_from": "scheduled send when held up by the previous answer",
        "requests": len(ms),
        "sent": sum(s.sent for s in stats),
        "achieved_rate": len(ms) / duration,
        "late_sends": sum(s.late for s in stats),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "mean_ms": sum(ms) / len(ms),
        "from_send_p50_ms": percentile(from_send, 50),
        "from_send_p99_ms": percentile(from_send, 99),
        "samples_us": [round(x / 1000) for x in samples],
    }


async def run_connrate(host: str, port: int, duration: float, concurrency: int, max_conns: int,
                       size: int) -> dict[str, object]:
    """Closed-loop new connections: each worker connects, sends ``size`` bytes, reads the echo,
    closes; repeat until ``duration`` or ``max_conns`` connections were started."""
    payload = os.urandom(size)
    perf = time.perf_counter_ns
    end = perf() + int(duration * 1e9)
    started = 0
    times_ns: list[int] = []
    errors: list[str] = []

    async def worker() -> None:
        nonlocal started
        while perf() < end and started < max_conns:
            started += 1
            t0 = perf()
            try:
                reader, writer = await _connect(host, port, 5.0)
                try:
                    writer.write(payload)
                    echo = await asyncio.wait_for(reader.readexactly(size), timeout=5.0)
                finally:
                    writer.close()
                if echo != payload:
                    raise RuntimeError("echo differs from the request")
            except (OSError, TimeoutError, RuntimeError, asyncio.IncompleteReadError) as e:
                errors.append(type(e).__name__)
                continue
            times_ns.append(perf() - t0)

    t_start = perf()
    async with asyncio.timeout(duration + 30.0):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = (perf() - t_start) / 1e9
    if not times_ns:
        raise RuntimeError(f"no connection completed ({len(errors)} failed: "
                           f"{', '.join(sorted(set(errors)))})")
    ms = [x / 1e6 for x in times_ns]
    return {
        "host": host, "port": port, "size": size, "concurrency": concurrency,
        "duration": duration, "elapsed": elapsed,
        "connections": len(ms), "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "rate": len(ms) / elapsed,
        "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms),
    }


def _pos_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def _pos_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.rr", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server", help="echo server")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, default=7000)
    s.add_argument("--max-seconds", type=_pos_float, default=3600.0,
                   help="exit after this long even if nobody stops the server")
    s.add_argument("--ready-file", type=Path, help="written once the socket listens")
    c = sub.add_parser("client", help="fixed-rate load, prints JSON")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, default=7000)
    c.add_argument("--rate", type=_pos_float, default=1000.0, help="requests/s, total")
    c.add_argument("--duration", type=_pos_float, default=10.0, help="measured seconds")
    c.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    c.add_argument("--connections", type=_pos_int, default=1)
    c.add_argument("--size", type=_pos_int, default=DEFAULT_SIZE, help="request bytes")
    c.add_argument("--no-samples", action="store_true", help="leave raw samples out of JSON")
    r = sub.add_parser("connrate", help="new connections per second, prints JSON")
    r.add_argument("--host", required=True)
    r.add_argument("--port", type=int, default=7000)
    r.add_argument("--duration", type=_pos_float, default=5.0)
    r.add_argument("--concurrency", type=_pos_int, default=8)
    r.add_argument("--max-conns", type=_pos_int, default=15_000,
                   help="stop after this many connections (ephemeral ports, TIME_WAIT)")
    r.add_argument("--size", type=_pos_int, default=DEFAULT_SIZE, help="request bytes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loop_name = _use_uvloop()
    if args.mode == "server":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.bind, args.port, args.max_seconds, args.ready_file))
        return 0
    if args.duration > 3600 or (args.mode == "client"
                                and args.rate * args.duration > 50_000_000):
        print("rr: refusing an unbounded-looking run (duration <= 3600 s, "
              "rate * duration <= 5e7)", file=sys.stderr)
        return 2
    try:
        if args.mode == "connrate":
            summary = asyncio.run(run_connrate(args.host, args.port, args.duration,
                                               args.concurrency, args.max_conns, args.size))
        else:
            summary = asyncio.run(run_client(args.host, args.port, args.rate, args.duration,
                                             max(0.0, args.warmup), args.connections,
                                             args.size))
    except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as e:
        print(f"rr: {args.mode} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary["loop"] = loop_name
    if getattr(args, "no_samples", False):
        summary.pop("samples_us", None)
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

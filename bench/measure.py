"""The measurements, run between the client and server pod namespaces.

Why separate from the setups: direct, the Envoy pairs and ambit differ only in which proxies run
and which address the client dials; throughput, latency, connection rate and the
many-connections run are measured identically for all of them, by the same tools with the same
settings, which is what makes the columns of the table comparable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import BenchError, Proc, ProcessSet, in_netns, wait_until

IPERF_PORT = 5201
RR_PORT = 7000
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    """Knobs shared by every setup of one run (recorded in results.json)."""

    duration: float = 10.0
    rate: float = 1000.0
    connections: int = 1
    size: int = 1024
    warmup: float = 1.0
    iperf_omit: int = 1  # seconds of TCP slow start left out of the throughput
    # P4: closed-loop new connections (one request/response each), bounded in time and count
    # (the count keeps TIME_WAIT sockets well inside the ephemeral port range).
    connrate_duration: float = 5.0
    connrate_concurrency: int = 8
    connrate_max: int = 15_000
    # P5: many connections, each at a low rate (here 1000 x 1 req/s).
    many_connections: int = 1000
    many_rate: float = 1000.0
    many_warmup: float = 2.0
    # P7: parallel iperf3 streams for the workers phase.
    parallel_streams: int = 4


def start_servers(procs: ProcessSet, server_ns: str, server_ip: str, workdir: Path,
                  tag: str) -> list[Proc]:
    """iperf3 and the echo server in the server pod; returns once both listen."""
    iperf = procs.start(f"{tag}-iperf3-server", in_netns(server_ns, [
        "iperf3", "-s", "-B", server_ip, "-p", str(IPERF_PORT), "--forceflush"]))
    ready = workdir / f"{tag}-rr-ready"
    ready.unlink(missing_ok=True)
    rr = procs.start(f"{tag}-rr-server", in_netns(server_ns, [
        sys.executable, "-m", "bench.rr", "server", "--bind", server_ip, "--port", str(RR_PORT),
        "--max-seconds", "3600", "--ready-file", str(ready)]), cwd=REPO_ROOT)
    wait_until("iperf3 server to listen", iperf,
               lambda: "Server listening" in iperf.log_path.read_text(errors="replace"),
               timeout=10)
    wait_until("echo server to listen", rr, ready.exists, timeout=15)
    return [iperf, rr]


def _run_json(argv: list[str], timeout: float, what: str) -> dict[str, Any]:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                            cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish within {timeout:.0f}s") from None
    try:
        data = json.loads(cp.stdout) if cp.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if cp.returncode != 0 or not data or "error" in data:
        detail = data.get("error") or cp.stderr.strip() or cp.stdout.strip()[-500:]
        raise BenchError(f"{what} failed (exit {cp.returncode}): {detail}")
    return data


@dataclass(frozen=True)
class Throughput:
    gbps: float  # at the receiver, slow start (--omit) left out
    retransmits: int  # iperf3's count, sender side
    bytes_sent: int  # over the whole run, slow start included (what the proxies' CPU paid for)


def parse_iperf(data: dict[str, Any]) -> Throughput:
    """The numbers the table uses from ``iperf3 -J`` output."""
    end = data["end"]
    sent = sum(int(iv["sum"]["bytes"]) for iv in data.get("intervals", []))
    return Throughput(gbps=float(end["sum_received"]["bits_per_second"]) / 1e9,
                      retransmits=int(end.get("sum_sent", {}).get("retransmits", 0)),
                      bytes_sent=sent)


def throughput(client_ns: str, host: str, port: int, s: Settings, streams: int = 1) -> Throughput:
    """iperf3 from the client pod (one stream unless ``streams``)."""
    data = _run_json(
        in_netns(client_ns, ["iperf3", "-c", host, "-p", str(port), "-t", f"{s.duration:g}",
                             "-O", str(s.iperf_omit), "-P", str(streams), "-J",
                             "--connect-timeout", "5000"]),
        timeout=s.duration + s.iperf_omit + 30, what="iperf3 client")
    return parse_iperf(data)


def _rr_client(client_ns: str, host: str, port: int, s: Settings, *, rate: float,
               warmup: float, connections: int, slack: float, what: str) -> dict[str, Any]:
    """bench/rr.py's fixed-rate client from the client pod; its JSON summary."""
    return _run_json(
        in_netns(client_ns, [
            sys.executable, "-m", "bench.rr", "client", "--host", host, "--port", str(port),
            "--rate", f"{rate:g}", "--duration", f"{s.duration:g}",
            "--warmup", f"{warmup:g}", "--connections", str(connections),
            "--size", str(s.size)]),
        timeout=warmup + s.duration + slack, what=what)


def latency(client_ns: str, host: str, port: int, s: Settings) -> dict[str, Any]:
    """Fixed-rate 1 KiB request/response from the client pod (bench/rr.py); its JSON summary."""
    return _rr_client(client_ns, host, port, s, rate=s.rate, warmup=s.warmup,
                      connections=s.connections, slack=40, what="latency client (bench.rr)")


def many(client_ns: str, host: str, port: int, s: Settings) -> dict[str, Any]:
    """P5: ``many_connections`` open at once, ``many_rate`` requests/s over all of them."""
    return _rr_client(client_ns, host, port, s, rate=s.many_rate, warmup=s.many_warmup,
                      connections=s.many_connections, slack=90,
                      what="many-connections client (bench.rr)")


def connrate(client_ns: str, host: str, port: int, s: Settings) -> dict[str, Any]:
    """P4: new connections per second, each one request/response (bench/rr.py connrate)."""
    return _run_json(
        in_netns(client_ns, [
            sys.executable, "-m", "bench.rr", "connrate", "--host", host, "--port", str(port),
            "--duration", f"{s.connrate_duration:g}",
            "--concurrency", str(s.connrate_concurrency),
            "--max-conns", str(s.connrate_max), "--size", str(s.size)]),
        timeout=s.connrate_duration + 60, what="connection-rate client (bench.rr)")

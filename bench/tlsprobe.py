"""Which TLS 1.3 cipher suite the two proxies of a setup actually negotiated, read off the wire.

Why: the ztunnels (Python's ssl, OpenSSL) and Envoy (BoringSSL) have different defaults and
different knobs (BoringSSL's TLS 1.3 suites cannot be configured at all; Python 3.11's ssl has
no setter for them), and AES-256-GCM costs more than AES-128-GCM per byte. A throughput
comparison is only fair when both sides use the same suite, so the table states the suite each
pair used, measured: in TLS 1.3 the ServerHello is still plaintext and names the one suite the
connection uses. ``tshark`` captures the first ServerHellos in the server node's namespace
while one probe connection crosses the setup, before the measurements start (the capture is
stopped before any load runs, so it costs the measurements nothing).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys

from bench.measure import REPO_ROOT
from bench.procs import BenchError, Proc, ProcessSet, in_netns, wait_until
from bench.report import cipher_name

_CODE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)$")


def start_capture(procs: ProcessSet, ns: str, ports: list[int], tag: str) -> Proc:
    """tshark in ``ns`` printing the cipher suite of every ServerHello on ``ports``."""
    filt = " or ".join(f"tcp port {p}" for p in ports)
    decode = [arg for p in ports for arg in ("-d", f"tcp.port=={p},tls")]
    proc = procs.start(f"{tag}-tshark", in_netns(ns, [
        "tshark", "-i", "any", "-n", "-l", "-f", filt, *decode,
        "-Y", "tls.handshake.type == 2", "-T", "fields", "-e", "tls.handshake.ciphersuite",
        "-a", "duration:60"]))
    wait_until("tshark to capture", proc,
               lambda: "Capturing on" in proc.log_path.read_text(errors="replace"),
               timeout=30, interval=0.2)
    return proc


def parse_ciphers(text: str) -> list[str]:
    """Suite names from tshark's field output (one code per ServerHello line), first-seen order."""
    seen: list[str] = []
    for line in text.splitlines():
        for code in line.strip().split(","):
            if _CODE.match(code.strip()):
                name = cipher_name(code.strip())
                if name not in seen:
                    seen.append(name)
    return seen


def probe(client_ns: str, host: str, port: int) -> None:
    """A few requests on one connection through the setup (its TLS handshake is captured)."""
    argv = in_netns(client_ns, [sys.executable, "-m", "bench.rr", "client", "--host", host,
                                "--port", str(port), "--rate", "20", "--duration", "0.2",
                                "--warmup", "0", "--no-samples"])
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                            cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        raise BenchError("TLS probe connection timed out") from None
    if cp.returncode != 0:
        raise BenchError(f"TLS probe connection failed: {cp.stderr.strip()}")


def measure(procs: ProcessSet, server_node_ns: str, ports: list[int], client_ns: str,
            host: str, port: int, tag: str) -> list[str]:
    """The suites seen while one probe connection crossed the setup."""
    cap = start_capture(procs, server_node_ns, ports, tag)
    try:
        probe(client_ns, host, port)
        # tshark prints each packet as it is dissected (-l); give it a moment to catch up.
        with contextlib.suppress(BenchError):  # reported below as "no ServerHello seen"
            wait_until("tshark to see a ServerHello", None,
                       lambda: bool(parse_ciphers(cap.log_path.read_text(errors="replace"))),
                       timeout=5, interval=0.2)
    finally:
        cap.stop()
        procs.procs.remove(cap)
    seen = parse_ciphers(cap.log_path.read_text(errors="replace"))
    if not seen:
        raise BenchError(f"no TLS ServerHello seen on ports {ports} (log {cap.log_path})")
    return seen

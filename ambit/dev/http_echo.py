"""An HTTP server for pods in the local cluster: answers every request with who it is.

Why it exists: L7 features (routing by header, weighted splits, retries, timeouts,
authorization) are proven by what the backend saw and who answered. Each response is JSON:
``{"version": NAME, "pod": HOSTNAME-OR-NAME, "method", "path", "headers": {...}, "peer"}``.
Two paths change the answer: ``/delay/<ms>`` waits before answering (timeouts) and
``/status/<code>`` answers with that status (retries, error metrics).

Run inside a pod: ``python -m ambit.dev.http_echo --port 8080 --version v1``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_DELAY_MS = 60_000


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real services do
    # Headers and body are written separately; with Nagle the body would wait for the
    # peer's delayed ACK (40 ms per request).
    disable_nagle_algorithm = True
    version_name = "v1"
    pod_name = ""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        status = 200
        if len(parts) == 2 and parts[0] == "delay" and parts[1].isdigit():
            time.sleep(min(int(parts[1]), MAX_DELAY_MS) / 1000)
        if len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
            status = int(parts[1])
        body = json.dumps({
            "version": self.version_name, "pod": self.pod_name, "method": self.command,
            "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
            "peer": f"{self.client_address[0]}:{self.client_address[1]}",
        }).encode() + b"\n"
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read JSON
        pass


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ambit.dev.http_echo")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--version", default="v1", help="name reported in every answer")
    p.add_argument("--pod", default="", help="pod name reported in every answer")
    p.add_argument("--ready-file", type=Path, help="created once the server listens")
    args = p.parse_args(argv)
    handler = type("Handler", (_Handler,), {"version_name": args.version,
                                            "pod_name": args.pod})
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.ready_file:
        args.ready_file.write_text("ready\n")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

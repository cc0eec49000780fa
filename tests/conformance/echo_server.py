"""The conformance tier's backend: what upstream's ``echo-advanced`` image is to the Gateway
API conformance suite, in one process per pod.

Why its own server: the Mesh tests judge a request by what the backend saw (which pod, the
path, every header, repeated headers joined with ``,`` as Go's echo reports them) and a gRPC
call by the metadata the server got; the dev cluster's ``ambit.dev.http_echo`` keeps only the
last value of a repeated header and speaks no gRPC. Listens on:

* ``--http`` ports: HTTP/1.1 (and answers any method); the JSON answer has ``pod``,
  ``namespace``, ``method``, ``path`` (with the query), ``host`` and ``headers`` (lower-case
  names to lists of values);
* ``--grpc``: gRPC (h2c) for any method: the answer is the same JSON as bytes, ``headers``
  being the call's metadata (``:authority`` included as ``host``);
* ``--tcp``: TCP echo, for ports a waypoint must pass through untouched: the server first
  sends ``<pod>\n`` (which backend took the connection), then echoes every byte.

Run in a pod with the venv's Python (grpcio comes from the project's dependencies):
``python tests/conformance/echo_server.py --pod echo-v1 --http 8080 --grpc 7070 --tcp 9090``.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

MAX_BODY = 1 << 20


def _answer(pod: str, namespace: str, method: str, path: str, host: str,
            headers: dict[str, list[str]]) -> bytes:
    return json.dumps({"pod": pod, "namespace": namespace, "method": method, "path": path,
                       "host": host, "headers": headers}).encode() + b"\n"


def http_handler(pod: str, namespace: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if 0 < length <= MAX_BODY:
                self.rfile.read(length)
            headers: dict[str, list[str]] = {}
            for k, v in self.headers.items():
                headers.setdefault(k.lower(), []).append(v)
            body = _answer(pod, namespace, self.command, self.path,
                           self.headers.get("host", ""), headers)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


class _AnyMethod(grpc.GenericRpcHandler):
    """Answers every unary method with the call's metadata (bytes in, bytes out)."""

    def __init__(self, pod: str, namespace: str) -> None:
        self.pod, self.namespace = pod, namespace

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        method = str(details.method)

        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            headers: dict[str, list[str]] = {}
            for key, value in context.invocation_metadata():
                text = value if isinstance(value, str) else value.decode(errors="replace")
                headers.setdefault(key.lower(), []).append(text)
            host = headers.get(":authority", [""])[0]
            return _answer(self.pod, self.namespace, "POST", method, host, headers)

        return grpc.unary_unary_rpc_method_handler(call)


def _tcp_echo(host: str, port: int, pod: str, stop: threading.Event) -> socket.socket:
    srv = socket.create_server((host, port), reuse_port=False)

    def pump(conn: socket.socket) -> None:
        with conn:
            conn.sendall(pod.encode() + b"\n")
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=pump, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="echo_server.py")
    p.add_argument("--pod", required=True, help="pod name reported in every answer")
    p.add_argument("--namespace", default="")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (in its pod)")
    p.add_argument("--http", type=int, action="append", default=[])
    p.add_argument("--grpc", type=int, action="append", default=[])
    p.add_argument("--tcp", type=int, action="append", default=[])
    p.add_argument("--ready-file", type=Path)
    args = p.parse_args(argv)
    stop = threading.Event()
    closers: list[Callable[[], Any]] = []
    for port in args.http:
        server = ThreadingHTTPServer((args.host, port), http_handler(args.pod, args.namespace))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
        closers.append(server.shutdown)
    if args.grpc:
        grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  handlers=[_AnyMethod(args.pod, args.namespace)])
        for port in args.grpc:
            grpc_server.add_insecure_port(f"{args.host}:{port}")
        grpc_server.start()
        closers.append(lambda: grpc_server.stop(0))
    for port in args.tcp:
        closers.append(_tcp_echo(args.host, port, args.pod, stop).close)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.ready_file:
        args.ready_file.write_text("ready\n")
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    stop.set()
    for close in closers:
        close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

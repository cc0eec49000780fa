"""Client-side probes run inside a namespace: one echo request, or one HTTP GET.

Why it exists: test topologies are deliberately unreachable from the machine's own namespace,
so every client action (a pod calling a server, reading a ztunnel's readiness or metrics) has
to be a process started with ``ip netns exec``. These are those processes, with a fixed,
parseable output and an exit status that says whether the probe worked:

* ``python -m ambit.dev.probe tcp HOST PORT [--message M]`` sends one line to an
  ``ambit.dev.echo`` server and prints its JSON answer; exit 1 (and a reason on stderr) if the
  connection fails or closes without an answer.
* ``python -m ambit.dev.probe hold HOST PORT --until FILE``: one connection, one line and
  its answer, then (same connection) wait until FILE exists and exchange a second line; proves
  a connection survives whatever happened in between (an agent restart, say).
* ``python -m ambit.dev.probe http URL`` prints the body and ``HTTP <status>`` on stderr;
  exit 1 on a connection error, 3 on a non-2xx status (the body is still printed).
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

EXIT_FAILED = 1
EXIT_HTTP_STATUS = 3


def tcp_request(host: str, port: int, message: str, timeout: float) -> str:
    """Send ``message`` and return the one-line answer; raise ``OSError`` if there is none."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(message.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed without an answer")
            buf += chunk
    return buf.decode().rstrip("\n")


def hold(host: str, port: int, until: str, timeout: float) -> list[str]:
    """Two exchanges on one connection, the second once ``until`` exists."""
    import os
    import time

    answers = []
    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rwb")
        for i, message in enumerate((b"first\n", b"second\n")):
            if i:
                deadline = time.monotonic() + timeout
                while not os.path.exists(until):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{until} did not appear within {timeout:g}s")
                    time.sleep(0.05)
            f.write(message)
            f.flush()
            line = f.readline()
            if not line:
                raise ConnectionError(f"connection closed before answer {i + 1}")
            answers.append(line.decode().rstrip("\n"))
            print(answers[-1], flush=True)
    return answers


def http_get(url: str, timeout: float) -> tuple[int, str]:
    """GET ``url``; return (status, body). Proxies from the environment are ignored."""
    # A namespace has no route to any proxy named in http_proxy, so never use one.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ambit.dev.probe", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tcp", help="one line to an echo server")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.add_argument("--message", default="hello")
    t.add_argument("--timeout", type=float, default=5.0)
    d = sub.add_parser("hold", help="two lines on one connection, the second after --until")
    d.add_argument("host")
    d.add_argument("port", type=int)
    d.add_argument("--until", required=True, help="a file whose appearance releases line 2")
    d.add_argument("--timeout", type=float, default=30.0)
    h = sub.add_parser("http", help="one HTTP GET")
    h.add_argument("url")
    h.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    try:
        if args.cmd == "tcp":
            print(tcp_request(args.host, args.port, args.message, args.timeout))
            return 0
        if args.cmd == "hold":
            hold(args.host, args.port, args.until, args.timeout)
            return 0
        status, body = http_get(args.url, args.timeout)
    except (OSError, urllib.error.URLError) as e:
        print(f"probe: {e}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(body)
    print(f"HTTP {status}", file=sys.stderr)
    return 0 if 200 <= status < 300 else EXIT_HTTP_STATUS


if __name__ == "__main__":
    sys.exit(main())

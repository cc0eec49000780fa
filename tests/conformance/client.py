"""The conformance tier's client: sends a batch of requests from inside a pod, prints what
came back as JSON (one process for many requests: starting Python per request would make the
tier slow).

Input (argv[1], JSON): a list of ``{"protocol": "http"|"grpc"|"tcp", "address", "port",
"host", "method", "path", "headers": [[name, value], ...], "count"}``. A ``tcp`` request
reads the server's greeting line (its pod), sends ``path`` and expects it back: its result's
body is ``{"pod", "echoed"}``. Output: one list per request
of ``count`` results ``{"status", "headers": {name: [values]}, "body": JSON or text,
"error"}``. HTTP requests never follow redirects (the Location is what is tested); a gRPC
call's status is 200 when it succeeded (as upstream's echo client reports it), else
``1000 + the gRPC code``.
"""

from __future__ import annotations

import http.client
import json
import sys
from typing import Any

TIMEOUT = 5.0


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


def _http(req: dict[str, Any], conns: dict[tuple[str, int], http.client.HTTPConnection]) \
        -> dict[str, Any]:
    key = (req["address"], int(req["port"]))
    for attempt in (1, 2):
        conn = conns.get(key) or http.client.HTTPConnection(*key, timeout=TIMEOUT)
        conns[key] = conn
        try:
            conn.putrequest(req.get("method", "GET"), req.get("path", "/"), skip_host=True,
                            skip_accept_encoding=True)
            conn.putheader("Host", req["host"])
            for name, value in req.get("headers", []):
                conn.putheader(name, value)
            conn.putheader("Content-Length", "0")
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read()
            headers: dict[str, list[str]] = {}
            for k, v in resp.getheaders():
                headers.setdefault(k.lower(), []).append(v)
            if resp.will_close:
                conn.close()
                del conns[key]
            return {"status": resp.status, "headers": headers, "body": _parse(body)}
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            conns.pop(key, None)
            if attempt == 2:
                return {"status": None, "error": f"{type(e).__name__}: {e}"}
    raise AssertionError("unreachable")


def _grpc(req: dict[str, Any], channels: dict[tuple[str, int, str], Any]) -> dict[str, Any]:
    import grpc

    key = (req["address"], int(req["port"]), req["host"])
    channel = channels.get(key)
    if channel is None:
        channel = grpc.insecure_channel(f"{key[0]}:{key[1]}",
                                        options=[("grpc.default_authority", key[2])])
        channels[key] = channel
    call: Any = channel.unary_unary(req.get("path") or "/grpc.testing.EchoTestService/Echo")
    metadata = tuple((str(name).lower(), str(value)) for name, value in req.get("headers", []))
    try:
        body, state = call.with_call(b"", metadata=metadata, timeout=TIMEOUT)
    except grpc.RpcError as e:
        code = e.code()
        return {"status": 1000 + code.value[0], "error": f"{code.name}: {e.details()}"}
    headers: dict[str, list[str]] = {}
    for k, v in state.initial_metadata() or ():
        headers.setdefault(k.lower(), []).append(v if isinstance(v, str) else v.decode())
    return {"status": 200, "headers": headers, "body": _parse(body)}


def _tcp(req: dict[str, Any], _pool: Any) -> dict[str, Any]:
    import socket

    payload = (req.get("path") or "ping").encode()
    try:
        with socket.create_connection((req["address"], int(req["port"])), timeout=TIMEOUT) as s:
            f = s.makefile("rb")
            pod = f.readline().decode().strip()
            s.sendall(payload)
            echoed = b""
            while len(echoed) < len(payload):
                chunk = f.read1(65536)
                if not chunk:
                    break
                echoed += chunk
    except OSError as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}
    return {"status": 200, "headers": {}, "body": {"pod": pod, "echoed": echoed.decode()}}


def main(argv: list[str]) -> int:
    requests = json.loads(argv[1])
    conns: dict[tuple[str, int], http.client.HTTPConnection] = {}
    channels: dict[tuple[str, int, str], Any] = {}
    out = []
    for req in requests:
        protocol = req.get("protocol", "http")
        send = {"grpc": _grpc, "tcp": _tcp}.get(protocol, _http)
        pool: Any = channels if protocol == "grpc" else conns
        out.append([send(req, pool) for _ in range(int(req.get("count", 1)))])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

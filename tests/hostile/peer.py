"""The hostile tier's processes, run inside the test's network namespaces with
``python -m tests.hostile.peer COMMAND ...``: a counting echo backend, a legitimate client, and
the attacks. Each prints one JSON object on stdout (the backend: nothing) and is bounded in
count and time by its arguments.

Why processes: the mesh lives in network namespaces the test process never enters (see
ambit/dev/netns.py), so whatever talks to it runs in one of them. The attacker is a mesh peer
with a valid certificate (``--identity-dir``/``--identity``): it completes mutual TLS with the
ztunnel and then misbehaves in HTTP/2 (frames from ``tests/hostile/h2wire.py``).

* ``backend --port P --accept-log F --ready-file R``: echoes bytes; one line in F per accepted
  connection (the rapid-reset probe counts backend dials with it).
* ``legit --host H --port P [--count N | --stop-file F]``: one new connection per request, a
  line out and its echo back; latency and failures.
* ``attack PROBE ...``: the probes (see ``ATTACKS``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import hpack

from tests.hostile import h2wire as w

MiB = 1024 * 1024


# --- backend -------------------------------------------------------------------------------


async def backend(port: int, accept_log: Path, ready_file: Path) -> None:
    fd = os.open(accept_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        os.write(fd, b"a\n")
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=1024,
                                        reuse_address=True)
    await asyncio.to_thread(ready_file.write_text, f"{port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


# --- the legitimate client -----------------------------------------------------------------


def _one_request(host: str, port: int, message: bytes, timeout: float) -> None:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(message)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed after {len(got)} of {len(message)} bytes")
            got += chunk
    if got != message:
        raise ConnectionError(f"echo {got[:60]!r} is not {message[:60]!r}")


def legit(host: str, port: int, count: int, stop_file: Path | None, max_seconds: float,
          interval: float, timeout: float) -> dict[str, Any]:
    """Requests until ``count`` are done, or ``stop_file`` appears (at most ``max_seconds``)."""
    latencies: list[float] = []
    errors: list[str] = []
    failed = 0
    t0 = time.monotonic()
    n = 0
    while True:
        if count and n >= count:
            break
        if not count and ((stop_file is not None and stop_file.exists())
                          or time.monotonic() - t0 > max_seconds):
            break
        n += 1
        start = time.monotonic()
        try:
            _one_request(host, port, f"legit-{os.getpid()}-{n}\n".encode(), timeout)
            latencies.append(time.monotonic() - start)
        except OSError as e:
            failed += 1
            if len(errors) < 5:
                errors.append(f"request {n} after {time.monotonic() - t0:.2f}s: "
                              f"{type(e).__name__}: {e}")
        time.sleep(interval)
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1)

    return {"ok": len(latencies), "failed": failed, "errors": errors,
            "p50_ms": pct(0.5), "p95_ms": pct(0.95),
            "max_ms": round(1000 * latencies[-1], 1) if latencies else None,
            "seconds": round(time.monotonic() - t0, 2)}


# --- attacks -------------------------------------------------------------------------------


class Attack:
    """What every attack knows: where the ztunnel is, what to CONNECT to, which certificate."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.port: int = args.port
        self.target: str = args.target
        ns, _, sa = args.identity.partition("/")
        self.ctx = w.tls_context(Path(args.identity_dir), ns, sa)
        self.connections: int = args.connections
        self.seconds: float = args.seconds

    async def peer(self) -> w.Peer:
        return await w.Peer.open(self.ctx, self.host, self.port)


async def _gather_limited(seconds: float, coros: Sequence[Awaitable[dict[str, Any]]]) \
        -> list[dict[str, Any]]:
    results = await asyncio.wait_for(asyncio.gather(*coros, return_exceptions=True),
                                     seconds)
    return [r if isinstance(r, dict) else {"error": f"{type(r).__name__}: {r}"}
            for r in results]


async def upload(a: Attack, streams: int = 100, per_stream: int = 2 * MiB) -> dict[str, Any]:
    """Probe 1: on each of ``--connections``, ``streams`` CONNECTs each uploading
    ``per_stream`` bytes to the echo backend, within the flow-control windows the ztunnel
    grants, while never giving any credit back for the echoed answers (our windows stay at
    65535: the answers pile up at the ztunnel). Until ``--seconds`` pass."""

    async def one() -> dict[str, Any]:
        p = await a.peer()
        await p.handshake()
        t0 = time.monotonic()
        await p.send(b"".join(p.open_stream(2 * i + 1, a.target) for i in range(streams)))
        await p.wait_for(lambda: len(p.statuses) + len(p.resets) >= streams or p.closed, 10)
        accepted = [sid for sid, st in p.statuses.items() if st == 200]
        left = dict.fromkeys(accepted, per_stream)
        chunk = bytes(16 * 1024)
        sent = 0
        last_progress = time.monotonic()
        deadline = t0 + a.seconds
        timeline: list[tuple[float, int]] = []
        while left and not p.closed and time.monotonic() < deadline:
            batch = []
            for sid in list(left):
                if sid in p.resets or sid in p.ended:
                    del left[sid]
                    continue
                n = min(len(chunk), left[sid], p.stream_windows.get(sid, 0), p.conn_window)
                if n <= 0:
                    continue
                batch.append(w.data(sid, chunk[:n]))
                left[sid] -= n
                p.stream_windows[sid] -= n
                p.conn_window -= n
                sent += n
                if not left[sid]:
                    del left[sid]
            if batch:
                if not await p.send(b"".join(batch),
                                    within=max(0.1, deadline - time.monotonic())):
                    break
                last_progress = time.monotonic()
                timeline.append((round(last_progress - t0, 2), sent))
            else:
                await p.wait_for(lambda: (p.conn_window > 0 and any(
                    p.stream_windows.get(s, 0) > 0 for s in left)) or p.closed,
                    max(0.0, deadline - time.monotonic()))
        out = {"streams_accepted": len(accepted),
               "streams_refused": len(p.statuses) - len(accepted), "resets": len(p.resets),
               "bytes_sent": sent, "bytes_wanted": streams * per_stream,
               "stalled_for_s": round(time.monotonic() - last_progress, 2),
               "timeline": timeline[:: max(1, len(timeline) // 10)], **p.summary(t0)}
        await p.close()
        return out

    conns = await _gather_limited(a.seconds + 30, [one() for _ in range(a.connections)])
    return {"connections": conns}


async def bigframe(a: Attack) -> dict[str, Any]:
    """Probe 2: on each connection a frame header declaring 16 MiB (the largest a 24-bit length
    can say; the ztunnel's max frame is 256 KiB), then its payload but one byte."""

    async def one(i: int) -> dict[str, Any]:
        p = await a.peer()
        await p.handshake()
        declared = (1 << 24) - 1
        kind = w.HEADERS if i % 2 == 0 else w.DATA
        t0 = time.monotonic()
        await p.send(w.frame_header(declared, kind, 0, 1))
        sent = 0
        chunk = bytes(64 * 1024)
        deadline = t0 + a.seconds
        while sent < declared - 1 and not p.closed and time.monotonic() < deadline:
            n = min(len(chunk), declared - 1 - sent)
            if not await p.send(chunk[:n], within=max(0.1, deadline - time.monotonic())):
                break
            sent += n
        await p.wait_closed(max(0.0, deadline - time.monotonic()))
        out = {"frame": w.FRAME_NAMES[kind], "payload_sent": sent, **p.summary(t0)}
        await p.close()
        return out

    conns = await _gather_limited(a.seconds + 15, [one(i) for i in range(a.connections)])
    return {"connections": conns}


async def continuation_flood(a: Attack, max_frames: int = 2000) -> dict[str, Any]:
    """Probe 3: HEADERS without END_HEADERS, then CONTINUATION frames that never end the
    block, until closed: on even connections as large as the ztunnel's max frame allows (a
    big header block), on odd ones 1 KiB each (many frames)."""

    async def one(i: int) -> dict[str, Any]:
        p = await a.peer()
        await p.handshake()
        block = w.connect_block(p.encoder, a.target)
        size = 256 * 1024 if i % 2 == 0 else 1024
        fragment = b"\x00\x05x-pad" + bytes(size - 16)
        t0 = time.monotonic()
        await p.send(w.headers(1, block, end_headers=False))
        frames = 0
        deadline = t0 + a.seconds
        while frames < max_frames and not p.closed and time.monotonic() < deadline:
            if not await p.send(w.continuation(1, fragment),
                                within=max(0.1, deadline - time.monotonic())):
                break
            frames += 1
        await p.wait_closed(max(0.0, deadline - time.monotonic()))
        out = {"fragment": len(fragment), "continuation_frames_sent": frames,
               "bytes_sent": frames * len(fragment), **p.summary(t0)}
        await p.close()
        return out

    conns = await _gather_limited(a.seconds + 15, [one(i) for i in range(a.connections)])
    return {"connections": conns}


async def rapid_reset(a: Attack, pairs: int = 20000, batch: int = 100) -> dict[str, Any]:
    """Probe 4: HEADERS (a CONNECT to the backend) and at once RST_STREAM, ``pairs`` times in
    all (never more than one stream open), on one connection after another: when the ztunnel
    ends one, the attacker opens the next (at most ``--connections``)."""
    # Never-indexed literals: every block is the same bytes and leaves HPACK state alone.
    enc = hpack.Encoder()
    block = enc.encode([hpack.NeverIndexedHeaderTuple(b":method", b"CONNECT"),
                        hpack.NeverIndexedHeaderTuple(b":authority", a.target.encode())],
                       huffman=False)
    t0 = time.monotonic()
    deadline = t0 + a.seconds
    sent = 0
    conns: list[dict[str, Any]] = []
    while sent < pairs and len(conns) < a.connections and time.monotonic() < deadline:
        p = await a.peer()
        await p.handshake()
        c0 = time.monotonic()
        mine = 0
        while sent < pairs and not p.closed and time.monotonic() < deadline:
            n = min(batch, pairs - sent)
            frames = b"".join(w.headers(2 * (mine + i) + 1, block)
                              + w.rst_stream(2 * (mine + i) + 1) for i in range(n))
            if not await p.send(frames, within=max(0.1, deadline - time.monotonic())):
                break
            sent += n
            mine += n
        await p.wait_closed(max(0.0, min(5.0, deadline - time.monotonic())))
        conns.append({"pairs_sent": mine,
                      "answered_200": sum(1 for v in p.statuses.values() if v == 200),
                      **p.summary(c0)})
        await p.close()
    codes: dict[str, int] = {}
    for c in conns:
        code = c["goaway"]["code"] if c["goaway"] else "none"
        codes[code] = codes.get(code, 0) + 1
    closes = [c["closed_after_s"] for c in conns if c["closed_after_s"] is not None]
    return {"pairs_sent": sent, "connections": len(conns), "goaway_codes": codes,
            "closed": len(closes), "max_close_s": max(closes, default=None),
            "max_pairs_per_connection": max((c["pairs_sent"] for c in conns), default=0),
            "answered_200": sum(c["answered_200"] for c in conns),
            "seconds": round(time.monotonic() - t0, 2), "first": conns[:2]}


async def ping_flood(a: Attack, max_pings: int = 2_000_000, batch: int = 4096) \
        -> dict[str, Any]:
    """Probe 5: PING frames as fast as the ztunnel takes them; nothing is read after the
    handshake, so every PING ACK it queues stays queued. Whether the ztunnel ended the
    connection is read from the kernel's TCP state, which reads none of the data."""
    p = await a.peer()
    await p.handshake(pump=False)
    frames = b"".join(w.ping(struct.pack(">Q", i)) for i in range(batch))
    t0 = time.monotonic()
    sent = 0
    stalled_at: float | None = None
    ended_at: float | None = None
    deadline = t0 + a.seconds
    while sent < max_pings and time.monotonic() < deadline:
        if p.tcp_state() != 1:
            ended_at = time.monotonic()
            break
        if not await p.send(frames, within=0.5):
            if p.closed:
                ended_at = p.closed_at
                break
            stalled_at = stalled_at or time.monotonic()
            continue
        sent += batch
    while ended_at is None and time.monotonic() < deadline:
        if p.tcp_state() != 1:
            ended_at = time.monotonic()
        await asyncio.sleep(0.05)
    # Only now read what the ztunnel sent: ACKs, then maybe a GOAWAY, then EOF.
    p.start_pump()
    await p.wait_closed(3.0)
    out = {"pings_sent": sent, "ping_bytes": sent * 17,
           "stalled_after_s": None if stalled_at is None else round(stalled_at - t0, 2),
           "ended_after_s": None if ended_at is None else round(ended_at - t0, 2),
           **p.summary(t0)}
    await p.close()
    return out


async def idle(a: Attack, preface_only: bool = False) -> dict[str, Any]:
    """Probe 6: connections that finish mutual TLS and then send nothing at all (or, with
    ``preface_only``, the 24-byte client preface and no SETTINGS)."""

    async def one() -> dict[str, Any]:
        p = await a.peer()
        p.auto_reply = False  # not even a SETTINGS acknowledgement
        t0 = time.monotonic()
        if preface_only:
            await p.send(w.PREFACE)
        p.start_pump()
        await p.wait_closed(a.seconds)
        out = p.summary(t0)
        await p.close()
        return out

    conns = await _gather_limited(a.seconds + 20, [one() for _ in range(a.connections)])
    closes = [c["closed_after_s"] for c in conns if c.get("closed_after_s") is not None]
    codes: dict[str, int] = {}
    for c in conns:
        code = c["goaway"]["code"] if c.get("goaway") else "none"
        codes[code] = codes.get(code, 0) + 1
    return {"connections": len(conns), "closed": len(closes),
            "min_close_s": min(closes, default=None), "max_close_s": max(closes, default=None),
            "goaway_codes": codes, "first": conns[0]}


async def _echo_stream(p: w.Peer, sid: int, target: str, message: bytes) -> dict[str, Any]:
    """A CONNECT on ``sid`` and one line through it; its status and the echo."""
    p.grant = True
    await p.send(p.open_stream(sid, target))
    await p.wait_for(lambda: sid in p.statuses or sid in p.resets or p.closed, 10)
    if p.statuses.get(sid) == 200:
        await p.send(w.data(sid, message))
        await p.wait_for(lambda: bytes(p.received.get(sid, b"")).endswith(b"\n") or p.closed,
                         10)
    return {"status": p.statuses.get(sid), "echo": bytes(p.received.get(sid, b"")).decode(
        errors="replace")}


async def bad_requests(a: Attack, cases: Sequence[tuple[str, bytes, Sequence[tuple[bytes, bytes]]]]
                       ) -> dict[str, Any]:
    """Probes 7 and 8: each bad CONNECT on its own stream of one connection, a good one
    before and after, and an echo through the good ones."""
    p = await a.peer()
    await p.handshake()
    t0 = time.monotonic()
    out: dict[str, Any] = {"before": await _echo_stream(p, 1, a.target, b"before\n")}
    bad: dict[str, Any] = {}
    sid = 3
    for name, authority, extra in cases:
        await p.send(p.open_stream(sid, authority, extra))
        await p.wait_for(functools.partial(_answered, p, sid), 10)
        bad[name] = {"stream": sid, "status": p.statuses.get(sid),
                     "reset": w.error_name(p.resets[sid]) if sid in p.resets else None,
                     "elapsed_s": round(time.monotonic() - t0, 3)}
        sid += 2
    out["bad"] = bad
    out["after"] = await _echo_stream(p, sid, a.target, b"after\n")
    await asyncio.sleep(0.5)  # a GOAWAY or close would show here
    out.update(p.summary(t0))
    await p.close()
    return out


def _answered(p: w.Peer, sid: int) -> bool:
    return sid in p.statuses or sid in p.resets or p.closed


def _own_port_cases(target: str) -> list[tuple[str, bytes, list[tuple[bytes, bytes]]]]:
    """CONNECTs that ask the ztunnel to dial its own node: loopback, unspecified, the node's
    address (``--node-ip`` is not known here: the server's node is 10.100.0.2 in the dev
    cluster, its gateway address 10.244.2.1)."""
    return [(name, name.encode(), []) for name in (
        "127.0.0.1:15000", "[::1]:15000", "0.0.0.0:15000", "127.0.0.1:15020",
        "10.100.0.2:15000", "10.100.0.2:15022", "10.244.2.1:15022")]


def _bad_header_cases(target: str) -> list[tuple[str, bytes, list[tuple[bytes, bytes]]]]:
    t = target.encode()
    return [
        ("value-not-utf8", t, [(b"x-evil", b"\xff\xfe\x80")]),
        ("value-overlong-utf8", t, [(b"x-evil", b"\xc0\xaf")]),
        ("name-not-utf8", t, [(b"x-\xff", b"1")]),
        ("authority-not-utf8", b"\xff" + t, []),
        ("forwarded-not-utf8", t, [(b"forwarded", b"for=\xff")]),
    ]


def _authority_cases(target: str) -> list[tuple[str, bytes, list[tuple[bytes, bytes]]]]:
    host = target.rpartition(":")[0]
    return [
        ("arabic-indic-127.0.0.20", "127.0.0.20:٨٠٨٠".encode(), []),
        ("arabic-indic-target", f"{host}:٨٠٨٠".encode(), []),
        ("fullwidth-target", f"{host}:\uff18\uff10\uff18\uff10".encode(), []),
        ("plus-sign", f"{host}:+8080".encode(), []),
        ("underscore", f"{host}:8_080".encode(), []),
    ]


async def socks5(host: str, port: int, destinations: Sequence[str], seconds: float) \
        -> dict[str, Any]:
    """Probe 9: SOCKS5 CONNECT requests for the ztunnel's own ports; then, if a connection is
    granted, ask for /config_dump through it."""
    out: dict[str, Any] = {}
    for dest in destinations:
        name, _, dport = dest.rpartition(":")
        t0 = time.monotonic()
        res: dict[str, Any] = {}
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except OSError as e:
            out[dest] = {"error": f"connect: {e}"}
            continue
        try:
            writer.write(b"\x05\x01\x00")
            method = await asyncio.wait_for(reader.readexactly(2), 5)
            res["method"] = method.hex()
            try:
                addr = b"\x01" + socket.inet_pton(socket.AF_INET, name)
            except OSError:
                try:
                    addr = b"\x04" + socket.inet_pton(socket.AF_INET6, name.strip("[]"))
                except OSError:
                    addr = b"\x03" + bytes([len(name)]) + name.encode()
            writer.write(b"\x05\x01\x00" + addr + struct.pack(">H", int(dport)))
            reply = await asyncio.wait_for(reader.read(10), seconds)
            res["reply"] = reply[1] if len(reply) > 1 else None
            if reply[1:2] == b"\x00" and int(dport) == 8080:  # the echo: the control
                writer.write(b"through socks5\n")
                res["echo"] = (await asyncio.wait_for(reader.readline(), 5)).decode()
            elif reply[1:2] == b"\x00":
                writer.write(b"GET /config_dump HTTP/1.0\r\nHost: x\r\n\r\n")
                body = await asyncio.wait_for(reader.read(4096), 5)
                res["leaked"] = body[:200].decode(errors="replace")
            else:
                rest = await asyncio.wait_for(reader.read(4096), 5)
                res["after_reply"] = rest[:200].decode(errors="replace")
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            res["error"] = f"{type(e).__name__}: {e}"
        finally:
            writer.close()
        res["elapsed_s"] = round(time.monotonic() - t0, 3)
        out[dest] = res
    return out


def grpc_credentials(root_cert: Path, identity_dir: Path | None, identity: str) -> Any:
    """TLS to the controller, trusting the mesh root; a client certificate if
    ``identity_dir``."""
    import grpc

    key = chain = None
    if identity_dir is not None:
        ns, _, sa = identity.partition("/")
        key = (identity_dir / ns / sa / "key.pem").read_bytes()
        chain = (identity_dir / ns / sa / "cert-chain.pem").read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root_cert.read_bytes(),
                                        private_key=key, certificate_chain=chain)


async def subscribe(address: str, creds: Any, nodes: Sequence[str], token: str, flood: int,
                    seconds: float) -> dict[str, Any]:
    """Probe 10: ``StateService.Subscribe`` for each of ``nodes`` (with ``token`` as bearer
    metadata if given), then ``flood`` calls at once; the status of each call and how many
    state updates it got before it ended."""
    import grpc

    from mesh.api.ambit.v1 import state_pb2, state_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def one(stub: Any, node: str) -> dict[str, Any]:
        t0 = time.monotonic()
        updates = 0
        workloads = 0
        code, details = "OK", ""
        call = stub.Subscribe(state_pb2.SubscribeRequest(node=node), metadata=metadata,
                              timeout=seconds)
        try:
            async for update in call:
                updates += 1
                workloads += len(update.workloads)
                call.cancel()
                code = "STATE_SENT"
                break
        except grpc.aio.AioRpcError as e:
            code, details = e.code().name, (e.details() or "")[:200]
        return {"code": code, "details": details, "updates": updates, "workloads": workloads,
                "elapsed_s": round(time.monotonic() - t0, 3)}

    async with grpc.aio.secure_channel(address, creds) as channel:
        stub = state_pb2_grpc.StateServiceStub(channel)
        out: dict[str, Any] = {"nodes": {n: await one(stub, n) for n in nodes}}
        if flood:
            t0 = time.monotonic()
            results = await asyncio.gather(*(one(stub, f"node-{i % 3}") for i in range(flood)))
            codes: dict[str, int] = {}
            for r in results:
                codes[r["code"]] = codes.get(r["code"], 0) + 1
            out["flood"] = {"calls": flood, "codes": codes,
                            "updates": sum(r["updates"] for r in results),
                            "max_elapsed_s": max(r["elapsed_s"] for r in results),
                            "seconds": round(time.monotonic() - t0, 2)}
    return out


def _descriptors(kind: str, count: int) -> list[Any]:
    """Objects owning ``count`` descriptors of ``kind`` (kept alive until sent)."""
    out: list[Any] = []
    for _ in range(count):
        if kind == "listening":
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
            out.append(s)
        elif kind == "unbound":
            out.append(socket.socket())
        elif kind == "udp":
            out.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        elif kind == "pipe":
            r, wr = os.pipe()
            out.append(os.fdopen(r, "rb"))
            out.append(os.fdopen(wr, "wb"))
            out.pop()  # only the read end is sent; the write end closes with it
        else:
            raise ValueError(f"descriptor kind {kind!r}")
    return out


def link(path: Path, names: Sequence[str], kind: str, count: int) -> dict[str, Any]:
    """Probe 11: ``count`` registrations on the agent's ztunnel link (``ztunnel.sock``), each
    naming ``names`` with as many descriptors of ``kind``; the agent's answers."""
    import array

    answers: dict[str, int] = {}
    first: dict[str, Any] = {}
    max_elapsed = 0.0
    for _ in range(count):
        owners = _descriptors(kind, len(names)) if kind != "none" else []
        fds = array.array("i", [o.fileno() for o in owners])
        t0 = time.monotonic()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(15)
        try:
            s.connect(str(path))
            line = json.dumps({"listeners": list(names)}).encode() + b"\n"
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
                          if len(fds) else [])
            raw = b""
            while not raw.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                raw += chunk
            answer = json.loads(raw) if raw.strip() else {"ok": None, "error": "no answer"}
        except OSError as e:
            answer = {"ok": None, "error": f"{type(e).__name__}: {e}"}
        finally:
            s.close()
            for o in owners:
                o.close()
        max_elapsed = max(max_elapsed, time.monotonic() - t0)
        key = "ok" if answer.get("ok") is True else "refused" if answer.get("ok") is False \
            else "error"
        answers[key] = answers.get(key, 0) + 1
        first.setdefault(key, answer)
    return {"answers": answers, "first": first, "max_elapsed_s": round(max_elapsed, 3),
            "pid": os.getpid()}


async def hold(a: Attack, batch: int = 64) -> dict[str, Any]:
    """Connection limits: open ``--connections`` mTLS HBONE connections (preface and SETTINGS
    on each), ``batch`` at a time; note how each fared (open, reset before TLS, GOAWAY after
    it); print a progress line once all are tried, keep the open ones until stdin closes (at
    most ``--seconds``), then say how many are still open."""

    async def one() -> tuple[str, str, float, w.Peer | None]:
        c0 = time.monotonic()
        try:
            p = await a.peer()
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            kind = "reset" if isinstance(e, ConnectionResetError | ssl.SSLEOFError) or \
                "EOF" in str(e) else "error"
            return kind, f"{type(e).__name__}: {e}"[:120], time.monotonic() - c0, None
        try:
            await p.handshake(within=10)
            await p.wait_closed(0.5)  # a refusal after the handshake comes at once
        except (OSError, TimeoutError) as e:
            await p.close()
            return "error", f"handshake: {type(e).__name__}: {e}"[:120], \
                time.monotonic() - c0, None
        if p.closed:
            reason = p.goaway.goaway_reason() if p.goaway else p.close_error
            kind = "goaway" if p.goaway else "closed"
            await p.close()
            return kind, reason[:120], time.monotonic() - c0, None
        return "open", "", time.monotonic() - c0, p

    t0 = time.monotonic()
    results: list[tuple[str, str, float, w.Peer | None]] = []
    for start in range(0, a.connections, batch):
        n = min(batch, a.connections - start)
        results += await asyncio.gather(*(one() for _ in range(n)))
    counts: dict[str, int] = {}
    reasons: dict[str, str] = {}
    refusal_s = 0.0
    for kind, reason, elapsed, _ in results:
        counts[kind] = counts.get(kind, 0) + 1
        reasons.setdefault(kind, reason)
        if kind != "open":
            refusal_s = max(refusal_s, elapsed)
    held = [p for *_, p in results if p is not None]
    out: dict[str, Any] = {"counts": counts, "reasons": reasons,
                           "max_refusal_s": round(refusal_s, 3),
                           "open_s": round(time.monotonic() - t0, 2)}
    print(json.dumps({"phase": "holding", **out}), flush=True)
    with contextlib.suppress(TimeoutError):  # until stdin closes, at most --seconds
        await asyncio.wait_for(asyncio.to_thread(sys.stdin.read), a.seconds)
    out["still_open"] = sum(1 for p in held if not p.closed)
    out["held_s"] = round(time.monotonic() - t0, 2)
    for p in held:
        await p.close()
    return out


ATTACKS: dict[str, Callable[[Attack], Coroutine[Any, Any, dict[str, Any]]]] = {
    "upload": upload,
    "bigframe": bigframe,
    "continuation": continuation_flood,
    "rapid-reset": rapid_reset,
    "ping-flood": ping_flood,
    "idle": idle,
    "idle-preface": lambda a: idle(a, preface_only=True),
    "bad-header": lambda a: bad_requests(a, _bad_header_cases(a.target)),
    "bad-authority": lambda a: bad_requests(a, _authority_cases(a.target)),
    "echo": lambda a: bad_requests(a, []),
    "own-ports": lambda a: bad_requests(a, _own_port_cases(a.target)),
    "hold": hold,
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.hostile.peer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--accept-log", type=Path, required=True)
    b.add_argument("--ready-file", type=Path, required=True)
    lg = sub.add_parser("legit")
    lg.add_argument("--host", required=True)
    lg.add_argument("--port", type=int, required=True)
    lg.add_argument("--count", type=int, default=0)
    lg.add_argument("--stop-file", type=Path)
    lg.add_argument("--max-seconds", type=float, default=60)
    lg.add_argument("--interval", type=float, default=0.1)
    lg.add_argument("--timeout", type=float, default=5)
    at = sub.add_parser("attack")
    at.add_argument("probe", choices=sorted(ATTACKS))
    at.add_argument("--host", required=True, help="the attacked pod's IP (its ztunnel's HBONE)")
    at.add_argument("--port", type=int, default=15008)
    at.add_argument("--target", required=True, help="IP:PORT to CONNECT to")
    at.add_argument("--identity-dir", required=True)
    at.add_argument("--identity", required=True, help="NAMESPACE/SERVICEACCOUNT")
    at.add_argument("--connections", type=int, default=1)
    at.add_argument("--seconds", type=float, default=10)
    sk = sub.add_parser("socks5")
    sk.add_argument("--host", default="127.0.0.1")
    sk.add_argument("--port", type=int, required=True)
    sk.add_argument("--seconds", type=float, default=5)
    sk.add_argument("destinations", nargs="+", help="HOST:PORT to ask for")
    sb = sub.add_parser("subscribe")
    sb.add_argument("--address", required=True)
    sb.add_argument("--root-cert", type=Path, required=True)
    sb.add_argument("--token", default="")
    sb.add_argument("--identity-dir", type=Path)
    sb.add_argument("--identity", default="default/attacker")
    sb.add_argument("--flood", type=int, default=0)
    sb.add_argument("--seconds", type=float, default=5)
    sb.add_argument("nodes", nargs="+")
    lk = sub.add_parser("link", help="registrations on the agent's ztunnel.sock")
    lk.add_argument("--socket", type=Path, required=True)
    lk.add_argument("--kind", default="listening",
                    choices=["listening", "unbound", "udp", "pipe", "none"])
    lk.add_argument("--count", type=int, default=1)
    lk.add_argument("names", nargs="*")
    args = p.parse_args(argv)
    if args.cmd == "backend":
        asyncio.run(backend(args.port, args.accept_log, args.ready_file))
        return 0
    if args.cmd == "legit":
        result = legit(args.host, args.port, args.count, args.stop_file, args.max_seconds,
                       args.interval, args.timeout)
    elif args.cmd == "link":
        result = link(args.socket, args.names, args.kind, args.count)
    elif args.cmd == "subscribe":
        creds = grpc_credentials(args.root_cert, args.identity_dir, args.identity)
        result = asyncio.run(subscribe(args.address, creds, args.nodes, args.token, args.flood,
                                       args.seconds))
    elif args.cmd == "socks5":
        result = asyncio.run(socks5(args.host, args.port, args.destinations, args.seconds))
    else:
        attack = Attack(args)
        result = asyncio.run(ATTACKS[args.probe](attack))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

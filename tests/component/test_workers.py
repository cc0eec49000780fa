"""``ambit ztunnel --workers 2`` as a real process tree on loopback: the parent and two workers
share the SOCKS5 listener (SO_REUSEPORT); both accept, ``/metrics`` is merged on the parent,
a killed worker is restarted, SIGTERM drains every worker; ``--workers 1`` stays one process.

SOCKS5 stands in for capture (no root needed): its listener is a data-path listener shared
like 15001/15006/15008. The client pod is a loopback address, its destination an echo server
outside the mesh (a TCP workload: passthrough), so nothing needs certificates.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(120)

NET = random.Random(os.getpid() + 7).randrange(16, 250)
HOST = f"127.{NET}.30.1"  # the ztunnel's listeners
CLIENT_IP = f"127.{NET}.30.2"  # a mesh pod
ECHO_IP = f"127.{NET}.30.3"  # a pod outside the mesh
AMBIT = str(Path(sys.executable).parent / "ambit")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class Echo:
    """A threaded line echo server; ``hold`` keeps answering on one connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server((ECHO_IP, 0))
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


@dataclass
class Zt:
    proc: subprocess.Popen[bytes]
    socks5: int
    admin: int
    metrics: int
    log: Path

    def get(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def workers(self) -> list[dict[str, Any]]:
        status, body = self.get(self.admin, "/workers")
        assert status == 200, body
        doc: list[dict[str, Any]] = json.loads(body)
        return doc

    def ready(self) -> bool:
        with contextlib.suppress(OSError):
            return self.get(self.metrics, "/healthz/ready")[0] == 200
        return False


def until(predicate: Callable[[], object], what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {limit:g}s")


def socks5_connect(port: int, dst: tuple[str, int]) -> socket.socket:
    s = socket.socket()
    s.settimeout(10)
    s.bind((CLIENT_IP, 0))
    s.connect((HOST, port))
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(dst[0]) + struct.pack("!H", dst[1]))
    reply = s.recv(10)
    assert reply[1] == 0, reply
    return s


def exchange(port: int, dst: tuple[str, int], count: int) -> int:
    ok = 0
    for i in range(count):
        with socks5_connect(port, dst) as s:
            s.sendall(b"hello %d\n" % i)
            ok += s.recv(100) == b"hello %d\n" % i
    return ok


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[int], Zt]]:
    started: list[Zt] = []
    (tmp_path / "state.yaml").write_text(yaml.safe_dump({"workloads": [
        {"name": "client", "namespace": "default", "node": "n1", "addresses": [CLIENT_IP]},
        {"name": "echo", "namespace": "default", "node": "n2", "addresses": [ECHO_IP],
         "protocol": "TCP"}]}))
    (tmp_path / "zt.yaml").write_text("loopback_pods: true\n")

    def run(workers: int) -> Zt:
        ports = {n: free_port(HOST) for n in ("socks5", "admin", "metrics")}
        log = tmp_path / f"zt-{len(started)}.log"
        argv = [AMBIT, "ztunnel", "--config", str(tmp_path / "zt.yaml"), "--node", "n1",
                "--state", str(tmp_path / "state.yaml"), "--workers", str(workers),
                "--bind-host", HOST, "--outbound-port", "0", "--inbound-plaintext-port", "0",
                "--inbound-port", "0", "--socks5-host", HOST,
                "--socks5-port", str(ports["socks5"]), "--admin-host", HOST,
                "--admin-port", str(ports["admin"]), "--stats-host", HOST,
                "--metrics-port", str(ports["metrics"]),
                "--readiness-port", str(ports["metrics"]), "--no-transparent",
                "--access-log", "", "--drain-seconds", "3"]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        zt = Zt(proc, ports["socks5"], ports["admin"], ports["metrics"], log)
        started.append(zt)
        until(zt.ready, f"ztunnel ready (log: {log})")
        return zt

    yield run
    for zt in started:
        if zt.proc.poll() is None:
            zt.proc.kill()
            zt.proc.wait()
        for child in children(zt.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


@pytest.fixture
def echo() -> Echo:
    return Echo()


def test_both_workers_accept_and_metrics_are_merged(start: Callable[[int], Zt],
                                                    echo: Echo) -> None:
    zt = start(2)
    pids = [w["pid"] for w in zt.workers()]
    assert sorted(pids) == sorted(children(zt.proc.pid)), "the workers are the parent's children"
    assert exchange(zt.socks5, (ECHO_IP, echo.port), 60) == 60
    per_worker = [w["connections"] for w in zt.workers()]
    print(f"\nconnections per worker: {per_worker}")
    assert sum(per_worker) == 60 and all(n > 0 for n in per_worker), per_worker
    status, text = zt.get(zt.metrics, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    opened = sum(s.value for s in families["istio_tcp_connections_opened"].samples
                 if s.name.endswith("_total"))
    assert opened == 60, "the parent sums the workers' counters"
    assert [s.value for s in families["ambit_ztunnel_workers"].samples] == [2.0]
    assert [s.value for s in families["ambit_ztunnel_workers_ready"].samples] == [2.0]
    assert {s.labels["worker"]: s.value for s in
            families["ambit_ztunnel_worker_connections"].samples
            if s.name.endswith("_total")} == {"0": per_worker[0], "1": per_worker[1]}
    # Resident memory is the node's total: every process's.
    rss = [s.value for s in families["process_resident_memory_bytes"].samples]
    assert rss and rss[0] > 3 * 10 * 2**20


def test_killed_worker_is_restarted_and_logged(start: Callable[[int], Zt], echo: Echo) -> None:
    zt = start(2)
    victim = zt.workers()[1]
    os.kill(victim["pid"], signal.SIGKILL)
    # Connections meanwhile all work: the parent holds the dead worker's socket, so those
    # the kernel hashes to it wait for the new worker.
    assert exchange(zt.socks5, (ECHO_IP, echo.port), 20) == 20
    until(lambda: zt.workers()[1]["pid"] not in (None, victim["pid"])
          and zt.workers()[1]["ready"], "worker 1 restarted")
    assert zt.workers()[1]["restarts"] == 1 and zt.workers()[0]["restarts"] == 0
    until(zt.ready, "ready again")
    _, text = zt.get(zt.metrics, "/metrics")
    assert "ambit_ztunnel_worker_restarts_total 1.0" in text
    log = zt.log.read_text()
    assert f"worker 1 (pid {victim['pid']}) exited with signal SIGKILL" in log
    assert exchange(zt.socks5, (ECHO_IP, echo.port), 20) == 20


def test_sigterm_drains_every_worker(start: Callable[[int], Zt], echo: Echo) -> None:
    zt = start(2)
    pids = [w["pid"] for w in zt.workers()]
    # One open connection per worker (retry until each worker holds one).
    held: list[socket.socket] = []

    def one_more() -> bool:
        held.append(socks5_connect(zt.socks5, (ECHO_IP, echo.port)))
        return all(w["connections"] > 0 for w in zt.workers())

    until(one_more, "a connection on each worker")
    zt.proc.send_signal(signal.SIGTERM)
    until(lambda: not zt.ready(), "readiness fails while draining", 5)
    # Open connections keep working during the drain, on every worker.
    for i, s in enumerate(held):
        s.sendall(b"still %d\n" % i)
        assert s.recv(100) == b"still %d\n" % i
    for s in held:
        s.close()
    assert zt.proc.wait(timeout=15) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            "zombie" in Path(f"/proc/{pid}/status").read_text()
    log = zt.log.read_text()
    assert log.count("drained and exited") == 2, log


def test_one_worker_is_one_process(start: Callable[[int], Zt], echo: Echo) -> None:
    zt = start(1)
    assert children(zt.proc.pid) == []
    assert zt.get(zt.admin, "/workers")[0] == 404
    assert exchange(zt.socks5, (ECHO_IP, echo.port), 5) == 5


def test_workers_leave_when_the_parent_is_killed(start: Callable[[int], Zt],
                                                 echo: Echo) -> None:
    zt = start(2)
    pids = [w["pid"] for w in zt.workers()]
    zt.proc.kill()
    zt.proc.wait()

    def gone(pid: int) -> bool:
        try:
            return "zombie" in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return True

    # Their control socket closes: they drain (--drain-seconds 3) and exit, and the port is
    # free at once (each closes its listener when the drain starts).
    until(lambda: all(gone(p) for p in pids), "the workers exited", 10)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, zt.socks5))
        s.listen()

"""The hostile tier's mesh and measuring tools.

One dev cluster (``ambit.dev.cluster.DevCluster``, eBPF capture) for the whole tier: the
controller, and on each of two nodes a node agent and a ztunnel with certificates from the
controller's CA. Pods:

* ``client`` (mesh, node-1): the legitimate client; its requests go client -> ztunnel-1 ->
  HBONE -> ztunnel-2 -> ``server``, a real CONNECT through the mesh, answered by the echo;
* ``server`` (mesh, node-2): a counting echo backend (``peer.py backend``);
* ``attacker`` (namespace ``plain``, not captured, node-1): holds valid mesh certificates for
  ``default/attacker`` and ``default/other`` (issued by the controller's root) and talks
  HTTP/2 to ztunnel-2 at the server pod's IP, port 15008, directly; ``attacker2`` is the same
  from another source IP.

Each probe gets a freshly started ztunnel-2 (``fresh_ztunnel``), so its memory is measured from
that process's own baseline, not from what an earlier probe left behind. Everything lives in
namespaces named ``ambd-hst<pid>-...`` and is removed at the end, also after a failure; a
crashed run's leftovers (a dead pid) are removed by the next run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from ambit.dev import mesh, netns
from ambit.dev.cluster import ClusterError, DevCluster, NodeInfo, PodInfo
from mesh.ports import METRICS_PORT, NODE_METRICS_PORT, READINESS_PORT

REPO = Path(__file__).resolve().parents[2]
ROOT = Path("/tmp/ambit-hostile")
TAG = "hst"
BACKEND_PORT = 8080
ATTACKER = ("default", "attacker")
OTHER = ("default", "other")  # a second identity the attacker's pods may also hold
MiB = 1024 * 1024

_figures: list[dict[str, Any]] = []


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def peer_argv(*args: str) -> list[str]:
    return [mesh.PYTHON, "-m", "tests.hostile.peer", *args]


def run_in(ns: str, argv: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a peer command inside ``ns``; its JSON answer (a failure shows its stderr)."""
    res = subprocess.run(netns.ns_argv(ns, argv), capture_output=True, text=True,
                         timeout=timeout, check=False, cwd=REPO, env=_env(),
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0 or not res.stdout.strip():
        raise AssertionError(f"{' '.join(argv[2:5])} in {ns} exited {res.returncode}: "
                             f"{res.stderr.strip()[-2000:]}")
    doc: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return doc


# --- measuring -----------------------------------------------------------------------------


def rss(pid: int) -> int:
    """The resident memory of a process and all its descendants: a ztunnel with --workers is
    a parent and its worker processes, and the node pays for all of them."""
    proc = psutil.Process(pid)
    total = int(proc.memory_info().rss)
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += int(child.memory_info().rss)
    return total


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


class Watch:
    """RSS of a process sampled every 50 ms while the block runs (baseline taken on entry),
    and the lines its log files gained."""

    def __init__(self, pid: int, logs: dict[str, Path]) -> None:
        self.pid = pid
        self.logs = logs
        self.baseline = 0
        self.peak = 0
        self.lines: dict[str, int] = {}
        self._start_lines: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.t0 = 0.0
        self.seconds = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> Watch:
        self.baseline = rss(self.pid)
        self.peak = self.baseline
        self._start_lines = {k: count_lines(p) for k, p in self.logs.items()}
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, rss(self.pid))
        self.seconds = time.monotonic() - self.t0
        self.lines = {k: count_lines(p) - self._start_lines[k] for k, p in self.logs.items()}

    @property
    def growth_mib(self) -> float:
        return round((self.peak - self.baseline) / MiB, 1)


class Background:
    """A peer command running in a namespace while the test does more: its first line (a
    progress report) and, once stdin is closed, its last (the result)."""

    def __init__(self, ns: str, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(netns.ns_argv(ns, argv), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=REPO, env=_env(), start_new_session=True)

    def first_line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()
                                                            if self.proc.stdout else ""),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0].strip():
            self.stop()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"no progress line within {timeout:g}s: {err[-2000:]}")
        doc: dict[str, Any] = json.loads(box[0])
        return doc

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate("", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError("a background peer did not finish") from None
        if self.proc.returncode != 0 or not out.strip():
            raise AssertionError(f"background peer failed: {err.strip()[-2000:]}")
        doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return doc

    def stop(self) -> None:
        netns.stop_process(self.proc)


class LegitLoop:
    """The legitimate client's requests, one every 100 ms, for as long as the block runs."""

    def __init__(self, m: HostileMesh) -> None:
        self.m = m
        self.stop_file = m.work / f"legit-stop-{time.monotonic_ns()}"
        self.proc: subprocess.Popen[str] | None = None
        self.result: dict[str, Any] = {}

    def __enter__(self) -> LegitLoop:
        self.proc = subprocess.Popen(
            netns.ns_argv(self.m.client.netns, peer_argv(
                "legit", "--host", self.m.server.ip, "--port", str(BACKEND_PORT),
                "--stop-file", str(self.stop_file), "--max-seconds", "120")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(),
            start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.stop_file.touch()
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            netns.stop_process(self.proc)
            raise AssertionError("the legitimate client did not stop") from None
        if self.proc.returncode != 0 or not out.strip():
            raise AssertionError(f"legitimate client failed: {err.strip()[-2000:]}")
        self.result = json.loads(out.strip().splitlines()[-1])


# --- the mesh ------------------------------------------------------------------------------


@dataclass
class Ztunnel:
    node: NodeInfo
    pid: int
    log: Path
    access_log: Path

    def logs(self) -> dict[str, Path]:
        return {"log": self.log, "access_log": self.access_log}


@dataclass
class HostileMesh:
    cluster: DevCluster
    client: PodInfo
    server: PodInfo
    attacker: PodInfo
    attacker2: PodInfo  # another non-mesh pod, another source IP, the same certificates
    identities: Path
    accept_log: Path
    work: Path
    _attackers: int = 0

    @property
    def target(self) -> str:
        return f"{self.server.ip}:{BACKEND_PORT}"

    def ztunnel(self, node: str = "node-2") -> Ztunnel:
        c = self.cluster
        p = c.process(f"ztunnel/{node}")
        info = c.node(node)
        return Ztunnel(info, p.pid, Path(p.log), Path(info.run_dir) / "access.jsonl")

    def legit(self, count: int = 5) -> dict[str, Any]:
        """``count`` requests from the client pod through both ztunnels to the backend."""
        return run_in(self.client.netns, peer_argv(
            "legit", "--host", self.server.ip, "--port", str(BACKEND_PORT), "--count",
            str(count), "--interval", "0.05"), timeout=60)

    def legit_loop(self) -> LegitLoop:
        return LegitLoop(self)

    def attack_argv(self, probe: str, *, connections: int = 1, seconds: float = 10,
                    target: str | None = None, identity: tuple[str, str] = ATTACKER) \
            -> list[str]:
        return peer_argv(
            "attack", probe, "--host", self.server.ip, "--target", target or self.target,
            "--identity-dir", str(self.identities), "--identity", "/".join(identity),
            "--connections", str(connections), "--seconds", str(seconds))

    def attack(self, probe: str, *, connections: int = 1, seconds: float = 10,
               target: str | None = None, identity: tuple[str, str] = ATTACKER,
               pod: PodInfo | None = None) -> dict[str, Any]:
        """Run ``peer.py attack PROBE`` from the attacker pod (or ``pod``) against
        ztunnel-2."""
        return run_in((pod or self.attacker).netns, self.attack_argv(
            probe, connections=connections, seconds=seconds, target=target,
            identity=identity), timeout=seconds + 120)

    def background_attack(self, probe: str, *, connections: int = 1, seconds: float = 10,
                          identity: tuple[str, str] = ATTACKER,
                          pod: PodInfo | None = None) -> Background:
        return Background((pod or self.attacker).netns, self.attack_argv(
            probe, connections=connections, seconds=seconds, identity=identity))

    def metric(self, node: str, name: str, **labels: str) -> float:
        """The sum of a ztunnel metric's samples whose labels include ``labels``."""
        status, body = mesh.http_get(self.cluster.node(node).netns,
                                     f"http://127.0.0.1:{METRICS_PORT}/metrics")
        assert status == 200, body[:200]
        total = 0.0
        for line in body.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def backend_accepts(self) -> int:
        return count_lines(self.accept_log)

    def restart_ztunnel(self, node: str = "node-2", extra: Sequence[str] = ()) -> Ztunnel:
        """A new ztunnel process on ``node`` (its flags plus ``extra``), ready."""
        c = self.cluster
        if extra:
            self._restart(f"ztunnel/{node}", extra,
                          f"http://127.0.0.1:{READINESS_PORT}/healthz/ready")
        else:
            c.stop(f"ztunnel/{node}", sig=signal.SIGKILL, timeout=10)
            c.start_ztunnel(c.node(node), timeout=60)
        return self.ztunnel(node)

    def restart_agent(self, node: str, extra: Sequence[str] = ()) -> None:
        """A new node agent on ``node`` (its flags plus ``extra``), ready."""
        if extra:
            self._restart(f"agent/{node}", extra,
                          f"http://127.0.0.1:{NODE_METRICS_PORT}/healthz/ready")
        else:
            self.cluster.restart_agent(self.cluster.node(node), timeout=60)

    def _restart(self, role: str, extra: Sequence[str], ready_url: str) -> None:
        c = self.cluster
        old = c.process(role)
        c.stop(role, sig=signal.SIGKILL, timeout=10)
        c.spawn(role, old.netns, [*old.argv, *extra])
        deadline = time.monotonic() + 60
        while mesh.http_get(old.netns, ready_url, timeout=2)[0] != 200:
            assert c.alive(role) and time.monotonic() < deadline, c.log_tail(role)
            time.sleep(0.2)

    def wait_legit(self, seconds: float = 30) -> None:
        """Until one request gets through (a new ztunnel registers its listeners with the
        agent and fetches certificates on first use)."""
        deadline = time.monotonic() + seconds
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.legit(count=1)
            if last["ok"] == 1:
                return
            time.sleep(0.2)
        raise AssertionError(f"the legitimate client never got through: {last}")

    def new_attackers(self) -> None:
        """Two new attacker pods (new source IPs) for the next probe: nothing an earlier
        probe left in the node's TCP state for the old addresses (TIME_WAIT, limits) can
        touch it."""
        self._attackers += 1
        n = self._attackers
        self.attacker = self.cluster.add_pod(f"atk{n}", 1, namespace="plain")
        self.attacker2 = self.cluster.add_pod(f"atk{n}b", 1, namespace="plain")

    def wait_attacker_reaches(self, seconds: float = 20) -> None:
        """Until the attacker, with its valid certificate, gets a tunnel through ztunnel-2
        to the backend: the starting point of every HBONE probe. A first failure is
        reported (it would be the mesh's problem, not the probe's)."""
        deadline = time.monotonic() + seconds
        tries: list[str] = []
        while True:
            try:
                res = run_in(self.attacker.netns, self.attack_argv("echo", seconds=5),
                             timeout=30)
                if res["before"] == {"status": 200, "echo": "before\n"}:
                    break
                tries.append(str(res["before"]))
            except AssertionError as e:
                tries.append(str(e)[-300:])
            if time.monotonic() > deadline:
                raise AssertionError(f"the attacker never reached ztunnel-2: {tries[-3:]}")
            time.sleep(0.5)
        if tries:
            print(f"\nHOSTILE-NOTE the attacker reached ztunnel-2 after {len(tries)} failed "
                  f"tries: {tries[0]}")

    def check_legit_is_mesh_traffic(self) -> None:
        """The legitimate client's requests reach the backend over HBONE with the client's
        identity (ztunnel-2's access log), not around the mesh."""
        path = self.ztunnel("node-2").access_log
        deadline = time.monotonic() + 5
        records: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            records = [json.loads(line) for line in path.read_text().splitlines()
                       if line.strip()] if path.exists() else []
            if any(r.get("listener") == "inbound" and r.get("mtls") is True
                   and r.get("dst") == self.target
                   and str(r.get("src_identity", "")).endswith("/ns/default/sa/client")
                   for r in records):
                return
            time.sleep(0.1)
        raise AssertionError(f"no inbound mTLS record of the client in {path}: {records[-3:]}")

    def record(self, probe: str, **figures: Any) -> None:
        """Keep a probe's figures for the summary at the end of the run, and print them."""
        row = json.loads(json.dumps({"probe": probe, **figures}, default=_plain))
        _figures.append(row)
        print(f"\nHOSTILE {json.dumps(row)}")


def _plain(value: object) -> object:
    return sorted(value, key=str) if isinstance(value, set | frozenset) else str(value)


def _issue_attacker_identity(c: DevCluster, out: Path) -> None:
    """A certificate for ``default/attacker`` signed by the controller's own root: as valid as
    any workload's (a stolen key, or a compromised pod)."""
    from controller.ca import CertificateAuthority, write_identity, write_trust_bundle
    from mesh.spiffe import SpiffeId

    ca_dir = c.controller_dir / "ca"
    ca = CertificateAuthority.load((ca_dir / "root-key.pem").read_bytes(),
                                   (ca_dir / "root-cert.pem").read_bytes())
    write_trust_bundle(out, ca)
    for who in (ATTACKER, OTHER):
        ident = SpiffeId("cluster.local", *who)
        write_identity(out, ident, ca.issue(ident, ttl=dt.timedelta(hours=2)))


def _remove_stale() -> None:
    """Clusters of earlier runs whose process is gone (a crash, a kill -9)."""
    pattern = re.compile(rf"^ambd-{TAG}(\d+)-")
    pids = {int(m.group(1)) for n in netns.list_netns() if (m := pattern.match(n))}
    for pid in pids:
        if pid == os.getpid() or netns.pid_alive(pid):
            continue
        name = f"{TAG}{pid}"
        try:
            DevCluster.load(name, ROOT, out=lambda _line: None).down(quiet=True)
        except ClusterError:
            DevCluster(name, root=ROOT, out=lambda _line: None).down(quiet=True)


@pytest.fixture(scope="session")
def hostile_mesh() -> Iterator[HostileMesh]:
    netns.require_root()
    _remove_stale()
    name = f"{TAG}{os.getpid()}"
    c = DevCluster(name, nodes=2, redirect_mode="ebpf", root=ROOT, out=lambda _line: None)
    work = c.dir / "hostile"
    try:
        c.up()
        work.mkdir(parents=True, exist_ok=True)
        c.set_namespace("default", ambient=True)
        c.set_namespace("plain", ambient=False)
        client = c.add_pod("client", 1)
        server = c.add_pod("server", 2)
        attacker = c.add_pod("attacker", 1, namespace="plain")
        attacker2 = c.add_pod("attacker2", 1, namespace="plain")
        accept_log, ready = work / "backend-accepts", work / "backend.ready"
        c.spawn("pod/server/backend", server.netns, peer_argv(
            "backend", "--port", str(BACKEND_PORT), "--accept-log", str(accept_log),
            "--ready-file", str(ready)), cgroup=Path(server.cgroup), env=_env())
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert time.monotonic() < deadline, c.log_tail("pod/server/backend")
            time.sleep(0.05)
        identities = work / "identities"
        _issue_attacker_identity(c, identities)
        m = HostileMesh(c, client, server, attacker, attacker2, identities, accept_log, work)
        m.wait_legit()
        m.check_legit_is_mesh_traffic()
        yield m
    finally:
        keep = os.environ.get("AMBIT_HOSTILE_LOGS")  # a directory to copy the logs to
        if keep:
            shutil.copytree(c.dir / "logs", Path(keep) / name, dirs_exist_ok=True)
            for node in c.nodes:
                with contextlib.suppress(OSError):
                    shutil.copy(Path(node.run_dir) / "access.jsonl",
                                Path(keep) / name / f"access-{node.name}.jsonl")
        c.down(quiet=True)
        shutil.rmtree(c.dir, ignore_errors=True)
        left = [n for n in netns.list_netns() if n.startswith(c.prefix)]
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def fresh_ztunnel(hostile_mesh: HostileMesh) -> Iterator[Ztunnel]:
    """ztunnel-2 restarted for this probe, serving the legitimate client again; after the
    probe it must still be the same, living process."""
    hostile_mesh.new_attackers()
    zt = hostile_mesh.restart_ztunnel("node-2")
    hostile_mesh.wait_legit()
    hostile_mesh.wait_attacker_reaches()
    yield zt
    assert psutil.pid_exists(zt.pid), "ztunnel-2 died during the probe"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _figures:
        return
    terminalreporter.write_sep("=", "hostile tier: figures")
    for row in _figures:
        terminalreporter.write_line(json.dumps(row))

"""Processes of a benchmark run: start them inside a namespace, log them, stop them, weigh them.

Why: a benchmark that leaves an Envoy or an iperf3 behind poisons the next run (ports taken,
CPU stolen) and, worse, keeps namespaces alive. Every process started here is registered with a
``ProcessSet`` that stops them all (SIGTERM to the process group, then SIGKILL) in a ``finally``,
whatever happened. Peak memory is sampled with psutil while a proxy runs and cross-checked with
the kernel's high-water mark (VmHWM), so a short spike between samples is not missed. CPU
time per phase is read from /proc/<pid>/stat (utime+stime) before and after it, and TCP
retransmits from each namespace's /proc/net/snmp.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import psutil

from bench.report import parse_proc_stat_cpu, parse_snmp_retrans


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and, when known, how to fix it."""


def in_netns(ns: str, argv: Sequence[str]) -> list[str]:
    """argv run inside network namespace ``ns`` (``ip netns exec`` execs it: same pid)."""
    return ["ip", "netns", "exec", ns, *argv]


def run(argv: Sequence[str], timeout: float = 30.0, check: bool = True) -> str:
    """Run a short command to completion, bounded in time; return stdout.

    On failure the error carries the command and its stderr: most setup failures (a missing
    binary, a bad address) are self-explanatory from those.
    """
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            check=False)
    except FileNotFoundError:
        raise BenchError(f"command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from None
    if check and cp.returncode != 0:
        raise BenchError(
            f"failed (exit {cp.returncode}): {' '.join(argv)}\n{cp.stderr.strip()}"
        )
    return cp.stdout


class Proc:
    """A long-running process in its own session, its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        try:
            self.popen = subprocess.Popen(
                self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd, env=env, start_new_session=True,  # own group: stop() kills children too
            )
        except FileNotFoundError:
            self._log.close()
            raise BenchError(f"command not found: {self.argv[0]}") from None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def ensure_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        else:
            # The leader is gone; make sure nothing it started lingers in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()


class ProcessSet:
    """Every process a benchmark phase started; ``stop_all`` is safe to call repeatedly."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.log_dir, cwd=cwd, env=env)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()


def wait_until(what: str, check: Proc | None, predicate: Callable[[], bool], timeout: float,
               interval: float = 0.1) -> None:
    """Poll ``predicate()`` until true; fail early if ``check`` died, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if check is not None:
            check.ensure_alive()
        try:
            if predicate():
                return
        except Exception as e:  # a probe failing is expected until the process is ready
            last_error = f" (last probe error: {e})"
        time.sleep(interval)
    tail = f"\nlog {check.log_path}:\n{check.log_tail()}" if check is not None else ""
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}{last_error}{tail}")


def _tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total
    except psutil.Error:
        return 0


def _tree_hwm(pid: int) -> int:
    """Sum of VmHWM (kernel peak RSS) over the process and its children, in bytes."""
    pids = [pid]
    with contextlib.suppress(psutil.Error):
        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakRss:
    """Samples the RSS of some process trees in a thread; ``peak_mib()`` reads the maxima."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1,
                 reset_hwm: bool = False) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.reset_hwm = reset_hwm
        self.peaks: dict[str, int] = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        if self.reset_hwm:
            # Per phase: start the kernel's high-water mark afresh ("5" resets VmHWM to the
            # current RSS, proc(5)), so an earlier phase's peak is not reported as this one's.
            for pid in self.pids.values():
                for p in tree_pids(pid):
                    with contextlib.suppress(OSError), open(f"/proc/{p}/clear_refs", "w") as f:
                        f.write("5")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> None:
        for role, pid in self.pids.items():
            self.peaks[role] = max(self.peaks[role], _tree_rss(pid), _tree_hwm(pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def peak_mib(self) -> dict[str, float]:
        return {role: round(v / (1024 * 1024), 1) for role, v in self.peaks.items() if v}


def ns_http_get(ns: str, url: str, timeout: float = 1.0) -> str | None:
    """GET ``url`` from inside namespace ``ns``: the body on a 2xx answer, else None.

    Uses ``python -m ambit.dev.probe`` (the namespaces are unreachable from here, and this
    avoids depending on curl being installed).
    """
    try:
        cp = subprocess.run(
            in_netns(ns, [sys.executable, "-m", "ambit.dev.probe", "http", url,
                          "--timeout", f"{timeout:g}"]),
            capture_output=True, text=True, timeout=timeout + 10, check=False)
    except subprocess.TimeoutExpired:
        return None
    return cp.stdout if cp.returncode == 0 else None


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants (a ztunnel with ``--workers`` forks worker processes)."""
    pids = [pid]
    with contextlib.suppress(psutil.Error):
        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process tree so far: the live processes' own time plus what their
    reaped children used (cutime+cstime), from /proc/<pid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                own, reaped = parse_proc_stat_cpu(f.read(), ticks)
        except (OSError, ValueError):
            continue  # exited between listing and reading: its time moved to its parent
        total += own + reaped
    return total


class CpuMeter:
    """CPU seconds each proxy tree used between ``start()`` and ``stop()``: one phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {role: tree_cpu_seconds(pid) for role, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {role: round(tree_cpu_seconds(pid) - self._before[role], 3)
                for role, pid in self.pids.items()}


def current_rss_mib(pid: int) -> float:
    """Resident memory of a process tree now, MiB."""
    return round(_tree_rss(pid) / (1024 * 1024), 1)


def ns_retransmits(namespaces: Sequence[str]) -> int:
    """TCP segments retransmitted so far, summed over network namespaces (each has its own
    /proc/net/snmp; reading it from inside the namespace gives that namespace's counters)."""
    total = 0
    for ns in namespaces:
        total += parse_snmp_retrans(run(in_netns(ns, ["cat", "/proc/net/snmp"]), timeout=10))
    return total

"""Process supervision for the dev cluster: start a command in a namespace, stop it, watch it.

Why it exists: the controller, each node's ztunnel and agent, and every pod's servers are
processes started the same way (detached, in a network namespace and maybe a pod's cgroup,
logging to ``logs/<role>.log``, recorded by role in the state file so another process can stop
them) and waited for the same way (an HTTP readiness URL, failing early with the log's tail
when the process dies). What those processes are is for ``cluster_nodes``, ``cluster_pods``
and ``cluster_waypoints``; this module only knows roles, pids and logs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ambit.dev import mesh, netns
from ambit.dev.cluster_state import ClusterError, ClusterState, Process


class ClusterProcesses(ClusterState):
    """Start, stop and wait for the cluster's processes, by role."""

    def _ambit(self, *args: str) -> list[str]:
        """The argv of an ``ambit`` command, run by the same interpreter as this one."""
        return [*mesh.ambit_command(), *args]

    def spawn(self, role: str, ns: str, argv: Sequence[str], *, cgroup: Path | None = None,
              env: Mapping[str, str] | None = None) -> Process:
        """Start ``argv`` in ``ns`` (and ``cgroup``), detached, logging to logs/<role>.log."""
        log = self.dir / "logs" / f"{role.replace('/', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        procs_file = None if cgroup is None else cgroup / "cgroup.procs"

        def enter_cgroup() -> None:  # runs in the child before exec, in our mount namespace
            if procs_file is not None:
                procs_file.write_text(str(os.getpid()))

        with log.open("ab") as fh:
            proc = subprocess.Popen(netns.ns_argv(ns, argv), stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.STDOUT,
                                    env=dict(env) if env is not None else None,
                                    start_new_session=True, preexec_fn=enter_cgroup)
        p = Process(role, proc.pid, ns, str(log), list(argv))
        self._popen[proc.pid] = proc
        self.processes.append(p)
        self.save()
        return p

    def stop(self, role: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the process(es) of ``role`` and wait until they are gone."""
        for p in [p for p in self.processes if p.role == role]:
            self._stop_pid(p.pid, sig, timeout)
            self.processes.remove(p)
        self.save()

    def _stop_all(self) -> None:
        """Stop every recorded process (``down``; the state file goes with the cluster)."""
        for p in list(self.processes):
            self._stop_pid(p.pid, signal.SIGTERM, 10)
        self.processes = []

    def _stop_pid(self, pid: int, sig: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        popen = self._popen.pop(pid, None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if popen is not None:
                if popen.poll() is not None:
                    return
            elif not netns.pid_alive(pid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)

    def process(self, role: str) -> Process:
        for p in self.processes:
            if p.role == role:
                return p
        raise ClusterError(f"no process {role!r} in this cluster")

    def alive(self, role: str) -> bool:
        try:
            p = self.process(role)
        except ClusterError:
            return False
        popen = self._popen.get(p.pid)
        return popen.poll() is None if popen is not None else netns.pid_alive(p.pid)

    def log_tail(self, role: str, lines: int = 15) -> str:
        try:
            return mesh.log_tail(Path(self.process(role).log), lines)
        except ClusterError:
            return "(no such process)"

    def _wait_http(self, role: str, ns: str, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive(role):
                raise ClusterError(f"{role} exited during startup; log:\n{self.log_tail(role)}")
            status, body = mesh.http_get(ns, url, timeout=2.0)
            if status == 200:
                return
            last = f"{status} {body.strip()[:200]}"
            time.sleep(0.2)
        raise ClusterError(f"{role} not ready after {timeout:g}s (last: {last}); log:\n"
                           f"{self.log_tail(role)}")

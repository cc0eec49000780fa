"""Turning a namespace ``Cluster`` into a running mesh: servers, ztunnels, state, probes.

Why it exists: the netns tests, ``ambit dev demo`` and the benchmarks all do the same few
things on top of a topology (write a state file, issue identities, start a ztunnel in a node
namespace and wait until it is ready, start an echo server in a pod, make a request from a pod,
read a ztunnel's admin or metrics endpoint). Doing them in one place keeps the waiting and the
error messages right once: a ztunnel that exits during startup is reported with the tail of
its log instead of as a timeout.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ambit.dev import netns
from ambit.dev.topology import Cluster, Node, Pod
from mesh.files import write_atomic
from mesh.ports import ADMIN_PORT, METRICS_PORT, READINESS_PORT

PYTHON = sys.executable
READY_PATH = "/healthz/ready"


class MeshError(RuntimeError):
    """A mesh component did not come up or a probe could not run; the message says why."""


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise MeshError(f"{what} exited with status {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise MeshError(f"{what} was not ready within {timeout:g}s")
        time.sleep(0.05)


# --- pods: echo servers and probes ---------------------------------------------------------


def start_echo(
    cluster: Cluster, pod: Pod, workdir: Path, port: int = 8080, timeout: float = 10.0
) -> subprocess.Popen[bytes]:
    """Start an ``ambit.dev.echo`` server on ``pod``'s IP and wait until it listens."""
    ready = workdir / f"echo-{pod.name}-{port}.ready"
    ready.unlink(missing_ok=True)
    log = workdir / f"echo-{pod.name}-{port}.log"
    argv = [PYTHON, "-m", "ambit.dev.echo", "--host", pod.ip, "--port", str(port)]
    proc = cluster.spawn(pod.netns, [*argv, "--ready-file", str(ready)], log=log)
    try:
        _wait_for_file(ready, proc, f"echo server in pod {pod.name}", timeout)
    except MeshError as e:
        raise MeshError(f"{e}; log:\n{log_tail(log)}") from None
    return proc


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one echo request: the server's answer, or why there was none."""

    ok: bool
    answer: dict[str, Any] | None
    error: str

    @property
    def peer_ip(self) -> str:
        """The client address the *server* saw (who actually connected to it)."""
        if self.answer is None:
            raise MeshError(f"no answer from the server: {self.error}")
        return str(self.answer["peer"]).rsplit(":", 1)[0]


def tcp_probe(
    ns: str, host: str, port: int, message: str = "hello", timeout: float = 5.0
) -> ProbeResult:
    """From inside ``ns``, send one line to an echo server at ``host:port``."""
    argv = [PYTHON, "-m", "ambit.dev.probe", "tcp", host, str(port), "--message", message,
            "--timeout", str(timeout)]  # fmt: skip
    res = subprocess.run(
        netns.ns_argv(ns, argv), capture_output=True, text=True, timeout=timeout + 10, check=False
    )
    if res.returncode != 0:
        return ProbeResult(False, None, res.stderr.strip() or f"exit status {res.returncode}")
    try:
        answer = json.loads(res.stdout)
    except json.JSONDecodeError:
        return ProbeResult(False, None, f"not an echo answer: {res.stdout.strip()!r}")
    return ProbeResult(True, answer, "")


def http_get(ns: str, url: str, timeout: float = 5.0) -> tuple[int | None, str]:
    """GET ``url`` from inside ``ns``: (status, body), status ``None`` if it did not connect."""
    argv = [PYTHON, "-m", "ambit.dev.probe", "http", url, "--timeout", str(timeout)]
    res = subprocess.run(
        netns.ns_argv(ns, argv), capture_output=True, text=True, timeout=timeout + 10, check=False
    )
    status = re.search(r"^HTTP (\d{3})$", res.stderr, re.MULTILINE)
    if res.returncode in (0, 3) and status:
        return int(status.group(1)), res.stdout
    return None, res.stderr.strip() or f"probe exit status {res.returncode}"


# --- mesh configuration --------------------------------------------------------------------


def workload(
    pod: Pod,
    *,
    namespace: str = "default",
    service_account: str | None = None,
    protocol: str = "HBONE",
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A state-file workload entry (docs/state-file.md) for ``pod``."""
    return {
        "name": pod.name,
        "namespace": namespace,
        "serviceAccount": service_account or pod.name,
        "node": pod.node.name,
        "addresses": [pod.ip],
        "labels": dict(labels or {"app": pod.name}),
        "protocol": protocol,
    }


def write_state(path: Path, doc: Mapping[str, Any]) -> Path:
    """Write a state file atomically (a watching ztunnel never reads half of it)."""
    write_atomic(path, yaml.safe_dump(dict(doc), sort_keys=False))
    return path


def issue_identities(
    identity_dir: Path, identities: Iterable[str], trust_domain: str = "cluster.local"
) -> None:
    """Run ``ambit dev certs`` for NAMESPACE/SERVICEACCOUNT ``identities``."""
    argv = [PYTHON, "-m", "ambit.cli", "dev", "certs", "--out", str(identity_dir),
            "--trust-domain", trust_domain]  # fmt: skip
    for ident in identities:
        argv += ["--identity", ident]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise MeshError(f"`ambit dev certs` failed: {(res.stderr or res.stdout).strip()}")


# --- ztunnels ------------------------------------------------------------------------------


def ambit_command() -> list[str]:
    """How to run the ``ambit`` CLI of this installation (the venv's script if present)."""
    script = Path(PYTHON).parent / "ambit"
    return [str(script)] if script.exists() else [PYTHON, "-m", "ambit.cli"]


@dataclass
class Ztunnel:
    node: Node
    proc: subprocess.Popen[bytes]
    log: Path
    admin_port: int = ADMIN_PORT
    metrics_port: int = METRICS_PORT
    readiness_port: int = READINESS_PORT

    def get(self, port: int, path: str, timeout: float = 5.0) -> tuple[int | None, str]:
        """GET ``path`` from one of this ztunnel's HTTP listeners, from inside its node."""
        return http_get(self.node.netns, f"http://127.0.0.1:{port}{path}", timeout)

    def metrics(self) -> str:
        status, body = self.get(self.metrics_port, "/metrics")
        if status != 200:
            raise MeshError(f"{self.node.name} ztunnel /metrics: {status} {body[:200]}")
        return body

    def config_dump(self) -> Any:
        status, body = self.get(self.admin_port, "/config_dump")
        if status != 200:
            raise MeshError(f"{self.node.name} ztunnel /config_dump: {status} {body[:200]}")
        return json.loads(body)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``/healthz/ready`` until 200; fail fast (with the log) if the process exits."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise MeshError(
                    f"ztunnel on {self.node.name} exited with status {self.proc.returncode} "
                    f"during startup; log:\n{log_tail(self.log)}"
                )
            status, body = self.get(self.readiness_port, READY_PATH, timeout=2.0)
            if status == 200:
                return
            last = f"{status} {body.strip()[:200]}"
            if time.monotonic() > deadline:
                raise MeshError(
                    f"ztunnel on {self.node.name} not ready after {timeout:g}s (last: {last}); "
                    f"log:\n{log_tail(self.log)}"
                )
            time.sleep(0.2)


def start_ztunnel(
    cluster: Cluster,
    node: Node,
    *,
    state_file: Path,
    identity_dir: Path,
    workdir: Path,
    extra_args: Sequence[str] = (),
    wait: bool = True,
    timeout: float = 30.0,
) -> Ztunnel:
    """Start ``ambit ztunnel`` inside ``node``'s namespace (shared inbound bind, TPROXY)."""
    log = workdir / f"ztunnel-{node.name}.log"
    argv = [
        *ambit_command(), "ztunnel", "--node", node.name, "--state", str(state_file),
        "--identity-dir", str(identity_dir), "--inbound-bind", "shared",
        "--admin-port", str(ADMIN_PORT), "--metrics-port", str(METRICS_PORT), *extra_args,
    ]  # fmt: skip
    zt = Ztunnel(node=node, proc=cluster.spawn(node.netns, argv, log=log), log=log)
    if wait:
        zt.wait_ready(timeout)
    return zt

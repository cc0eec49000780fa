"""Run ``ambit dashboard`` next to a dev cluster, as one of its processes (``make demo KEEP=1``).

Why it exists: a kept demo should end with an address to open, not with a command to type, and
the dashboard should go when the cluster goes. So it is started detached (its own session, log
in the cluster's ``logs/``), recorded in the cluster's state file under the role
``dashboard`` (``ambit dev cluster down`` stops every recorded process), and waited for until
it answers. It runs in this machine's own network namespace, bound to loopback: the browser is
on this machine, and the dashboard reaches the cluster's namespaces itself.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

from ambit.dashboard.cli import DEFAULT_LISTEN
from ambit.dev import mesh
from ambit.dev.cluster_state import ClusterError, ClusterState, Process

ROLE = "dashboard"


def start(cluster: ClusterState, listen: str = DEFAULT_LISTEN, timeout: float = 20.0) -> str:
    """Start the dashboard for ``cluster``; its URL once it answers."""
    log = cluster.dir / "logs" / "dashboard.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [*mesh.ambit_command(), "dashboard", "--cluster", cluster.name, "--cluster-root",
            str(cluster.dir.parent), "--listen", listen]
    with log.open("ab") as fh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    cluster.processes.append(Process(ROLE, proc.pid, "", str(log), argv))
    cluster.save()
    url = f"http://{listen}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"ambit dashboard exited with status {proc.returncode}; "
                               f"log:\n{mesh.log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}healthz", timeout=2) as r:  # loopback
                if json.loads(r.read(65536)).get("gathers", 0) > 0:
                    return url
        except OSError:
            pass
        time.sleep(0.2)
    raise ClusterError(f"ambit dashboard did not answer on {url} within {timeout:g} s; "
                       f"log:\n{mesh.log_tail(log)}")


def announce(cluster: ClusterState, listen: str = DEFAULT_LISTEN) -> list[str]:
    """Start the dashboard and say where it is; a dashboard that cannot start (the port is
    taken) is reported, never a reason to take the kept cluster down."""
    try:
        url = start(cluster, listen)
    except ClusterError as e:
        return [f"dashboard: not started ({e}); run it yourself: ambit dashboard --cluster "
                f"{cluster.name} --listen 127.0.0.1:PORT"]
    host, _, port = listen.rpartition(":")
    return [f"dashboard: {url}  (live view of this mesh: open it in a browser on this "
            f"machine; from another one: ssh -L {port}:{host}:{port} THIS_MACHINE)",
            f"  it stops with the cluster; log {cluster.dir / 'logs' / 'dashboard.log'}"]

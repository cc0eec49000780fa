"""A ztunnel restart under load, for the e2e modules: a steady rate of new connections and a
few long-lived ones from a client pod (``ambit.dev.conn_load``) while one node's ztunnel is
replaced (``DevCluster.restart_ztunnel``). Returns the load's summary and what the restart
left in the logs, for the caller's assertions."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ambit.dev import mesh, netns
from ambit.dev.cluster import DevCluster, NodeInfo, PodInfo
from tests.e2e.waiting import until

RATE = 50  # new connections per second (issue 15's measurement)
LONG = 5  # long-lived connections
LOAD_SECONDS = 12.0  # new connections are opened this long; the restart starts after 1 s
# The long-lived connections end this long after the new ztunnel took over: well inside the
# old one's drain period (``--drain-seconds``, 5 s in the dev cluster), which they must
# survive.
LONG_AFTER = 2.0
# Lines that mean a connection or a stream was lost in a ztunnel (issue 15 saw 81 of these
# when a pooled connection sent its queued streams past the peer's limit).
BAD_LINES = ("Task exception was never retrieved", "Traceback", "Max inbound streams",
             "TooManyStreamsError")


@dataclass
class Restart:
    load: dict[str, Any]
    took_s: float
    old_pid: int
    bad_lines: list[str]

    def problems(self) -> list[str]:
        new, long = self.load["new"], self.load["long"]
        out = []
        if new["failed"]:
            out.append(f"{new['failed']} new connection(s) failed: {new['errors']} "
                       f"{new['first_failures'][:5]}")
        if long["failed"]:
            out.append(f"{long['failed']} long-lived connection(s) lost: {long['errors']}")
        if self.bad_lines:
            out.append("lost streams in the ztunnel logs:\n" + "\n".join(self.bad_lines[:10]))
        return out


def restart_under_load(c: DevCluster, client: PodInfo, server: PodInfo, node: NodeInfo,
                       port: int, overlap: bool = True) -> Restart:
    tag = uuid.uuid4().hex[:8]
    ready, release = c.dir / f"load-{tag}.ready", c.dir / f"load-{tag}.release"
    logs = [Path(p.log) for p in c.processes if p.role.startswith("ztunnel/")]
    sizes = {path: path.stat().st_size for path in logs}
    load = subprocess.Popen(netns.ns_argv(client.netns, [
        mesh.PYTHON, "-m", "ambit.dev.conn_load", server.ip, str(port), "--rate", str(RATE),
        "--seconds", str(LOAD_SECONDS), "--long", str(LONG), "--long-seconds", "60",
        "--long-until", str(release), "--ready-file", str(ready)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: ready.exists() or load.poll() is not None, 30, "the load to start")
        time.sleep(1.0)
        old = c.process(f"ztunnel/{node.name}")
        t0 = time.monotonic()
        c.restart_ztunnel(node, overlap=overlap)
        took = time.monotonic() - t0
        time.sleep(LONG_AFTER)
        release.touch()
        out, err = load.communicate(timeout=LOAD_SECONDS + 60)
    finally:
        if load.poll() is None:
            load.kill()
    lines = out.strip().splitlines()
    assert lines, f"the load printed nothing; stderr:\n{err[-2000:]}"
    # The old ztunnel drained and exited on its own (overlap) or was stopped.
    until(lambda: not any(p.pid == old.pid and c.alive(p.role) for p in c.processes), 15,
          f"the old ztunnel (pid {old.pid}) to exit after its drain")
    bad = []
    for path in logs:
        with path.open("rb") as fh:
            fh.seek(sizes[path])
            bad += [f"{path.name}: {line.strip()}" for line in
                    fh.read().decode(errors="replace").splitlines()
                    if any(b in line for b in BAD_LINES)]
    return Restart(json.loads(lines[-1]), took, old.pid, bad)

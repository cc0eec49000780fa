"""`ambit dev cluster` as a user runs it: separate processes for up, pod add, exec, status and
down; what `up` starts outlives it, and `down` removes everything."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from ambit.dev import mesh, netns
from ambit.dev.cluster import STATE_ROOT, cgroup2_root

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]


def ambit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*mesh.ambit_command(), "dev", "cluster", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_up_pod_exec_status_down(tmp_path: Path) -> None:
    name = f"cli{uuid.uuid4().hex[:5]}"
    state = STATE_ROOT / name
    try:
        up = ambit("up", "--name", name, "--nodes", "2", "--redirect-mode", "iptables")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"cluster {name!r} up" in up.stdout and "ambit dev cluster down" in up.stdout
        pids = [p["pid"] for p in json.loads((state / "cluster.json").read_text())["processes"]]
        assert len(pids) == 5  # controller + (ztunnel, agent) x 2, still running after `up`
        for pid in pids:
            os.kill(pid, 0)
        env = {**os.environ, "AMBIT_DB": str(state / "registry.db")}
        enable = subprocess.run([*mesh.ambit_command(), "namespace", "enable", "default"],
                                env=env, capture_output=True, text=True, check=False)
        assert enable.returncode == 0, enable.stderr
        srv = ambit("pod", "add", "server", "--node", "node-2", "--echo", "8080", "--name", name)
        assert srv.returncode == 0, srv.stderr
        assert "echo server on 10.244.2." in srv.stdout
        cli = ambit("pod", "add", "client", "--node", "node-1", "--name", name)
        assert cli.returncode == 0, cli.stderr
        server_ip = srv.stdout.split()[2]
        for _ in range(25):  # the first connection also fetches the client's certificate
            probe = ambit("exec", "--name", name, "client", "--", mesh.PYTHON, "-m",
                          "ambit.dev.probe", "tcp", server_ip, "8080")
            if probe.returncode == 0:
                break
        assert probe.returncode == 0, probe.stderr
        assert json.loads(probe.stdout)["data"] == "hello"
        status = ambit("status", "--name", name)
        assert status.returncode == 0, status.stderr
        assert "pod default/client" in status.stdout and "(captured" in status.stdout
        assert (cgroup2_root() / "ambit-dev" / name / "server").is_dir()
        again = ambit("up", "--name", name)
        assert again.returncode == 1 and "already exists" in again.stderr
        bad = ambit("pod", "add", "x", "--node", "node-9", "--name", name)
        assert bad.returncode == 1 and "no node 'node-9'" in bad.stderr
    finally:
        down = ambit("down", "--name", name)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [n for n in netns.list_netns() if n.startswith(f"ambd-{name}-")]
    assert not state.exists()
    assert not (cgroup2_root() / "ambit-dev" / name).exists()
    # Gone, or a zombie waiting for init to reap it (the `up` process that started it exited).
    assert not [pid for pid in pids if netns.pid_alive(pid)]


def test_status_of_a_missing_cluster_says_how_to_start_one() -> None:
    res = ambit("status", "--name", "nosuch")
    assert res.returncode == 1 and "ambit dev cluster up" in res.stderr

"""`ambit controller --mode kubernetes` as a process, against the in-repo API-server double:
pods in an ambient namespace reach a subscribed ztunnel's state, and follow changes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from controller.main import choose_mode
from mesh.state.controller_source import ControllerSource
from mesh.state.store import StateStore
from tests.component.harness import free_port
from tests.component.test_push import eventually
from tests.k8s_double import objects
from tests.k8s_double.server import ApiServerDouble, ServiceAccountToken


def ztunnel_token_file(double: ApiServerDouble, tmp: Path, node: str = "node-a") -> Path:
    """A file holding a ztunnel service-account token bound to ``node``, as the DaemonSet
    mounts it: the controller reviews it (TokenReview) before it streams the state."""
    token = f"ztunnel-token-{node}"
    double.tokens[token] = ServiceAccountToken("ambit-system", "ztunnel", node_name=node)
    path = tmp / f"{node}.token"
    path.write_text(token)
    return path


@pytest.mark.parametrize(("mode", "kubeconfig", "env", "expected"), [
    ("auto", None, {}, "embedded"),
    ("auto", "/k", {}, "kubernetes"),
    ("auto", None, {"KUBECONFIG": "/k"}, "kubernetes"),
    ("auto", None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, "kubernetes"),
    ("embedded", "/k", {"KUBECONFIG": "/k"}, "embedded"),
    ("kubernetes", None, {}, "kubernetes"),
])
def test_choose_mode(mode: str, kubeconfig: str | None, env: dict[str, str],
                     expected: str) -> None:
    assert choose_mode(mode, kubeconfig, env) == expected


async def test_controller_process_in_kubernetes_mode(double: ApiServerDouble,
                                                     tmp_path: Path) -> None:
    # The controller keeps its Lease and the mesh root's Secret in ambit-system.
    double.apply("namespaces", objects.namespace("ambit-system", ambient=False))
    double.apply("namespaces", objects.namespace("shop"))
    double.apply("namespaces", objects.namespace("legacy", ambient=False))
    double.apply("pods", objects.pod("web-1", "shop", "10.1.0.5"))
    double.apply("pods", objects.pod("old-1", "legacy", "10.1.0.6"))
    kubeconfig = double.write_kubeconfig(tmp_path / "kubeconfig")
    port = free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "AMBIT_DB")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ambit.cli", "controller", "--mode", "kubernetes",
        "--kubeconfig", str(kubeconfig), "--data-dir", str(tmp_path / "data"),
        "--listen-host", "127.0.0.1", "--grpc-port", str(port), "--monitoring-port", "0",
        "--insecure", env=env, stderr=subprocess.PIPE)
    store = StateStore()
    source = ControllerSource(f"127.0.0.1:{port}", "node-a", store,
                              token_file=ztunnel_token_file(double, tmp_path),
                              backoff_initial=0.05, backoff_max=0.2)
    task = asyncio.create_task(source.run())
    try:
        await eventually(lambda: store.ready, limit=20)
        by_name = {w.name: w for w in store.current.config.workloads}
        assert by_name["web-1"].protocol.value == "HBONE"
        assert by_name["old-1"].protocol.value == "TCP"  # namespace not ambient
        double.apply("pods", objects.pod("web-2", "shop", "10.1.0.7"))
        await eventually(lambda: "web-2" in {w.name for w in store.current.config.workloads},
                         limit=2)
    finally:
        task.cancel()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0

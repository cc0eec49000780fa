"""`ambit dev demo` end to end: every check passes and nothing is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambit.dev import demo, netns

pytestmark = pytest.mark.netns


def test_demo_passes_and_cleans_up(tmp_path: Path) -> None:
    lines: list[str] = []
    status = demo.run(tmp_path, out=lines.append, name="demotest")
    text = "\n".join(lines)
    assert status == 0, text
    assert "9/9 checks passed" in text  # in-pod mode (the default) adds the client-IP check
    assert "PASS  the server sees the client pod's IP" in text
    assert "PASS  denied client is refused" in text
    assert "istio_tcp_connections_opened_total{reporter=destination" in text
    assert "ambit_capture_connections_total{" in text
    assert not [n for n in netns.list_netns() if n.startswith("ambd-demotest-")]
    assert not (tmp_path / "demotest").exists()

"""``ambit waypoint apply|list|delete`` against the embedded registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambit.cli import main
from controller.registry.sqlite import EmbeddedRegistry


def test_apply_list_delete_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) \
        -> None:
    db = tmp_path / "r.db"
    assert main(["waypoint", "apply", "-n", "shop", "--name", "wp", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "waypoint shop/wp recorded" in out and "ambit waypoint run" in out
    assert "ambit.dev/use-waypoint=wp" in out
    with EmbeddedRegistry(db) as r:
        (gw,) = r.snapshot().gateways
    assert (gw.namespace, gw.name, gw.waypoint_for) == ("shop", "wp", "service")
    with EmbeddedRegistry(db) as r:
        r.apply([{"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": "cart", "namespace": "shop",
                               "labels": {"ambit.dev/use-waypoint": "wp"}},
                  "spec": {"clusterIP": "10.96.1.1", "ports": [{"port": 80}],
                           "selector": {"app": "cart"}}}])
    assert main(["waypoint", "list", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["shop", "wp", "service", "none", "shop/cart"]
    assert main(["waypoint", "delete", "-n", "shop", "--name", "wp", "--db", str(db)]) == 0
    assert "fail closed" in capsys.readouterr().out
    with EmbeddedRegistry(db) as r:
        assert r.snapshot().gateways == ()


def test_errors_exit_2_with_a_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    assert main(["waypoint", "delete", "--name", "nope", "--db", str(db)]) == 2
    assert "Gateway default/nope is not registered" in capsys.readouterr().err
    assert main(["waypoint", "list", "--db", str(tmp_path / "missing.db")]) == 2
    assert "no registry" in capsys.readouterr().err
    assert main(["waypoint", "apply", "--name", "Bad_Name", "--db", str(db)]) == 2
    assert "metadata.name" in capsys.readouterr().err

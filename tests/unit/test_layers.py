"""The layer check (hack/check_layers.py): the repository passes it, and it fails, naming the
import, on a sideways or upward import, including one inside a function."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "check_layers.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


layers = _load()


def test_repository_follows_the_layers() -> None:
    assert layers.violations(ROOT) == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages the check reads (sources only)."""
    for package in layers.LAYER:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o"))
    return tmp_path


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_ztunnel_importing_controller_fails_with_the_import_named(tree: Path) -> None:
    _append(tree / "ztunnel" / "routing.py", "\nimport controller\n")
    found = layers.violations(tree)
    assert len(found) == 1
    assert found[0].startswith("ztunnel/routing.py:")
    assert "imports controller" in found[0] and "move what both need into mesh/" in found[0]


def test_a_lazy_import_inside_a_function_is_caught(tree: Path) -> None:
    _append(tree / "agent" / "pods.py",
            "\n\ndef _late() -> None:\n    from ztunnel.config import ZtunnelConfig  # noqa\n")
    found = layers.violations(tree)
    assert [f.split(": ", 1)[1].split(":")[0] for f in found] == ["imports ztunnel.config"]


def test_mesh_importing_a_component_fails(tree: Path) -> None:
    _append(tree / "mesh" / "ports.py", "\nfrom waypoint.config import WaypointConfig\n")
    assert any(f.startswith("mesh/ports.py:") and "imports waypoint.config" in f
               for f in layers.violations(tree))


def test_a_component_importing_the_command_line_fails(tree: Path) -> None:
    _append(tree / "controller" / "ca.py", "\nfrom ambit import registry_cli\n")
    assert any("controller/ca.py" in f and "imports ambit" in f for f in layers.violations(tree))


def test_the_command_line_and_third_party_imports_are_free(tree: Path) -> None:
    _append(tree / "ambit" / "cli.py", "\nimport ztunnel.routing\nimport controller.ca\n")
    _append(tree / "ztunnel" / "routing.py", "\nimport h2.connection\nimport json\n")
    assert layers.violations(tree) == []


@pytest.mark.parametrize(("importer", "imported", "ok"), [
    ("mesh", "mesh", True), ("mesh", "ztunnel", False), ("mesh", "ambit", False),
    ("ztunnel", "mesh", True), ("ztunnel", "controller", False), ("agent", "ztunnel", False),
    ("waypoint", "controller", False), ("controller", "waypoint", False),
    ("controller", "ambit", False), ("agent", "grpc", True),
    ("ambit", "controller", True), ("bench", "ambit", True), ("ambit", "mesh", True),
])
def test_allowed_table(importer: str, imported: str, ok: bool) -> None:
    assert layers.allowed(importer, imported) is ok


def test_script_exit_status_and_message(tree: Path) -> None:
    ok = subprocess.run([sys.executable, str(SCRIPT), str(ROOT)], capture_output=True,
                        text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    _append(tree / "ztunnel" / "proxy.py", "\nfrom controller.ca import CertificateAuthority\n")
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tree)], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 1
    assert "ztunnel/proxy.py" in bad.stdout and "imports controller.ca" in bad.stdout
    assert "1 import(s) against the layers" in bad.stderr

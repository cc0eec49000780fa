"""mesh.files.write_atomic: the target is replaced whole, nothing is left beside it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mesh.files import write_atomic


def test_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.yaml"
    target.write_text("old\n")
    inode = target.stat().st_ino
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_ino != inode  # renamed over, not rewritten in place
    write_atomic(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.yaml"]


def test_mode_applies_to_a_new_file(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "key.pem", b"k", mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600

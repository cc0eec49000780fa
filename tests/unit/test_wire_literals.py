"""The HBONE port and the ztunnel's socket mark are defined once, in ``mesh/ports.py``: no
other module (code, comment or help text) spells them out, so a change to either cannot leave a
stale copy behind. Tests and docs may name the numbers."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LITERAL = re.compile(r"15008|0x539", re.IGNORECASE)
EXEMPT = {"mesh", "tests", "docs", ".venv", ".git"}


def test_no_wire_literal_outside_mesh() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in EXEMPT or "out" in rel.parts:
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if LITERAL.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert found == [], "use mesh.ports.HBONE_PORT / ZTUNNEL_SOCKET_MARK:\n" + "\n".join(found)

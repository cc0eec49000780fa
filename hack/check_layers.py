"""Keep the package graph one-directional: mesh (L0) <- components (L1) <- the command line (L2).

Why it exists: the components were once tangled (the ztunnel importing the controller's protos,
the controller importing the ztunnel's model and server, the controller importing the CLI's
waypoint package). The layering is what lets a newcomer read one component without the others,
and what lets a component's image leave the others out; a rule nobody checks erodes, so this
script checks every import (module level and inside functions) and names each offender:

    L2  ambit/ bench/                            may import anything
    L1  ztunnel/ controller/ agent/ waypoint/    import only mesh/ and themselves
    L0  mesh/                                    imports only itself

Third-party and standard-library imports are not ours to check. Run by ``make lint`` and by
``tests/unit/test_layers.py`` (which also shows that a sideways import fails).
Usage: ``python hack/check_layers.py [ROOT]``; exit status 1 and one line per offending import.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

LAYER = {"mesh": 0, "ztunnel": 1, "controller": 1, "agent": 1, "waypoint": 1, "ambit": 2,
         "bench": 2}
FIX = {
    0: "mesh/ is the base: move what it needs into mesh/ instead",
    1: "components never import each other: move what both need into mesh/",
}


def _imported(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, absolute module) of every import in ``tree``; relative imports stay in their
    own package and are skipped."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def allowed(importer: str, imported: str) -> bool:
    """May a module of top-level package ``importer`` import top-level package ``imported``?"""
    if imported not in LAYER or imported == importer:
        return True  # third-party, standard library, or the package itself
    mine, theirs = LAYER[importer], LAYER[imported]
    if mine == 2:
        return True
    return theirs < mine


def violations(root: Path) -> list[str]:
    """One line per sideways or upward import under ``root``, sorted."""
    found: list[str] = []
    for package in LAYER:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            try:
                tree = ast.parse(path.read_text(), filename=str(rel))
            except SyntaxError as e:
                found.append(f"{rel}:{e.lineno}: cannot parse: {e.msg}")
                continue
            for line, module in _imported(tree):
                top = module.split(".")[0]
                if not allowed(package, top):
                    found.append(
                        f"{rel}:{line}: imports {module}: {package}/ is layer L{LAYER[package]} "
                        f"and {top}/ is L{LAYER[top]}; {FIX[LAYER[package]]}")
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    found = violations(root)
    for line in found:
        print(line)
    if found:
        print(f"check_layers: {len(found)} import(s) against the layers "
              "(mesh <- ztunnel/controller/agent/waypoint <- ambit/bench); see "
              "docs/architecture.md#layers", file=sys.stderr)
        return 1
    print("check_layers: every import follows the layers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The host binary of ``ambit-cni``: where its C source is and how it is built.

Why it exists: the container runtime executes CNI plugins on the node itself, outside our
image, where the agent's Python venv does not exist (and often no Python at all). The binary
installed in ``/opt/cni/bin`` is therefore ``ambit-cni.c`` built static (``make -C
agent/cni/shim``): it forwards each invocation to the node agent, which runs
``agent.cni.plugin.handle`` in-process (``agent/cni_server.py``, the ``exec`` request), and
only answers by itself what it must: VERSION, and the failure policy when the agent cannot be
asked. The protocol and the exact behaviour are described at the top of ``ambit-cni.c``.

This module lets the tests and the dev cluster find and (re)build it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parent
SOURCE = SHIM_DIR / "ambit-cni.c"
BINARY = SHIM_DIR / "ambit-cni"


class ShimBuildError(RuntimeError):
    """The host binary cannot be built here (no compiler, no static libc, or a build error)."""


def build() -> Path:
    """Build the static binary if it is missing or older than its source; return its path."""
    missing = [tool for tool in ("make", "gcc") if shutil.which(tool) is None]
    if missing:
        raise ShimBuildError(
            f"cannot build {BINARY}: {' and '.join(missing)} not found; install gcc, make and "
            "libc6-dev (hack/setup.sh does)"
        )
    res = subprocess.run(
        ["make", "--no-print-directory", "-C", str(SHIM_DIR)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        hint = (
            " (no static libc: install libc6-dev)"
            if "cannot find -lc" in res.stderr
            else ""
        )
        raise ShimBuildError(
            f"building {BINARY} failed{hint}:\n{res.stdout}{res.stderr}".rstrip()
        )
    return BINARY

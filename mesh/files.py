"""Writing a file so that its readers see the old content or the new, never half of it.

Why it exists: several components write files another process reads while they change (the
agent's pod table, the dev mesh's state files a ztunnel hot-reloads, identity files, the
waypoint's Envoy bootstrap, the dev CNI runner's cache); each did the same temp-file-and-rename
dance. The temporary file sits beside the target (``<name>.tmp``), so the rename stays within one
filesystem and is atomic.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o666) -> None:
    """Replace ``path`` with ``data`` in one step. ``mode`` (before the umask) applies when
    the temporary file is created, e.g. 0o600 for a private key."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)

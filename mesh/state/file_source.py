"""The standalone state source: a YAML/JSON file, polled and hot-reloaded.

A change is applied only if the whole file validates; otherwise the error (naming the field)
is logged, counted, and the previous state keeps serving. Polling the mtime (plus size) is
simple and works on every filesystem, including the symlink swaps Kubernetes ConfigMaps do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from mesh.state.model import MeshConfig
from mesh.state.parse import StateError, load_state_text
from mesh.state.store import StateStore

log = logging.getLogger("mesh.state.file")


class FileSource:
    def __init__(self, path: Path, store: StateStore, interval: float = 1.0,
                 on_result: Callable[[bool, str], None] | None = None) -> None:
        self.path = path
        self.store = store
        self.interval = interval
        self._stamp: tuple[float, int] | None = None
        self._on_result = on_result
        self.last_error: str | None = None

    def _read_stamp(self) -> tuple[float, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime, st.st_size)

    def load(self) -> MeshConfig | None:
        """Load now; returns the applied config or None if the file was rejected."""
        self._stamp = self._read_stamp()
        try:
            config = load_state_text(self.path.read_text())
        except OSError as e:
            self._reject(f"cannot read {self.path}: {e.strerror}")
            return None
        except StateError as e:
            self._reject(f"{self.path}: {e}")
            return None
        self.store.replace(config)
        self.last_error = None
        log.info("applied state from %s: %d workloads, %d services, %d policies", self.path,
                 len(config.workloads), len(config.services), len(config.policies))
        if self._on_result:
            self._on_result(True, "")
        return config

    def _reject(self, message: str) -> None:
        self.last_error = message
        log.error("rejected state update, keeping the last good state: %s", message)
        if self._on_result:
            self._on_result(False, message)
        return None

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stamp = self._read_stamp()
            if stamp is not None and stamp != self._stamp:
                self.load()

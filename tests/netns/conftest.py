"""Fixtures shared by the netns tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ambit.dev import netns


@pytest.fixture(scope="module")
def bpffs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A bpffs of our own: /sys/fs/bpf is not mounted here, and `ip netns exec` remounts /sys
    (so a bpffs under it would be invisible inside the test namespaces)."""
    mnt = tmp_path_factory.mktemp("bpffs")
    netns.run(["mount", "-t", "bpf", "bpf", str(mnt)])
    try:
        yield mnt
    finally:
        try:
            netns.run(["umount", str(mnt)])
        except netns.NetnsError:
            netns.run(["umount", "-l", str(mnt)])

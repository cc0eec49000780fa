"""Every eBPF program in ebpf/*.c compiles and passes the kernel's verifier.

Why it exists: a program the verifier rejects only shows up when the agent starts on a node,
where it would silently fall back to no capture or fail the node. The files are found by glob,
so a new program cannot escape this test, and the maps each one pins must have exactly the
layout the Python side reads and writes (agent/capture/ebpf.py MAP_LAYOUTS).

Needs root (bpf(2)); no network namespace or traffic is involved. Pins go to a bpffs mounted in
a temporary directory for the test and unmounted afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.capture import ebpf
from ambit.dev import netns

pytestmark = pytest.mark.netns

SOURCES = sorted(ebpf.DEFAULT_SOURCE_DIR.glob("*.c"))


@pytest.fixture(scope="module")
def bpffs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mnt = tmp_path_factory.mktemp("bpffs")
    netns.run(["mount", "-t", "bpf", "bpf", str(mnt)])
    try:
        yield mnt
    finally:
        try:
            netns.run(["umount", str(mnt)])
        except netns.NetnsError:
            netns.run(["umount", "-l", str(mnt)])


def test_sources_are_found() -> None:
    assert {s.stem for s in SOURCES} >= set(ebpf.PROGRAMS)


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_program_loads(source: Path, bpffs: Path) -> None:
    pin_dir = bpffs / source.stem
    pin_dir.mkdir()
    prog = ebpf.load_program(source, pin_dir, ebpf.DEFAULT_SOURCE_DIR)
    try:
        assert prog.fd >= 0
        pinned = sorted(os.listdir(pin_dir))
        assert set(pinned) <= set(ebpf.MAP_LAYOUTS), f"maps unknown to Python: {pinned}"
        for name in pinned:
            ebpf.PinnedMap(pin_dir / name, ebpf.MAP_LAYOUTS[name]).close()  # checks layout
    finally:
        prog.module.cleanup()
        for name in os.listdir(pin_dir):
            (pin_dir / name).unlink()
        pin_dir.rmdir()


def test_programs_share_pinned_maps(bpffs: Path) -> None:
    """The second program reopens the first one's maps instead of creating its own."""
    pin_dir = bpffs / "shared"
    pin_dir.mkdir()
    loaded = []
    try:
        for name in ebpf.PROGRAMS:
            loaded.append(ebpf.load_program(ebpf.DEFAULT_SOURCE_DIR / f"{name}.c", pin_dir,
                                            ebpf.DEFAULT_SOURCE_DIR))  # fmt: skip
        with ebpf.PinnedMap(pin_dir / ebpf.MAP_PODS, ebpf.MAP_LAYOUTS[ebpf.MAP_PODS]) as pods:
            pods.update(ebpf.ipv4_key("10.244.1.2"), ebpf.pod_value(7))
        # Both programs' modules see the entry through their own fd of the same map.
        for prog in loaded:
            table = prog.module[ebpf.MAP_PODS.encode()]
            assert len(list(table.keys())) == 1
        assert sorted(os.listdir(pin_dir)) == sorted(ebpf.MAP_LAYOUTS)
    finally:
        for prog in loaded:
            prog.module.cleanup()
        for name in os.listdir(pin_dir):
            (pin_dir / name).unlink()
        pin_dir.rmdir()

"""Every eBPF program in ebpf/*.c compiles and passes the kernel's verifier, through the loader.

Why it exists: a program the verifier rejects only shows up when the agent starts on a node,
where it would silently fall back to no capture or fail the node. The files are found by glob,
so a new program cannot escape this test, and the maps each one pins must have exactly the
layout the Python side reads and writes (agent/capture/ebpf_maps.py MAP_LAYOUTS).

Programs are compiled and loaded the way the agent does it: by the loader process
(agent/capture/ebpf_loader.py, run by ``ebpf_programs.load_programs``), which pins them next to
the maps.
So this also proves the loader's contract: the pinned program is the one it reports, uses
exactly the pinned maps, replaces an older pin, and a compiler or verifier failure reaches
``CaptureError`` with the compiler's (verifier's) message, leaving the pins as they were.

Needs root (bpf(2)); no network namespace or traffic is involved. Pins go to a bpffs mounted in
a temporary directory for the test and unmounted afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.capture import bpf_sys, ebpf, ebpf_maps, ebpf_programs
from agent.capture.base import CaptureError

pytestmark = pytest.mark.netns

SOURCES = sorted(ebpf_programs.DEFAULT_SOURCE_DIR.glob("*.c"))


@pytest.fixture
def pin_dir(bpffs: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = bpffs / request.node.name.replace("[", "_").replace("]", "").replace(".", "_")
    path.mkdir()
    try:
        yield path
    finally:
        for name in os.listdir(path):
            (path / name).unlink()
        path.rmdir()


def _map_ids(pin_dir: Path) -> dict[str, int]:
    ids = {}
    for name in os.listdir(pin_dir):
        if name in ebpf_maps.MAP_LAYOUTS:
            layout = ebpf_maps.MAP_LAYOUTS[name]
            with bpf_sys.PinnedMap(pin_dir / name, layout) as m:  # checks layout
                ids[name] = m.id
    return ids


def test_sources_are_found() -> None:
    assert {s.stem for s in SOURCES} >= set(ebpf_programs.PROGRAMS)


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_program_loads(source: Path, pin_dir: Path) -> None:
    ids = ebpf_programs.load_programs(pin_dir, ebpf_programs.DEFAULT_SOURCE_DIR, [source.stem])
    pinned = set(os.listdir(pin_dir))
    program = ebpf_programs.program_pin(pin_dir, source.stem).name
    assert program in pinned
    assert pinned - {program} <= set(ebpf_maps.MAP_LAYOUTS), f"maps unknown to Python: {pinned}"
    prog = ebpf_programs.open_program(pin_dir, source.stem)
    try:
        info = bpf_sys.program_info(prog.fd)
        assert (prog.id, info.type, info.name) == (ids[source.stem],
                                                   bpf_sys.PROG_TYPE_SCHED_CLS, source.stem)
        # Every map the program uses is one of the pins (none private to the program).
        assert info.map_ids and set(info.map_ids) <= set(_map_ids(pin_dir).values())
    finally:
        prog.close()


def test_programs_share_pinned_maps(pin_dir: Path) -> None:
    """The second program reopens the first one's maps instead of creating its own."""
    ids = ebpf_programs.load_programs(pin_dir)
    assert sorted(os.listdir(pin_dir)) == sorted(
        [*ebpf_maps.MAP_LAYOUTS,
         *(ebpf_programs.program_pin(pin_dir, n).name for n in ebpf_programs.PROGRAMS)])
    maps = _map_ids(pin_dir)
    used = {}
    for name in ebpf_programs.PROGRAMS:
        prog = ebpf_programs.open_program(pin_dir, name)
        assert prog.id == ids[name]
        used[name] = set(bpf_sys.program_info(prog.fd).map_ids)
        prog.close()
    assert set().union(*used.values()) == set(maps.values())
    for name in (ebpf_maps.MAP_PODS, ebpf_maps.MAP_STATS, ebpf_maps.MAP_LISTENERS):
        assert all(maps[name] in u for u in used.values()), name
    # An entry written through the pin is what both programs see: it is the same map.
    with bpf_sys.PinnedMap(pin_dir / ebpf_maps.MAP_PODS,
                           ebpf_maps.MAP_LAYOUTS[ebpf_maps.MAP_PODS]) as pods:
        pods.update(ebpf_maps.ipv4_key("10.244.1.2"), ebpf_maps.pod_value(7))
        assert pods.list_keys() == [ebpf_maps.ipv4_key("10.244.1.2")]


def test_loading_again_replaces_the_program_pins(pin_dir: Path) -> None:
    first = ebpf_programs.load_programs(pin_dir)
    maps = _map_ids(pin_dir)
    second = ebpf_programs.load_programs(pin_dir)
    assert all(second[n] != first[n] for n in ebpf_programs.PROGRAMS)  # new programs...
    assert ebpf_programs.pinned_program_ids(pin_dir) == second  # ...at the same paths
    assert _map_ids(pin_dir) == maps  # the same maps, state kept
    assert not [n for n in os.listdir(pin_dir) if n.endswith(ebpf_programs.PROG_PIN_NEW_SUFFIX)]


def _broken_sources(tmp_path: Path) -> Path:
    src = tmp_path / "ebpf"
    shutil.copytree(ebpf_programs.DEFAULT_SOURCE_DIR, src)
    text = (src / "pod_ingress.c").read_text()
    at = text.index("return ", text.index("int pod_ingress("))
    (src / "pod_ingress.c").write_text(text[:at] + "ambit_oops = 1;\n\t" + text[at:])
    return src


def test_compile_error_reaches_capture_error_and_the_log(
    pin_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = ebpf_programs.load_programs(pin_dir)
    caplog.set_level(logging.ERROR, logger="agent.capture.ebpf")
    with pytest.raises(CaptureError) as raised:
        ebpf_programs.load_programs(pin_dir, _broken_sources(tmp_path))
    message = str(raised.value)
    assert "compiling" in message and "pod_ingress.c" in message
    assert "error: use of undeclared identifier 'ambit_oops'" in message
    assert "error: use of undeclared identifier 'ambit_oops'" in caplog.text
    assert ebpf_programs.pinned_program_ids(pin_dir) == good  # the running programs are untouched


def test_verifier_rejection_reaches_capture_error(pin_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "unchecked.c").write_text(
        "#include <uapi/linux/bpf.h>\n"
        "int unchecked(struct __sk_buff *skb) {\n"
        "\treturn *(int *)(long)skb->data;  /* no bounds check */\n"
        "}\n"
    )
    with pytest.raises(CaptureError, match=r"verifier.*invalid access to packet"):
        ebpf_programs.load_programs(pin_dir, tmp_path, ["unchecked"])
    assert not ebpf_programs.program_pin(pin_dir, "unchecked").exists()


def test_capture_backend_reports_the_loader_failure(bpffs: Path, tmp_path: Path) -> None:
    """The backend's load step (what ``setup`` does first) fails with the compiler's message.
    Only the load step: ``setup`` would go on to touch this namespace's routes if it passed;
    test_ebpf_capture.py runs ``setup`` with broken sources inside a node namespace."""
    cap = ebpf.EbpfCapture(bpffs / "setup-fails", [], source_dir=_broken_sources(tmp_path))
    try:
        with pytest.raises(CaptureError, match="undeclared identifier 'ambit_oops'"):
            cap._load()
    finally:
        shutil.rmtree(bpffs / "setup-fails", ignore_errors=True)

"""ztunnel.allocator.tune: after it, a byte-path-sized buffer comes from the heap, not from an
mmap of its own (which is fresh memory, page-faulting on first touch, every time); with
glibc's defaults it is mmapped. Read back through glibc's mallinfo2."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ztunnel.allocator import tune

# Run in a fresh interpreter: in this one, heap chunks freed by earlier tests (kept, since
# tune raised the trim threshold) would serve the control's buffer without any mmap.
_PROBE = """
import ctypes, ctypes.util, json
from ztunnel.allocator import tune

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2

def mmapped_by_a_buffer(size):
    before = libc.mallinfo2().hblkhd
    buf = bytes(size)
    during = libc.mallinfo2().hblkhd
    del buf
    return during - before

control = mmapped_by_a_buffer(1 << 20)  # glibc's defaults: its own mmap
tuned = tune()
print(json.dumps({"control": control, "tuned": tuned, "after": [
    mmapped_by_a_buffer(1 << 20), mmapped_by_a_buffer(4 << 20)]}))
"""


def test_byte_path_buffers_come_from_the_heap_after_tune() -> None:
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    out = json.loads(res.stdout)
    assert out["control"] >= 1 << 20, out  # without tune: mmapped, fresh memory each time
    assert out["tuned"] is True
    assert out["after"] == [0, 0], out  # 1 MiB and a full 4 MiB flush: from the heap


def test_without_glibc_there_is_nothing_to_tune(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert not tune()

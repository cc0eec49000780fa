"""ztunnel.allocator.tune: after it, a byte-path-sized buffer comes from the heap, not from an
mmap of its own (which is fresh memory, page-faulting on first touch, every time); with
glibc's small threshold it would be mmapped. Read back through glibc's mallinfo2."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest

from ztunnel.allocator import TRIM_THRESHOLD, tune


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mmapped_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)


def _mmapped_by_a_buffer(size: int) -> int:
    before = _mmapped_bytes()
    buf = bytes(size)
    during = _mmapped_bytes()
    del buf
    return during - before


def test_byte_path_buffers_come_from_the_heap_after_tune() -> None:
    try:
        assert tune(128 * 1024, TRIM_THRESHOLD)  # glibc's starting threshold: the control
        assert _mmapped_by_a_buffer(1 << 20) >= 1 << 20
        assert tune()
        assert _mmapped_by_a_buffer(1 << 20) == 0
        assert _mmapped_by_a_buffer(4 << 20) == 0  # a full flush of a connection's budget
    finally:
        tune()


def test_without_glibc_there_is_nothing_to_tune(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert not tune()

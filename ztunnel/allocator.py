"""Keep the C allocator from handing byte-path buffers back to the kernel between chunks.

Why: the data path allocates and frees buffers of 16 KiB to a few MiB thousands of times a
second (a socket read, a batch of frames, the TLS records of a batch). With glibc's defaults a
chunk above the mmap threshold (128 KiB at first) gets an mmap of its own, unmapped when freed,
and the heap is trimmed whenever its free top exceeds 128 KiB: either way the next buffer is
fresh memory, and copying into it page-faults every 4 KiB. Profiled under iperf3 (py-spy
--native, make bench), 46% of the sending ztunnel's CPU was in libc, mostly those first-touch
copies, and brk another 4%.

``tune`` raises both thresholds with ``mallopt``, once per process before the loop starts:
buffers up to ``MMAP_THRESHOLD`` come from the heap and freed ones are reused. The cost is
memory: up to ``TRIM_THRESHOLD`` of freed heap stays resident after a burst (it is counted in
RSS, and in the hostile tier's budgets). Not glibc (musl, another OS): nothing to tune.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("ztunnel.allocator")

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above the largest buffer the byte path makes (a flush is at most the connection's 4 MiB send
# budget), so none of them is mmapped.
MMAP_THRESHOLD = 8 * 1024 * 1024
# Freed heap kept for reuse: a few connections' worth of buffers in flight.
TRIM_THRESHOLD = 32 * 1024 * 1024


def tune(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set the thresholds; True if glibc took them."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
              and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1)
    if not ok:
        log.warning("mallopt refused the byte path's thresholds; buffers may page-fault")
    return ok

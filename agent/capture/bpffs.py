"""The BPF filesystem the eBPF backend pins its maps on.

Why it exists: pinned maps are what let capture outlive the agent (a restarted agent reopens
them), and pinning needs a bpffs mount. Most distributions mount one at ``/sys/fs/bpf``; some
minimal ones (and this project's CI VM) do not, so the agent mounts it when it is missing rather
than failing. Telling bpffs apart takes ``statfs(2)``'s filesystem type, which Python's
``os.statvfs`` does not return, hence the small ctypes calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from agent.capture.base import CaptureError

BPF_FS_MAGIC = 0xCAFE4A11
DEFAULT_BPFFS = Path("/sys/fs/bpf")

# struct statfs is 120 bytes on 64-bit Linux and 64 (or 84 for statfs64) on 32-bit; f_type is
# its first member on every architecture (a long, __fsword_t), so a roomy buffer and reading
# the first long is portable without spelling out the whole struct.
_STATFS_BUFFER = 256

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def fs_type(path: Path) -> int | None:
    """The filesystem magic of ``path`` (``statfs`` ``f_type``), ``None`` if it does not exist."""
    buf = ctypes.create_string_buffer(_STATFS_BUFFER)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        if err in (2, 20):  # ENOENT, ENOTDIR
            return None
        raise CaptureError(f"statfs {path}: {os.strerror(err)}")
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def is_bpffs(path: Path) -> bool:
    """Whether ``path`` exists and lives on a BPF filesystem."""
    return fs_type(path) == BPF_FS_MAGIC


def ensure_bpffs(path: Path = DEFAULT_BPFFS) -> None:
    """Make ``path`` a bpffs: nothing to do if it already is one, else mount one there.

    Mounting needs CAP_SYS_ADMIN; the error says what to do instead (mount it beforehand, for
    example with a hostPath volume of type bpffs on Kubernetes).
    """
    if is_bpffs(path):
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CaptureError(f"cannot create {path} to mount bpffs on: {e.strerror}") from None
    rc = _libc.mount(b"bpf", os.fsencode(path), b"bpf", ctypes.c_ulong(0), b"mode=0700")
    if rc != 0:
        err = ctypes.get_errno()
        raise CaptureError(
            f"cannot mount bpffs on {path}: {os.strerror(err)}; mount it yourself "
            f"(`mount -t bpf bpf {path}`) or give the agent CAP_SYS_ADMIN"
        )


def ensure_pin_dir(pin_dir: Path) -> None:
    """Make sure ``pin_dir`` is a directory on bpffs, mounting bpffs on its parent if needed.

    ``/sys/fs/bpf/ambit`` becomes: the directory created on the bpffs it is under (when
    /sys/fs/bpf already is one), else /sys/fs/bpf mounted as bpffs and the directory created in
    it.
    """
    existing = pin_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == pin_dir and not pin_dir.is_dir():
        raise CaptureError(f"{pin_dir} exists and is not a directory; choose another --bpf-dir")
    if not is_bpffs(existing):
        if existing == pin_dir:
            raise CaptureError(
                f"{pin_dir} exists but is not on a bpffs; remove it or choose another --bpf-dir"
            )
        ensure_bpffs(pin_dir.parent)
    try:
        pin_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CaptureError(f"cannot create {pin_dir} on bpffs: {e.strerror}") from None

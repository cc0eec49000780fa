"""bpf(2) on pinned objects, with ctypes: the agent's only way into its maps and programs.

Why it exists: bcc's Python ``Table`` knows no SOCKMAP and wants integer leaves for per-CPU
maps, and the long-lived agent must not load bcc at all (its clang/LLVM would stay resident;
see ``agent/capture/ebpf_loader.py``). So every map lookup, update, delete and walk, and
opening, pinning and describing pinned objects, goes through this small wrapper of the
syscall, with the map's layout checked against what the agent expects when it is opened.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.capture.base import CaptureError

_BPF_MAP_LOOKUP_ELEM = 1
_BPF_MAP_UPDATE_ELEM = 2
_BPF_MAP_DELETE_ELEM = 3
_BPF_MAP_GET_NEXT_KEY = 4
_BPF_OBJ_PIN = 6
_BPF_OBJ_GET = 7
_BPF_OBJ_GET_INFO_BY_FD = 15

PROG_TYPE_SCHED_CLS = 3

MAP_TYPE_HASH = 1
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_LPM_TRIE = 11
MAP_TYPE_SOCKMAP = 15

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}


@dataclass(frozen=True)
class MapLayout:
    type: int
    key_size: int
    value_size: int
    max_entries: int




class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjGetAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _ProgInfo(ctypes.Structure):
    """The head of ``struct bpf_prog_info`` (the kernel fills what fits in ``info_len``)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise CaptureError(f"eBPF capture does not know the bpf syscall on {platform.machine()}")
    size = ctypes.c_uint(ctypes.sizeof(attr))
    ret = int(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr), size))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


def obj_get(path: Path) -> int:
    """``BPF_OBJ_GET``: a new fd of the map or program pinned at ``path`` (raises ``OSError``)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(_BPF_OBJ_GET, _ObjGetAttr(pathname=ctypes.addressof(name)))


def obj_pin(fd: int, path: Path) -> None:
    """``BPF_OBJ_PIN``: pin the map or program ``fd`` at ``path`` on a bpffs (raises ``OSError``,
    ``EEXIST`` if something is pinned there already)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(_BPF_OBJ_PIN, _ObjGetAttr(pathname=ctypes.addressof(name), bpf_fd=fd))


@dataclass(frozen=True)
class ProgramInfo:
    """What the kernel says about a loaded program: ``id`` is unique per load, so a pin whose id
    changed holds another program; ``map_ids`` are the maps it uses."""

    type: int
    id: int
    name: str
    map_ids: tuple[int, ...]


_MAX_PROG_MAPS = 64


def program_info(fd: int) -> ProgramInfo:
    """``BPF_OBJ_GET_INFO_BY_FD`` on a program fd."""
    ids = (ctypes.c_uint32 * _MAX_PROG_MAPS)()
    info = _ProgInfo(nr_map_ids=_MAX_PROG_MAPS, map_ids=ctypes.addressof(ids))
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                            info=ctypes.addressof(info)))  # fmt: skip
    count = min(info.nr_map_ids, _MAX_PROG_MAPS)
    return ProgramInfo(info.type, info.id, info.name.decode(errors="replace"), tuple(ids[:count]))


class PinnedMap:
    """A pinned BPF map opened by path: lookup, update, delete and iterate raw bytes."""

    def __init__(self, path: Path, layout: MapLayout) -> None:
        self.path = path
        self.layout = layout
        self.ncpus = possible_cpus() if layout.type == MAP_TYPE_PERCPU_HASH else 1
        self.id = 0
        try:
            self.fd = obj_get(path)
        except OSError as e:
            raise CaptureError(f"cannot open pinned map {path}: {e.strerror}") from None
        try:
            self._check_layout()
        except BaseException:
            os.close(self.fd)
            raise

    def _check_layout(self) -> None:
        info = _MapInfo()
        attr = _InfoAttr(bpf_fd=self.fd, info_len=ctypes.sizeof(info),
                         info=ctypes.addressof(info))  # fmt: skip
        _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
        self.id = int(info.id)
        have = MapLayout(info.type, info.key_size, info.value_size, info.max_entries)
        if have != self.layout:
            raise CaptureError(
                f"pinned map {self.path} is {have}, this agent needs {self.layout}: it was "
                "left by another Ambit version; run `ambit agent uninstall` (capture stops "
                "until the agent sets it up again)"
            )

    @property
    def _value_size(self) -> int:
        if self.layout.type == MAP_TYPE_PERCPU_HASH:
            return (self.layout.value_size + 7) // 8 * 8 * self.ncpus
        return self.layout.value_size

    def _elem(self, cmd: int, key: bytes | None, value: Any = None, flags: int = 0) -> None:
        kbuf = None if key is None else ctypes.create_string_buffer(key, len(key))
        attr = _ElemAttr(map_fd=self.fd, key=_addr(kbuf), value=_addr(value), flags=flags)
        _bpf(cmd, attr)

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self._value_size)
        try:
            self._elem(_BPF_MAP_LOOKUP_ELEM, key, value)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return value.raw

    def update(self, key: bytes, value: bytes) -> None:
        self._elem(_BPF_MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, len(value)))

    def delete(self, key: bytes) -> bool:
        try:
            self._elem(_BPF_MAP_DELETE_ELEM, key)
        except OSError as e:
            # A SOCKMAP reports an empty slot as EINVAL, other maps a missing key as ENOENT.
            empty = errno.EINVAL if self.layout.type == MAP_TYPE_SOCKMAP else errno.ENOENT
            if e.errno == empty:
                return False
            raise
        return True

    def list_keys(self) -> list[bytes]:
        out: list[bytes] = []
        key: bytes | None = None
        while len(out) <= self.layout.max_entries:
            nxt = ctypes.create_string_buffer(self.layout.key_size)
            try:
                self._elem(_BPF_MAP_GET_NEXT_KEY, key, nxt)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    break
                raise
            key = nxt.raw
            out.append(key)
        # A key deleted under us (the data path adds and removes counters) makes the kernel
        # start over from the first key, so the same key can come twice.
        return list(dict.fromkeys(out))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedMap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

def parse_cpu_list(text: str) -> list[int]:
    """``/sys/devices/system/cpu/possible`` format ("0-3,5,7-8") to CPU numbers."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi if sep else lo) + 1))
    return cpus


def possible_cpus() -> int:
    """How many per-CPU copies a per-CPU map value has (possible, not online, CPUs)."""
    return len(parse_cpu_list(Path("/sys/devices/system/cpu/possible").read_text()))

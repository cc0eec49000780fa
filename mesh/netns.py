"""Entering a network namespace for a moment, from any thread: ``setns(2)`` through ctypes.

Why it exists: in the in-pod redirect mode (issue 15) the node agent reads and writes inside
each mesh pod's network namespace, and the ztunnel creates sockets there (a socket belongs to
the namespace it was created in). Python 3.11 has no ``os.setns``, and ``setns`` moves only
the calling thread, so ``entered`` moves it in for a synchronous block and back out; other
threads (and the process's other sockets) are untouched. Needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl: the type of namespace a descriptor refers to

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    """A namespace could not be entered (not a network namespace, no CAP_SYS_ADMIN, ...)."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        hint = " (needs CAP_SYS_ADMIN)" if err == errno.EPERM else ""
        raise NetnsError(err, f"setns: {os.strerror(err)}{hint}")


@contextlib.contextmanager
def entered(netns: int) -> Iterator[None]:
    """The calling thread in network namespace ``netns`` (a descriptor), then back in its own.
    Keep the block synchronous and short: socket creation, a netlink read."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(netns)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def is_netns(fd: int) -> bool:
    """``fd`` refers to a network namespace."""
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def same_netns(a: int, b: int) -> bool:
    """Two descriptors of one namespace (nsfs gives each namespace one inode)."""
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)

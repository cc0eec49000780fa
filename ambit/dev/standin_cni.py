"""A stand-in for a CNI that owns the pods' host-side veths (Cilium, Calico eBPF), for tests.

Why it exists: such CNIs attach their own direct-action tc program at ingress of every pod's
host veth, ahead of anybody else's, and it decides each packet's fate; node-level eBPF capture
on the same veth then never runs (issue 15: the reason Istio moved capture into the pod). This
attaches the smallest such program: ``r0 = TC_ACT_OK; exit`` (the packet goes on to the stack,
no later tc filter sees it), as a ``bpf`` filter at priority 1 on ``IFACE`` in the calling
process's network namespace (run it inside a dev-cluster node with ``ip netns exec``).

``python -m ambit.dev.standin_cni IFACE`` attaches it; ``--remove`` detaches it.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import struct
import sys
from collections.abc import Sequence

from pyroute2 import IPRoute, NetlinkError

_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SCHED_CLS = 3
_TC_INGRESS_PARENT = 0xFFFFFFF2
_ETH_P_ALL = 0x0003
PRIORITY = 1
HANDLE = 1
NAME = "standin_cni"


def load_pass_program() -> int:
    """A SCHED_CLS program that returns TC_ACT_OK (0); its descriptor."""
    insns = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQII16s", attr, 0, _BPF_PROG_TYPE_SCHED_CLS, 2,
                     ctypes.addressof(code), ctypes.addressof(license_), 0, 0, 0, 0, 0,
                     NAME.encode())
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, len(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}")
    return fd


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ambit.dev.standin_cni", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("iface")
    p.add_argument("--remove", action="store_true")
    args = p.parse_args(argv)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=args.iface)
        if not found:
            print(f"standin_cni: no interface {args.iface}", file=sys.stderr)
            return 1
        index = int(found[0])
        if args.remove:
            try:
                ipr.tc("del-filter", "bpf", index, HANDLE, parent=_TC_INGRESS_PARENT,
                       prio=PRIORITY, protocol=_ETH_P_ALL)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise
            return 0
        fd = load_pass_program()
        try:
            try:
                ipr.tc("add", "clsact", index)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            ipr.tc("add-filter", "bpf", index, HANDLE, parent=_TC_INGRESS_PARENT,
                   prio=PRIORITY, protocol=_ETH_P_ALL, fd=fd, name=NAME, direct_action=True)
        finally:
            os.close(fd)  # the filter holds the program
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Whether this node can run eBPF capture, checked without compiling anything.

Why it exists: ``--redirect-mode auto`` must decide quickly between eBPF and iptables and say
why it fell back, and ``--redirect-mode ebpf`` must fail with a reason the operator can act on
(an old kernel, missing capabilities, no BTF, no kernel headers, no bcc). The checks are pure
where they can be (``kernel_version``, ``missing_capabilities``); whether bcc imports is asked
of a child process, so bcc never loads into the agent.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from agent.capture import kernel_headers

# All of eBPF capture logs under the backend's name, whichever module does the work.
log = logging.getLogger("agent.capture.ebpf")

MIN_KERNEL = (5, 7)  # bpf_sk_assign at tc ingress
_BTF = Path("/sys/kernel/btf/vmlinux")
_MODULES = Path("/lib/modules")
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_BPF = 39


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a ``uname -r`` string such as ``6.1.0-18-amd64``."""
    m = re.match(r"^(\d+)\.(\d+)", release)
    if not m:
        raise ValueError(f"cannot read a kernel version from {release!r}")
    return int(m.group(1)), int(m.group(2))


def missing_capabilities(capeff: int) -> list[str]:
    """Capabilities eBPF capture needs that the effective set ``capeff`` lacks."""
    missing = []
    if not capeff & (1 << _CAP_BPF | 1 << _CAP_SYS_ADMIN):
        missing.append("CAP_BPF")
    if not capeff & (1 << _CAP_NET_ADMIN):
        missing.append("CAP_NET_ADMIN")
    return missing


def _kernel_release() -> str:
    return os.uname().release


def _effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def ebpf_unavailable_reason() -> str | None:
    """Why eBPF capture cannot work on this node, or ``None`` if it can.

    Checked without compiling anything, so ``--redirect-mode auto`` can decide quickly and say
    why it fell back to iptables.
    """
    release = _kernel_release()
    try:
        if kernel_version(release) < MIN_KERNEL:
            need = ".".join(map(str, MIN_KERNEL))
            return f"kernel {release} is older than {need} (bpf_sk_assign at tc ingress)"
    except ValueError as e:
        return str(e)
    missing = missing_capabilities(_effective_capabilities())
    if missing:
        return f"not root: missing {' and '.join(missing)}"
    if not _BTF.exists():
        return f"the kernel has no BTF ({_BTF} is missing)"
    # In the node pod the host's headers are mounted elsewhere; link them (or the image's) where
    # bcc looks. On a host that has them already this changes nothing.
    try:
        linked = kernel_headers.ensure(release, modules=_MODULES)
    except LookupError as e:
        return f"{e} (Debian: apt-get install linux-headers-{release})"
    except OSError as e:
        return f"cannot link kernel headers under {_MODULES / release}: {e}"
    if linked:
        log.info("%s", linked)
    return _bcc_unavailable_reason()


_BCC_FIX = "Debian: apt-get install python3-bpfcc"


def _bcc_unavailable_reason() -> str | None:
    """Whether bcc imports, asked of a child process: importing it here would load libbcc and
    its LLVM into the agent for good, which is what the loader process exists to avoid."""
    if importlib.util.find_spec("bcc") is None:
        return f"bcc is not installed ({_BCC_FIX})"
    try:
        proc = subprocess.run([sys.executable, "-c", "import bcc"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot check whether bcc imports: {e}"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return f"bcc is not importable ({lines[-1]}; {_BCC_FIX})"
    return None

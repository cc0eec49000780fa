"""The eBPF redirect mode: tc programs that steer enrolled pods' TCP into the ztunnel's sockets.

Why it exists: the same capture as the iptables backend (``agent/capture/base.py`` has the
contract) without netfilter: one small program at tc ingress of every pod veth
(``ebpf/pod_ingress.c``) and of the uplink (``ebpf/uplink_ingress.c``) looks up the socket a
packet belongs to and hands it over with ``bpf_sk_assign``, or gives a new connection to the
ztunnel listener for its direction (a SOCKMAP the agent fills with the ztunnel's listening
sockets). A mark plus the shared policy routing (``agent/capture/policy_routing.py``) makes the
kernel deliver it locally. Addresses are never rewritten, so the accepted socket's local
address is the original destination, as with TPROXY.

The state lives in maps pinned under ``bpf_dir`` (``ebpf/lib/maps.h``): ``pods`` (enrolled
IPv4 -> host veth ifindex), ``listeners`` (SOCKMAP, ``LISTENER_SLOTS``), ``stats`` (per-CPU
counters per pod) and ``excluded`` (LPM trie). Programs stay attached and maps pinned when the
agent exits; a new agent compiles the programs again, reopens the same maps and replaces the
programs in place (same tc priority and handle), so capture never stops for a restart.

bcc and its embedded clang/LLVM never enter this process: they would stay resident for the
agent's whole life (about 150 MB of its RSS). ``load_programs`` runs
``agent/capture/ebpf_loader.py`` in a short-lived child that compiles both programs, loads them
and pins them next to the maps (``prog_pod_ingress``, ``prog_uplink_ingress``); the agent opens
the pinned programs with ``BPF_OBJ_GET`` and attaches them.

Layers, bottom up: pure encoders (unit-tested), the ``bpf(2)`` client on pinned maps and
programs in ``agent/capture/bpf_sys.py`` (everything the agent does needs neither bcc nor a
compiler), running the loader, tc attachment with pyroute2, and ``EbpfCapture``.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from pyroute2 import IPRoute, NetlinkError

from agent.capture import bpffs, kernel_headers, policy_routing
from agent.capture.base import (
    LISTENER_INBOUND,
    LISTENER_INBOUND_PLAINTEXT,
    LISTENER_OUTBOUND,
    LISTENER_SLOTS,
    MODE_EBPF,
    BackendStatus,
    CaptureError,
    PodCapture,
    PodCounters,
)
from agent.capture.bpf_sys import (
    MAP_TYPE_HASH,
    MAP_TYPE_LPM_TRIE,
    MAP_TYPE_PERCPU_HASH,
    MAP_TYPE_SOCKMAP,
    PROG_TYPE_SCHED_CLS,
    MapLayout,
    PinnedMap,
    obj_get,
    program_info,
)
from mesh.ports import HBONE_PORT as INBOUND_HBONE_PORT
from mesh.ports import MARK_MASK, TPROXY_MARK

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

DEFAULT_BPF_DIR = Path("/sys/fs/bpf/ambit")
DEFAULT_SOURCE_DIR = Path(__file__).resolve().parents[2] / "ebpf"

POD_PROGRAM = "pod_ingress"
UPLINK_PROGRAM = "uplink_ingress"
PROGRAMS = (POD_PROGRAM, UPLINK_PROGRAM)
# Programs are pinned next to the maps as prog_<name>; a new one is pinned as prog_<name>_new
# and renamed over the old pin (bpffs names may not contain dots).
PROG_PIN_PREFIX = "prog_"
PROG_PIN_NEW_SUFFIX = "_new"

MAP_PODS = "pods"
MAP_LISTENERS = "listeners"
MAP_STATS = "stats"
MAP_EXCLUDED = "excluded"

MAX_PODS = 4096
MAX_EXCLUDED = 256
POD_ENROLLED = 0x1

# Our tc filters: one fixed priority and handle on every interface, so attaching again
# replaces the program in place (no window without capture, no stacking) and uninstall can
# tell our filters from anybody else's. The name carries the program too (`tc filter show`).
FILTER_PRIORITY = 0xA3B1
FILTER_HANDLE = 1
FILTER_NAME_PREFIX = "ambit_"
TC_INGRESS_PARENT = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS): "ingress"
_ETH_P_ALL = 0x0003

MIN_KERNEL = (5, 7)  # bpf_sk_assign at tc ingress
_BTF = Path("/sys/kernel/btf/vmlinux")
_MODULES = Path("/lib/modules")
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_BPF = 39

# --- pure encoders ----------------------------------------------------------------------------


def ipv4_key(ip: str) -> bytes:
    """A pod address as the maps key it: 4 bytes, network order (as in the IP header)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise CaptureError(f"{ip!r} is not an IP address") from None
    if addr.version != 4:
        raise CaptureError(f"{ip}: capture is IPv4 only")
    return addr.packed


def ipv4_from_key(key: bytes) -> str:
    if len(key) != 4:
        raise ValueError(f"an IPv4 map key is 4 bytes, got {len(key)}")
    return str(ipaddress.IPv4Address(key))


_POD_VALUE = struct.Struct("=II")  # struct ambit_pod: ifindex, flags (host order)
_COUNTERS = struct.Struct("=QQQ")  # struct ambit_counters: captured, passed, errors
_LPM_KEY = struct.Struct("=I4s")  # struct ambit_lpm_key: prefixlen (host order), address


def program_pin(pin_dir: Path, program: str) -> Path:
    """Where the loader pins ``program`` (and the agent opens it)."""
    return pin_dir / f"{PROG_PIN_PREFIX}{program}"


def program_pin_new(pin_dir: Path, program: str) -> Path:
    """The loader's temporary pin of a freshly loaded ``program``, renamed over the old one."""
    return pin_dir / f"{PROG_PIN_PREFIX}{program}{PROG_PIN_NEW_SUFFIX}"


def pod_value(ifindex: int, flags: int = POD_ENROLLED) -> bytes:
    return _POD_VALUE.pack(ifindex, flags)


def decode_pod_value(value: bytes) -> tuple[int, int]:
    """(ifindex, flags) of a ``pods`` map value."""
    ifindex, flags = _POD_VALUE.unpack(value)
    return ifindex, flags


def parse_exclusions(cidrs: Iterable[str]) -> tuple[ipaddress.IPv4Network, ...]:
    """Validate ``--exclude-cidr`` values: IPv4 networks, host bits zero, no duplicates."""
    nets: dict[ipaddress.IPv4Network, None] = {}
    for text in cidrs:
        try:
            net = ipaddress.ip_network(text.strip(), strict=True)
        except ValueError as e:
            raise CaptureError(f"excluded CIDR {text!r}: {e}") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise CaptureError(f"excluded CIDR {text}: capture is IPv4 only")
        nets[net] = None
    if len(nets) > MAX_EXCLUDED:
        raise CaptureError(f"{len(nets)} excluded CIDRs; at most {MAX_EXCLUDED} are supported")
    return tuple(nets)


def lpm_key(net: ipaddress.IPv4Network) -> bytes:
    return _LPM_KEY.pack(net.prefixlen, net.network_address.packed)


def lpm_network(key: bytes) -> ipaddress.IPv4Network:
    prefixlen, addr = _LPM_KEY.unpack(key)
    return ipaddress.IPv4Network((addr, prefixlen))



def sum_percpu_counters(raw: bytes, ncpus: int) -> PodCounters:
    """Add up the per-CPU copies of one ``stats`` value as returned by a lookup from user space
    (each copy padded to 8 bytes, which ``struct ambit_counters`` already is)."""
    size = _COUNTERS.size
    if len(raw) < size * ncpus:
        raise ValueError(f"per-CPU value of {len(raw)} bytes for {ncpus} CPUs")
    captured = passed = errors = 0
    for cpu in range(ncpus):
        c, p, e = _COUNTERS.unpack_from(raw, cpu * size)
        captured, passed, errors = captured + c, passed + p, errors + e
    return PodCounters(captured=captured, passed=passed, errors=errors)


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


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
_SAFE_PATH = re.compile(r'^[^"\\\n\r]+$')


def amalgamate(source: Path, include_dir: Path) -> str:
    """``source`` with its ``#include "..."`` files (resolved in ``include_dir``) pasted in.

    bcc only rewrites map accesses (``pods.lookup(&key)``) in the main file it is given, not
    in included headers, so helpers that use maps could not live in ``ebpf/lib/*.h``. Pasting
    the headers in, each once (as if every header had ``#pragma once``), keeps the sources
    ordinary C; ``#line`` directives keep compiler and verifier messages pointing at the real
    file and line. System includes (``<uapi/...>``) are left to the compiler.
    """
    seen: set[Path] = set()

    def expand(path: Path, label: str) -> list[str]:
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise CaptureError(f"eBPF source {path}: {e.strerror}") from None
        out = [f'#line 1 "{label}"']
        for number, line in enumerate(lines, 1):
            m = _INCLUDE.match(line)
            if m is None:
                out.append(line)
                continue
            target = (include_dir / m.group(1)).resolve()
            if not target.is_file():
                raise CaptureError(f'{label}:{number}: #include "{m.group(1)}" not found in '
                                   f"{include_dir}")  # fmt: skip
            if target not in seen:
                seen.add(target)
                out.extend(expand(target, m.group(1)))
            out.append(f'#line {number + 1} "{label}"')
        return out

    return "\n".join(expand(source, source.name)) + "\n"


def compile_flags(pin_dir: Path, include_dir: Path) -> list[str]:
    """The clang flags: where the headers and pins are, and the numbers shared with Python."""
    text = str(pin_dir)
    if not _SAFE_PATH.match(text) or not pin_dir.is_absolute():
        raise CaptureError(
            f"bpf dir {text!r} must be an absolute path without quotes, backslashes or newlines "
            "(it is compiled into the programs as a C string)"
        )
    return [
        f"-I{include_dir}",
        f'-DAMBIT_PIN_DIR="{text}"',
        f"-DAMBIT_TPROXY_MARK={TPROXY_MARK:#x}",
        f"-DAMBIT_MARK_MASK={MARK_MASK:#x}",
        f"-DAMBIT_INBOUND_HBONE_PORT={INBOUND_HBONE_PORT}",
        f"-DAMBIT_SLOT_OUTBOUND={LISTENER_SLOTS[LISTENER_OUTBOUND]}",
        f"-DAMBIT_SLOT_INBOUND={LISTENER_SLOTS[LISTENER_INBOUND]}",
        f"-DAMBIT_SLOT_INBOUND_PLAINTEXT={LISTENER_SLOTS[LISTENER_INBOUND_PLAINTEXT]}",
        f"-DAMBIT_MAX_PODS={MAX_PODS}",
        f"-DAMBIT_MAX_EXCLUDED={MAX_EXCLUDED}",
    ]


# What the C side declares (ebpf/lib/maps.h); checked against every pinned map before use.
MAP_LAYOUTS = {
    MAP_PODS: MapLayout(MAP_TYPE_HASH, 4, _POD_VALUE.size, MAX_PODS),
    MAP_LISTENERS: MapLayout(MAP_TYPE_SOCKMAP, 4, 8, len(LISTENER_SLOTS)),
    MAP_STATS: MapLayout(MAP_TYPE_PERCPU_HASH, 4, _COUNTERS.size, MAX_PODS),
    MAP_EXCLUDED: MapLayout(MAP_TYPE_LPM_TRIE, _LPM_KEY.size, 1, MAX_EXCLUDED),
}


# --- compiling and loading: the loader process ----------------------------------------------------

LOADER_MODULE = "agent.capture.ebpf_loader"
LOADER_TIMEOUT = 180.0  # clang takes about a second per program; a slow node, much more
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # holds `agent/`: the child runs this code

_COMPILER_ERROR = re.compile(r"(^|\s|:)(fatal )?error: ")
_VERIFIER_SUMMARY = re.compile(r"^processed \d+ insns")
_VERIFIER_NOISE = re.compile(r"^(\d+: |; |\s*$|bpf: Failed to load program)")


def compiler_messages(output: str, limit: int = 8) -> str:
    """The lines of the loader's output that say what went wrong, for ``CaptureError``.

    clang's diagnostics (``pod_ingress.c:18:9: error: ...``) when compiling failed; else the
    verifier's verdict, the lines just before its ``processed N insns`` summary (the log
    before them is the instruction trace); else the last lines.
    """
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    errors = [line.strip() for line in lines if _COMPILER_ERROR.search(line)]
    if errors:
        return "; ".join(errors[:limit])
    end = next((i for i in range(len(lines) - 1, -1, -1) if _VERIFIER_SUMMARY.match(lines[i])),
               None)  # fmt: skip
    if end is not None:
        verdict: list[str] = []
        for line in reversed(lines[:end]):
            if _VERIFIER_NOISE.match(line):
                if verdict:
                    break
                continue
            verdict.insert(0, line.strip())
        if verdict:
            return "; ".join(verdict[-limit:])
    return "; ".join(line.strip() for line in lines[-3:])


def loader_command(pin_dir: Path, source_dir: Path, programs: Sequence[str]) -> list[str]:
    argv = [sys.executable, "-m", LOADER_MODULE, "--bpf-dir", str(pin_dir),
            "--source-dir", str(source_dir)]  # fmt: skip
    for name in programs:
        argv += ["--program", name]
    return argv


def load_programs(
    pin_dir: Path,
    source_dir: Path = DEFAULT_SOURCE_DIR,
    programs: Sequence[str] = PROGRAMS,
    timeout: float = LOADER_TIMEOUT,
) -> dict[str, int]:
    """Compile, load and pin ``programs`` (``source_dir/<name>.c``, entry function ``<name>``)
    in a child process; returns the kernel id of each program now pinned at ``program_pin``.

    The child (``agent/capture/ebpf_loader.py``) is the only process that loads bcc and its
    clang/LLVM, and it exits when done, so none of that stays resident in the agent. Maps are
    opened from, or created and pinned in, ``pin_dir`` as bcc's ``BPF_TABLE_PINNED`` does. The
    old pins are replaced only once every program passed the verifier. A failure raises
    ``CaptureError`` with the compiler's or verifier's message; the child's whole output (the
    full verifier log, say) goes to this process's log.
    """
    argv = loader_command(pin_dir, source_dir, programs)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise CaptureError(f"the eBPF loader took more than {timeout:g}s; killed it") from None
    except OSError as e:
        raise CaptureError(f"cannot run the eBPF loader ({argv[0]}): {e.strerror}") from None
    output = proc.stderr.strip()
    try:
        answer = json.loads(proc.stdout)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError:
        answer = {"error": f"the eBPF loader exited with status {proc.returncode} without "
                           "an answer"}  # fmt: skip
    if proc.returncode != 0 or "error" in answer:
        log.error("eBPF loader failed (%s)%s", " ".join(programs),
                  f"; its output:\n{output}" if output else "")  # fmt: skip
        detail = compiler_messages(output)
        raise CaptureError(f"{answer.get('error', 'the eBPF loader failed')}"
                           + (f": {detail}" if detail else ""))  # fmt: skip
    if output:
        log.warning("eBPF loader output:\n%s", output)
    ids = answer.get("programs")
    if not isinstance(ids, dict) or set(ids) != set(programs):
        raise CaptureError(f"the eBPF loader answered {proc.stdout.strip()!r}")
    return {str(name): int(i) for name, i in ids.items()}


@dataclass
class LoadedProgram:
    """A pinned program opened by this process: ``fd`` is what tc attaches, ``id`` the
    kernel's id of that load (``bpftool prog show id N``, ``tc filter show`` prints it)."""

    name: str
    fd: int
    id: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_program(pin_dir: Path, name: str) -> LoadedProgram:
    """The program the loader pinned for ``name``, checked to be a tc classifier."""
    path = program_pin(pin_dir, name)
    try:
        fd = obj_get(path)
    except OSError as e:
        raise CaptureError(f"cannot open pinned program {path}: {e.strerror}") from None
    try:
        info = program_info(fd)
        if info.type != PROG_TYPE_SCHED_CLS:
            raise CaptureError(f"{path} is not a tc program (BPF type {info.type}); run "
                               "`ambit agent uninstall`")  # fmt: skip
    except BaseException:
        os.close(fd)
        raise
    return LoadedProgram(name, fd, info.id)


def pinned_program_ids(pin_dir: Path) -> dict[str, int]:
    """Kernel id of each of our programs pinned in ``pin_dir`` (missing ones left out)."""
    out: dict[str, int] = {}
    for name in PROGRAMS:
        if not program_pin(pin_dir, name).exists():
            continue
        prog = open_program(pin_dir, name)
        out[name] = prog.id
        prog.close()
    return out


# --- tc attachment (pyroute2) -------------------------------------------------------------------


def _ifindex(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _our_filter(msg: Any) -> str | None:
    """The program name if ``msg`` (a tc filter dump entry) is one of our filters."""
    if msg["handle"] != FILTER_HANDLE or msg["info"] >> 16 != FILTER_PRIORITY:
        return None
    if msg.get_attr("TCA_KIND") != "bpf":
        return None
    options = msg.get_attr("TCA_OPTIONS")
    name = options.get_attr("TCA_BPF_NAME") if options is not None else None
    if not isinstance(name, str) or not name.startswith(FILTER_NAME_PREFIX):
        return None
    return name.removeprefix(FILTER_NAME_PREFIX)


def _filters(ipr: Any, index: int) -> list[str]:
    return [
        name
        for msg in ipr.get_filters(index=index, parent=TC_INGRESS_PARENT)
        if (name := _our_filter(msg)) is not None
    ]


def attach(ipr: Any, ifname: str, program: LoadedProgram) -> None:
    """Put ``program`` at tc ingress of ``ifname``, replacing ours if there is one."""
    index = _ifindex(ipr, ifname)
    if index is None:
        raise CaptureError(f"interface {ifname} does not exist in this network namespace")
    try:
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        ipr.tc(
            "replace-filter", "bpf", index, FILTER_HANDLE, parent=TC_INGRESS_PARENT,
            prio=FILTER_PRIORITY, protocol=_ETH_P_ALL, fd=program.fd,
            name=FILTER_NAME_PREFIX + program.name, direct_action=True,
        )  # fmt: skip
    except NetlinkError as e:
        raise CaptureError(f"attaching {program.name} to {ifname} (tc ingress): {e}") from None


def detach(ipr: Any, index: int) -> bool:
    """Remove our filter from interface ``index``; False if it had none."""
    if not _filters(ipr, index):
        return False
    try:
        ipr.tc(
            "del-filter", "bpf", index, FILTER_HANDLE, parent=TC_INGRESS_PARENT,
            prio=FILTER_PRIORITY, protocol=_ETH_P_ALL,
        )  # fmt: skip
    except NetlinkError as e:
        if e.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False  # gone meanwhile
        raise CaptureError(f"detaching from interface #{index}: {e}") from None
    return True


def attached() -> dict[str, str]:
    """Interfaces of this network namespace that carry one of our programs: name -> program."""
    out: dict[str, str] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            names = _filters(ipr, int(link["index"]))
            if names:
                out[str(link.get_attr("IFLA_IFNAME"))] = names[0]
    return out


# --- availability -------------------------------------------------------------------------------


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


# --- the backend --------------------------------------------------------------------------------


def _kernel_errors(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """Report a failed bpf(2) or netlink call as ``CaptureError`` naming the operation, the
    error type the agent handles, instead of a bare ``OSError``."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(*args, **kwargs)
        except (OSError, NetlinkError) as e:
            raise CaptureError(f"eBPF capture, {method.__name__}: {e}") from e

    return wrapper


def _listener_slot(name: str) -> int:
    try:
        return LISTENER_SLOTS[name]
    except KeyError:
        known = ", ".join(LISTENER_SLOTS)
        raise CaptureError(f"unknown ztunnel listener {name!r} (known: {known})") from None


class EbpfCapture:
    """``CaptureBackend`` with tc programs, ``bpf_sk_assign`` and pinned maps.

    Runs inside the node's network namespace (the agent's), like every netlink call here.
    ``uplinks`` are the interfaces other nodes' traffic arrives on; ``exclude_cidrs`` are
    destinations enrolled pods reach directly; ``source_dir`` holds the C sources.
    """

    mode = MODE_EBPF

    def __init__(
        self,
        bpf_dir: Path,
        uplinks: Sequence[str],
        exclude_cidrs: Sequence[str] = (),
        source_dir: Path = DEFAULT_SOURCE_DIR,
    ) -> None:
        self.bpf_dir = Path(bpf_dir)
        self.uplinks = tuple(dict.fromkeys(uplinks))
        self.exclusions = parse_exclusions(exclude_cidrs)
        self.source_dir = Path(source_dir)
        compile_flags(self.bpf_dir, self.source_dir)  # reject an unusable bpf_dir early
        self._programs: dict[str, LoadedProgram] = {}
        # Methods are called from a thread pool; the program and map fds are not for sharing.
        self._lock = threading.RLock()

    # -- maps ------------------------------------------------------------------------------

    def _map(self, name: str) -> PinnedMap:
        return PinnedMap(self.bpf_dir / name, MAP_LAYOUTS[name])

    def _maybe_map(self, name: str) -> PinnedMap | None:
        """The pinned map, or ``None`` if nothing was ever set up (reading needs no compiler)."""
        if not (self.bpf_dir / name).exists():
            return None
        return self._map(name)

    def _check_pins(self) -> None:
        for name in MAP_LAYOUTS:
            if (self.bpf_dir / name).exists():
                self._map(name).close()  # raises on a layout from another version

    # -- programs --------------------------------------------------------------------------

    def _load(self) -> dict[str, LoadedProgram]:
        """Compile, load and pin both programs once per instance (in the loader process, clang
        takes about a second each), then open the pins for attaching."""
        if len(self._programs) == len(PROGRAMS):
            return self._programs
        bpffs.ensure_pin_dir(self.bpf_dir)
        self._check_pins()
        ids = load_programs(self.bpf_dir, self.source_dir, PROGRAMS)
        self._check_pins()  # bcc created what was missing: the C and Python layouts must agree
        self._close_programs()
        for name in PROGRAMS:
            prog = open_program(self.bpf_dir, name)
            self._programs[name] = prog
            if prog.id != ids[name]:
                self._close_programs()
                raise CaptureError(
                    f"{program_pin(self.bpf_dir, name)} was replaced while this agent loaded it "
                    "(is another agent using this --bpf-dir?)"
                )
        return self._programs

    def _close_programs(self) -> None:
        for prog in self._programs.values():
            prog.close()
        self._programs.clear()

    def _attach(self, ifname: str, program: str) -> None:
        if not ifname:
            raise CaptureError("no host interface given for the pod")
        loaded = self._load()[program]
        with IPRoute() as ipr:
            attach(ipr, ifname, loaded)

    def _reattach(self) -> None:
        """Put the programs just loaded on every interface that carries one of ours, in place
        (same priority and handle), so none keeps running a predecessor's program, including
        pods this agent has not heard of (yet)."""
        programs = self._load()
        with IPRoute() as ipr:
            for link in ipr.get_links():
                found = _filters(ipr, int(link["index"]))
                if found and found[0] in programs:
                    attach(ipr, str(link.get_attr("IFLA_IFNAME")), programs[found[0]])

    # -- CaptureBackend --------------------------------------------------------------------

    @_kernel_errors
    def setup(self) -> None:
        with self._lock:
            self._load()
            self._reattach()
            for uplink in self.uplinks:
                self._attach(uplink, UPLINK_PROGRAM)
            policy_routing.ensure_policy_routing()
            self._write_exclusions()

    def _write_exclusions(self) -> None:
        want = {lpm_key(net) for net in self.exclusions}
        with self._map(MAP_EXCLUDED) as excluded:
            # Add before removing, so a CIDR kept across a restart never has a gap.
            for key in want:
                excluded.update(key, b"\x01")
            for key in excluded.list_keys():
                if key not in want:
                    excluded.delete(key)

    @_kernel_errors
    def watch_interface(self, pod: PodCapture) -> None:
        with self._lock:
            self._attach(pod.host_iface, POD_PROGRAM)

    @_kernel_errors
    def enroll(self, pod: PodCapture) -> None:
        with self._lock:
            # Program first, then the map entry: the pod is captured from its first SYN on.
            self._attach(pod.host_iface, POD_PROGRAM)
            try:
                ifindex = socket.if_nametoindex(pod.host_iface)
            except OSError:
                raise CaptureError(f"pod {pod.uid}: interface {pod.host_iface} is gone") from None
            with self._map(MAP_PODS) as pods:
                for ip in pod.ips:
                    try:
                        pods.update(ipv4_key(ip), pod_value(ifindex))
                    except OSError as e:
                        if e.errno == errno.E2BIG:
                            raise CaptureError(
                                f"pod {pod.uid}: {MAX_PODS} pods are enrolled already, the "
                                "most the pods map holds"
                            ) from None
                        raise CaptureError(f"pod {pod.uid}: enrolling {ip}: {e}") from None

    @_kernel_errors
    def unenroll(self, pod: PodCapture) -> None:
        with self._lock:
            pods = self._maybe_map(MAP_PODS)
            if pods is None:
                return
            with pods:
                for ip in pod.ips:
                    pods.delete(ipv4_key(ip))

    @_kernel_errors
    def forget_interface(self, pod: PodCapture) -> None:
        with self._lock:
            if pod.host_iface:
                with IPRoute() as ipr:
                    index = _ifindex(ipr, pod.host_iface)
                    if index is not None:
                        detach(ipr, index)
            # The pod is gone: its counters go too, or a pod reusing the address inherits them.
            stats = self._maybe_map(MAP_STATS)
            if stats is not None:
                with stats:
                    for ip in pod.ips:
                        stats.delete(ipv4_key(ip))

    @_kernel_errors
    def enrolled(self) -> set[str]:
        with self._lock:
            pods = self._maybe_map(MAP_PODS)
            if pods is None:
                return set()
            with pods:
                return {ipv4_from_key(key) for key in pods.list_keys()}

    @_kernel_errors
    def set_listeners(self, fds: Mapping[str, int]) -> None:
        """Fill the SOCKMAP slots; a listener missing from ``fds`` has its slot emptied, so
        its connections fail closed instead of reaching a stale socket."""
        slots = {_listener_slot(name): fd for name, fd in fds.items()}
        with self._lock:
            self._load()
            with self._map(MAP_LISTENERS) as listeners:
                for name, slot in LISTENER_SLOTS.items():
                    key = struct.pack("=I", slot)
                    if slot not in slots:
                        listeners.delete(key)
                        continue
                    try:
                        listeners.update(key, struct.pack("=Q", slots[slot]))
                    except OSError as e:
                        raise CaptureError(
                            f"ztunnel listener {name} (fd {slots[slot]}): the kernel refused it "
                            f"for the SOCKMAP: {e.strerror} (it must be a listening TCP socket "
                            "in this network namespace)"
                        ) from None

    @_kernel_errors
    def listener_cookies(self) -> dict[str, int | None]:
        """Socket cookie in each listener slot, ``None`` where the slot is empty."""
        with self._lock:
            out: dict[str, int | None] = dict.fromkeys(LISTENER_SLOTS)
            listeners = self._maybe_map(MAP_LISTENERS)
            if listeners is None:
                return out
            with listeners:
                for name, slot in LISTENER_SLOTS.items():
                    raw = listeners.lookup(struct.pack("=I", slot))
                    out[name] = None if raw is None else struct.unpack("=Q", raw)[0]
            return out

    @_kernel_errors
    def counters(self) -> dict[str, PodCounters]:
        with self._lock:
            stats = self._maybe_map(MAP_STATS)
            if stats is None:
                return {}
            out: dict[str, PodCounters] = {}
            with stats:
                for key in stats.list_keys():
                    raw = stats.lookup(key)
                    if raw is not None:
                        out[ipv4_from_key(key)] = sum_percpu_counters(raw, stats.ncpus)
            return out

    @_kernel_errors
    def status(self) -> BackendStatus:
        with self._lock:
            cookies = self.listener_cookies()
            ifaces = attached()
            detail = {
                "bpf_dir": str(self.bpf_dir),
                "pinned": "yes" if (self.bpf_dir / MAP_PODS).exists() else "no",
                "programs": ", ".join(f"{name} (id {prog_id})" for name, prog_id
                                      in pinned_program_ids(self.bpf_dir).items()) or "none",
                "uplinks": ", ".join(self.uplinks) or "none",
                "attached": ", ".join(f"{i} ({p})" for i, p in sorted(ifaces.items())) or "none",
                "enrolled": str(len(self.enrolled())),
                "listeners": ", ".join(
                    f"{name}={'ready' if cookie is not None else 'missing'}"
                    for name, cookie in cookies.items()
                ),
                "excluded": ", ".join(map(str, self.exclusions)) or "none",
            }
            return BackendStatus(self.mode, detail)

    @_kernel_errors
    def uninstall(self) -> None:
        """Detach our filters from every interface, remove the policy routing and every pin.

        Needs neither bcc nor a compiler, so it also cleans up after a node lost them.
        Filters of other tools, and the clsact qdiscs (possibly shared), are left alone.
        Programs are freed by the kernel once detached and unpinned.
        """
        with self._lock:
            with IPRoute() as ipr:
                for link in ipr.get_links():
                    detach(ipr, int(link["index"]))
            policy_routing.remove_policy_routing()
            self._close_programs()
            self._unpin()

    def _unpin(self) -> None:
        """Remove ``bpf_dir`` with everything in it (it is ours), unless it is a mount point
        such as /sys/fs/bpf itself: then only our maps and programs go, other tools' pins
        stay."""
        try:
            if not self.bpf_dir.exists():
                return
            if not os.path.ismount(self.bpf_dir):
                shutil.rmtree(self.bpf_dir)
                return
            for name in MAP_LAYOUTS:
                (self.bpf_dir / name).unlink(missing_ok=True)
            for name in PROGRAMS:
                program_pin(self.bpf_dir, name).unlink(missing_ok=True)
                program_pin_new(self.bpf_dir, name).unlink(missing_ok=True)
        except OSError as e:
            raise CaptureError(f"removing pinned objects in {self.bpf_dir}: {e.strerror}") \
                from None


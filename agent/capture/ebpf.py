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
agent's whole life (about 150 MB of its RSS). ``load_programs`` (``ebpf_programs.py``) runs
``agent/capture/ebpf_loader.py`` in a short-lived child that compiles both programs, loads them
and pins them next to the maps (``prog_pod_ingress``, ``prog_uplink_ingress``); the agent opens
the pinned programs with ``BPF_OBJ_GET`` and attaches them.

Modules, bottom up, all in ``agent/capture/``: the ``bpf(2)`` client on pinned maps and
programs (``bpf_sys.py``; everything the agent does needs neither bcc nor a compiler), the
maps' names, layouts and pure encoders (``ebpf_maps.py``), the programs' sources, pins, loader
driver and opening (``ebpf_programs.py``), tc attachment with pyroute2 (``tc.py``), the node
checks behind ``--redirect-mode auto`` (``ebpf_support.py``), and here ``EbpfCapture``, the
backend that drives them.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

from pyroute2 import IPRoute, NetlinkError

from agent.capture import bpffs, policy_routing, tc
from agent.capture.base import (
    LISTENER_SLOTS,
    MODE_EBPF,
    BackendStatus,
    CaptureError,
    PodCapture,
    PodCounters,
)
from agent.capture.bpf_sys import PinnedMap
from agent.capture.ebpf_maps import (
    MAP_EXCLUDED,
    MAP_LAYOUTS,
    MAP_LISTENERS,
    MAP_PODS,
    MAP_STATS,
    MAX_PODS,
    ipv4_from_key,
    ipv4_key,
    lpm_key,
    parse_exclusions,
    pod_value,
    sum_percpu_counters,
)
from agent.capture.ebpf_programs import (
    DEFAULT_SOURCE_DIR,
    POD_PROGRAM,
    PROGRAMS,
    UPLINK_PROGRAM,
    LoadedProgram,
    compile_flags,
    load_programs,
    open_program,
    pinned_program_ids,
    program_pin,
    program_pin_new,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")


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
            tc.attach(ipr, ifname, loaded)

    def _reattach(self) -> None:
        """Put the programs just loaded on every interface that carries one of ours, in place
        (same priority and handle), so none keeps running a predecessor's program, including
        pods this agent has not heard of (yet)."""
        programs = self._load()
        with IPRoute() as ipr:
            for link in ipr.get_links():
                found = tc.our_filters(ipr, int(link["index"]))
                if found and found[0] in programs:
                    tc.attach(ipr, str(link.get_attr("IFLA_IFNAME")), programs[found[0]])

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
                    index = tc.ifindex(ipr, pod.host_iface)
                    if index is not None:
                        tc.detach(ipr, index)
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
            ifaces = tc.attached()
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
            ahead = tc.preempted()
            if ahead:
                detail["preempted"] = (
                    "another tc filter runs before ours, so capture may never see these "
                    "pods' packets (a CNI that owns the host veths? --redirect-mode inpod is "
                    "not affected): " + "; ".join(f"{i}: {w}" for i, w in sorted(ahead.items())))
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
                    tc.detach(ipr, int(link["index"]))
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


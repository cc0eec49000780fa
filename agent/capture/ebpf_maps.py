"""The pinned maps of eBPF capture: their names, sizes and layouts, and the bytes of their keys and
values.

Why it exists: the C programs (``ebpf/lib/maps.h``) and the agent meet only through bytes in
pinned maps, so every encoding lives here, pure and unit-tested (``tests/unit/test_ebpf_pure.py``):
a byte-order slip would make capture silently miss pods. ``MAP_LAYOUTS`` is what
``PinnedMap`` (``agent/capture/bpf_sys.py``) checks every pinned map against before use.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

from agent.capture.base import LISTENER_SLOTS, CaptureError, PodCounters
from agent.capture.bpf_sys import (
    MAP_TYPE_HASH,
    MAP_TYPE_LPM_TRIE,
    MAP_TYPE_PERCPU_HASH,
    MAP_TYPE_SOCKMAP,
    MapLayout,
)

MAP_PODS = "pods"
MAP_LISTENERS = "listeners"
MAP_STATS = "stats"
MAP_EXCLUDED = "excluded"

MAX_PODS = 4096
MAX_EXCLUDED = 256
POD_ENROLLED = 0x1

_POD_VALUE = struct.Struct("=II")  # struct ambit_pod: ifindex, flags (host order)
_COUNTERS = struct.Struct("=QQQ")  # struct ambit_counters: captured, passed, errors
_LPM_KEY = struct.Struct("=I4s")  # struct ambit_lpm_key: prefixlen (host order), address

# What the C side declares (ebpf/lib/maps.h); checked against every pinned map before use.
MAP_LAYOUTS = {
    MAP_PODS: MapLayout(MAP_TYPE_HASH, 4, _POD_VALUE.size, MAX_PODS),
    MAP_LISTENERS: MapLayout(MAP_TYPE_SOCKMAP, 4, 8, len(LISTENER_SLOTS)),
    MAP_STATS: MapLayout(MAP_TYPE_PERCPU_HASH, 4, _COUNTERS.size, MAX_PODS),
    MAP_EXCLUDED: MapLayout(MAP_TYPE_LPM_TRIE, _LPM_KEY.size, 1, MAX_EXCLUDED),
}


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

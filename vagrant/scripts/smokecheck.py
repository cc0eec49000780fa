#!/usr/bin/env python3
"""The smoke test's verdicts on what it collected: node agents' pod lists, Prometheus metrics
and packet captures.

Why a Python file and not more shell: reading a pcap (Ethernet, VXLAN, IPv4, TCP) and
Prometheus' text format with grep and awk is fragile, and a verdict that is wrong in silence is
worse than none. This file runs on cp1 with Debian's python3 and the standard library only,
and its parsers are unit-tested on our machines (tests/unit/test_vagrant.py), where the rest of
the Vagrant flow cannot run.

Every subcommand prints ``PASS <title>`` or ``FAIL <title>`` lines (details indented below a
FAIL) and exits 1 if any check failed:

* ``captured``: every named pod is in some node agent's ``/debug/pods`` document (as such,
  or as ``ambit status --json`` shows them) with ``captured: true``;
* ``metric``: the samples of one metric whose labels match add up to at least a number;
* ``wire``: what crossed the wire between the nodes: the marker string of the smoke test's
  requests appears in no packet (no plaintext), the sample pods' TCP traffic is HBONE only
  (``mesh.ports.HBONE_PORT``), there is HBONE traffic at all, and every HBONE connection whose
  start was captured opens with a TLS handshake record.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import re
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.ports import HBONE_PORT  # AMBIT_SRC on PYTHONPATH (smoke-test.sh)

# Linux's VXLAN port (flannel's default) and IANA's.
VXLAN_PORTS = (8472, 4789)
# Link types: Ethernet, Linux cooked capture v1 and v2 (tcpdump -i any).
LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_VLAN = (0x8100, 0x88A8)
TCP_SYN = 0x02
TCP_ACK = 0x10
# TLS record: content type handshake (22), then major version 3.
TLS_HANDSHAKE_PREFIX = b"\x16\x03"
MAX_EXAMPLES = 5


class CheckError(Exception):
    """Input that cannot be checked (an unreadable file, a bad format): exit status 2."""


# --- Prometheus text format ----------------------------------------------------------------

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_metrics(text: str) -> list[Sample]:
    """Samples of Prometheus' text exposition format (comments and blank lines skipped)."""
    samples: list[Sample] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _SAMPLE.match(line.strip())
        if m is None:
            raise CheckError(f"line {number}: not a metric sample: {line[:120]!r}")
        labels: dict[str, str] = {}
        body = (m.group(2) or "{}")[1:-1]
        pos = 0
        while pos < len(body):
            lm = _LABEL.match(body, pos)
            if lm is None:
                raise CheckError(f"line {number}: bad labels: {line[:120]!r}")
            labels[lm.group(1)] = _unescape(lm.group(2))
            pos = lm.end()
        try:
            value = float(m.group(3))
        except ValueError:
            raise CheckError(f"line {number}: bad value {m.group(3)!r}") from None
        samples.append(Sample(m.group(1), labels, value))
    return samples


def metric_sum(samples: Iterable[Sample], name: str, labels: dict[str, str]) \
        -> tuple[float, int]:
    """The sum of the samples named ``name`` carrying all of ``labels``, and how many."""
    total, count = 0.0, 0
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()) \
                and not math.isnan(s.value):
            total += s.value
            count += 1
    return total, count


# --- packets ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """One TCP segment, from the outer packet or from inside a VXLAN packet."""

    src: str
    dst: str
    sport: int
    dport: int
    flags: int
    seq: int
    payload: bytes
    encapsulated: bool

    @property
    def flow(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """The connection, the same for both directions."""
        a, b = (self.src, self.sport), (self.dst, self.dport)
        return (a, b) if a <= b else (b, a)

    def __str__(self) -> str:
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport}"


@dataclass(frozen=True)
class Frame:
    raw: bytes
    segments: tuple[Segment, ...]


_MAGIC = {
    b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",  # microseconds
    b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">",  # nanoseconds
}


def read_pcap(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(link type, frame) of each record of a classic pcap file (tcpdump -w). A record cut
    short at the end (a capture stopped mid-write) ends the file."""
    if len(data) < 24:
        raise CheckError("not a pcap file: shorter than its header")
    endian = _MAGIC.get(data[:4])
    if endian is None:
        raise CheckError(f"not a classic pcap file (magic {data[:4].hex()}); pcapng is not "
                         "read, capture with tcpdump -w")
    (linktype,) = struct.unpack_from(endian + "I", data, 20)
    linktype &= 0x0FFFFFFF  # the upper bits may carry FCS information
    pos = 24
    while pos + 16 <= len(data):
        _sec, _frac, incl_len, _orig_len = struct.unpack_from(endian + "IIII", data, pos)
        pos += 16
        if pos + incl_len > len(data):
            return
        yield linktype, data[pos:pos + incl_len]
        pos += incl_len


def _ipv4_segments(packet: bytes, encapsulated: bool, vxlan_ports: Sequence[int],
                   depth: int) -> list[Segment]:
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return []
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    frag = struct.unpack_from("!H", packet, 6)[0] & 0x1FFF
    proto = packet[9]
    src = str(ipaddress.IPv4Address(packet[12:16]))
    dst = str(ipaddress.IPv4Address(packet[16:20]))
    body = packet[ihl:total] if ihl <= total <= len(packet) else packet[ihl:]
    if frag:
        return []  # not the first fragment: no transport header
    if proto == 6 and len(body) >= 20:
        sport, dport, seq = struct.unpack_from("!HHI", body, 0)
        offset = (body[12] >> 4) * 4
        flags = body[13]
        return [Segment(src, dst, sport, dport, flags, seq, bytes(body[offset:]),
                        encapsulated)]
    if proto == 17 and len(body) >= 8 and depth == 0:
        sport, dport = struct.unpack_from("!HH", body, 0)
        if (dport in vxlan_ports or sport in vxlan_ports) and len(body) >= 16 \
                and body[8] & 0x08:
            return _ethernet_segments(body[16:], True, vxlan_ports, depth + 1)
    return []


def _ethernet_segments(frame: bytes, encapsulated: bool, vxlan_ports: Sequence[int],
                       depth: int) -> list[Segment]:
    if len(frame) < 14:
        return []
    pos = 12
    (ethertype,) = struct.unpack_from("!H", frame, pos)
    while ethertype in ETHERTYPE_VLAN and len(frame) >= pos + 6:
        pos += 4
        (ethertype,) = struct.unpack_from("!H", frame, pos)
    if ethertype != ETHERTYPE_IPV4:
        return []
    return _ipv4_segments(frame[pos + 2:], encapsulated, vxlan_ports, depth)


def decode(linktype: int, frame: bytes, vxlan_ports: Sequence[int] = VXLAN_PORTS) -> Frame:
    """The TCP segments in one captured frame, VXLAN decapsulated."""
    if linktype == LINKTYPE_ETHERNET:
        segments = _ethernet_segments(frame, False, vxlan_ports, 0)
    elif linktype == LINKTYPE_LINUX_SLL and len(frame) >= 16:
        proto = struct.unpack_from("!H", frame, 14)[0]
        segments = _ipv4_segments(frame[16:], False, vxlan_ports, 0) \
            if proto == ETHERTYPE_IPV4 else []
    elif linktype == LINKTYPE_LINUX_SLL2 and len(frame) >= 20:
        proto = struct.unpack_from("!H", frame, 0)[0]
        segments = _ipv4_segments(frame[20:], False, vxlan_ports, 0) \
            if proto == ETHERTYPE_IPV4 else []
    else:
        raise CheckError(f"link type {linktype} is not read (Ethernet, Linux cooked v1/v2)")
    return Frame(frame, tuple(segments))


@dataclass
class Check:
    title: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def wire_checks(frames: Sequence[Frame], marker: bytes, app_ips: Iterable[str],
                hbone_port: int = HBONE_PORT) -> list[Check]:
    """The verdicts on a capture between nodes (see the module docstring)."""
    if not marker:
        raise CheckError("an empty marker would match every packet")
    apps = set(app_ips)
    segments = [s for f in frames for s in f.segments]

    plaintext = Check(f"no plaintext: the requests' marker is in none of {len(frames)} "
                      "captured packets")
    hits = sum(marker in f.raw for f in frames)
    # A marker split between two segments: look in each direction's bytes, in order.
    streams: dict[tuple[str, int, str, int], bytearray] = {}
    for s in segments:
        streams.setdefault((s.src, s.sport, s.dst, s.dport), bytearray()).extend(s.payload)
    split = [k for k, data in streams.items() if marker in data]
    if hits:
        plaintext.problems.append(f"{hits} packet(s) carry the marker in clear text")
    for k in split[:MAX_EXAMPLES]:
        plaintext.problems.append(f"in the stream {k[0]}:{k[1]} -> {k[2]}:{k[3]}")

    hbone_flows = {s.flow for s in segments if hbone_port in (s.sport, s.dport)}
    hbone = Check(f"HBONE between the nodes: {len(hbone_flows)} connection(s) on port "
                  f"{hbone_port}")
    if not hbone_flows:
        hbone.problems.append(f"no TCP traffic on port {hbone_port} in the capture: did the "
                              "requests cross nodes, and was the capture on the interface "
                              "that carries pod traffic?")

    only = Check(f"the sample pods' TCP traffic between the nodes is HBONE only "
                 f"({', '.join(sorted(apps)) or 'no pod IPs given'})")
    stray = [s for s in segments if (s.src in apps or s.dst in apps)
             and hbone_port not in (s.sport, s.dport)]
    if stray:
        only.problems.append(f"{len(stray)} segment(s) to or from the sample pods on other "
                             "ports, e.g.:")
        seen: list[str] = []
        for s in stray:
            if str(s) not in seen:
                seen.append(str(s))
        only.problems.extend(f"  {s}" for s in seen[:MAX_EXAMPLES])

    tls = Check(f"HBONE connections start with a TLS handshake (port {hbone_port})")
    started = {s.flow for s in segments
               if hbone_port in (s.sport, s.dport) and s.flags & TCP_SYN}
    checked = 0
    for flow in sorted(started):
        for direction in ("to", "from"):
            first = next((s for s in segments if s.flow == flow and s.payload
                          and (s.dport == hbone_port) == (direction == "to")), None)
            if first is None:
                continue
            checked += 1
            if not first.payload.startswith(TLS_HANDSHAKE_PREFIX):
                tls.problems.append(f"{first}: first bytes {first.payload[:8].hex()} are not "
                                    "a TLS handshake record")
    if checked == 0:
        tls.notes.append("no HBONE connection started during the capture (the ztunnels "
                         "reuse pooled connections); nothing to check here")
    return [plaintext, hbone, only, tls]


# --- the agents' pod lists -------------------------------------------------------------------

def captured_checks(statuses: Iterable[dict[str, Any]], pods: Iterable[str]) -> list[Check]:
    """One check per pod ("namespace/name"): some agent lists it as captured."""
    seen: dict[str, dict[str, Any]] = {}
    for doc in statuses:
        for entry in doc.get("pods") or []:
            if isinstance(entry, dict) and isinstance(entry.get("pod"), str):
                seen[entry["pod"]] = {**entry, "node": doc.get("node")}
    out = []
    for pod in pods:
        c = Check(f"{pod} is captured")
        entry = seen.get(pod)
        if entry is None:
            c.problems.append("no node agent lists this pod (is the CNI chained? "
                              "kubectl -n ambit-system logs ds/ambit-node -c agent)")
        elif entry.get("captured") is not True:
            c.problems.append(f"agent on {entry.get('node')}: captured={entry.get('captured')}, "
                              f"shouldCapture={entry.get('shouldCapture')}, "
                              f"reason: {entry.get('reason') or '-'}")
        else:
            c.title += f" (on {entry.get('node')})"
        out.append(c)
    return out


def agent_documents(status: Any) -> list[dict[str, Any]]:
    """The node agents' ``/debug/pods`` documents inside ``ambit status --json`` output
    (``nodes.pods[].agent``; null for an agent that did not answer)."""
    nodes = status.get("nodes") if isinstance(status, dict) else None
    rows = nodes.get("pods") if isinstance(nodes, dict) else None
    if not isinstance(rows, list):
        raise CheckError("not `ambit status --json` output (no nodes.pods)")
    return [r["agent"] for r in rows if isinstance(r, dict) and isinstance(r.get("agent"), dict)]


# --- command line ----------------------------------------------------------------------------

def report(checks: Iterable[Check]) -> int:
    failed = 0
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.title}")
        for line in [*c.problems, *c.notes]:
            print(f"      {line}")
        failed += not c.ok
    return 1 if failed else 0


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CheckError(f"{path}: {e.strerror}") from None


def _json(path: str) -> Any:
    try:
        return json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise CheckError(f"{path}: not JSON ({e})") from None


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("captured", help="pods listed as captured by the node agents")
    p.add_argument("--status", action="append", default=[], metavar="FILE",
                   help="an agent's /debug/pods JSON (repeat for every node)")
    p.add_argument("--ambit-status", action="append", default=[], metavar="FILE",
                   help="`ambit status --json` output: the agents' documents it holds")
    p.add_argument("pods", nargs="+", metavar="NAMESPACE/NAME")

    p = sub.add_parser("metric", help="a metric's matching samples add up to at least N")
    p.add_argument("--file", action="append", required=True, metavar="FILE",
                   help="Prometheus text (repeat to add up several endpoints)")
    p.add_argument("--before", action="append", default=[], metavar="FILE",
                   help="the same endpoints scraped earlier: count only what happened since")
    p.add_argument("--name", required=True)
    p.add_argument("--label", action="append", type=_label, default=[], metavar="NAME=VALUE")
    p.add_argument("--at-least", type=float, default=1.0)
    p.add_argument("--title", required=True)

    p = sub.add_parser("wire", help="what crossed the wire between the nodes")
    p.add_argument("--pcap", action="append", required=True, metavar="FILE")
    p.add_argument("--marker", required=True)
    p.add_argument("--app-ip", action="append", default=[], metavar="IP",
                   help="a sample pod's IP: its TCP traffic must be HBONE only")
    p.add_argument("--hbone-port", type=int, default=HBONE_PORT)

    args = parser.parse_args(argv)
    try:
        if args.command == "captured":
            docs = [_json(path) for path in args.status]
            for path in args.ambit_status:
                docs.extend(agent_documents(_json(path)))
            if not docs:
                raise CheckError("no agent documents: give --status or --ambit-status")
            return report(captured_checks(docs, args.pods))
        if args.command == "metric":
            samples = [s for path in args.file
                       for s in parse_metrics(_read(path).decode("utf-8", "replace"))]
            earlier = [s for path in args.before
                       for s in parse_metrics(_read(path).decode("utf-8", "replace"))]
            labels = dict(args.label)
            total, count = metric_sum(samples, args.name, labels)
            total -= metric_sum(earlier, args.name, labels)[0]
            since = " since the first scrape" if args.before else ""
            c = Check(f"{args.title} ({args.name} +{total:g}{since})" if args.before
                      else f"{args.title} ({args.name} = {total:g})")
            if total < args.at_least:
                wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
                c.problems.append(f"expected at least {args.at_least:g}{since} in {count} "
                                  f"matching series of {args.name}{{{wanted}}}")
                similar = sorted({json.dumps(s.labels, sort_keys=True) for s in samples
                                  if s.name == args.name})
                c.problems.extend(f"seen: {line}" for line in similar[:MAX_EXAMPLES])
            return report([c])
        frames: list[Frame] = []
        for path in args.pcap:
            frames.extend(decode(lt, frame) for lt, frame in read_pcap(_read(path)))
        return report(wire_checks(frames, args.marker.encode(), args.app_ip, args.hbone_port))
    except CheckError as e:
        print(f"FAIL  smokecheck {args.command}: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The node agent's eBPF capture, run in one benchmark node namespace (``ambit-ebpf`` setup).

Why it exists: issue 14 asks for the eBPF capture path in ``make bench`` beside iptables, and in
eBPF mode the path is different end to end: tc programs on the pod's host veth and on the
node's uplink steer packets into the ztunnel's listeners with ``bpf_sk_assign`` instead of
TPROXY rules and policy routing. The real agent needs a controller and CNI to learn its pods;
the benchmark has neither, so this script does the agent's capture part with the agent's own
code and nothing else: ``EbpfCapture`` (the programs and pinned maps the agent loads), the pod
enrolled as CNI ADD would, and ``ZtunnelLinkServer`` (the unix socket on which the real ztunnel,
started with ``--agent-socket``, hands over its listeners for the SOCKMAP).

Run inside the node namespace (``ip netns exec``):
``python -m bench.ebpf_node --bpf-dir D --socket S --pod NAME=IP=IFACE --ready F``.
Writes ``F`` (JSON) once the programs are attached and the pod is enrolled, then serves the
link until SIGTERM. The node namespace's tc programs go with the namespace; the pinned maps
live in the bpffs that ``bench/mesh.py`` mounted and unmounts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.capture.base import CaptureError, PodCapture
from agent.capture.ebpf import EbpfCapture
from agent.capture.ebpf_programs import DEFAULT_SOURCE_DIR
from bench.link_node import serving_link, write_json


def _pod(spec: str) -> PodCapture:
    try:
        name, ip, iface = spec.split("=")
    except ValueError:
        raise SystemExit(f"--pod {spec!r}: expected NAME=IP=IFACE") from None
    return PodCapture(f"bench/{name}", (ip,), iface)


async def _serve(cap: EbpfCapture, socket_path: Path, registered: Path) -> None:
    async def on_listeners(fds: Mapping[str, int], pid: int) -> None:
        # As the agent does: the link server owns these descriptors (it keeps them for the
        # next ztunnel, agent/ztunnel_link.py), so they are not ours to close.
        cap.set_listeners(fds)
        write_json(registered, {"pid": pid, "listeners": sorted(fds)})

    async with serving_link(socket_path, on_listeners) as (_link, stop):
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ebpf_node", description=__doc__)
    ap.add_argument("--bpf-dir", type=Path, required=True, help="pinned maps (on a bpffs)")
    ap.add_argument("--uplink", default="eth0")
    ap.add_argument("--socket", type=Path, required=True, help="the ztunnel link socket")
    ap.add_argument("--pod", action="append", default=[], help="NAME=IP=IFACE to enroll")
    ap.add_argument("--ready", type=Path, required=True)
    args = ap.parse_args(argv)
    cap = EbpfCapture(args.bpf_dir, [args.uplink], (), DEFAULT_SOURCE_DIR)
    try:
        cap.setup()
        for spec in args.pod:
            cap.enroll(_pod(spec))
    except CaptureError as e:
        print(f"eBPF capture failed: {e}", file=sys.stderr, flush=True)
        return 3
    write_json(args.ready, {"enrolled": sorted(cap.enrolled()),
                             "status": dict(cap.status().detail)})
    asyncio.run(_serve(cap, args.socket, args.ready.with_suffix(".registered")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

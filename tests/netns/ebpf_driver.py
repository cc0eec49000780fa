"""The eBPF capture backend driven inside one node namespace, for tests/netns/test_ebpf_capture.py.

Why it exists: ``EbpfCapture`` acts on the network namespace of the process that calls it (as
the agent does in the node's), and the test process must stay in the root namespace. So the
test runs this script in a node namespace, in one of these roles:

* ``agent``: the node agent's part. Builds ``EbpfCapture``, records what the pinned maps held
  before it touched them (what a restarted agent reads back), runs ``setup()`` (which compiles
  and loads the programs in the loader process), watches every pod interface given and enrolls
  some; reports whether bcc ever entered this process and its resident memory. A failed
  ``setup()`` prints ``SETUP FAILED: <CaptureError>`` and exits 3. With ``--listen`` it also
  plays the ztunnel's part: it opens the transparent listeners (0.0.0.0:15001/15006/15008),
  hands them to ``set_listeners`` and passes them to a ``relay`` child, then closes its own
  copies. The relay therefore outlives the agent, as the ztunnel outlives an agent restart,
  and stopping the relay empties the listener slots, as a ztunnel crash would. Writes READY
  (JSON) when done, then idles until killed.
* ``relay``: the ztunnel stand-in (``tproxy_relay.py``'s handler): logs each accepted
  connection (listener port, original destination = the accepted socket's address, peer) and
  relays it to the original destination with the ztunnel's socket mark.
* ``inspect``: prints the backend's view (``enrolled()``, ``counters()``, ``status()``) as JSON,
  read from the pinned maps by a fresh instance, without compiling anything.
* ``uninstall``: ``EbpfCapture.uninstall()``.
* ``client``: holds one TCP connection open and sends each line read from stdin on it, printing
  the echo server's answer, to show that a connection survives an agent restart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for `agent`

import tproxy_relay  # this script's directory, sys.path[0]

from agent.capture.base import (
    LISTENER_INBOUND,
    LISTENER_INBOUND_PLAINTEXT,
    LISTENER_OUTBOUND,
    CaptureError,
    PodCapture,
)
from agent.capture.ebpf import EbpfCapture
from agent.capture.ebpf_programs import DEFAULT_SOURCE_DIR
from mesh.ports import HBONE_PORT as INBOUND_HBONE_PORT
from mesh.ports import INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT

LISTENERS = {
    LISTENER_OUTBOUND: OUTBOUND_PORT,
    LISTENER_INBOUND: INBOUND_HBONE_PORT,
    LISTENER_INBOUND_PLAINTEXT: INBOUND_PLAINTEXT_PORT,
}


def _backend(args: argparse.Namespace) -> EbpfCapture:
    source_dir = Path(getattr(args, "source_dir", None) or DEFAULT_SOURCE_DIR)
    return EbpfCapture(Path(args.bpf_dir), args.uplink, args.exclude, source_dir)


def _memory() -> dict[str, object]:
    """What of bcc is in this process (nothing, it stays in the loader) and its RSS."""
    maps = Path("/proc/self/maps").read_text()
    status = Path("/proc/self/status").read_text()
    rss_kb = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:"))
    return {
        "bcc_imported": sorted(m for m in sys.modules if m == "bcc" or m.startswith("bcc.")),
        "libbcc_mapped": "libbcc" in maps,
        "llvm_mapped": "libLLVM" in maps or "libclang" in maps,
        "rss_bytes": rss_kb * 1024,
    }


def _pods(specs: list[str]) -> dict[str, PodCapture]:
    """NAME=IP=IFACE arguments."""
    pods = {}
    for spec in specs:
        name, ip, iface = spec.split("=")
        pods[name] = PodCapture(f"default/{name}", (ip,), iface)
    return pods


def _listen(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_IP, tproxy_relay.IP_TRANSPARENT, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    return s


def agent(args: argparse.Namespace) -> int:
    started = time.monotonic()
    cap = _backend(args)
    before = sorted(cap.enrolled())
    try:
        cap.setup()
    except CaptureError as e:
        print(f"SETUP FAILED: {e}", flush=True)
        return 3
    pods = _pods(args.pod)
    for pod in pods.values():
        cap.watch_interface(pod)
    for name in args.enroll:
        cap.enroll(pods[name])
    relay_pid = None
    if args.listen:
        socks = {name: _listen(port) for name, port in LISTENERS.items()}
        cap.set_listeners({name: s.fileno() for name, s in socks.items()})
        fds = [s.fileno() for s in socks.values()]
        relay = subprocess.Popen(
            [sys.executable, __file__, "relay", args.log, *(f"{s.getsockname()[1]}:{s.fileno()}"
                                                            for s in socks.values())],
            pass_fds=fds,
        )
        relay_pid = relay.pid
        for s in socks.values():
            s.close()  # the relay holds them now; the SOCKMAP keeps following the sockets
    ready = {
        "enrolled_before": before,
        "enrolled": sorted(cap.enrolled()),
        "relay_pid": relay_pid,
        "status": dict(cap.status().detail),
        "seconds": round(time.monotonic() - started, 2),
        **_memory(),
    }
    tmp = Path(args.ready + ".tmp")
    tmp.write_text(json.dumps(ready))
    tmp.replace(args.ready)
    while True:
        time.sleep(3600)


async def _relay(log: Path, listeners: list[tuple[int, int]]) -> None:
    servers = []
    for port, fd in listeners:
        sock = socket.socket(fileno=fd)

        async def handler(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port
        ) -> None:
            await tproxy_relay._handle(port, log, r, w)

        servers.append(await asyncio.start_server(handler, sock=sock))
    await asyncio.Event().wait()


def relay(args: argparse.Namespace) -> int:
    listeners = [(int(p), int(fd)) for p, fd in (spec.split(":") for spec in args.listener)]
    asyncio.run(_relay(Path(args.log), listeners))
    return 0


def inspect(args: argparse.Namespace) -> int:
    cap = _backend(args)
    counters = {ip: vars(c) for ip, c in cap.counters().items()}
    print(json.dumps({
        "enrolled": sorted(cap.enrolled()),
        "counters": counters,
        "listeners": cap.listener_cookies(),
        "status": dict(cap.status().detail),
    }))  # fmt: skip
    return 0


def uninstall(args: argparse.Namespace) -> int:
    _backend(args).uninstall()
    return 0


def client(args: argparse.Namespace) -> int:
    with socket.create_connection((args.host, args.port), timeout=5) as s:
        f = s.makefile("rwb")
        for line in sys.stdin:
            f.write(line.encode())
            f.flush()
            answer = f.readline()
            print(answer.decode().strip() or "closed", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("agent", "inspect", "uninstall"):
        s = sub.add_parser(name)
        s.add_argument("--bpf-dir", required=True)
        s.add_argument("--uplink", action="append", default=[])
        s.add_argument("--exclude", action="append", default=[])
    a = sub.choices["agent"]
    a.add_argument("--pod", action="append", default=[], help="NAME=IP=IFACE, watched")
    a.add_argument("--enroll", action="append", default=[], help="NAME of a --pod to enroll")
    a.add_argument("--listen", action="store_true", help="open the listeners, start a relay")
    a.add_argument("--log", default=os.devnull)
    a.add_argument("--source-dir", help="the C sources (default: the repo's ebpf/)")
    a.add_argument("--ready", required=True)
    r = sub.add_parser("relay")
    r.add_argument("log")
    r.add_argument("listener", nargs="+", help="PORT:FD of an inherited listening socket")
    c = sub.add_parser("client")
    c.add_argument("host")
    c.add_argument("port", type=int)
    args = p.parse_args()
    handlers = {"agent": agent, "relay": relay, "inspect": inspect, "uninstall": uninstall,
                "client": client}  # fmt: skip
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

"""The node agent's in-pod redirection, run for one benchmark node (``ambit-inpod`` setup).

Why it exists: issue 15 asks for the ``inpod`` redirect mode in ``make bench``, and its path
differs from both node-level modes: the redirect rules are inside each pod's network namespace
(nat REDIRECT to 127.0.0.1:15001 outbound, to 15006 inbound, the HBONE port left to the HBONE
listener), and the ztunnel serves that pod's listeners inside the pod's namespace, opening its
own connections from there. The real agent needs a controller and CNI to learn its pods; the
benchmark has neither, so this script does the agent's in-pod part with the agent's own code
and nothing else, in the agent's order (``Agent._hand_netns`` then ``backend.enroll``):

* ``ZtunnelLinkServer`` (the unix socket on which the real ztunnel, started with
  ``--agent-socket``, registers);
* per pod: ``InpodCapture.netns_path`` (the pod's namespace; the bench's pods are ``ip netns``
  namespaces, so their path is ``/run/netns/<name>``, as a CNI's netns path would be), a
  descriptor of it handed to the ztunnel with ``ZtunnelLinkServer.hand_pod`` (``pod_netns``
  over SCM_RIGHTS; it returns once the ztunnel serves the pod's listeners in there), and only
  then ``InpodCapture.enroll`` (the rules inside the pod, so nothing is redirected to a
  listener that does not exist yet).

Run inside the node namespace (``ip netns exec``):
``python -m bench.inpod_node --socket S --pod UID=IP=NETNS_PATH --ready F``.
Writes ``F.listening`` once the link socket accepts, ``F`` (JSON) once every pod is handed over
and enrolled, then serves the link until SIGTERM. The rules live in the pods' namespaces and go
with them when the bench deletes them; nothing is added to the node's namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.capture.base import CaptureError, PodCapture
from agent.capture.inpod import InpodCapture
from agent.ztunnel_link import LinkUnavailable, ZtunnelLinkServer
from bench.link_node import serving_link, write_json

# How long a pod's hand-off may take, the wait for the ztunnel to start and register included
# (the bench starts the ztunnels after this driver listens).
HANDOFF_SECONDS = 60.0


def _pod(spec: str) -> PodCapture:
    try:
        uid, ip, netns = spec.split("=")
    except ValueError:
        raise SystemExit(f"--pod {spec!r}: expected UID=IP=NETNS_PATH") from None
    # No host interface: this mode adds nothing on the host side of the veth.
    return PodCapture(uid, (ip,), "", netns)


async def _enroll(cap: InpodCapture, link: ZtunnelLinkServer, pod: PodCapture) -> None:
    """One pod as the agent enrolls it in this mode: hand its namespace over, then redirect."""
    loop = asyncio.get_running_loop()
    # The agent runs kernel work off its event loop (nsenter, setns): so does this.
    path = await loop.run_in_executor(None, cap.netns_path, pod)
    netns = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    await link.hand_pod(pod.uid, pod.ips, netns, HANDOFF_SECONDS)  # takes netns
    await loop.run_in_executor(None, cap.watch_interface, pod)
    await loop.run_in_executor(None, cap.enroll, pod)


async def _run(pods: Sequence[PodCapture], socket_path: Path, ready: Path) -> int:
    cap = InpodCapture()
    cap.setup()  # nothing on the node, as in the agent; called so the order is the agent's

    async def on_listeners(fds: Mapping[str, int], pid: int) -> None:
        # The node-level listeners: the link server holds them (for a restarted ztunnel); the
        # backend has nothing to do with them in this mode.
        cap.set_listeners(fds)

    async with serving_link(socket_path, on_listeners) as (link, stop):
        ready.with_suffix(".listening").write_text(str(os.getpid()))
        try:
            for pod in pods:
                await _enroll(cap, link, pod)
        except (CaptureError, LinkUnavailable, OSError) as e:
            print(f"in-pod enrolment failed: {e}", file=sys.stderr, flush=True)
            return 3
        listeners = {uid: sorted({n for n, _ in rec.listeners})
                     for uid, rec in link.pods.items()}
        write_json(ready, {"enrolled": sorted(cap.enrolled()), "ztunnel": link.ztunnel_pid,
                           "listeners": listeners, "status": dict(cap.status().detail)})
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.inpod_node", description=__doc__)
    ap.add_argument("--socket", type=Path, required=True, help="the ztunnel link socket")
    ap.add_argument("--pod", action="append", default=[], help="UID=IP=NETNS_PATH to enroll")
    ap.add_argument("--ready", type=Path, required=True)
    args = ap.parse_args(argv)
    return asyncio.run(_run([_pod(s) for s in args.pod], args.socket, args.ready))


if __name__ == "__main__":
    sys.exit(main())

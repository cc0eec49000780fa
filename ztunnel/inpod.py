"""In-pod redirection (issue 15): the ztunnel's sockets inside each pod's network namespace.

Why it exists: with node-level capture the ztunnel's connections leave from the node, so a
server sees the node's address instead of its client's, and passthrough traffic carries the
node's identity past IP allowlists. In ``inpod`` redirect mode the node agent installs the
redirection inside each mesh pod's network namespace (``agent/capture/inpod.py``: outbound TCP
REDIRECTed to 127.0.0.1:15001, inbound to 15006, the HBONE port left to its listener, the
ztunnel's own marked sockets exempt) and hands the ztunnel that namespace (a descriptor over
the link, ``ztunnel/agent_link.py`` ``pod_netns``). The ztunnel then

* opens the pod's listeners inside it (``InpodPods.add``: 15001 on 127.0.0.1, 15006 and the
  HBONE port on every address, SO_REUSEPORT so a restarted ztunnel joins them), or serves the very
  sockets a previous ztunnel had there, which the agent kept (a restart);
* creates the pod's outgoing sockets inside it (HBONE to other nodes, passthrough), so they
  leave with the pod's IP (``socket_in``);
* connects to a local pod's application from inside that pod's namespace with the original
  client's address as source (IP_TRANSPARENT; the agent's connmark rule routes the replies
  back to the ztunnel's socket), so the application, its logs and NetworkPolicy see the real
  client.

A socket belongs to the network namespace it was created in; ``entered`` moves the calling
thread (the event loop's, for microseconds: nothing else runs meanwhile) into the pod's
namespace for the ``socket()`` call and back (``mesh.netns``: ``setns(2)`` through ctypes).
That needs CAP_SYS_ADMIN, which the DaemonSet's ztunnel gets for this mode.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

from mesh.listener import Listener, bind_socket
from mesh.netns import entered
from mesh.ports import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from mesh.state.model import IPAddress

log = logging.getLogger("ztunnel.inpod")

SO_ORIGINAL_DST = 80  # netfilter: the destination before REDIRECT (linux/netfilter_ipv4.h)
IP_TRANSPARENT = 19

# Where each listener listens inside a pod: the agent's rules REDIRECT there (outbound to
# 127.0.0.1, inbound to the pod's address), HBONE is dialled directly.
POD_LISTENERS: dict[str, tuple[str, int]] = {
    "outbound": ("127.0.0.1", OUTBOUND_PORT),
    "inbound_plaintext": ("0.0.0.0", INBOUND_PLAINTEXT_PORT),
    "inbound": ("0.0.0.0", HBONE_PORT),
}


def socket_in(netns: int, family: int) -> socket.socket:
    """A TCP socket that belongs to network namespace ``netns``."""
    with entered(netns):
        return socket.socket(family, socket.SOCK_STREAM)


def original_dst(sock: socket.socket) -> tuple[IPAddress, int]:
    """Where a REDIRECTed connection was going (SO_ORIGINAL_DST; IPv4, as capture is)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, ip = struct.unpack("!2xH4s8x", raw)
    return ipaddress.ip_address(ip), port


def listener_port_problem(name: str, sock: socket.socket) -> str | None:
    """Why ``sock`` (handed over by the agent for a pod) is not that pod's ``name`` listener."""
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        port = sock.getsockname()[1]
    except OSError as e:
        return f"{name}: {e}"
    if not listening or sock.type != socket.SOCK_STREAM:
        return f"{name}: not a listening TCP socket"
    if port != POD_LISTENERS[name][1]:
        return f"{name}: on port {port}, not {POD_LISTENERS[name][1]}"
    return None


@dataclass
class InpodPod:
    """A pod whose namespace the agent handed over: its descriptor (owned here), its
    addresses, and the listener sockets served inside it (name -> the group's members)."""

    uid: str
    ips: tuple[IPAddress, ...]
    netns: int
    sockets: dict[str, list[socket.socket]] = field(default_factory=dict)
    listeners: list[Listener] = field(default_factory=list)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        for socks in self.sockets.values():
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()
        self.sockets = {}
        with contextlib.suppress(OSError):
            os.close(self.netns)


def open_pod_listeners(netns: int) -> dict[str, list[socket.socket]]:
    """The pod's three listeners inside its namespace (SO_REUSEPORT, so a ztunnel that does
    not get the agent's copies, after an agent restart say, can still join them)."""
    out: dict[str, list[socket.socket]] = {}
    try:
        with entered(netns):
            for name, (host, port) in POD_LISTENERS.items():
                out[name] = [bind_socket(host, port, reuseport=True)]
    except Exception:
        for socks in out.values():
            for s in socks:
                s.close()
        raise
    return out


class InpodPods:
    """The pods handed over, by uid and by address (``ProxyContext.inpod`` reads the latter:
    a connection to one of these addresses is made from inside its namespace)."""

    def __init__(self) -> None:
        self.by_uid: dict[str, InpodPod] = {}
        self.by_ip: dict[IPAddress, InpodPod] = {}

    def put(self, pod: InpodPod) -> None:
        self.remove(pod.uid)
        self.by_uid[pod.uid] = pod
        for ip in pod.ips:
            self.by_ip[ip] = pod

    def remove(self, uid: str) -> bool:
        pod = self.by_uid.pop(uid, None)
        if pod is None:
            return False
        for ip in pod.ips:
            if self.by_ip.get(ip) is pod:
                del self.by_ip[ip]
        pod.close()
        return True

    def close(self) -> None:
        for uid in list(self.by_uid):
            self.remove(uid)

"""The node agent: enrolls the node's pods into capture and keeps that true.

Why it exists: capture is the half of the mesh that makes it sidecarless, and it must be right
for every pod on the node at all times: pods started after the agent (``ambit-cni`` reports
them at CNI ADD, before their containers run), pods that predate it, namespaces enabled later
and pods opting out (the registry's state push), and its own restarts (the kernel keeps
capture; the agent re-reads it). The decisions are in ``agent/reconcile.py`` (pure); this
module is the thin asyncio shell around them, in uvicorn's startup/serve/shutdown shape.

Kernel work (the eBPF loader process, bpf(2), netlink, iptables) is blocking and must not
interleave, so every backend call goes through one worker thread, in order.

In Kubernetes the agent also keeps ``ambit-cni`` installed and chained (``ChainWatcher``),
re-resolves ``--uplink auto`` on every resync, and on SIGTERM asks whether its DaemonSet is
being deleted (``agent.k8s_owner``): only then does it remove the chain, the binary and
capture from the node; otherwise everything stays for the next agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from agent import uplinks
from agent.capture.base import MODE_INPOD, CaptureBackend, CaptureError, PodCapture
from agent.cni.installer import ChainWatcher
from agent.cni_server import CniRequest, CniServer
from agent.config import AgentConfig
from agent.discover import host_iface_for, iface_exists
from agent.k8s_owner import OwnerWatch
from agent.membership import Answer, MembershipClient, MembershipUnavailable
from agent.node_endpoint import NodeEndpoint
from agent.node_metrics import NodeMetrics
from agent.pods import LocalPod, PodTable
from agent.reconcile import MAX_TOMBSTONES, MeshPod, adoption, desired, plan, prune
from agent.ztunnel_link import LinkUnavailable, ZtunnelLinkServer
from mesh import __version__
from mesh.state.model import Protocol
from mesh.state.store import StateSnapshot, StateStore
from mesh.unix import allowed_uids

log = logging.getLogger("agent")
T = TypeVar("T")

# A busy node gets a state push per pod added or removed, and each wakes a reconcile pass:
# passes woken by pushes are spaced at least this far apart (seconds), so a burst of pod
# changes costs a bounded number of passes, and they plan on the agent's own record of what it
# captured (kept exact by every ADD, DEL and pass) instead of reading the kernel's capture back
# (O(pods): an iptables-save, or every key of the pods map); the kernel is read back by the
# periodic resync (``resync_interval``). CNI ADD and DEL never wait for a pass.
RECONCILE_SPACING = 0.5
# The capture backend's status (``ambit agent status``; eBPF lists every interface's filters)
# is read again by a pass at most this often (seconds), or when the ztunnel relinked.
STATUS_INTERVAL = 5.0


def _ipv4_only(ips: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for ip in ips:
        try:
            if ipaddress.ip_address(ip).version == 4:
                out.append(ip)
        except ValueError:
            continue
    return tuple(out)


def _missing_ifaces(ifaces: Mapping[str, str]) -> set[str]:
    """The keys of ``ifaces`` whose interface does not exist right now (one kernel-thread hop
    for all pods of a pass, not one per pod)."""
    return {uid for uid, name in ifaces.items() if not iface_exists(name)}


class Agent:
    """``initial_uplinks``: the resolved ``--uplink`` names the backend was built with; ``cni``
    keeps the plugin chained; ``owner`` and ``remove_install`` decide and do the removal from
    the node at SIGTERM (``remove_install`` returns what it removed, one line each)."""

    def __init__(self, config: AgentConfig, backend: CaptureBackend, mode_reason: str, *,
                 initial_uplinks: Sequence[str] | None = None,
                 cni: ChainWatcher | None = None,
                 owner: OwnerWatch | None = None,
                 remove_install: Callable[[], list[str]] | None = None) -> None:
        self.config = config
        self.backend = backend
        self.mode_reason = mode_reason
        self.uplinks = tuple(initial_uplinks if initial_uplinks is not None else
                             (u for u in config.uplinks if u != uplinks.AUTO))
        self.cni_watcher = cni
        self.owner = owner
        self.remove_install = remove_install
        self.table = PodTable(config.pods_file)
        self.store = StateStore()
        self.metrics = NodeMetrics(config.node, __version__, backend.mode,
                                   counters=backend.counters, pod_name=self._pod_name,
                                   components=self._components)
        self._kernel_pool = ThreadPoolExecutor(1, thread_name_prefix="capture")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._enrolled: set[str] = set()
        # CNI DEL and a reconcile pass never interleave: a pass plans on the table as it was
        # when it started and must not re-enroll a pod deleted while it awaited the kernel.
        self._pods_lock = asyncio.Lock()
        self.pods_gone = 0  # pods found without their interface (an expected event)
        self.setup_done = False
        self._backend_status: dict[str, str] = {}
        self._status_at = -STATUS_INTERVAL  # monotonic time of the last backend status read
        self._last_pass = -RECONCILE_SPACING
        self._kernel_read_at = -config.resync_interval  # last full read of the capture
        self.last_reconcile = 0.0
        self.last_error = ""
        self.membership: MembershipClient | None = None
        self.source: Any = None
        uids = allowed_uids(config.socket_uids)
        self.cni = CniServer(config.cni_socket, self.handle_cni, uids=uids)
        self.link = ZtunnelLinkServer(config.ztunnel_socket, self._on_listeners, uids=uids,
                                      peer_check=config.ztunnel_peer_check,
                                      hold_seconds=config.listener_hold)
        # container id -> pod uid of the pods handed to the ztunnel at ADD (for DEL, which
        # may come without the pod's name).
        self._added_uids: dict[str, str] = {}
        self.endpoint = NodeEndpoint(self.metrics, config.metrics_host, config.metrics_port,
                                     config.ztunnel_metrics_url, self.ready, self.status)

    # -- helpers ---------------------------------------------------------------------------

    async def _kernel(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._kernel_pool, functools.partial(fn, *args))

    def _pod_name(self, ip: str) -> tuple[str, str] | None:
        pod = self.table.by_ip(ip)
        if pod is None:
            return None
        ns, _, name = pod.uid.partition("/")
        return ns, name

    def _components(self) -> Mapping[str, int | None]:
        return {"agent": os.getpid(), "ztunnel": self.link.ztunnel_pid}

    async def _refresh_enrolled(self) -> None:
        """Re-read what the kernel captures (for status and the pod gauges); O(pods), so
        reconcile passes do it, not CNI ADD and DEL (``_note_capture``)."""
        self._enrolled = await self._kernel(self.backend.enrolled)
        self.metrics.set_pods(len(self._enrolled), len(self.table.pods))

    def _note_capture(self, ips: tuple[str, ...], captured: bool) -> None:
        """What one CNI ADD or DEL just did to capture, without reading the kernel back."""
        if captured:
            self._enrolled.update(ips)
        else:
            self._enrolled.difference_update(ips)
        self.metrics.set_pods(len(self._enrolled), len(self.table.pods))

    def _mesh(self) -> dict[str, MeshPod]:
        """IPv4 address -> the mesh pod of this node the state push gives it. An address two
        workloads claim (a deleted pod the push still lists and the pod that reuses its IP)
        is left out: it belongs to neither until the state settles, and the local pod's own
        CNI ADD decides meanwhile."""
        if not self.store.ready:
            return {}
        claims: dict[str, list[MeshPod]] = {}
        for w in self.store.current.local_workloads(self.config.node):
            for ip in w.addresses:
                if ip.version == 4:
                    claims.setdefault(str(ip), []).append(
                        MeshPod(w.uid, w.protocol is Protocol.HBONE))
        return {ip: pods[0] for ip, pods in claims.items() if len({p.uid for p in pods}) == 1}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        import grpc

        from mesh.state.controller_source import ControllerSource

        await self._kernel(self.backend.setup)
        self.setup_done = True
        self.table.load()
        adopt = getattr(self.backend, "adopt", None)
        if adopt is not None:
            await self._kernel(adopt, {u: p.capture() for u, p in self.table.pods.items()})
        for pod in list(self.table.pods.values()):
            try:
                await self._kernel(self.backend.watch_interface, pod.capture())
            except CaptureError as e:
                log.warning("pod %s: %s; forgetting it (CNI DEL missed?)", pod.uid, e)
                self.table.remove(pod.uid)
        self._enrolled = await self._kernel(self.backend.enrolled)
        if self.inpod:
            # Their rules stayed in them: the ztunnel gets their namespaces when it links.
            for pod in self.table.pods.values():
                if set(pod.ips) & self._enrolled:
                    with contextlib.suppress(OSError, CaptureError):
                        self.link.remember_pod(pod.uid, pod.ips, await self._open_netns(pod))
        root = self.config.ca_root_cert
        creds = (None if root is None
                 else grpc.ssl_channel_credentials(root_certificates=root.read_bytes()))
        self.membership = MembershipClient(self.config.controller_address, self.config.node,
                                           self.config.node_token_file, creds,
                                           self.config.membership_timeout)
        self.source = ControllerSource(
            self.config.controller_address, self.config.node, self.store, credentials=creds,
            token_file=self.config.node_token_file,
            on_connected=self.metrics.set_registry_connected)
        self.metrics.set_registry_connected(False)
        self.store.subscribe(self._on_state)
        await self.link.start()
        await self.cni.start()
        await self.endpoint.start()
        self._tasks += [asyncio.create_task(self.source.run()),
                        asyncio.create_task(self._reconcile_loop())]
        if self.cni_watcher is not None:
            self._tasks.append(asyncio.create_task(self.cni_watcher.run()))
        if self.owner is not None:
            self._tasks.append(asyncio.create_task(self.owner.learn()))
        log.info("agent for node %s started: redirect mode %s (%s); uplinks %s; CNI socket %s; "
                 "node metrics on %s:%d", self.config.node, self.backend.mode, self.mode_reason,
                 ", ".join(self.uplinks) or "none", self.config.cni_socket,
                 self.config.metrics_host, self.endpoint.port)

    async def shutdown(self) -> None:
        """Stop serving; capture stays in the kernel (that is what `ambit agent uninstall` is
        for), so traffic keeps flowing through the ztunnel while the agent restarts."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.cni.close()
        await self.link.close()
        await self.endpoint.close()
        if self.membership is not None:
            await self.membership.close()
        self._kernel_pool.shutdown(wait=True)
        log.info("agent stopped; capture left in place")

    async def removal_wanted(self) -> bool:
        """At SIGTERM: is Ambit being removed from the node (its DaemonSet deleted)?"""
        if self.owner is None or self.remove_install is None:
            return False
        try:
            return (await self.owner.decide_at_exit()).remove
        except Exception as e:  # never remove on doubt
            log.error("on SIGTERM: could not decide whether Ambit is being removed (%s: %s); "
                      "leaving everything in place", type(e).__name__, e)
            return False

    async def remove_from_node(self) -> None:
        """Remove the CNI chain entry, the plugin binary and all capture state (after
        ``shutdown``: nothing of ours may run while it goes)."""
        assert self.remove_install is not None
        try:
            lines = await asyncio.to_thread(self.remove_install)
        except Exception as e:
            log.error("removing Ambit from the node failed: %s: %s; finish with `ambit agent "
                      "uninstall` on the node", type(e).__name__, e)
            return
        for line in lines:
            log.info("removed: %s", line)
        log.info("Ambit removed from node %s", self.config.node)

    # -- readiness and status --------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if not self.setup_done:
            return False, "setting up capture"
        if not self.store.ready:
            return False, "waiting for the first state from the controller"
        if self.link.ztunnel_pid is None:
            # Both modes: CNI ADD of a mesh pod waits for the ztunnel to take the pod over the
            # link (pod start), so without it every such ADD would fail; eBPF also needs its
            # listeners for the SOCKMAP.
            return False, "waiting for the ztunnel to link (hand over its listeners)"
        return True, "ready"

    def status(self) -> dict[str, Any]:
        mesh = self._mesh()
        return {
            "node": self.config.node,
            "redirectMode": self.backend.mode,
            "redirectModeReason": self.mode_reason,
            "ready": self.ready()[1],
            "registryVersion": self.store.current.version if self.store.ready else None,
            "ztunnelPid": self.link.ztunnel_pid,
            # The capture listeners the agent keeps for the next ztunnel (restarts).
            "heldListeners": self.link.held_status(),
            "ztunnelTakeovers": self.link.takeovers,
            "refusedPeers": {"cni": self.cni.refusals.total,
                             "ztunnel": self.link.refusals.total},
            "lastReconcile": self.last_reconcile,
            "lastError": self.last_error,
            "podsGone": self.pods_gone,
            "deleted": [{"pod": t.uid, "ips": list(t.ips), "reason": t.reason,
                         "deletedAt": t.deleted_at} for t in self.table.deleted],
            "uplinks": list(self.uplinks),
            "cni": (self.cni_watcher.status if self.cni_watcher is not None else
                    "not managed by this agent (no --binary)"),
            "capture": self._backend_status,
            "pods": [
                {"pod": p.uid, "ips": list(p.ips), "hostIface": p.host_iface, "netns": p.netns,
                 "mode": self.backend.mode,
                 "captured": bool(set(p.ips) & self._enrolled),
                 **({"listeners": self._pod_listeners(p.uid)} if self.inpod else {}),
                 "shouldCapture": desired(p, mesh), "reason": p.reason}
                for p in sorted(self.table.pods.values(), key=lambda p: p.uid)
            ],
        }

    def _pod_listeners(self, uid: str) -> str:
        """In-pod mode: whether the ztunnel serves the pod's listeners (for status)."""
        record = self.link.pods.get(uid)
        if record is None:
            return "none: its namespace is not handed to the ztunnel"
        if not record.listeners:
            return "none yet: the ztunnel has not answered"
        return ", ".join(sorted({n for n, _ in record.listeners}))

    # -- the ztunnel's listeners -----------------------------------------------------------

    async def _on_listeners(self, fds: Mapping[str, int], pid: int) -> None:
        await self._kernel(self.backend.set_listeners, fds)
        self._status_at = -STATUS_INTERVAL
        self._wake.set()  # refresh the status (listeners ready) soon

    # -- CNI -------------------------------------------------------------------------------

    async def handle_cni(self, req: CniRequest) -> dict[str, Any]:
        try:
            if req.op == "add":
                answer = await self._cni_add(req)
            elif req.op == "del":
                answer = await self._cni_del(req)
                await self._ztunnel_forget(req)
            else:
                answer = await self._cni_check(req)
        except (CaptureError, MembershipUnavailable, OSError) as e:
            answer = {"ok": False, "error": str(e)}
        result = ("error" if not answer.get("ok") else
                  "ok" if answer.get("captured", True) else "not_captured")
        self.metrics.cni_request(req.op, result)
        if not answer.get("ok"):
            log.warning("CNI %s %s: %s", req.op, req.uid, answer.get("error"))
        return answer

    async def _cni_add(self, req: CniRequest) -> dict[str, Any]:
        ips = _ipv4_only(req.ips)
        if not ips:
            return {"ok": False, "error": f"pod {req.uid} has no IPv4 address in the previous "
                    "plugin's result; ambit-cni must be chained after the plugin that assigns "
                    "addresses (capture is IPv4 only)"}
        found: str | None = req.host_iface or await self._kernel(
            host_iface_for, ips[0], self.uplinks)
        iface = found or ""
        if not iface:
            return {"ok": False, "error": f"pod {req.uid}: cannot tell its node-side interface "
                    "(no host interface in the previous result and no route to "
                    f"{ips[0]} over a pod interface)"}
        assert self.membership is not None
        answer = await self.membership.ask(req.pod_namespace, req.pod_name)
        if not answer.known:
            return {"ok": False, "error": f"the registry does not place pod {req.uid} on node "
                    f"{self.config.node} ({answer.reason}); refusing to start it uncaptured, "
                    "the kubelet will retry"}
        if answer.in_mesh:
            # Before capture: a pod whose workload the ztunnel cannot take is never captured
            # into a ztunnel that would refuse its connections as "unknown source".
            problem = await self._hand_to_ztunnel(req, ips, answer)
            if problem is not None:
                return {"ok": False, "error": problem}
        pod = LocalPod(req.uid, ips, iface, req.netns, req.container_id, answer.in_mesh,
                       answer.reason)
        capture = pod.capture()
        await self._kernel(self.backend.watch_interface, capture)
        if answer.in_mesh:
            if self.inpod:
                problem = await self._hand_netns(pod)
                if problem is not None:
                    return {"ok": False, "error": problem}
            await self._kernel(self.backend.enroll, capture)
        else:
            await self._kernel(self.backend.unenroll, capture)  # a reused IP, say
            await self.link.pod_gone(pod.uid)
        self.table.put(pod)
        self._note_capture(ips, answer.in_mesh)
        log.info("pod %s (%s on %s): %s", req.uid, ", ".join(ips), iface,
                 "captured" if answer.in_mesh else f"not captured: {answer.reason}")
        return {"ok": True, "captured": answer.in_mesh, "reason": answer.reason}

    async def _hand_to_ztunnel(self, req: CniRequest, ips: tuple[str, ...],
                               answer: Answer) -> str | None:
        """Give the node's ztunnel the new mesh pod's workload and wait until it has it (in its
        store, certificate fetch started); the reason ADD must fail, None once it has.

        Why before ADD returns: the runtime starts the containers as soon as ADD succeeds, and
        the controller's state push lists the pod only after the kubelet reports its IP, about
        a second later; a first connection in between was refused as "unknown source". Why
        fail closed when the ztunnel does not answer within ``ztunnel_handoff_timeout``: the
        pod's connections would be refused anyway (and in eBPF mode a ztunnel that is not
        linked has no listeners in the SOCKMAP), and a failed ADD is retried by the kubelet
        (CNI error), as an unreachable controller is, while an ADD that succeeds cannot be
        taken back.
        """
        workload: dict[str, Any] = {
            "uid": req.uid, "name": req.pod_name, "namespace": req.pod_namespace,
            "serviceAccount": answer.service_account or "default", "node": self.config.node,
            "addresses": list(ips), "labels": dict(answer.labels)}
        if answer.workload_name:
            workload["workloadName"] = answer.workload_name
        started = time.monotonic()
        try:
            await self.link.request({"op": "pod_added", "workload": workload},
                                    self.config.ztunnel_handoff_timeout)
        except LinkUnavailable as e:
            return (f"pod {req.uid}: the node's ztunnel does not have its workload: {e}; "
                    "refusing to start it (its first connections would be refused), the "
                    "kubelet will retry")
        self._added_uids[req.container_id] = req.uid
        while len(self._added_uids) > 4096:  # bounded: DELs that never came
            del self._added_uids[next(iter(self._added_uids))]
        log.debug("pod %s handed to the ztunnel in %.1f ms", req.uid,
                  (time.monotonic() - started) * 1000)
        return None

    async def _ztunnel_forget(self, req: CniRequest) -> None:
        """At DEL: drop the pod's provisional workload in the ztunnel (best effort; it also
        expires there, and the state push replaces it)."""
        uid = self._added_uids.pop(req.container_id, None) or (req.uid if req.pod_name else None)
        if uid is None or self.link.ztunnel_pid is None:
            return
        try:
            await self.link.request({"op": "pod_deleted", "uid": uid}, 1.0)
        except LinkUnavailable as e:
            log.info("pod %s: could not tell the ztunnel it is deleted: %s", uid, e)

    # -- in-pod mode ------------------------------------------------------------------------

    @property
    def inpod(self) -> bool:
        return self.backend.mode == MODE_INPOD

    async def _open_netns(self, pod: LocalPod) -> int:
        """A descriptor of ``pod``'s network namespace (its CNI path, or the one found with
        its address)."""
        from agent.capture.inpod import InpodCapture

        assert isinstance(self.backend, InpodCapture)
        path = await self._kernel(self.backend.netns_path, pod.capture())
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    async def _hand_netns(self, pod: LocalPod) -> str | None:
        """In-pod mode: the ztunnel serves ``pod``'s listeners inside its namespace before
        the rules that redirect to them go in; the reason it does not (None: it does)."""
        try:
            netns = await self._open_netns(pod)
        except (OSError, CaptureError) as e:
            return f"pod {pod.uid}: cannot open its network namespace: {e}"
        try:
            await self.link.hand_pod(pod.uid, pod.ips, netns,
                                     self.config.ztunnel_handoff_timeout)
        except LinkUnavailable as e:
            await self.link.pod_gone(pod.uid)
            return (f"pod {pod.uid}: the node's ztunnel does not serve its network namespace: "
                    f"{e}; not redirecting it (its connections would be refused)")
        return None

    async def _cni_del(self, req: CniRequest) -> dict[str, Any]:
        """A CNI DEL is final: capture of the pod's IPs is removed before the answer, and the
        pod is remembered as deleted (a tombstone), so a reconcile never adopts it back from a
        registry that still lists it."""
        async with self._pods_lock:
            pod = self.table.by_container(req.container_id)
            if pod is None and req.pod_name:
                pod = self.table.pods.get(req.uid)
            if pod is None:
                return {"ok": True, "captured": False, "reason": "not known; nothing to remove"}
            self.table.bury(pod, time.time(), MAX_TOMBSTONES)
            capture = pod.capture()
            await self._kernel(self.backend.unenroll, capture)
            await self._kernel(self.backend.forget_interface, capture)
            await self.link.pod_gone(pod.uid)
            self._note_capture(pod.ips, False)
        log.info("pod %s removed", pod.uid)
        return {"ok": True, "captured": False, "reason": "removed"}

    async def _cni_check(self, req: CniRequest) -> dict[str, Any]:
        pod = self.table.pods.get(req.uid)
        if pod is None:
            return {"ok": False, "error": f"the agent has no record of pod {req.uid}"}
        want = desired(pod, self._mesh())
        enrolled = await self._kernel(self.backend.enrolled)
        have = set(pod.ips) <= enrolled
        if want != have:
            return {"ok": False, "error": f"pod {req.uid} should {'' if want else 'not '}be "
                    f"captured but is {'' if have else 'not '}captured"}
        return {"ok": True, "captured": have, "reason": pod.reason}

    # -- reconcile -------------------------------------------------------------------------

    def _on_state(self, _old: StateSnapshot, _new: StateSnapshot) -> None:
        self._wake.set()

    async def _reconcile_loop(self) -> None:
        while True:
            woken = False
            with contextlib.suppress(asyncio.TimeoutError):
                woken = await asyncio.wait_for(self._wake.wait(), self.config.resync_interval)
            full = (not woken or time.monotonic() - self._kernel_read_at
                    >= self.config.resync_interval)
            wait = self._last_pass + RECONCILE_SPACING - time.monotonic()
            if wait > 0:  # coalesce a burst of state pushes into one pass
                await asyncio.sleep(wait)
            self._wake.clear()
            try:
                await self.reconcile_once(read_kernel=full)
                self.metrics.reconciled(True)
                self.last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep reconciling; the next pass may succeed
                self.metrics.reconciled(False)
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("reconcile failed: %s", self.last_error)
            self._last_pass = time.monotonic()

    async def refresh_uplinks(self) -> None:
        """``--uplink auto``: find the uplinks again; attach capture to new ones."""
        if not self.config.uplinks_auto:
            return
        pod_ifaces = {p.host_iface for p in self.table.pods.values()}
        links = await self._kernel(uplinks.read_links)
        found = uplinks.resolve(self.config.uplinks, links, pod_ifaces)
        if found == self.uplinks:
            return
        added = [u for u in found if u not in self.uplinks]
        gone = [u for u in self.uplinks if u not in found]
        if hasattr(self.backend, "uplinks"):  # eBPF: the uplink program goes on new ones
            self.backend.uplinks = found
            if added:  # idempotent, programs replaced in place; a gone one keeps its filter
                await self._kernel(self.backend.setup)  # until uninstall (harmless)
        log.info("uplinks (auto): %s (new: %s; no longer: %s); not uplinks: %s",
                 ", ".join(found) or "none", ", ".join(added) or "-", ", ".join(gone) or "-",
                 "; ".join(uplinks.describe(links, pod_ifaces)) or "-")
        self.uplinks = found

    async def reconcile_once(self, read_kernel: bool = True) -> None:
        """One pass. ``read_kernel``: plan on what the kernel captures, read back now (the
        periodic resync), rather than on the agent's record of it (passes woken by pushes);
        ``--uplink auto`` is resolved again (every link of the node) only then too."""
        try:
            if read_kernel:
                await self.refresh_uplinks()
        except (uplinks.UplinkError, CaptureError) as e:  # pods still get reconciled
            log.error("uplinks (auto): %s; still using %s, trying again next resync", e,
                      ", ".join(self.uplinks) or "none")
        async with self._pods_lock:
            await self._reconcile_pods(read_kernel)
        if time.monotonic() - self._status_at >= STATUS_INTERVAL:
            self._backend_status = dict((await self._kernel(self.backend.status)).detail)
            self._status_at = time.monotonic()
        self.last_reconcile = time.time()

    async def _forget(self, pod: LocalPod, why: str) -> None:
        """``pod``'s interface is gone (it was deleted without a CNI DEL reaching us, or while
        we looked): release it and remember it as deleted. Expected, not a failure."""
        self.table.bury(pod, time.time(), MAX_TOMBSTONES, reason=why)
        capture = pod.capture()
        await self._kernel(self.backend.unenroll, capture)
        await self.link.pod_gone(pod.uid)
        self._enrolled.difference_update(pod.ips)
        with contextlib.suppress(CaptureError):  # nothing left to detach from
            await self._kernel(self.backend.forget_interface, capture)
        self.pods_gone += 1
        self.metrics.pod_gone()
        log.info("pod %s (%s) gone: %s; released", pod.uid, ", ".join(pod.ips), why)

    def _current(self, pod: LocalPod) -> bool:
        """Whether ``pod`` is still the table's record (the ADD path does not wait for a pass,
        so a pass acts only on records it planned with)."""
        return self.table.pods.get(pod.uid) == pod

    async def _gone_now(self, pod: LocalPod) -> bool:
        return not await self._kernel(iface_exists, pod.host_iface)

    async def _reconcile_pods(self, read_kernel: bool = True) -> None:
        mesh = self._mesh()
        if self.store.ready:  # never drop tombstones on a registry view we have not received
            self.table.set_deleted(prune(self.table.deleted, mesh, self.table.pods,
                                         time.time()))
        if read_kernel:
            self._enrolled = await self._kernel(self.backend.enrolled)
            self._kernel_read_at = time.monotonic()
        enrolled = set(self._enrolled)
        # Live facts, read now: pods whose host interface no longer exists.
        ifaces = {p.uid: p.host_iface for p in self.table.pods.values()}
        gone = await self._kernel(_missing_ifaces, ifaces)
        todo = plan(self.table.pods, mesh, enrolled, self.table.deleted, gone)
        for pod in todo.forget:
            if self._current(pod):
                await self._forget(pod, f"interface {pod.host_iface} no longer exists")
        for ip in todo.discover:
            # The live evidence is read at the moment of adoption: a route to the IP over a pod
            # interface that exists now.
            iface = await self._kernel(host_iface_for, ip, self.uplinks)
            found = adoption(ip, mesh, self.table.deleted, iface)
            if found.pod is None:
                log.debug("not adopting %s: %s", ip, found.reason)
                continue
            try:
                await self._kernel(self.backend.watch_interface, found.pod.capture())
            except CaptureError as e:
                if await self._gone_now(found.pod):
                    log.info("not adopting pod %s: interface %s gone while adopting it",
                             found.pod.uid, found.pod.host_iface)
                    continue
                raise CaptureError(f"adopting pod {found.pod.uid}: {e}") from e
            self.table.put(found.pod)
            log.info("adopted pod %s (%s on %s), %s", found.pod.uid, ", ".join(found.pod.ips),
                     found.pod.host_iface, found.reason)
        if todo.discover or todo.forget:
            todo = plan(self.table.pods, mesh, enrolled, self.table.deleted)
        for pod in todo.enroll:
            if not self._current(pod):
                continue  # a CNI ADD replaced the record while this pass ran
            if self.inpod:
                problem = await self._hand_netns(pod)
                if problem is not None:
                    log.warning("%s; trying again at the next pass", problem)
                    continue
            try:
                await self._kernel(self.backend.watch_interface, pod.capture())
                await self._kernel(self.backend.enroll, pod.capture())
            except CaptureError as e:
                if await self._gone_now(pod):
                    await self._forget(pod, f"interface {pod.host_iface} vanished while "
                                       "capturing it")
                    continue
                raise CaptureError(f"capturing pod {pod.uid}: {e}") from e
            if await self._gone_now(pod):  # vanished right after: do not leave it captured
                await self._forget(pod, f"interface {pod.host_iface} vanished while capturing "
                                   "it")
                continue
            self._enrolled.update(pod.ips)
            log.info("capturing pod %s (%s)", pod.uid, ", ".join(pod.ips))
        for pod in todo.unenroll:
            await self._kernel(self.backend.unenroll, pod.capture())
            await self.link.pod_gone(pod.uid)
            self._enrolled.difference_update(pod.ips)
            log.info("no longer capturing pod %s (%s)", pod.uid, ", ".join(pod.ips))
        if self.store.ready:  # never release on a registry view we have not received
            for ip in todo.release:
                if self.table.by_ip(ip) is not None:
                    continue  # a CNI ADD took the address while this pass ran
                await self._kernel(self.backend.unenroll, PodCapture("unknown", (ip,), ""))
                self._enrolled.discard(ip)
                log.info("released %s: captured, but no pod of this node has it", ip)
        if read_kernel:
            await self._refresh_enrolled()
        else:
            self.metrics.set_pods(len(self._enrolled), len(self.table.pods))


async def serve(agent: Agent, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await agent.start()
    remove = False
    try:
        await stop.wait()
        remove = await agent.removal_wanted()
    finally:
        await agent.shutdown()
    if remove:
        await agent.remove_from_node()

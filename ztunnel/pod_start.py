"""Pod start: hold a captured connection from a source the state does not know yet.

Why it exists: a new pod may connect the moment its containers start. The agent hands its
workload to the ztunnel at CNI ADD (``ztunnel/agent_link.py``), so normally the source is known
before the first byte; but a pod started while the link was down, a ztunnel restarted after the
ADD, or a state push that replaced a provisional entry too early would still meet "unknown
source". Istio's ztunnel holds such early connections until the pod's config arrives; so does
this one, for a bounded time, re-planning as soon as a state change names the source.

Bounded: at most ``pod_start_hold`` seconds each, ``pod_start_hold_max`` connections in all and
``pod_start_hold_per_source`` from one IP, so holding cannot become a memory sink (an
unenrolled IP spraying connections is refused beyond its share). The decision is pure
(``hold_refusal``); ``SourceHold`` is the thin asyncio part, woken by the store's change
notifications, never by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mesh.state.model import IPAddress, Workload
from mesh.state.store import StateSnapshot, StateStore
from ztunnel.config import ZtunnelConfig
from ztunnel.metrics import Metrics

log = logging.getLogger("ztunnel.pod_start")

# Outcomes of a held connection (ambit_ztunnel_held_total{outcome}).
RELEASED = "released"  # the state named the source in time: re-planned and carried
TIMEOUT = "timeout"  # still unknown after pod_start_hold: refused (unknown source)
OVER_TOTAL = "over_total"  # not held: pod_start_hold_max connections already held
OVER_SOURCE = "over_source"  # not held: pod_start_hold_per_source from this IP already held


def hold_refusal(config: ZtunnelConfig, held_total: int, held_from_source: int) -> str | None:
    """Why a connection from an unknown source is not held (an outcome above, or "disabled");
    None: hold it."""
    if config.pod_start_hold <= 0:
        return "disabled"
    if held_total >= config.pod_start_hold_max:
        return OVER_TOTAL
    if held_from_source >= config.pod_start_hold_per_source:
        return OVER_SOURCE
    return None


class SourceHold:
    """Waits, per source IP, for a snapshot in which the IP is a workload."""

    def __init__(self, store: StateStore, config: ZtunnelConfig, metrics: Metrics) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self._waiting: dict[IPAddress, list[asyncio.Future[Workload]]] = {}
        self.held = 0
        store.subscribe(self._on_state)

    def _on_state(self, _old: StateSnapshot, new: StateSnapshot) -> None:
        for ip in [ip for ip in self._waiting if new.workload_by_ip(ip) is not None]:
            workload = new.workload_by_ip(ip)
            assert workload is not None
            for fut in self._waiting.pop(ip):
                if not fut.done():
                    fut.set_result(workload)

    async def wait_for(self, ip: IPAddress) -> Workload | None:
        """The workload ``ip`` turns out to be, or None: not held (limits, disabled) or not
        known within ``pod_start_hold`` seconds."""
        known = self.store.current.workload_by_ip(ip)
        if known is not None:
            return known
        waiting = self._waiting.get(ip, [])
        refusal = hold_refusal(self.config, self.held, len(waiting))
        if refusal is not None:
            if refusal != "disabled":
                self.metrics.held_total.labels(refusal).inc()
            return None
        fut: asyncio.Future[Workload] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(ip, []).append(fut)
        self.held += 1
        self.metrics.held.set(self.held)
        outcome = TIMEOUT
        try:
            workload = await asyncio.wait_for(fut, self.config.pod_start_hold)
            outcome = RELEASED
            return workload
        except TimeoutError:
            log.info("held a connection from %s for %gs; the state still does not name it: "
                     "refusing it", ip, self.config.pod_start_hold)
            return None
        finally:
            self.held -= 1
            self.metrics.held.set(self.held)
            self.metrics.held_total.labels(outcome).inc()
            rest = self._waiting.get(ip)
            if rest is not None:
                with contextlib.suppress(ValueError):
                    rest.remove(fut)
                if not rest:
                    del self._waiting[ip]

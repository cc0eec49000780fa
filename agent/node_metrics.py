"""The node agent's Prometheus metrics: its own state, per-pod capture and node resource use.

Why it exists: an operator looking at one node wants a single scrape target that answers
"is capture working for pod X, is the agent healthy, and what do the agent and ztunnel cost".
The ztunnel exports the mesh traffic metrics; this registry exports what only the agent knows
(enrolment, CNI calls, reconciles, per-pod capture counters read from the backend) and what
neither process can say about itself once it is gone (``ambit_process_up 0``).

The registry has no default process/platform collectors, so the node endpoint can append the
ztunnel's exposition (which has them) without duplicate families. Per-pod and per-process
values are read at scrape time through callables; a callable that fails is logged and counted
in ``ambit_agent_scrape_errors_total`` and never breaks the scrape. ``render`` may be called
from a worker thread (the capture backend's ``counters`` is synchronous and may be slow).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.capture.base import PodCounters

log = logging.getLogger("agent.metrics")

CNI_OPS = ("add", "del", "check")
CNI_RESULTS = ("ok", "error", "not_captured")
RECONCILE_RESULTS = ("ok", "error")
SCRAPE_ERROR_SOURCES = ("capture_counters", "pod_name", "components", "process", "node")
UNKNOWN = "unknown"  # pod_namespace/pod_name of a captured IP the agent cannot name
POD_LABELS = ("pod_namespace", "pod_name", "pod_ip")

CountersFn = Callable[[], Mapping[str, PodCounters]]
PodNameFn = Callable[[str], "tuple[str, str] | None"]
ComponentsFn = Callable[[], Mapping[str, "int | None"]]
ErrorHook = Callable[[str, BaseException], None]


def _own_pid() -> Mapping[str, int | None]:
    return {"agent": os.getpid()}


class _CaptureCollector(Collector):
    """``ambit_capture_*_total`` per pod, read from the capture backend at scrape time."""

    def __init__(self, counters: CountersFn, pod_name: PodNameFn, on_error: ErrorHook) -> None:
        self._counters = counters
        self._pod_name = pod_name
        self._on_error = on_error

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily("ambit_capture_connections", "New connections of the pod "
                                "steered to a ztunnel listener", labels=POD_LABELS),
            CounterMetricFamily("ambit_capture_passed_packets", "Packets of the pod seen by "
                                "capture and left alone", labels=POD_LABELS),
            CounterMetricFamily("ambit_capture_errors", "Connections of the pod that could not "
                                "be steered and were dropped (capture fails closed)",
                                labels=POD_LABELS),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        captured, passed, errors = families = self._families()
        try:
            counters = dict(self._counters())
        except Exception as e:
            self._on_error("capture_counters", e)
            counters = {}
        name_error: Exception | None = None
        for ip, c in sorted(counters.items()):
            try:
                named = self._pod_name(ip)
            except Exception as e:  # reported once per scrape, not once per pod
                name_error, named = e, None
            labels = [*(named or (UNKNOWN, UNKNOWN)), ip]
            captured.add_metric(labels, c.captured)
            passed.add_metric(labels, c.passed)
            errors.add_metric(labels, c.errors)
        if name_error is not None:
            self._on_error("pod_name", name_error)
        return iter(families)


class _ProcessCollector(Collector):
    """``ambit_process_*{component}`` for the agent and ztunnel, ``ambit_node_*`` for the node."""

    def __init__(self, components: ComponentsFn, on_error: ErrorHook) -> None:
        self._components = components
        self._on_error = on_error

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily | CounterMetricFamily, ...]:
        lbl = ("component",)
        return (
            GaugeMetricFamily("ambit_process_up", "1 while the component's process exists",
                              labels=lbl),
            GaugeMetricFamily("ambit_process_resident_memory_bytes",
                              "Resident memory of the component's process", labels=lbl),
            CounterMetricFamily("ambit_process_cpu_seconds",
                                "User plus system CPU time of the component's process",
                                labels=lbl),
            GaugeMetricFamily("ambit_process_open_fds",
                              "Open file descriptors of the component's process", labels=lbl),
            GaugeMetricFamily("ambit_process_threads", "Threads of the component's process",
                              labels=lbl),
            GaugeMetricFamily("ambit_node_memory_available_bytes",
                              "Memory available to new processes on the node"),
            GaugeMetricFamily("ambit_node_cpu_count", "Logical CPUs of the node"),
            GaugeMetricFamily("ambit_node_load1", "The node's 1-minute load average"),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        up, per_process, node = families[0], families[1:5], families[5:]
        try:
            components = dict(self._components())
        except Exception as e:
            self._on_error("components", e)
            components = {}
        for component, pid in sorted(components.items()):
            values = self._read(component, pid)
            up.add_metric([component], 0 if values is None else 1)
            for family, value in zip(per_process, values or (), strict=False):
                if value is not None:
                    family.add_metric([component], value)
        try:
            node_values = (psutil.virtual_memory().available, psutil.cpu_count() or 0,
                           os.getloadavg()[0])
        except Exception as e:
            self._on_error("node", e)
            return iter(families[:5])
        for family, value in zip(node, node_values, strict=True):
            family.add_metric([], value)
        return iter(families)

    def _read(self, component: str, pid: int | None) -> list[float | None] | None:
        """RSS, CPU seconds, open fds, threads (None where access is denied); None when the
        process does not exist."""
        if pid is None:
            return None
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                readers: tuple[Callable[[], float], ...] = (
                    lambda: proc.memory_info().rss,
                    lambda: sum(proc.cpu_times()[:2]),  # user + system
                    proc.num_fds,
                    proc.num_threads,
                )
                values: list[float | None] = []
                denied: psutil.AccessDenied | None = None
                for read in readers:
                    try:
                        values.append(read())
                    except psutil.AccessDenied as e:  # it exists; we may not look at this
                        values.append(None)
                        denied = e
        except psutil.NoSuchProcess:  # includes ZombieProcess: gone for our purposes
            return None
        if denied is not None:
            self._on_error(f"process:{component}", denied)
        return values


class NodeMetrics:
    """The agent's registry. Update it through the methods; ``render`` gives the exposition."""

    def __init__(self, node: str, version: str, redirect_mode: str, *,
                 counters: CountersFn | None = None, pod_name: PodNameFn | None = None,
                 components: ComponentsFn | None = None) -> None:
        self.node = node
        self.version = version
        self.registry = CollectorRegistry()
        self._render_lock = threading.Lock()  # one scrape at a time reads the backend
        r = self.registry
        self._info = Gauge("ambit_agent_info", "Always 1; the agent's node, redirect mode and "
                           "version as labels", ("node", "redirect_mode", "version"), registry=r)
        self.set_redirect_mode(redirect_mode)
        self.pods_enrolled = Gauge("ambit_agent_pods_enrolled",
                                   "Local pods whose traffic is captured", registry=r)
        self.pods_known = Gauge("ambit_agent_pods_known",
                                "Local pods the agent knows (enrolled or not)", registry=r)
        self.cni_requests = Counter("ambit_agent_cni_requests", "CNI plugin calls, by operation "
                                    "and result", ("op", "result"), registry=r)
        for op in CNI_OPS:
            for result in CNI_RESULTS:
                self.cni_requests.labels(op, result)
        self.reconciles = Counter("ambit_agent_reconcile", "Reconcile passes against the "
                                  "registry, by result", ("result",), registry=r)
        for result in RECONCILE_RESULTS:
            self.reconciles.labels(result)
        self.pods_gone = Counter("ambit_agent_pods_gone", "Local pods found without their "
                                 "host interface (deleted without a CNI DEL reaching the "
                                 "agent, or while a reconcile ran): released, not an error",
                                 registry=r)
        self.registry_connected = Gauge("ambit_agent_registry_connected",
                                        "1 while the agent is connected to the registry",
                                        registry=r)
        r.register(_CaptureCollector(counters or dict, pod_name or (lambda ip: None),
                                     self._scrape_error))
        r.register(_ProcessCollector(components or _own_pid, self._scrape_error))
        # Registered last so errors from the collectors above show in the same scrape.
        self.scrape_errors = Counter("ambit_agent_scrape_errors", "Failures reading values at "
                                     "scrape time, by source", ("source",), registry=r)
        for source in SCRAPE_ERROR_SOURCES:
            self.scrape_errors.labels(source)

    def set_redirect_mode(self, mode: str) -> None:
        """Set the ``redirect_mode`` label of ``ambit_agent_info`` (decided at startup)."""
        self._info.clear()
        self._info.labels(self.node, mode, self.version).set(1)

    def set_pods(self, enrolled: int, known: int) -> None:
        self.pods_enrolled.set(enrolled)
        self.pods_known.set(known)

    def cni_request(self, op: str, result: str) -> None:
        if op not in CNI_OPS or result not in CNI_RESULTS:
            raise ValueError(f"cni_request({op!r}, {result!r}): op must be one of {CNI_OPS}, "
                             f"result one of {CNI_RESULTS}")
        self.cni_requests.labels(op, result).inc()

    def reconciled(self, ok: bool) -> None:
        self.reconciles.labels("ok" if ok else "error").inc()

    def pod_gone(self) -> None:
        self.pods_gone.inc()

    def set_registry_connected(self, connected: bool) -> None:
        self.registry_connected.set(1 if connected else 0)

    def _scrape_error(self, source: str, e: BaseException) -> None:
        log.warning("metrics: reading %s failed: %s: %s", source, type(e).__name__, e)
        self.scrape_errors.labels(source.split(":", 1)[0]).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text format (0.0.4). Thread-safe; calls the
        supplied callables."""
        with self._render_lock:
            out: bytes = generate_latest(self.registry)
        return out

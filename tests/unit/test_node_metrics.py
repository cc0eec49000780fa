"""The agent's node metrics, read back the way Prometheus reads them, and the merge with the
ztunnel's exposition (no duplicate families, nothing of the ztunnel's own lost)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent.capture.base import PodCounters
from agent.node_endpoint import merge_exposition
from agent.node_metrics import NodeMetrics

PODS = {"10.244.1.2": PodCounters(captured=5, passed=7, errors=1),
        "10.244.1.3": PodCounters(captured=2)}
NAMES = {"10.244.1.2": ("default", "client-1")}


def _samples(m: NodeMetrics) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if s.labels == labels]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def test_agent_state_metrics() -> None:
    m = NodeMetrics("node-a", "0.1.0", "iptables")
    m.set_redirect_mode("ebpf")  # decided at startup, after probing the kernel
    m.set_pods(enrolled=3, known=5)
    m.cni_request("add", "ok")
    m.cni_request("add", "ok")
    m.cni_request("del", "not_captured")
    m.reconciled(ok=False)
    m.set_registry_connected(True)
    s = _samples(m)
    assert [x.labels for x in s["ambit_agent_info"]] == [
        {"node": "node-a", "redirect_mode": "ebpf", "version": "0.1.0"}]
    assert _value(s, "ambit_agent_info", node="node-a", redirect_mode="ebpf",
                  version="0.1.0") == 1
    assert _value(s, "ambit_agent_pods_enrolled") == 3
    assert _value(s, "ambit_agent_pods_known") == 5
    assert _value(s, "ambit_agent_cni_requests_total", op="add", result="ok") == 2
    assert _value(s, "ambit_agent_cni_requests_total", op="del", result="not_captured") == 1
    assert _value(s, "ambit_agent_cni_requests_total", op="check", result="error") == 0
    assert len(s["ambit_agent_cni_requests_total"]) == 9  # every op x result, for rate()
    assert _value(s, "ambit_agent_reconcile_total", result="error") == 1
    assert _value(s, "ambit_agent_reconcile_total", result="ok") == 0
    assert _value(s, "ambit_agent_registry_connected") == 1
    with pytest.raises(ValueError, match="op must be one of"):
        m.cni_request("update", "ok")


def test_per_pod_capture_series() -> None:
    m = NodeMetrics("node-a", "0.1.0", "ebpf", counters=lambda: PODS, pod_name=NAMES.get)
    s = _samples(m)
    named = {"pod_namespace": "default", "pod_name": "client-1", "pod_ip": "10.244.1.2"}
    unnamed = {"pod_namespace": "unknown", "pod_name": "unknown", "pod_ip": "10.244.1.3"}
    assert _value(s, "ambit_capture_connections_total", **named) == 5
    assert _value(s, "ambit_capture_passed_packets_total", **named) == 7
    assert _value(s, "ambit_capture_errors_total", **named) == 1
    assert _value(s, "ambit_capture_connections_total", **unnamed) == 2
    assert _value(s, "ambit_capture_errors_total", **unnamed) == 0
    assert len(s["ambit_capture_connections_total"]) == 2
    assert all(v == 0 for v in (x.value for x in s["ambit_agent_scrape_errors_total"]))


def test_failing_callables_do_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def counters() -> Mapping[str, PodCounters]:
        raise RuntimeError("bpf map gone")

    def components() -> Mapping[str, int | None]:
        raise OSError("no /proc")

    m = NodeMetrics("node-a", "0.1.0", "ebpf", counters=counters, components=components)
    with caplog.at_level(logging.WARNING, logger="agent.metrics"):
        s = _samples(m)
    assert "bpf map gone" in caplog.text and "no /proc" in caplog.text
    assert "ambit_capture_connections_total" not in s  # the family is there, with no series
    assert _value(s, "ambit_agent_info", node="node-a", redirect_mode="ebpf",
                  version="0.1.0") == 1
    assert _value(s, "ambit_node_cpu_count") >= 1
    # Counted in the scrape that failed, and again in the next.
    assert _value(s, "ambit_agent_scrape_errors_total", source="capture_counters") == 1
    assert _value(s, "ambit_agent_scrape_errors_total", source="components") == 1
    s = _samples(m)
    assert _value(s, "ambit_agent_scrape_errors_total", source="capture_counters") == 2


def test_failing_pod_name_is_counted_once_per_scrape() -> None:
    def pod_name(ip: str) -> tuple[str, str] | None:
        raise KeyError(ip)

    m = NodeMetrics("node-a", "0.1.0", "ebpf", counters=lambda: PODS, pod_name=pod_name)
    s = _samples(m)
    assert len(s["ambit_capture_connections_total"]) == 2
    assert {x.labels["pod_name"] for x in s["ambit_capture_connections_total"]} == {"unknown"}
    assert _value(s, "ambit_agent_scrape_errors_total", source="pod_name") == 1


def test_process_metrics_and_a_dead_pid() -> None:
    m = NodeMetrics("node-a", "0.1.0", "ebpf", components=lambda: {
        "agent": os.getpid(), "ztunnel": None, "gone": _dead_pid()})
    s = _samples(m)
    assert _value(s, "ambit_process_up", component="agent") == 1
    assert _value(s, "ambit_process_up", component="ztunnel") == 0
    assert _value(s, "ambit_process_up", component="gone") == 0
    assert _value(s, "ambit_process_resident_memory_bytes", component="agent") > 1 << 20
    assert _value(s, "ambit_process_cpu_seconds_total", component="agent") > 0
    assert _value(s, "ambit_process_open_fds", component="agent") >= 3
    assert _value(s, "ambit_process_threads", component="agent") >= 1
    # Only the live process has resource series.
    assert [x.labels for x in s["ambit_process_resident_memory_bytes"]] == [
        {"component": "agent"}]
    assert _value(s, "ambit_node_memory_available_bytes") > 0
    assert _value(s, "ambit_node_cpu_count") == os.cpu_count()
    assert _value(s, "ambit_node_load1") >= 0
    assert all(v == 0 for v in (x.value for x in s["ambit_agent_scrape_errors_total"]))


def test_default_components_is_the_agent_itself() -> None:
    s = _samples(NodeMetrics("node-a", "0.1.0", "ebpf"))
    assert [x.labels for x in s["ambit_process_up"]] == [{"component": "agent"}]


ZTUNNEL = """\
# HELP process_open_fds Number of open file descriptors.
# TYPE process_open_fds gauge
process_open_fds 12.0
# HELP ambit_agent_pods_known Local pods
# TYPE ambit_agent_pods_known gauge
ambit_agent_pods_known 99.0
# HELP istio_tcp_connections_opened_total TCP connections opened
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source"} 4.0
# HELP istio_tcp_connections_opened_created TCP connections opened
# TYPE istio_tcp_connections_opened_created gauge
istio_tcp_connections_opened_created{reporter="source"} 1.7e+09
"""


def test_merge_drops_agent_families_and_keeps_the_ztunnels_others() -> None:
    m = NodeMetrics("node-a", "0.1.0", "ebpf")
    m.set_pods(enrolled=1, known=2)
    merged = merge_exposition(m.render().decode(), ZTUNNEL)
    families = [f.name for f in text_string_to_metric_families(merged)]
    assert len(families) == len(set(families)), "duplicate family"
    values = {s.name: s.value for f in text_string_to_metric_families(merged)
              for s in f.samples if not s.labels}
    assert values["ambit_agent_pods_known"] == 2  # the agent's, not the ztunnel's 99
    assert values["process_open_fds"] == 12  # the ztunnel's own process metrics survive
    assert values["ambit_agent_ztunnel_scrape_up"] == 1
    assert "istio_tcp_connections_opened" in families
    assert merged.count("ambit_agent_pods_known") == 3  # HELP, TYPE, one sample


AGENT = """\
# HELP a_total A
# TYPE a_total counter
a_total 1.0
# HELP h H
# TYPE h histogram
h_bucket{le="+Inf"} 1.0
h_count 1.0
h_sum 2.0
"""

UP1 = """\
# HELP ambit_agent_ztunnel_scrape_up 1 if the ztunnel's /metrics answered this scrape
# TYPE ambit_agent_ztunnel_scrape_up gauge
ambit_agent_ztunnel_scrape_up 1
"""
UP0 = UP1.replace("scrape_up 1\n", "scrape_up 0\n")


@pytest.mark.parametrize(("ztunnel", "expected_tail"), [
    pytest.param(None, UP0, id="unreachable"),
    pytest.param("", UP1, id="empty"),
    pytest.param("# HELP z Z\n# TYPE z gauge\nz 3.0\n",
                 UP1 + "# HELP z Z\n# TYPE z gauge\nz 3.0\n", id="disjoint"),
    pytest.param("# HELP a_total other\n# TYPE a_total counter\na_total 5.0\n"
                 "# HELP z Z\n# TYPE z gauge\nz 3.0\n",
                 UP1 + "# HELP z Z\n# TYPE z gauge\nz 3.0\n", id="same-counter-dropped"),
    pytest.param("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 9.0\nh_count 9.0\nh_sum 9.0\n"
                 "z 3.0\n",
                 UP1 + "z 3.0\n", id="histogram-dropped-headerless-kept"),
    pytest.param("a_total 7.0\nz{x=\"a b\"} 3.0\n\n# EOF\n",
                 UP1 + "z{x=\"a b\"} 3.0\n", id="headerless-duplicate-sample-dropped"),
    pytest.param("# HELP ambit_agent_ztunnel_scrape_up fake\nambit_agent_ztunnel_scrape_up 1\n",
                 UP1, id="scrape-up-is-the-agents"),
])
def test_merge_table(ztunnel: str | None, expected_tail: str) -> None:
    assert merge_exposition(AGENT, ztunnel) == AGENT + expected_tail

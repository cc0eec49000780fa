"""The benchmark's pure parts: percentiles, ambit/envoy ratios, the table, the JSON round trip.

These decide the numbers docs/performance.md quotes, so they are pinned here without needing
root, namespaces or proxies.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.envoy import client_side_bootstrap, server_side_bootstrap
from bench.mesh import state_document
from bench.report import SetupResult, format_table, percentile, ratio


def test_percentile_matches_linear_interpolation() -> None:
    data = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 4.0
    assert percentile(data, 50) == pytest.approx(2.5)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("q", [-1.0, 100.5])
def test_percentile_rejects_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], q)


def test_percentile_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_ratio_is_ambit_over_envoy_and_none_when_missing() -> None:
    assert ratio(3.0, 6.0) == pytest.approx(0.5)
    assert ratio(None, 6.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def _results() -> dict[str, SetupResult]:
    return {
        "direct": SetupResult("direct", throughput_gbps=20.0, p50_ms=0.05, p99_ms=0.1,
                              achieved_rate=1000.0),
        "envoy": SetupResult("envoy", throughput_gbps=8.0, p50_ms=0.2, p99_ms=0.5,
                             achieved_rate=1000.0,
                             proxy_peak_rss_mib={"client-node": 60.0, "server-node": 62.0}),
        "ambit": SetupResult("ambit", throughput_gbps=2.0, p50_ms=0.4, p99_ms=1.5,
                             achieved_rate=999.0,
                             proxy_peak_rss_mib={"client-node": 45.0, "server-node": 31.0}),
    }


def test_table_has_columns_in_order_and_ratios() -> None:
    table = format_table(_results())
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "direct", "envoy", "ambit", "ambit/envoy"]
    rows = {line.split("  ")[0].strip(): line.split() for line in lines[2:] if line}
    assert rows["P1 throughput, 1 stream (Gbit/s)"][-4:] == ["20.00", "8.00", "2.00", "0.25x"]
    # latency ratio is ambit time / envoy time
    assert rows["P2 p50 latency from schedule (ms)"][-1] == "2.00x"
    assert rows["P2 p99 latency from schedule (ms)"][-1] == "3.00x"
    assert rows["client-node proxy peak RSS (MiB)"][-4:] == ["-", "60.0", "45.0", "0.75x"]
    assert "max latency (ms)" not in rows  # no setup measured it: the row is left out


def test_table_without_envoy_has_no_ratio_and_lists_errors() -> None:
    results = _results()
    del results["envoy"]
    results["ambit"] = SetupResult("ambit", errors=["ztunnel not runnable: no module"])
    table = format_table(results)
    assert "ambit/envoy" not in table
    assert "note: ambit: ztunnel not runnable: no module" in table
    throughput = next(line for line in table.splitlines() if line.startswith("P1 throughput"))
    assert throughput.split()[-2:] == ["20.00", "-"]


def test_setup_result_json_round_trip() -> None:
    r = _results()["ambit"]
    assert SetupResult.from_json(r.to_json()) == r


def test_envoy_chain_is_mutual_tls_1_3_with_spiffe_checks(tmp_path: Path) -> None:
    from bench.envoy import TlsFiles

    tls = TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "tb.pem")
    a = client_side_bootstrap("10.0.0.1", "10.0.0.2", [5201], tls, "spiffe://td/ns/b/sa/s",
                              sni="s.b")
    b = server_side_bootstrap("10.0.0.2", "10.0.2.2", [5201], tls, "spiffe://td/ns/b/sa/c")
    up = a["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
    assert up["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    assert up["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://td/ns/b/sa/s"}}]
    down = b["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
    assert down["typed_config"]["require_client_certificate"] is True
    assert b["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_state_document_puts_each_pod_on_its_node() -> None:
    doc = state_document("10.244.1.2", "10.244.2.2", ("bench", "client"), ("bench", "server"))
    nodes = {w["serviceAccount"]: (w["node"], w["addresses"], w["protocol"])
             for w in doc["workloads"]}
    assert nodes == {"client": ("node-1", ["10.244.1.2"], "HBONE"),
                     "server": ("node-2", ["10.244.2.2"], "HBONE")}


def test_combine_takes_median_throughput_pooled_latency_and_max_memory() -> None:
    from bench.report import combine

    runs = [
        SetupResult(
            "ambit",
            throughput_gbps=1.0,
            achieved_rate=1000.0,
            proxy_peak_rss_mib={"client-node": 40.0},
        ),
        SetupResult(
            "ambit",
            throughput_gbps=3.0,
            achieved_rate=998.0,
            proxy_peak_rss_mib={"client-node": 45.0},
        ),
        SetupResult(
            "ambit",
            throughput_gbps=2.0,
            achieved_rate=1000.0,
            errors=["run 3: something"],
            proxy_peak_rss_mib={"client-node": 41.0},
        ),
    ]
    samples = [[1.0, 2.0], [3.0], [4.0, 5.0]]
    out = combine("ambit", runs, samples)
    assert out.runs == 3
    assert out.throughput_gbps == 2.0
    assert out.throughput_runs == [1.0, 3.0, 2.0]
    assert out.p50_ms == 3.0  # over the pooled 1..5, not a median of per-run medians
    assert out.max_ms == 5.0
    assert out.achieved_rate == pytest.approx(999.333, rel=1e-4)
    assert out.proxy_peak_rss_mib == {"client-node": 45.0}
    assert out.errors == ["run 3: something"]

"""The churn benchmark's pure parts: merging repeated runs and the table's ratio line."""

from __future__ import annotations

from pathlib import Path

from bench.churn import ChurnResult, merge, table, write_plot


def run(mode: str, pods: int, cpu: float, add: list[float]) -> ChurnResult:
    r = ChurnResult(mode, pods, agent_cpu_add_ms=cpu, agent_cpu_del_ms=cpu / 2,
                    add_ms=add, del_ms=add, first_ms=[10.0], probes=1, probes_ok=1)
    r.add_p50_ms = r.add_p99_ms = r.del_p50_ms = r.del_p99_ms = add[0]
    return r


def test_merge_averages_cpu_and_pools_samples() -> None:
    m = merge([run("ebpf", 10, 10.0, [1.0, 2.0]), run("ebpf", 10, 20.0, [3.0, 4.0])])
    assert m.repeats == 2 and m.agent_cpu_add_ms == 15.0 and m.agent_cpu_ms == 22.5
    assert m.add_ms == [1.0, 2.0, 3.0, 4.0] and m.add_p50_ms == 2.5
    assert (m.probes, m.probes_ok, m.first_conn_p50_ms) == (2, 2, 10.0)


def test_table_reports_the_ratio_per_mode(tmp_path: Path) -> None:
    results = [run("ebpf", 10, 10.0, [1.0]), run("ebpf", 250, 12.0, [1.0]),
               run("iptables", 10, 10.0, [1.0]), run("iptables", 250, 20.0, [1.0])]
    text = table(results)
    assert "ebpf: agent CPU per pod at 250 pods / at 10 pods = 1.20x" in text
    assert "iptables: agent CPU per pod at 250 pods / at 10 pods = 2.00x" in text
    write_plot(results, tmp_path / "churn.png")
    assert (tmp_path / "churn.png").stat().st_size > 0

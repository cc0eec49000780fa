"""The demo's one-line rendering of Istio metric samples."""

from __future__ import annotations

from ambit.dev import demo


def test_compact_metric_line() -> None:
    line = (
        'istio_tcp_connections_opened_total{connection_security_policy="mutual_tls",'
        'reporter="source",response_flags="-",source_workload="client",'
        'destination_workload="server"} 1.0'
    )
    assert demo._compact(line) == (
        "istio_tcp_connections_opened_total{reporter=source,source_workload=client,"
        "destination_workload=server,response_flags=-} 1.0"
    )

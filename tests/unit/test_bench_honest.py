"""The benchmark's accounting for issue 14 ("an honest benchmark"), without root or namespaces.

Latency from the scheduled send time (no coordinated omission), CPU seconds from /proc stat
lines, retransmits from /proc/net/snmp, the bytes a throughput phase moved, the cipher read
from a ServerHello, CPU per unit of work, two Envoy ratio columns, and the Envoy HBONE pair's
configuration. Each of these decides a number docs/performance.md quotes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bench import mesh
from bench.__main__ import CAPTURE_OF, PHASES, build_parser, expected_connections
from bench.envoy import TlsFiles, client_side_hbone_bootstrap, server_side_hbone_bootstrap
from bench.measure import Settings, parse_iperf
from bench.report import (
    AMBITS,
    SetupResult,
    cipher_name,
    combine,
    format_table,
    format_workers_table,
    parse_proc_stat_cpu,
    parse_snmp_retrans,
)
from bench.rr import run_client, scheduled_latency
from bench.tlsprobe import parse_ciphers


def test_latency_of_a_held_up_send_counts_from_its_schedule() -> None:
    # Scheduled at 1000, but the previous answer only came at 4990, so it went at 5000 and was
    # echoed at 5200: the user waited 4200, not the 200 the wire took.
    assert scheduled_latency(1000, 5000, 5200, interval_ns=1000, prev_done_ns=4990) == (
        4200, True)
    # Held up a little: from the schedule, but not late.
    assert scheduled_latency(1000, 1500, 1700, interval_ns=1000, prev_done_ns=1400) == (
        700, False)
    # Connection free at its time, the client's timer woke 800 late: that slack is the load
    # generator's, so the latency counts from the send.
    assert scheduled_latency(1000, 1800, 2000, interval_ns=1000, prev_done_ns=500) == (
        200, False)
    # Timer fired early: the wait starts when the request actually left.
    assert scheduled_latency(1000, 900, 1100, interval_ns=1000, prev_done_ns=1200) == (
        200, False)
    with pytest.raises(ValueError):
        scheduled_latency(0, 10, 5, interval_ns=1000, prev_done_ns=0)


class _StallingEcho(asyncio.Protocol):
    """Echoes, except that the answer to the 3rd request is held back for ``stall`` seconds."""

    def __init__(self, size: int, stall: float) -> None:
        self.size, self.stall, self.seen = size, stall, 0
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= self.size:
            msg, self.buf = self.buf[:self.size], self.buf[self.size:]
            self.seen += 1
            if self.seen == 3:
                asyncio.get_running_loop().call_later(self.stall, self.transport.write, msg)
            else:
                self.transport.write(msg)


def test_a_stall_shows_in_every_request_scheduled_during_it() -> None:
    """One 100 ms stall at 200 req/s delays the ~20 requests scheduled behind it. Timing from
    the actual send (coordinated omission) would show one slow request; from the schedule,
    about 20 are slow."""

    async def scenario() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _StallingEcho(64, 0.1), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await run_client("127.0.0.1", port, rate=200, duration=0.4, warmup=0.0,
                                    connections=1, size=64)
        finally:
            server.close()

    summary = asyncio.run(scenario())
    samples_us = summary["samples_us"]
    assert isinstance(samples_us, list)
    slow = [x for x in samples_us if x > 40_000]
    assert len(slow) >= 8, slow
    late = summary["late_sends"]
    assert isinstance(late, int) and late >= 8
    assert str(summary["timed_from"]).startswith("scheduled send")


def test_cpu_seconds_from_proc_stat_even_with_odd_command_names() -> None:
    # comm may contain spaces and parentheses; utime=250 stime=50 cutime=30 cstime=20 ticks.
    line = ("4242 (envoy (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 "
            "250 50 30 20 20 0 3 0 100 1000 200")
    own, reaped = parse_proc_stat_cpu(line, clock_ticks=100)
    assert own == pytest.approx(3.0)
    assert reaped == pytest.approx(0.5)


def test_retransmits_from_snmp() -> None:
    text = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails "
            "EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n"
            "Tcp: 1 200 120000 -1 10 5 0 0 2 1000 900 37 0 3 0\n")
    assert parse_snmp_retrans(text) == 37
    with pytest.raises(ValueError):
        parse_snmp_retrans("Ip: a\nIp: 1\n")


def test_bytes_moved_include_the_omitted_slow_start() -> None:
    data = {"intervals": [{"sum": {"bytes": 100, "omitted": True}},
                          {"sum": {"bytes": 300, "omitted": False}}],
            "end": {"sum_received": {"bits_per_second": 2.5e9},
                    "sum_sent": {"retransmits": 4}}}
    tp = parse_iperf(data)
    assert (tp.gbps, tp.retransmits, tp.bytes_sent) == (2.5, 4, 400)


def test_cipher_names_from_tshark_output() -> None:
    assert cipher_name("0x1301") == "TLS_AES_128_GCM_SHA256"
    assert cipher_name("4866") == "TLS_AES_256_GCM_SHA384"
    out = ('Running as user "root"\nCapturing on \'any\'\n0x1302\n0x1302\n0x1301\n'
           "2 packets captured\n")
    assert parse_ciphers(out) == ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]


def test_cpu_per_unit_is_summed_over_runs() -> None:
    runs = [SetupResult("ambit", bytes_moved=2_000_000_000, requests=1000,
                        cpu_s={"throughput": {"client-node": 3.0, "server-node": 1.0},
                               "latency": {"client-node": 0.2, "server-node": 0.1}}),
            SetupResult("ambit", bytes_moved=1_000_000_000, requests=3000,
                        cpu_s={"throughput": {"client-node": 1.0, "server-node": 1.0},
                               "latency": {"client-node": 0.3, "server-node": 0.2}},
                        tcp_retrans={"latency": 2})]
    out = combine("ambit", runs, [[], []])
    assert out.cpu_per("throughput") == pytest.approx(6.0 / 3.0)  # s per GB
    assert out.cpu_per("latency") == pytest.approx(0.8 / 4.0)  # s per 1000 requests
    assert out.cpu_per("connrate") is None
    assert out.tcp_retrans == {"latency": 2}


def _three() -> dict[str, SetupResult]:
    return {
        "envoy": SetupResult("envoy", throughput_gbps=8.0, p99_ms=1.0, late_sends=3,
                             ciphers=["TLS_AES_128_GCM_SHA256"]),
        "envoy-hbone": SetupResult("envoy-hbone", throughput_gbps=4.0, p99_ms=2.0,
                                   ciphers=["TLS_AES_128_GCM_SHA256"]),
        "ambit": SetupResult("ambit", throughput_gbps=2.0, p99_ms=1.5, late_sends=9,
                             ciphers=["TLS_AES_256_GCM_SHA384"],
                             idle_rss_mib={"client-node": 40.0, "server-node": 42.0}),
    }


def test_table_has_a_ratio_column_per_envoy_setup_and_states_the_ciphers() -> None:
    lines = format_table(_three()).splitlines()
    assert lines[0].split() == ["metric", "envoy", "envoy-hbone", "ambit", "ambit/envoy",
                                "ambit/envoy-hbone"]
    tp = next(x for x in lines if x.startswith("P1 throughput"))
    assert tp.split()[-2:] == ["0.25x", "0.50x"]
    late = next(x for x in lines if "late sends" in x)
    assert late.split()[-5:] == ["3", "-", "9", "-", "-"]  # counts get no ratio
    idle = next(x for x in lines if x.startswith("P6 idle RSS"))
    assert idle.split()[-3:] == ["42.0", "-", "-"]  # the larger of the two proxies
    cipher = next(x for x in lines if x.startswith("TLS 1.3 cipher"))
    assert cipher.split()[-3:] == ["AES_128_GCM", "AES_128_GCM", "AES_256_GCM"]


def test_each_ztunnel_capture_gets_its_own_ratio_columns() -> None:
    results = _three()
    results["ambit-ebpf"] = SetupResult("ambit-ebpf", throughput_gbps=3.0, p99_ms=1.0)
    results["ambit-inpod"] = SetupResult("ambit-inpod", throughput_gbps=6.0, p99_ms=1.0)
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["metric", "envoy", "envoy-hbone", "ambit", "ambit-ebpf",
                                "ambit-inpod", "ambit/envoy", "ambit/envoy-hbone",
                                "ambit-ebpf/envoy", "ambit-ebpf/envoy-hbone",
                                "ambit-inpod/envoy", "ambit-inpod/envoy-hbone"]
    tp = next(x for x in lines if x.startswith("P1 throughput"))
    assert tp.split()[-6:] == ["0.25x", "0.50x", "0.38x", "0.75x", "0.75x", "1.50x"]


def test_every_ztunnel_setup_is_captured_its_own_way_and_proven_proxied() -> None:
    # Each ztunnel setup other than plain "ambit" (TPROXY) names a capture start_ztunnels
    # knows; _run_setup checks every AMBITS setup with verify_proxied before its numbers count.
    assert set(CAPTURE_OF) == set(AMBITS) - {"ambit"}
    assert set(CAPTURE_OF.values()) | {"iptables"} == set(mesh.CAPTURES)
    assert build_parser().parse_args(["--only", "ambit-inpod,ambit"]).only == [
        "ambit", "ambit-inpod"]


def test_workers_table_shows_scaling() -> None:
    table = format_workers_table({"ambit": {1: 1.0, 2: 1.5}, "envoy": {1: 4.0, 2: None}})
    rows = {x.split()[0]: x.split()[1:] for x in table.splitlines()[2:]}
    assert rows["ambit"] == ["1.00", "1.50", "1.50x"]
    assert rows["envoy"] == ["4.00", "-", "-"]


def test_envoy_hbone_pair_tunnels_connect_over_mtls_to_15008(tmp_path: Path) -> None:
    tls = TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "tb.pem")
    a = client_side_hbone_bootstrap("10.0.0.1", "10.0.0.2", "10.244.2.2", [5201, 7000], tls,
                                    "spiffe://td/ns/b/sa/s", sni="s.b")
    b = server_side_hbone_bootstrap("10.0.0.2", "10.244.2.2", [5201, 7000], tls,
                                    "spiffe://td/ns/b/sa/c")
    (cluster,) = a["static_resources"]["clusters"]
    port = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert port["socket_address"]["port_value"] == 15008
    tls_up = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls_up["alpn_protocols"] == ["h2"]
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    tunnels = [lst["filter_chains"][0]["filters"][0]["typed_config"]["tunneling_config"]
               for lst in a["static_resources"]["listeners"]]
    assert tunnels == [{"hostname": "10.244.2.2:5201"}, {"hostname": "10.244.2.2:7000"}]
    (listener,) = b["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 15008
    chain = listener["filter_chains"][0]
    assert chain["transport_socket"]["typed_config"]["require_client_certificate"] is True
    hcm = chain["filters"][0]["typed_config"]
    assert hcm["http2_protocol_options"] == {"allow_connect": True}
    assert hcm["upgrade_configs"] == [{"upgrade_type": "CONNECT"}]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"]["headers"][0]["string_match"]["exact"] for r in routes] == [
        "10.244.2.2:5201", "10.244.2.2:7000"]
    assert all("connect_matcher" in r["match"] for r in routes)


def test_expected_connections_follow_the_phases() -> None:
    s = Settings(connections=2, many_connections=1000)
    r = SetupResult("ambit", conns=500, ciphers=["x"])
    assert expected_connections(["throughput", "latency"], s, r) == 1 + 2 + 2
    assert expected_connections(["connrate", "many"], s, r) == 1 + 500 + 1000
    assert expected_connections(["workers"], s, SetupResult("ambit")) == 5


def test_phases_run_in_the_order_given_and_default_to_many_before_connrate() -> None:
    assert build_parser().parse_args([]).phases == list(PHASES)
    assert PHASES.index("many") < PHASES.index("connrate")
    args = build_parser().parse_args(["--phases", "connrate,many,connrate"])
    assert args.phases == ["connrate", "many"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--phases", "nope"])

"""The pure parts of ``--workers`` (ztunnel/workers.py, ztunnel/config.py): how many workers by
default, the flag's forms, how the workers' metrics merge on the parent's endpoint, the
restart backoff and the control channel's framing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.spiffe import SpiffeId
from ztunnel.agent_link import AgentLink
from ztunnel.config import (
    ConfigError,
    ZtunnelConfig,
    available_cpus,
    cpu_quota,
    default_workers,
    parse_workers,
)
from ztunnel.identity import IdentityError
from ztunnel.workers import (
    MAX_FRAME,
    RESTART_BACKOFF,
    ParentSecrets,
    frame,
    members_for,
    merge_metrics,
    opened_connections,
    read_frame,
    render_merged,
    restart_delay,
    worker_config,
)


@pytest.mark.parametrize(("size", "workers", "served"), [
    (2, 2, [[0], [1]]),  # a group this ztunnel bound: member i to worker i
    (4, 2, [[0, 2], [1, 3]]),  # taken over from a ztunnel with more workers: none left out
    (2, 3, [[0], [1], [0]]),  # ... with fewer: every worker serves one
    (1, 4, [[0], [0], [0], [0]]),
    (3, 1, [[0, 1, 2]]),
])
def test_members_for(size: int, workers: int, served: list[list[int]]) -> None:
    assert [members_for(size, i, workers) for i in range(workers)] == served


@pytest.mark.parametrize(("cpus", "workers"), [
    (1, 2), (2, 2), (4, 2), (8, 2), (9, 3), (12, 3), (16, 4), (17, 5), (64, 16), (96, 24),
])
def test_default_is_max_of_two_and_a_quarter_of_the_cores(cpus: int, workers: int) -> None:
    assert default_workers(cpus) == workers


@pytest.mark.parametrize(("cpu_max", "cores"), [
    ("max 100000", None), ("200000 100000", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5),
    ("", None), ("garbage", None), ("0 100000", None), ("x 100000", None),
])
def test_cgroup_cpu_quota(cpu_max: str, cores: float | None) -> None:
    assert cpu_quota(cpu_max) == cores


def test_available_cpus_is_capped_by_the_cgroup_quota(tmp_path: Path) -> None:
    unlimited = available_cpus(tmp_path / "absent")
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(tmp_path / "cpu.max") == min(unlimited, 2)  # 1.5 cores: 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path / "cpu.max") == unlimited


def test_config_default_follows_the_cores_this_process_may_use() -> None:
    assert ZtunnelConfig(node="n").validate().workers == default_workers(available_cpus())


@pytest.mark.parametrize(("text", "cpus", "workers"), [
    ("1", 8, 1), ("4", 8, 4), (" 3 ", 2, 3), ("25%", 8, 2), ("25%", 2, 1), ("25%", 9, 3),
    ("100%", 6, 6), ("50%", 1, 1), ("12.5%", 16, 2),
])
def test_parse_workers(text: str, cpus: int, workers: int) -> None:
    assert parse_workers(text, cpus) == workers


@pytest.mark.parametrize("text", ["", "two", "-1", "0%", "101%", "%", "x%", "٣", "1e3"])
def test_parse_workers_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"count or a percentage|percentage of the cores"):
        parse_workers(text, 8)


@pytest.mark.parametrize("value", [0, 65, -2, True, 2.5])
def test_worker_count_out_of_range_is_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match="workers"):
        ZtunnelConfig.from_mapping({"node": "n", "workers": value})


def test_workers_from_a_flag_or_file_string() -> None:
    assert ZtunnelConfig.from_mapping({"node": "n"}, workers="3").workers == 3
    assert ZtunnelConfig.from_mapping({"node": "n", "workers": "100%"}).workers == \
        available_cpus()
    with pytest.raises(ConfigError, match="workers: 'many'"):
        ZtunnelConfig.from_mapping({"node": "n"}, workers="many")


# -- metrics merging, as a table -------------------------------------------------------------

W0 = """\
# HELP istio_tcp_connections_opened_total TCP connections opened
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source",response_flags="-"} 3.0
istio_tcp_connections_opened_total{reporter="source",response_flags="DENY"} 1.0
istio_tcp_connections_opened_created{reporter="source",response_flags="-"} 1000.0
# HELP ambit_ztunnel_active_connections Open proxied connections
# TYPE ambit_ztunnel_active_connections gauge
ambit_ztunnel_active_connections{listener="outbound"} 2.0
# HELP ambit_state_workloads Workloads in the mesh state
# TYPE ambit_state_workloads gauge
ambit_state_workloads 7.0
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 500.0
# HELP ambit_certificate_expiry_seconds Unix time at which a workload certificate expires
# TYPE ambit_certificate_expiry_seconds gauge
ambit_certificate_expiry_seconds{identity="spiffe://td/ns/a/sa/b"} 9000.0
"""

W1 = """\
# HELP istio_tcp_connections_opened_total TCP connections opened
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{response_flags="-",reporter="source"} 4.0
istio_tcp_connections_opened_created{reporter="source",response_flags="-"} 900.0
# HELP ambit_ztunnel_active_connections Open proxied connections
# TYPE ambit_ztunnel_active_connections gauge
ambit_ztunnel_active_connections{listener="outbound"} 5.0
ambit_ztunnel_active_connections{listener="inbound"} 1.0
# HELP ambit_state_workloads Workloads in the mesh state
# TYPE ambit_state_workloads gauge
ambit_state_workloads 7.0
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 400.0
# HELP ambit_certificate_expiry_seconds Unix time at which a workload certificate expires
# TYPE ambit_certificate_expiry_seconds gauge
ambit_certificate_expiry_seconds{identity="spiffe://td/ns/a/sa/b"} 8000.0
# HELP ambit_xds_connected 1 while subscribed to the controller's state push
# TYPE ambit_xds_connected gauge
ambit_xds_connected 1.0
"""


def _values(texts: list[str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in merge_metrics(texts) for s in f.samples}


@pytest.mark.parametrize(("name", "labels", "merged", "why"), [
    ("istio_tcp_connections_opened_total", {"reporter": "source", "response_flags": "-"}, 7.0,
     "counters add up (label order does not matter)"),
    ("istio_tcp_connections_opened_total", {"reporter": "source", "response_flags": "DENY"},
     1.0, "a label set only one worker has"),
    ("istio_tcp_connections_opened_created", {"reporter": "source", "response_flags": "-"},
     900.0, "creation time: the earliest"),
    ("ambit_ztunnel_active_connections", {"listener": "outbound"}, 7.0, "gauges add up"),
    ("ambit_ztunnel_active_connections", {"listener": "inbound"}, 1.0, "one worker's only"),
    ("ambit_state_workloads", {}, 7.0, "the same state everywhere: max, not a sum"),
    ("process_start_time_seconds", {}, 400.0, "the oldest process"),
    ("ambit_certificate_expiry_seconds", {"identity": "spiffe://td/ns/a/sa/b"}, 8000.0,
     "the first certificate to expire"),
    ("ambit_xds_connected", {}, 1.0, "only the parent subscribes"),
])
def test_merge_table(name: str, labels: dict[str, str], merged: float, why: str) -> None:
    assert _values([W0, W1])[(name, tuple(sorted(labels.items())))] == merged, why


def test_merge_of_one_text_is_that_text() -> None:
    assert _values([W0]) == {(s.name, tuple(sorted(s.labels.items()))): s.value
                             for f in text_string_to_metric_families(W0) for s in f.samples}


def test_merged_render_is_valid_exposition_with_types_and_help() -> None:
    text = render_merged([W0, W1]).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["istio_tcp_connections_opened"].type == "counter"
    assert families["ambit_ztunnel_active_connections"].type == "gauge"
    assert families["istio_tcp_connections_opened"].documentation == "TCP connections opened"
    assert text.count("# TYPE ambit_state_workloads gauge") == 1


def test_opened_connections_of_one_worker() -> None:
    assert opened_connections(W0) == {"source/": 4.0}
    assert opened_connections(W1) == {"source/": 4.0}
    assert opened_connections("") == {}
    text = W0.replace('reporter="source",response_flags="DENY"',
                      'connection_security_policy="none",reporter="destination",'
                      'response_flags="DENY"')
    assert opened_connections(text) == {"source/": 3.0, "destination/none": 1.0}


@pytest.mark.parametrize(("previous", "lived", "delay"), [
    (0.0, 0.0, RESTART_BACKOFF[0]),  # the first restart
    (0.2, 1.0, 0.4),  # died young again: double
    (6.4, 1.0, RESTART_BACKOFF[1]),  # capped
    (RESTART_BACKOFF[1], 1.0, RESTART_BACKOFF[1]),
    (6.4, 60.0, RESTART_BACKOFF[0]),  # ran a while: start over
])
def test_restart_delay(previous: float, lived: float, delay: float) -> None:
    assert restart_delay(previous, lived) == pytest.approx(delay)


async def _read(data: bytes) -> list[bytes | None]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out: list[bytes | None] = []
    while True:
        body = await read_frame(reader)
        out.append(body)
        if body is None:
            return out


def test_frames_round_trip_and_end_cleanly() -> None:
    assert asyncio.run(_read(frame(b"a") + frame(b"") + frame(b"xyz"))) == \
        [b"a", b"", b"xyz", None]


@pytest.mark.parametrize(("data", "problem"), [
    (b"\x00\x00", "inside a frame header"),
    ((MAX_FRAME + 1).to_bytes(4, "big"), "limit"),
])
def test_bad_frames(data: bytes, problem: str) -> None:
    with pytest.raises(ConnectionError, match=problem):
        asyncio.run(_read(data))


@pytest.mark.parametrize(("setting", "configured", "workers", "per_worker"), [
    ("max_hbone_connections", 4096, 2, 2048),
    ("max_hbone_connections_per_ip", 1024, 3, 341),  # rounded down: never above the total
    ("max_hbone_connections_per_identity", 1024, 4, 256),
    ("max_plaintext_connections", 4096, 2, 2048),
    ("max_plaintext_connections_per_ip", 1, 2, 1),  # at least one each
    ("max_outbound_connections_per_pod", 2048, 2, 1024),
    ("max_socks5_connections", 0, 2, 0),  # unlimited stays unlimited
    ("pod_start_hold_max", 512, 2, 256),
    ("pod_start_hold_per_source", 32, 8, 4),
    ("max_hbone_connections", 4096, 1, 4096),
    ("hbone_peer_buffer", 16 << 20, 2, 8 << 20),  # one peer's buffers, over the workers
    ("hbone_peer_buffer", 1 << 20, 8, 256 << 10),  # never below the smallest valid budget
    ("hbone_peer_buffer", 0, 2, 0),  # off stays off
])
def test_worker_config_shares_the_per_process_limits(setting: str, configured: int,
                                                     workers: int, per_worker: int) -> None:
    config = ZtunnelConfig.from_mapping({"node": "n", "workers": workers, setting: configured})
    assert getattr(worker_config(config), setting) == per_worker
    assert getattr(config, setting) == configured  # the parent's own is untouched


def test_worker_config_keeps_everything_else() -> None:
    config = ZtunnelConfig.from_mapping({"node": "n", "workers": 2})
    shared = worker_config(config)
    for f in dataclasses.fields(config):
        if (f.name.startswith(("max_", "pod_start_hold_")) and f.name != "pod_start_hold") \
                or f.name == "hbone_peer_buffer":
            continue
        assert getattr(shared, f.name) == getattr(config, f.name), f.name


def _link(barrier: Callable[[], Awaitable[None]]) -> AgentLink:
    return AgentLink(Path("/nonexistent"), {}, node="n", on_request=lambda _r: None,
                     barrier=barrier)


def test_agent_request_is_answered_after_the_workers_applied_it() -> None:
    line = b'{"op": "pod_deleted", "id": 7, "uid": "default/a"}'
    waited: list[bool] = []

    async def applied() -> None:
        waited.append(True)

    async def late() -> None:
        raise ValueError("worker(s) 1 did not apply the change within 3s")

    assert json.loads(asyncio.run(_link(applied)._answer(line))) == {"id": 7, "ok": True}
    assert waited == [True]
    link = _link(late)
    assert json.loads(asyncio.run(link._answer(line))) == {
        "id": 7, "ok": False, "error": "worker(s) 1 did not apply the change within 3s"}
    assert (link.requests, link.refused) == (0, 1)
    # A refused request never waits for the workers.
    bad = asyncio.run(_link(late)._answer(b'{"op": "pod_deleted", "id": 8, "uid": "x"}'))
    assert json.loads(bad)["ok"] is False and "worker" not in json.loads(bad)["error"]


def _sent(frames: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(f[4:]) for f in frames]


def test_worker_asks_the_parent_once_per_identity_and_gets_its_refusal() -> None:
    frames: list[bytes] = []
    secrets = ParentSecrets()
    secrets.send = frames.append
    identity = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/a")

    async def scenario() -> list[BaseException | ssl.SSLContext]:
        waiting = [asyncio.create_task(secrets.client_context(identity)),
                   asyncio.create_task(secrets.server_context(identity))]
        await asyncio.sleep(0)
        secrets.refused(identity, "the CA refused: not on this node")
        return await asyncio.gather(*waiting, return_exceptions=True)

    results = asyncio.run(scenario())
    assert _sent(frames) == [{"op": "cert", "identity": str(identity)}], "single flight"
    assert all(isinstance(r, IdentityError) and "not on this node" in str(r) for r in results)


def test_worker_gives_up_on_a_silent_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ztunnel.workers.CERT_TIMEOUT", 0.01)
    secrets = ParentSecrets()
    secrets.send = lambda _frame: None
    identity = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/a")
    with pytest.raises(IdentityError, match="did not send a certificate"):
        asyncio.run(secrets.client_context(identity))
    starting = ParentSecrets()  # no control channel yet
    with pytest.raises(IdentityError, match="worker starting"):
        asyncio.run(starting.server_context(identity))

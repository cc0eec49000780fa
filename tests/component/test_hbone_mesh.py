"""Two ztunnels on loopback: traffic, metrics, policy, identities, reloads, bad input."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import ipaddress
import json
import os
import random
import ssl
import struct
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from controller.ca import CertificateAuthority, write_identity
from mesh.spiffe import SpiffeId
from tests.component.harness import (
    CLIENT_IP,
    ECHO_IP,
    ECHO_PORT,
    NET,
    OTHER_CLIENT_IP,
    SERVICE_VIP,
    TD,
    Mesh,
    base_state,
    digest,
    exchange,
    free_port,
    mesh,
    sample,
)
from tests.component.waiting import until


async def roundtrip(m: Mesh, payload: bytes, source: str = CLIENT_IP,
                    dest: tuple[str, int] = (ECHO_IP, ECHO_PORT)) -> bytes:
    r, w = await m.connect(dest, source)
    return await exchange(r, w, payload)


async def refused(m: Mesh, source: str = CLIENT_IP,
                  dest: tuple[str, int] = (ECHO_IP, ECHO_PORT)) -> bool:
    """True if the tunnel is closed without carrying a byte."""
    try:
        got = await asyncio.wait_for(roundtrip(m, b"secret", source, dest), 5)
    except (ConnectionError, OSError):
        return True
    return got == b""


wait_for = partial(until, limit=3.0, interval=0.02)


def with_policy(*policies: dict[str, Any], **extra: Any) -> dict[str, Any]:
    state = base_state()
    state["authorizationPolicies"] = list(policies)
    state.update(extra)
    return state


ALLOW_CLIENT = {"name": "allow-client", "namespace": "default", "spec": {
    "selector": {"matchLabels": {"app": "echo"}},
    "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/default/sa/client"]}}]}]}}
DENY_OTHER = {"name": "deny-other", "namespace": "default", "spec": {
    "action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}}


async def test_echo_over_hbone_with_matching_metrics(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        payload = os.urandom(3_000_000)
        got = await roundtrip(m, payload)
        assert digest(got) == digest(payload)
        await asyncio.sleep(0.05)
        n = float(len(payload))
        assert sample(m.a, "istio_tcp_sent_bytes_total", reporter="source") == n
        assert sample(m.a, "istio_tcp_received_bytes_total", reporter="source") == n
        labels = {"reporter": "destination", "source_workload": "client",
                  "destination_workload": "echo",
                  "source_principal": f"spiffe://{TD}/ns/default/sa/client",
                  "destination_principal": f"spiffe://{TD}/ns/default/sa/echo",
                  "connection_security_policy": "mutual_tls"}
        assert sample(m.b, "istio_tcp_received_bytes_total", **labels) == n
        assert sample(m.b, "istio_tcp_sent_bytes_total", **labels) == n
        assert sample(m.b, "istio_tcp_connections_opened_total", **labels) == 1
        assert sample(m.b, "istio_tcp_connections_closed_total", **labels) == 1
        assert m.echo.received == len(payload)
        # The echo server saw the ztunnel, never the client directly.
        assert CLIENT_IP not in m.echo.peers


async def test_service_vip_routes_to_endpoint(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        assert await roundtrip(m, b"via service", dest=(SERVICE_VIP, 80)) == b"via service"
        assert sample(m.b, "istio_tcp_connections_opened_total", reporter="destination") == 1
        assert sample(m.a, "istio_tcp_connections_opened_total",
                      destination_service="echo.default.svc.cluster.local") == 1


async def test_allow_policy(tmp_path: Path) -> None:
    async with mesh(tmp_path, with_policy(ALLOW_CLIENT)) as m:
        assert await roundtrip(m, b"hello") == b"hello"
        before = m.echo.received
        assert await refused(m, source=OTHER_CLIENT_IP)
        assert m.echo.received == before  # no byte forwarded
        assert sample(m.b, "ambit_ztunnel_policy_denied_total", direction="destination") == 1
        assert sample(m.b, "istio_tcp_connections_opened_total", response_flags="DENY") == 1
        assert sample(m.a, "istio_tcp_connections_opened_total", response_flags="DENY") == 1


async def test_deny_policy(tmp_path: Path) -> None:
    async with mesh(tmp_path, with_policy(DENY_OTHER)) as m:
        assert await refused(m, source=OTHER_CLIENT_IP)
        assert await roundtrip(m, b"ok") == b"ok"
        assert sample(m.b, "ambit_ztunnel_policy_denied_total",
                      policy="default/deny-other") == 1


async def socks_answer(m: Mesh, dest: tuple[str, int], source: str = CLIENT_IP,
                       greeting: bytes = b"\x05\x01\x00") -> tuple[bytes, bytes]:
    """A SOCKS5 CONNECT by hand: (method selection + reply as sent, what follows until EOF)."""
    r, w = await asyncio.open_connection(*m.socks, local_addr=(source, 0))
    try:
        w.write(greeting)
        method = await asyncio.wait_for(r.readexactly(2), 5)
        if method != b"\x05\x00":
            return method, await asyncio.wait_for(r.read(), 5)
        try:
            ip = ipaddress.ip_address(dest[0])
            address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        except ValueError:  # a host name
            address = b"\x03" + bytes([len(dest[0])]) + dest[0].encode()
        w.write(b"\x05\x01\x00" + address + struct.pack("!H", dest[1]))
        answer = await asyncio.wait_for(r.readexactly(10), 5)
        rest = await asyncio.wait_for(r.read(), 5) if answer[1] != 0 else b""
        return method + answer, rest
    finally:
        w.close()


async def test_socks5_replies_with_the_outcome(tmp_path: Path) -> None:
    # A host outside the mesh: a workload that is not enrolled (the pods here are loopback
    # addresses; any other loopback address is the node itself and refused).
    outside = f"127.{NET}.250.1"
    state = with_policy(ALLOW_CLIENT)
    state["workloads"].append({"name": "outside", "namespace": "default", "node": "node-b",
                               "addresses": [outside], "protocol": "TCP"})
    async with mesh(tmp_path, state) as m:
        ok, _ = await socks_answer(m, (ECHO_IP, ECHO_PORT))
        assert ok[3] == 0  # succeeded

        # Denied by the destination's policy (403 over HBONE): "not allowed by ruleset", close.
        answer, rest = await socks_answer(m, (ECHO_IP, ECHO_PORT), source=OTHER_CLIENT_IP)
        assert (answer[3], rest) == (2, b"")
        # Nothing listens on the pod's port (503 over HBONE): host unreachable.
        answer, rest = await socks_answer(m, (ECHO_IP, free_port(ECHO_IP)))
        assert (answer[3], rest) == (4, b"")
        # Outside the mesh, a closed port: connection refused.
        answer, rest = await socks_answer(m, (outside, free_port(outside)))
        assert (answer[3], rest) == (5, b"")
        # No route: the service has no such port.
        answer, rest = await socks_answer(m, (SERVICE_VIP, 81))
        assert (answer[3], rest) == (4, b"")
        assert m.echo.received == 0

        # No acceptable method (only username/password): the greeting's refusal, then close.
        assert await socks_answer(m, (ECHO_IP, ECHO_PORT), greeting=b"\x05\x01\x02") == (
            b"\x05\xff", b"")
        assert await roundtrip(m, b"alive") == b"alive"


async def test_socks5_never_reaches_the_node_itself(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        admin = (m.a.config.admin_host, m.a.config.admin_port)
        # The admin really listens there: what a pod must not reach through the ztunnel.
        url = f"http://{admin[0]}:{admin[1]}/config_dump"
        assert await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).status) \
            == 200
        node_ips = [str(a) for a in m.a.ctx.own.addresses if not a.is_loopback]
        refused = [("localhost", 15000), ("127.0.0.1", 15000), ("::1", 15000),
                   ("0.0.0.0", admin[1]), admin, ("127.0.0.1", 8080),
                   *((ip, port) for ip in node_ips[:2] for port in (15000, 15022, admin[1]))]
        for dest in refused:
            answer, rest = await socks_answer(m, dest)
            # "Connection not allowed by ruleset", then a close: a denial, nothing dialled.
            assert (answer[3], rest) == (2, b""), dest
        assert sample(m.a, "ambit_ztunnel_policy_denied_total", direction="source",
                      policy="node-protection") == len(refused)
        assert sample(m.a, "istio_tcp_connections_opened_total", response_flags="DENY",
                      source_workload="client") == len(refused)
        # A normal destination still works, through SOCKS5 as through the mesh.
        ok, _ = await socks_answer(m, (ECHO_IP, ECHO_PORT))
        assert ok[3] == 0
        assert await roundtrip(m, b"alive") == b"alive"


async def test_wrong_server_identity_is_refused(tmp_path: Path) -> None:
    state = base_state()
    async with mesh(tmp_path) as m:
        # Node A believes the echo pod runs as "imposter"; node B presents "echo".
        state["workloads"][2]["serviceAccount"] = "imposter"
        m.write_state(state, "a")
        await wait_for(lambda: m.a.store.current.config.workloads[2].service_account
                       == "imposter")
        assert await refused(m)
        assert m.echo.received == 0
        assert sample(m.a, "istio_tcp_connections_opened_total", response_flags="IDENTITY") == 1
        # The refused connection was never pooled, nor forgotten when it closed.
        assert m.a.ctx.pool is not None and m.a.ctx.pool.size == 0


async def test_strict_rejects_plaintext(tmp_path: Path) -> None:
    strict = {"name": "strict", "namespace": "default", "spec": {"mtls": {"mode": "STRICT"}}}
    async with mesh(tmp_path, with_policy(peerAuthentications=[strict])) as m:
        r, w = await asyncio.open_connection(ECHO_IP, 15006, local_addr=(OTHER_CLIENT_IP, 0))
        assert await exchange(r, w, b"plaintext") == b""
        assert sample(m.b, "ambit_ztunnel_policy_denied_total", policy="peer-authentication") == 1
        # mTLS traffic still flows.
        assert await roundtrip(m, b"ok") == b"ok"
        # PERMISSIVE lets plaintext past the mTLS check (here it then meets the loop guard,
        # because on loopback the original destination is the listener itself).
        m.write_state(base_state(), "b")
        await wait_for(lambda: not m.b.store.current.config.peer_authentications)
        r, w = await asyncio.open_connection(ECHO_IP, 15006, local_addr=(OTHER_CLIENT_IP, 0))
        assert await exchange(r, w, b"plaintext") == b""
        assert sample(m.b, "ambit_ztunnel_connection_errors_total",
                      listener="inbound_plaintext", reason="unknown_destination") == 1


async def test_broken_reload_keeps_last_good_state(tmp_path: Path) -> None:
    async with mesh(tmp_path, with_policy(DENY_OTHER)) as m:
        good_version = m.b.store.current
        m.state_b.write_text("workloads:\n  - name: x\n    addresses: [not-an-ip]\n")
        await wait_for(lambda: sample(m.b, "ambit_config_rejected_total") == 1)
        assert m.b.store.current is good_version
        assert m.b.file_source is not None and m.b.file_source.last_error is not None
        assert "workloads[0]" in m.b.file_source.last_error
        assert await roundtrip(m, b"still serving") == b"still serving"
        assert await refused(m, source=OTHER_CLIENT_IP)  # the old policy still applies
        # A good file is applied again.
        m.write_state(with_policy(), "b")
        await wait_for(lambda: sample(m.b, "ambit_config_loaded_total") == 2)
        assert await roundtrip(m, b"now allowed", source=OTHER_CLIENT_IP) == b"now allowed"


async def test_concurrent_connections_arrive_intact(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        rng = random.Random(7)
        payloads = [rng.randbytes(rng.randrange(1, 200_000)) for _ in range(200)]

        async def one(p: bytes) -> bool:
            return digest(await roundtrip(m, p)) == digest(p)

        results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in payloads)), 90)
        assert all(results)
        assert sample(m.b, "istio_tcp_connections_closed_total", reporter="destination") == 200
        # Multiplexed: far fewer HBONE connections than tunnels.
        assert m.a.ctx.pool is not None and m.a.ctx.pool.connections_opened <= 5


async def test_garbage_on_15008_closes_only_that_connection(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        r, w = await asyncio.open_connection(ECHO_IP, 15008)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(500))
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        assert sample(m.b, "ambit_ztunnel_connection_errors_total", reason="tls_handshake") == 1
        assert await roundtrip(m, b"alive") == b"alive"


async def _h2_client(m: Mesh, identity: SpiffeId) -> ssl.SSLContext:
    return await m.a.secrets.client_context(identity)


async def _raw_hbone(m: Mesh, headers: list[tuple[str, str]]) -> list[h2.events.Event]:
    """Speak HTTP/2 over mTLS to ztunnel B by hand; return what it answered."""
    ctx = await _h2_client(m, SpiffeId(TD, "default", "client"))
    r, w = await asyncio.open_connection(ECHO_IP, 15008, ssl=ctx, server_hostname=ECHO_IP)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    w.write(conn.data_to_send())
    events: list[h2.events.Event] = []
    try:
        async with asyncio.timeout(5):
            while not any(isinstance(e, h2.events.ResponseReceived | h2.events.StreamReset |
                                     h2.events.ConnectionTerminated) for e in events):
                data = await r.read(65536)
                if not data:
                    break
                events += conn.receive_data(data)
                w.write(conn.data_to_send())
    finally:
        w.close()
    return events


def _status(events: list[h2.events.Event]) -> str | None:
    for e in events:
        if isinstance(e, h2.events.ResponseReceived):
            return dict(e.headers)[b":status"].decode()
    return None


async def test_non_connect_method_gets_405(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        events = await _raw_hbone(m, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                                      (":authority", f"{ECHO_IP}:{ECHO_PORT}")])
        assert _status(events) == "405"
        assert sample(m.b, "ambit_ztunnel_connection_errors_total", reason="bad_request") == 1
        assert await roundtrip(m, b"alive") == b"alive"


async def test_unknown_destination_gets_400(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        # Not loopback: an unknown loopback address is the node itself (403, below).
        events = await _raw_hbone(m, [(":method", "CONNECT"), (":authority", "198.51.100.9:80")])
        assert _status(events) == "400"
        assert sample(m.b, "ambit_ztunnel_connection_errors_total",
                      reason="unknown_destination") == 1


async def test_hbone_connect_to_the_node_itself_gets_403(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        admin = f"{m.b.config.admin_host}:{m.b.config.admin_port}"
        targets = ["127.0.0.1:15000", "[::1]:15000", "0.0.0.0:15000", admin]
        for authority in targets:
            events = await _raw_hbone(m, [(":method", "CONNECT"), (":authority", authority)])
            assert _status(events) == "403", authority
        assert sample(m.b, "ambit_ztunnel_policy_denied_total", direction="destination",
                      policy="node-protection") == len(targets)
        assert await roundtrip(m, b"alive") == b"alive"


async def test_bad_header_bytes_refuse_one_stream_and_the_connection_carries_on(
        tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        ctx = await _h2_client(m, SpiffeId(TD, "default", "client"))
        r, w = await asyncio.open_connection(ECHO_IP, 15008, ssl=ctx, server_hostname=ECHO_IP)
        # A client that sends the bytes it is given, as a probe would.
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False))
        conn.initiate_connection()
        good = [(b":method", b"CONNECT"), (b":authority", f"{ECHO_IP}:{ECHO_PORT}".encode())]
        conn.send_headers(1, [*good, (b"x-probe", b"\xff\xfe")])
        conn.send_headers(3, good)
        w.write(conn.data_to_send())
        status: dict[int, bytes] = {}
        echoed = b""
        try:
            async with asyncio.timeout(5):
                while echoed != b"still here":
                    data = await r.read(65536)
                    assert data, f"connection closed; answers so far {status}"
                    for e in conn.receive_data(data):
                        assert not isinstance(e, h2.events.ConnectionTerminated)
                        if isinstance(e, h2.events.ResponseReceived):
                            status[e.stream_id] = dict(e.headers)[b":status"]
                            if e.stream_id == 3:
                                conn.send_data(3, b"still here")
                        elif isinstance(e, h2.events.DataReceived) and e.stream_id == 3:
                            echoed += e.data
                            conn.acknowledge_received_data(e.flow_controlled_length, 3)
                    w.write(conn.data_to_send())
        finally:
            w.close()
        assert status == {1: b"400", 3: b"200"}
        assert sample(m.b, "ambit_ztunnel_connection_errors_total", reason="bad_request") == 1
        assert await roundtrip(m, b"alive") == b"alive"


async def test_oversized_headers_close_the_connection(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        events = await _raw_hbone(m, [(":method", "CONNECT"),
                                      (":authority", f"{ECHO_IP}:{ECHO_PORT}"),
                                      ("x-big", "a" * 40_000)])
        assert _status(events) is None
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
        assert await roundtrip(m, b"alive") == b"alive"


def _reissue_identities(m: Mesh, client_issued_at: dt.datetime) -> None:
    """Replace the whole identity bundle with one from a new CA the servers then trust; the
    client's certificate is valid for an hour from ``client_issued_at``, the others from now."""
    assert (m.ids / "trust-bundle.pem").exists()
    ca = CertificateAuthority.generate(TD)
    (m.ids / "trust-bundle.pem").write_bytes(ca.root_pem)
    for ns, sa in (("default", "echo"), ("other", "other")):
        write_identity(m.ids, SpiffeId(TD, ns, sa), ca.issue(SpiffeId(TD, ns, sa)))
    ident = SpiffeId(TD, "default", "client")
    write_identity(m.ids, ident, ca.issue(ident, ttl=dt.timedelta(hours=1),
                                          now=client_issued_at))


async def test_expired_client_certificate_is_refused(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    # Positive control: the same re-issued bundle with the client's certificate still valid
    # carries traffic, so the refusal below is down to the expiry alone.
    (tmp_path / "valid").mkdir()
    async with mesh(tmp_path / "valid") as m:
        _reissue_identities(m, client_issued_at=now - dt.timedelta(minutes=5))
        assert await roundtrip(m, b"secret") == b"secret"
        assert sample(m.b, "ambit_ztunnel_connection_errors_total", reason="tls_handshake") == 0
        assert m.echo.received == len(b"secret")
    # The same, but the client's certificate expired two hours ago.
    (tmp_path / "expired").mkdir()
    async with mesh(tmp_path / "expired") as m:
        _reissue_identities(m, client_issued_at=now - dt.timedelta(hours=3))
        assert await refused(m)
        assert sample(m.b, "ambit_ztunnel_connection_errors_total", reason="tls_handshake") >= 1
        assert m.echo.received == 0


async def test_admin_config_dump_and_readiness(tmp_path: Path) -> None:
    async with mesh(tmp_path, with_policy(ALLOW_CLIENT)) as m:
        await roundtrip(m, b"x")
        host, port = m.b.listeners["admin"].address
        dump = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(
            f"http://{host}:{port}/config_dump", timeout=5)))
        assert dump["node"] == "node-b"
        assert {w["name"] for w in dump["workloads"]} == {"client", "other", "echo"}
        assert dump["authorization_policies"][0]["name"] == "allow-client"
        assert dump["services"][0]["endpoints"] == ["default/echo"]
        certs = {c["identity"]: c for c in dump["certificates"]}
        assert certs[f"spiffe://{TD}/ns/default/sa/echo"]["expires_in_seconds"] > 3600
        rhost, rport = m.b.listeners["readiness"].address
        ready = await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"http://{rhost}:{rport}/healthz/ready", timeout=5).status)
        assert ready == 200
        mhost, mport = m.b.listeners["metrics"].address
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"http://{mhost}:{mport}/metrics", timeout=5).read().decode())
        assert "istio_tcp_connections_opened_total{" in text
        assert "process_resident_memory_bytes" in text


async def test_drain_lets_open_connections_finish(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        r, w = await m.connect()
        w.write(b"before ")
        await w.drain()
        assert await r.readexactly(7) == b"before "
        m.b.config.drain_seconds = 3
        shutdown = asyncio.create_task(m.b.shutdown())
        await asyncio.sleep(0.2)
        assert m.b.readiness() == (False, "draining")
        # The open tunnel still works while draining...
        w.write(b"during")
        await w.drain()
        assert await r.readexactly(6) == b"during"
        w.write_eof()
        assert await r.read() == b""
        w.close()
        await asyncio.wait_for(shutdown, 5)
        # ...and new connections are refused once B stopped accepting.
        assert await refused(m)


@pytest.mark.parametrize("payload_size", [0, 1, 16_384, 1_048_577])
async def test_payload_edge_sizes(tmp_path: Path, payload_size: int) -> None:
    async with mesh(tmp_path) as m:
        payload = os.urandom(payload_size)
        assert await roundtrip(m, payload) == payload


def test_state_fixture_is_valid() -> None:
    from mesh.state.parse import parse_state

    parse_state(copy.deepcopy(base_state()))


async def test_draining_peer_refuses_new_tunnels_and_client_retries(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        r, w = await m.connect()  # opens the pooled HBONE connection to B
        w.write(b"x")
        assert await r.readexactly(1) == b"x"
        for proto in m.b.inbound.connections:  # B refuses new tunnels on this connection
            proto.start_drain()
        # The retry lands on a new connection, which B (not shut down) still accepts.
        assert await roundtrip(m, b"retried") == b"retried"
        assert m.a.ctx.pool is not None and m.a.ctx.pool.connections_opened == 2
        w.close()


async def test_closed_connection_leaves_the_pool(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        pool = m.a.ctx.pool
        assert pool is not None
        assert await roundtrip(m, b"first") == b"first"
        assert pool.size == 1  # idle, still pooled
        for proto in list(m.b.inbound.connections):  # B drops it under A
            proto.abort()
        await wait_for(lambda: pool.size == 0, "the closed connection leaving the pool")
        assert await roundtrip(m, b"second") == b"second"
        assert pool.size == 1 and pool.connections_opened == 2


async def test_listener_on_a_socket_opened_elsewhere(tmp_path: Path) -> None:
    """A capture listener can be any bound socket (e.g. one opened in a pod's netns)."""
    from mesh.listener import bind_socket

    async with mesh(tmp_path) as m:
        sock = bind_socket(ECHO_IP, 25008)
        listener = m.b.add_listener("inbound", sock)
        try:
            assert listener.address == (ECHO_IP, 25008)
            # Speak HBONE to it as ztunnel A would: the pool dials the address we give it.
            assert m.a.ctx.pool is not None
            from ztunnel.hbone.pool import PoolKey

            key = PoolKey(SpiffeId(TD, "default", "client"), SpiffeId(TD, "default", "echo"),
                          (ECHO_IP, 25008))
            stream = await m.a.ctx.pool.open_stream(key, f"{ECHO_IP}:{ECHO_PORT}")
            assert await asyncio.wait_for(stream.response, 5) == 200
            await stream.write(b"hi")
            stream.write_eof()
            data, flow = await stream.read()
            stream.consumed(flow)
            assert data == b"hi"
        finally:
            listener.close()


async def test_cli_process_serves_and_drains_on_sigterm(tmp_path: Path) -> None:
    """`ambit ztunnel` as a process: ready on 15021, exits 0 on SIGTERM within the drain."""
    import signal
    import sys

    from tests.component.harness import free_port, write_certs

    ids = tmp_path / "ids"
    write_certs(ids, [("default", "echo")])
    state = tmp_path / "state.yaml"
    import yaml

    state.write_text(yaml.safe_dump(base_state()))
    host = f"127.{NET}.30.1"
    ready_port = free_port(host)
    argv = [sys.executable, "-m", "ambit.cli", "ztunnel", "--node", "node-b", "--state",
            str(state), "--identity-dir", str(ids), "--inbound-bind", "workload",
            "--outbound-port", "0", "--no-transparent", "--admin-host", host, "--admin-port",
            str(free_port(host)), "--stats-host", host, "--metrics-port",
            str(free_port(host)), "--readiness-port", str(ready_port), "--drain-seconds", "1",
            "--inbound-port", str(free_port(host)), "--inbound-plaintext-port",
            str(free_port(host))]
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                status = await asyncio.to_thread(lambda: urllib.request.urlopen(
                    f"http://{host}:{ready_port}/healthz/ready", timeout=1).status)
                if status == 200:
                    break
            except OSError:
                pass
            assert proc.returncode is None, "ztunnel exited early"
            assert asyncio.get_running_loop().time() < deadline, "never became ready"
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "draining" in log and "ztunnel stopped" in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""``python -m bench`` (``make bench``): direct vs. two Envoy pairs vs. ambit ztunnels, one table.

Why: the ztunnel is written in Python, and the question every reader asks is "how far is that
from Envoy?". This answers it on one machine, repeatably: the same four-namespace topology
(client pod, client node, server node, server pod), the same tools and settings for every setup,
and a table with ambit/envoy ratios for issue 14's goals (P1 throughput, P2 latency from the
scheduled send time, P3 proxy CPU per unit of work, P4 connection rate, P5 many connections,
P6 idle memory, P7 workers), saved with a JSON record and a plot under ``--out``. Two Envoy
yardsticks: an mTLS TCP-proxy pair (the fastest thing built from parts) and an HBONE pair (the
same protocol work as the ztunnels, configured as Istio's waypoints do it).

All traffic stays inside namespaces this program creates; they are removed on exit, Ctrl-C
included (see bench/topo.py and bench/procs.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ambit.dev.mesh import MeshError, issue_identities
from bench import envoy as envoy_setup
from bench import measure as m
from bench import mesh, tlsprobe
from bench.measure import IPERF_PORT, REPO_ROOT, RR_PORT, Settings, start_servers
from bench.procs import (
    BenchError,
    CpuMeter,
    PeakRss,
    Proc,
    ProcessSet,
    current_rss_mib,
    ns_retransmits,
    run,
)
from bench.report import (
    AMBITS,
    SETUPS,
    SetupResult,
    combine,
    format_table,
    format_workers_table,
    write_plot,
)
from bench.topo import Topology

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
# Above this share of CPU used by other work before a run, its numbers are flagged as noisy.
QUIET_PERCENT = 25
CLIENT_ID = ("bench", "client")
SERVER_ID = ("bench", "server")
# In this order. "many" runs before "connrate": right after thousands of short connections
# the ztunnel's HBONE pool has been seen to open more streams than the peer allows (the peer
# then closes the whole HBONE connection), which would cost the P5 measurement too.
PHASES: tuple[str, ...] = ("throughput", "latency", "many", "connrate", "workers")
# What the ztunnels' TLS 1.3 is restricted to by default: the suite BoringSSL (Envoy) picks.
DEFAULT_TLS13 = "TLS_AES_128_GCM_SHA256"
SPIFFE = "spiffe://cluster.local/ns/{}/sa/{}"
# How each ztunnel setup's pods are captured (bench/mesh.py start_ztunnels); "ambit" is TPROXY.
CAPTURE_OF = {"ambit-ebpf": "ebpf", "ambit-inpod": "inpod"}


def _names(text: str, flag: str, kind: str, known: Sequence[str]) -> list[str]:
    """The comma-separated names of ``flag``, each one of ``known``, in the order given."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{flag}: unknown {kind}(s) {', '.join(bad) or '(none)'}; choose from "
            f"{','.join(known)}")
    return list(dict.fromkeys(names))


def _only(text: str) -> list[str]:
    names = _names(text, "--only", "setup", SETUPS)
    return [s for s in SETUPS if s in names]


def _phases(text: str) -> list[str]:
    # In the order given (the default is PHASES'), so an order that provokes a bug can be
    # replayed; the workers phase runs separately, after all runs, whatever its position.
    return _names(text, "--phases", "phase", PHASES)


def _counts(text: str) -> list[int]:
    try:
        values = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers-counts: not integers: {text}") from None
    if not values or values[0] < 1 or values[-1] > 16:
        raise argparse.ArgumentTypeError("--workers-counts: 1..16")
    return values


def _bounded(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is outside {lo:g}..{hi:g}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Through direct routing, an Envoy mTLS TCP-proxy pair, an Envoy HBONE pair "
        "and two ambit ztunnels over HBONE: single-stream throughput (iperf3), fixed-rate 1 KiB "
        "request/response latency timed from the scheduled send, proxy CPU per GB and per 1000 "
        "requests, new connections/s, 1000 concurrent connections, idle memory, and aggregate "
        "throughput with 1 and 2 workers. Needs root (creates network namespaces).")
    p.add_argument("--duration", type=_bounded(1, 300), default=10.0,
                   help="seconds per measurement (default 10)")
    p.add_argument("--rate", type=_bounded(1, 100_000), default=1000.0,
                   help="requests/s of the latency test, total over connections (default 1000)")
    p.add_argument("--connections", type=int, choices=range(1, 65), metavar="N", default=1,
                   help="connections of the latency test (default 1)")
    p.add_argument("--repeat", type=int, choices=range(1, 21), metavar="N", default=3,
                   help="runs of each setup, interleaved; throughput is the median run, "
                   "latency percentiles pool all runs (default 3)")
    p.add_argument("--wait-quiet", type=_bounded(0, 3600), default=0.0, metavar="SECONDS",
                   help="on a shared machine: before each run, wait up to this long for other "
                   f"work to use less than {QUIET_PERCENT}%% of the CPUs (default 0)")
    p.add_argument("--only", type=_only, default=list(SETUPS),
                   help=f"comma-separated setups to run (default {','.join(SETUPS)})")
    p.add_argument("--phases", type=_phases, default=list(PHASES),
                   help=f"comma-separated phases, run in the order given (default "
                   f"{','.join(PHASES)})")
    p.add_argument("--connrate-seconds", type=_bounded(1, 60), default=5.0,
                   help="length of the connection-rate phase (default 5; at most 15000 "
                   "connections)")
    p.add_argument("--many", type=int, choices=range(10, 2001), metavar="N", default=1000,
                   help="connections of the many-connections phase, 1 req/s each (default 1000)")
    p.add_argument("--workers-counts", type=_counts, default=[1, 2],
                   help="ztunnel --workers / Envoy --concurrency values of the workers phase "
                   "(default 1,2)")
    p.add_argument("--ztunnel-tls13", default=DEFAULT_TLS13, metavar="SUITES",
                   help="TLS 1.3 suites the ztunnels may use (OPENSSL_CONF), or 'default' for "
                   f"OpenSSL's own list (default {DEFAULT_TLS13}, what BoringSSL picks)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="directory for results.json, table.txt, bench.png and logs "
                   "(default bench/results)")
    p.add_argument("--certs", type=Path,
                   help="use this identity directory (bench/client and bench/server issued) "
                   "instead of creating a fresh one with `ambit dev certs`")
    return p


def _preflight(only: Sequence[str]) -> dict[str, str]:
    """Fail before creating anything when a tool is missing; return tool versions."""
    if os.geteuid() != 0:
        raise BenchError("the benchmark creates network namespaces: run it as root "
                         "(sudo make bench)")
    versions: dict[str, str] = {}
    tools = ["ip", "iperf3", "tshark"] + (["iptables-restore"] if "ambit" in only else [])
    tools += ["mount", "umount"] if "ambit-ebpf" in only else []
    tools += ["nsenter", "iptables-restore"] if "ambit-inpod" in only else []
    for tool in tools:
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: run `make bench`, which installs it")
    versions["iperf3"] = run(["iperf3", "--version"]).split("\n")[0].strip()
    if "envoy" in only or "envoy-hbone" in only:
        binary = envoy_setup.find_envoy()
        versions["envoy"] = envoy_setup.envoy_version(binary)
    if "ambit" in only:
        mesh.check_runnable()
    if "ambit-ebpf" in only:
        mesh.check_runnable("ebpf")
    if "ambit-inpod" in only:
        mesh.check_runnable("inpod")
    return versions


def _make_certs(work: Path) -> Path:
    """A fresh mesh root and the two workload identities, via ``ambit dev certs``."""
    certs = work / "certs"
    shutil.rmtree(certs, ignore_errors=True)
    try:
        issue_identities(certs, [f"{ns}/{sa}" for ns, sa in (CLIENT_ID, SERVER_ID)])
    except MeshError as e:
        raise BenchError(str(e)) from None
    return certs


def _measure(name: str, topo: Topology, target: tuple[str, int, int], settings: Settings,
             proxies: dict[str, Proc], result: SetupResult,
             phases: Sequence[str]) -> dict[str, list[float]]:
    """The phases through one setup; per phase the proxies' CPU time, peak memory and the TCP
    retransmits of all namespaces. Fills ``result``; returns latency samples (ms) per phase.
    """
    host, tport, lport = target
    pids = {role: p.pid for role, p in proxies.items()}
    every_ns = list(topo.ns.values())
    samples: dict[str, list[float]] = {}
    for phase in phases:
        retr0 = ns_retransmits(every_ns)
        meter = CpuMeter(pids)
        with PeakRss(pids, reset_hwm=True) as rss:
            meter.start()
            if phase in ("throughput", "workers"):
                streams = 1 if phase == "throughput" else settings.parallel_streams
                print(f"[{name}] {phase}: iperf3 -P {streams} -t {settings.duration:g} "
                      f"to {host}:{tport}", flush=True)
                tp = m.throughput(topo.ns["client"], host, tport, settings, streams=streams)
                result.throughput_gbps, result.retransmits = tp.gbps, tp.retransmits
                result.bytes_moved = tp.bytes_sent
            elif phase == "latency":
                print(f"[{name}] latency: {settings.rate:g} req/s x {settings.duration:g}s "
                      f"to {host}:{lport}", flush=True)
                lat = m.latency(topo.ns["client"], host, lport, settings)
                result.p50_ms, result.p90_ms = lat["p50_ms"], lat["p90_ms"]
                result.p99_ms, result.max_ms = lat["p99_ms"], lat["max_ms"]
                result.achieved_rate, result.late_sends = lat["achieved_rate"], lat["late_sends"]
                result.requests = lat["sent"]
                result.from_send_p50_ms = lat.get("from_send_p50_ms")
                result.from_send_p99_ms = lat.get("from_send_p99_ms")
                samples[phase] = [us / 1000 for us in lat.get("samples_us", [])]
            elif phase == "connrate":
                print(f"[{name}] connrate: new connections for {settings.connrate_duration:g}s "
                      f"({settings.connrate_concurrency} at a time) to {host}:{lport}",
                      flush=True)
                cr = m.connrate(topo.ns["client"], host, lport, settings)
                result.conn_rate, result.conn_p99_ms = cr["rate"], cr["p99_ms"]
                result.conns, result.conn_errors = cr["connections"], cr["errors"]
            elif phase == "many":
                print(f"[{name}] many: {settings.many_connections} connections, "
                      f"{settings.many_rate:g} req/s in all, {settings.duration:g}s",
                      flush=True)
                many = m.many(topo.ns["client"], host, lport, settings)
                result.many_p50_ms, result.many_p99_ms = many["p50_ms"], many["p99_ms"]
                result.many_late_sends, result.many_requests = many["late_sends"], many["sent"]
                samples[phase] = [us / 1000 for us in many.get("samples_us", [])]
            result.cpu_s[phase] = meter.stop()
        result.tcp_retrans[phase] = ns_retransmits(every_ns) - retr0
        peaks = rss.peak_mib()
        if phase == "many":
            result.many_peak_rss_mib = peaks
        for role, mib in peaks.items():
            result.proxy_peak_rss_mib[role] = max(mib, result.proxy_peak_rss_mib.get(role, 0.0))
        for p in proxies.values():
            p.ensure_alive()
    return samples


def expected_connections(phases: Sequence[str], settings: Settings,
                         result: SetupResult) -> int:
    """How many client connections the phases that ran opened (a lower bound for what the
    proxies must have counted): iperf3 opens a control connection plus one per stream."""
    n = 1 if result.ciphers else 0  # the TLS probe's connection
    for phase in phases:
        n += {"throughput": 2, "latency": settings.connections,
              "connrate": result.conns or 0, "many": settings.many_connections,
              "workers": 1 + settings.parallel_streams}.get(phase, 0)
    return n


def _start_envoys(name: str, procs: ProcessSet, topo: Topology, certs: Path, work: Path,
                  concurrency: int) -> dict[str, Proc]:
    binary = envoy_setup.find_envoy()
    a = topo.addrs
    ports = [IPERF_PORT, RR_PORT]
    client_tls = envoy_setup.TlsFiles.from_identity_dir(certs, *CLIENT_ID)
    server_tls = envoy_setup.TlsFiles.from_identity_dir(certs, *SERVER_ID)
    sni = f"{SERVER_ID[1]}.{SERVER_ID[0]}.svc.cluster.local"
    if name == "envoy":
        b_conf = envoy_setup.server_side_bootstrap(a.server_node, a.server, ports, server_tls,
                                                   SPIFFE.format(*CLIENT_ID))
        a_conf = envoy_setup.client_side_bootstrap(
            a.client_node, a.server_node, ports, client_tls, SPIFFE.format(*SERVER_ID), sni=sni)
    else:
        b_conf = envoy_setup.server_side_hbone_bootstrap(
            a.server_node, a.server, ports, server_tls, SPIFFE.format(*CLIENT_ID))
        a_conf = envoy_setup.client_side_hbone_bootstrap(
            a.client_node, a.server_node, a.server, ports, client_tls,
            SPIFFE.format(*SERVER_ID), sni=sni)
    return {
        "server-node": envoy_setup.start_envoy(procs, binary, f"{name}-b", topo.ns["server-node"],
                                               b_conf, work, concurrency=concurrency),
        "client-node": envoy_setup.start_envoy(procs, binary, f"{name}-a", topo.ns["client-node"],
                                               a_conf, work, concurrency=concurrency),
    }


def _tls_ports(name: str) -> list[int]:
    """Where the server side's TLS is spoken in a setup (what tlsprobe captures)."""
    if name == "envoy":
        return [envoy_setup.IN_OFFSET + IPERF_PORT, envoy_setup.IN_OFFSET + RR_PORT]
    return [envoy_setup.HBONE_PORT]


def _run_setup(name: str, settings: Settings, certs: Path, work: Path, logs: Path,
               phases: Sequence[str], workers: int = 1, tls13: str | None = None,
               cipher: bool = True) -> tuple[SetupResult, dict[str, list[float]]]:
    """One setup in a fresh topology (so no state, e.g. capture rules, leaks between setups).

    ``workers``: Envoy ``--concurrency`` and ztunnel ``--workers``. A failure of this setup is
    recorded in its result and the run goes on with the next one.
    """
    result = SetupResult(name)
    samples: dict[str, list[float]] = {}
    procs = ProcessSet(logs)
    topo = Topology()
    try:
        topo.create()
        a = topo.addrs
        start_servers(procs, topo.ns["server"], a.server, work, name)
        proxies: dict[str, Proc] = {}
        if name == "direct":
            target = (a.server, IPERF_PORT, RR_PORT)
        elif name in ("envoy", "envoy-hbone"):
            proxies = _start_envoys(name, procs, topo, certs, work, workers)
            target = (a.client_node, envoy_setup.OUT_OFFSET + IPERF_PORT,
                      envoy_setup.OUT_OFFSET + RR_PORT)
        else:
            if mesh.workers_supported():
                flag: int | None = workers
            elif workers == 1:
                flag = None  # a ztunnel without the flag is one process
            else:
                raise BenchError(f"ztunnel has no --workers flag: cannot run {workers} workers")
            proxies = mesh.start_ztunnels(
                procs, topo, certs, work, CLIENT_ID, SERVER_ID, workers=flag,
                tls13_suites=tls13, capture=CAPTURE_OF.get(name, "iptables"))
            target = (a.server, IPERF_PORT, RR_PORT)
        # P6: memory once ready, before any traffic (settled for a second).
        time.sleep(1.0)
        result.idle_rss_mib = {role: current_rss_mib(p.pid) for role, p in proxies.items()}
        if cipher and proxies:
            result.ciphers = tlsprobe.measure(procs, topo.ns["server-node"], _tls_ports(name),
                                              topo.ns["client"], target[0], target[2], name)
            print(f"[{name}] TLS 1.3 suite negotiated: {', '.join(result.ciphers)}", flush=True)
        samples = _measure(name, topo, target, settings, proxies, result, phases)
        # Every connection the phases opened must have crossed both proxies.
        expected = expected_connections(phases, settings, result)
        if name in AMBITS and workers == 1:
            mesh.verify_proxied(topo, expected=expected)
        if name == "envoy-hbone":
            envoy_setup.verify_hbone(topo.ns["server-node"], expected=expected)
    except BenchError as e:
        result.errors.append(str(e).split("\n")[0])
        print(f"[{name}] FAILED: {e}", file=sys.stderr, flush=True)
    finally:
        procs.stop_all()
        topo.destroy()
    return result, samples


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _background_cpu(seconds: float = 1.0) -> float:
    """Percent of all CPUs busy right before the run (other work skews every number)."""
    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    return 100.0 * (busy1 - busy0) / max(1, total1 - total0)


def _wait_quiet(limit: float) -> None:
    """Wait (bounded) until other work leaves the CPUs mostly idle; warn if it never does."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        busy = _background_cpu(1.0)
        if busy <= QUIET_PERCENT:
            return
        print(f"bench: waiting for a quiet machine (other work: {busy:.0f}% CPU)",
              file=sys.stderr, flush=True)
        time.sleep(min(4.0, max(0.0, deadline - time.monotonic())))
    if limit > 0:
        print("bench: warning: machine still busy; measuring anyway", file=sys.stderr)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP behave like Ctrl-C, so every `finally` (processes, namespaces) runs.
    raise KeyboardInterrupt(f"signal {signum}")


def _git_revision() -> str:
    """The commit measured (``+dirty`` if the ztunnel or anything tracked was modified)."""
    try:
        rev = run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]).strip()
        dirty = run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                     "--untracked-files=no"]).strip()
    except BenchError:
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def _dirty_files() -> list[str]:
    """Tracked files that differ from the commit measured: the ztunnel measured is the work
    tree, and with several people editing it the record must say what was not committed."""
    try:
        out = run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"])
    except BenchError:
        return []
    return [line[3:] for line in out.splitlines() if line.strip()]


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       "")
    except OSError:
        pass
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version()}


def _run_all(args: argparse.Namespace, settings: Settings, certs: Path, work: Path,
             logs: Path, tls13: str | None, background: list[float],
             ) -> tuple[dict[str, list[tuple[SetupResult, dict[str, list[float]]]]],
                        dict[str, dict[int, SetupResult]]]:
    """Every setup x run (interleaved), then the workers phase; raw per-run results."""
    main_phases = [p for p in args.phases if p != "workers"]
    runs: dict[str, list[tuple[SetupResult, dict[str, list[float]]]]] = {
        n: [] for n in args.only}
    for i in range(args.repeat if main_phases else 0):
        # Interleaved (direct, envoy, envoy-hbone, ambit, direct, ...) so slow drift of the
        # machine affects every setup alike instead of whichever ran last.
        for name in args.only:
            _wait_quiet(args.wait_quiet)
            background.append(_background_cpu(0.5))
            print(f"== {name}, run {i + 1}/{args.repeat} "
                  f"(other work: {background[-1]:.0f}% CPU)", flush=True)
            if background[-1] > QUIET_PERCENT:
                print(f"bench: warning: {background[-1]:.0f}% of the CPUs are busy with "
                      "other work; this run's numbers will be noisy", file=sys.stderr)
            runs[name].append(_run_setup(name, settings, certs, work, logs / f"run{i + 1}",
                                         main_phases, workers=1, tls13=tls13,
                                         cipher=(i == 0)))
    workers: dict[str, dict[int, SetupResult]] = {}
    if "workers" in args.phases:
        for n in args.workers_counts:
            # Not ambit-ebpf: the workers share one reuseport group either way, and the phase
            # already costs two setups' time per count. Not ambit-inpod: there the ztunnel's
            # parent process serves the pods' in-pod listeners itself (the workers serve only
            # the node-level ones, which no pod traffic reaches), so N would not change what
            # is measured.
            for name in [s for s in args.only if s not in ("direct", "ambit-ebpf", "ambit-inpod")]:
                _wait_quiet(args.wait_quiet)
                background.append(_background_cpu(0.5))
                print(f"== {name}, workers phase, N={n} "
                      f"(other work: {background[-1]:.0f}% CPU)", flush=True)
                workers.setdefault(name, {})[n], _ = _run_setup(
                    name, settings, certs, work, logs / f"workers{n}", ["workers"],
                    workers=n, tls13=tls13, cipher=False)
    return runs, workers


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Explicitly, because a shell starting us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    settings = Settings(duration=args.duration, rate=args.rate, connections=args.connections,
                        connrate_duration=args.connrate_seconds, many_connections=args.many,
                        many_rate=float(args.many))
    tls13 = None if args.ztunnel_tls13 == "default" else args.ztunnel_tls13
    out: Path = args.out.resolve()
    work, logs = out / "work", out / "logs"
    background: list[float] = []
    try:
        versions = _preflight(args.only)
        shutil.rmtree(logs, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        certs = args.certs.resolve() if args.certs else _make_certs(work)
        runs, workers = _run_all(args, settings, certs, work, logs, tls13, background)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; processes and namespaces cleaned up", file=sys.stderr)
        return 130
    results = {n: combine(n, [r for r, _ in rs], [s.get("latency", []) for _, s in rs],
                          [s.get("many", []) for _, s in rs])
               for n, rs in runs.items() if rs}
    samples = {n: [x for _, s in rs for x in s.get("latency", [])] for n, rs in runs.items()}
    workers_gbps = {n: {k: r.throughput_gbps for k, r in per.items()}
                    for n, per in workers.items()}
    ztunnel_workers = "--workers 1" if mesh.workers_supported() else "one process (no --workers)"
    sections = [
        f"{args.repeat} run(s) per setup, {settings.duration:g}s each; latency: "
        f"{settings.size} B request/response at {settings.rate:g} req/s on "
        f"{settings.connections} connection(s), timed from the scheduled send; connection "
        f"rate: {settings.connrate_duration:g}s, {settings.connrate_concurrency} at a time; "
        f"many: {settings.many_connections} connections at {settings.many_rate:g} req/s in "
        f"all. Envoy --concurrency 1, ztunnel {ztunnel_workers}; ztunnel TLS 1.3 suites: "
        f"{tls13 or 'OpenSSL default'}; Envoy: BoringSSL default (not configurable)."]
    if results:
        sections.append(format_table(results))
    if workers_gbps:
        notes = [f"note: {name} N={k}: {err}" for name, per in workers.items()
                 for k, r in per.items() for err in r.errors]
        sections.append("\n".join([format_workers_table(workers_gbps), *notes]))
    table = "\n\n".join(sections)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    mach = _machine()
    record: dict[str, Any] = {
        "date": stamp,
        "machine": mach,
        "versions": {**versions, "ambit": _git_revision(), "uncommitted": _dirty_files()},
        "settings": {**dataclasses.asdict(settings), "repeat": args.repeat,
                     "phases": args.phases, "ztunnel_tls13_suites": tls13,
                     "ztunnel_workers_flag": mesh.workers_supported()},
        # CPU used by other work right before each run (in run order): noise indicator.
        "background_cpu_percent": [round(b, 1) for b in background],
        "results": {k: v.to_json() for k, v in results.items()},
        "runs": {n: [r.to_json() for r, _ in rs] for n, rs in runs.items()},
        "workers": {n: {str(k): r.to_json() for k, r in per.items()}
                    for n, per in workers.items()},
    }
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "table.txt").write_text(table + "\n")
    (out / "latency-samples.json").write_text(json.dumps(samples) + "\n")
    write_plot(results, out / "bench.png", samples, workers_gbps,
               title=f"ambit bench {stamp} - {mach['cpu']} x{mach['cpus']}, "
               f"{settings.rate:g} req/s, {settings.duration:g}s x {args.repeat}")
    print()
    print(table)
    print(f"\nresults: {out / 'results.json'}, plot: {out / 'bench.png'}")
    failed = any(r.errors for r in results.values()) or any(
        r.errors for per in workers.values() for r in per.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

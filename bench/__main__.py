"""``python -m bench`` (``make bench``): direct vs. Envoy chain vs. ambit ztunnels, one table.

Why: the ztunnel is written in Python, and the question every reader asks is "how far is that
from Envoy?". This answers it on one machine, repeatably: the same four-namespace topology
(client pod, client node, server node, server pod), the same tools and settings for every setup,
and a table with ambit/envoy ratios, saved with a JSON record and a plot under ``--out``.

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
from bench import mesh
from bench.measure import IPERF_PORT, REPO_ROOT, RR_PORT, Settings, latency, start_servers
from bench.measure import throughput as measure_throughput
from bench.procs import BenchError, PeakRss, Proc, ProcessSet, run
from bench.report import SETUPS, SetupResult, combine, format_table, write_plot
from bench.topo import Topology

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
# Above this share of CPU used by other work before a run, its numbers are flagged as noisy.
QUIET_PERCENT = 25
CLIENT_ID = ("bench", "client")
SERVER_ID = ("bench", "server")


def _only(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SETUPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--only: unknown setup(s) {', '.join(bad) or '(none)'}; choose from "
            f"{','.join(SETUPS)}")
    return [s for s in SETUPS if s in names]


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
        description="Single-stream throughput (iperf3) and fixed-rate 1 KiB request/response "
        "latency through: direct routing, an Envoy mTLS TCP-proxy chain, and two ambit "
        "ztunnels over HBONE. Needs root (creates network namespaces).")
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
                   help="on a shared machine: wait up to this long for other work to use less "
                   f"than {QUIET_PERCENT}%% of the CPUs before starting (default 0)")
    p.add_argument("--only", type=_only, default=list(SETUPS),
                   help="comma-separated setups to run (default direct,envoy,ambit)")
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
    tools = ["ip", "iperf3"] + (["iptables-restore"] if "ambit" in only else [])
    for tool in tools:
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: run `make bench`, which installs it")
    versions["iperf3"] = run(["iperf3", "--version"]).split("\n")[0].strip()
    if "envoy" in only:
        binary = envoy_setup.find_envoy()
        versions["envoy"] = envoy_setup.envoy_version(binary)
    if "ambit" in only:
        mesh.check_runnable()
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
             proxies: dict[str, Proc], result: SetupResult) -> list[float]:
    """Throughput then latency through one setup, sampling the proxies' memory meanwhile.

    Fills ``result`` and returns the latency samples (ms) for the CDF plot.
    """
    host, tport, lport = target
    with PeakRss({role: p.pid for role, p in proxies.items()}) as rss:
        print(f"[{name}] throughput: iperf3 -t {settings.duration:g} to {host}:{tport}",
              flush=True)
        result.throughput_gbps, result.retransmits = measure_throughput(
            topo.ns["client"], host, tport, settings)
        for p in proxies.values():
            p.ensure_alive()
        print(f"[{name}] latency: {settings.rate:g} req/s x {settings.duration:g}s "
              f"to {host}:{lport}", flush=True)
        lat = latency(topo.ns["client"], host, lport, settings)
        for p in proxies.values():
            p.ensure_alive()
    result.p50_ms, result.p90_ms = lat["p50_ms"], lat["p90_ms"]
    result.p99_ms, result.max_ms = lat["p99_ms"], lat["max_ms"]
    result.achieved_rate, result.late_sends = lat["achieved_rate"], lat["late_sends"]
    result.proxy_peak_rss_mib = rss.peak_mib()
    return [us / 1000 for us in lat.get("samples_us", [])]


def _run_setup(name: str, settings: Settings, certs: Path, work: Path,
               logs: Path) -> tuple[SetupResult, list[float]]:
    """One setup in a fresh topology (so no state, e.g. capture rules, leaks between setups).

    A failure of this setup is recorded in its result and the run goes on with the next one.
    """
    result = SetupResult(name)
    samples: list[float] = []
    procs = ProcessSet(logs)
    topo = Topology()
    try:
        topo.create()
        a = topo.addrs
        start_servers(procs, topo.ns["server"], a.server, work, name)
        proxies: dict[str, Proc] = {}
        if name == "direct":
            target = (a.server, IPERF_PORT, RR_PORT)
        elif name == "envoy":
            binary = envoy_setup.find_envoy()
            ports = [IPERF_PORT, RR_PORT]
            client_tls = envoy_setup.TlsFiles.from_identity_dir(certs, *CLIENT_ID)
            server_tls = envoy_setup.TlsFiles.from_identity_dir(certs, *SERVER_ID)
            spiffe = "spiffe://cluster.local/ns/{}/sa/{}"
            proxies["server-node"] = envoy_setup.start_envoy(
                procs, binary, "envoy-b", topo.ns["server-node"],
                envoy_setup.server_side_bootstrap(a.server_node, a.server, ports, server_tls,
                                                  spiffe.format(*CLIENT_ID)), work)
            proxies["client-node"] = envoy_setup.start_envoy(
                procs, binary, "envoy-a", topo.ns["client-node"],
                envoy_setup.client_side_bootstrap(
                    a.client_node, a.server_node, ports, client_tls, spiffe.format(*SERVER_ID),
                    sni=f"{SERVER_ID[1]}.{SERVER_ID[0]}.svc.cluster.local"), work)
            target = (a.client_node, envoy_setup.OUT_OFFSET + IPERF_PORT,
                      envoy_setup.OUT_OFFSET + RR_PORT)
        else:
            proxies = mesh.start_ztunnels(procs, topo, certs, work, CLIENT_ID, SERVER_ID)
            target = (a.server, IPERF_PORT, RR_PORT)
        samples = _measure(name, topo, target, settings, proxies, result)
        if name == "ambit":
            # iperf3 (control + data) and the echo client: every one must cross both ztunnels.
            mesh.verify_proxied(topo, expected=2 + settings.connections)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Explicitly, because a shell starting us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    settings = Settings(duration=args.duration, rate=args.rate, connections=args.connections)
    out: Path = args.out.resolve()
    work, logs = out / "work", out / "logs"
    try:
        versions = _preflight(args.only)
        shutil.rmtree(logs, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        certs = args.certs.resolve() if args.certs else _make_certs(work)
        _wait_quiet(args.wait_quiet)
        background: list[float] = []
        runs: dict[str, list[tuple[SetupResult, list[float]]]] = {n: [] for n in args.only}
        for i in range(args.repeat):
            # Interleaved (direct, envoy, ambit, direct, ...) so slow drift of the machine
            # affects every setup alike instead of whichever ran last.
            for name in args.only:
                background.append(_background_cpu(0.5))
                print(f"== {name}, run {i + 1}/{args.repeat} "
                      f"(other work: {background[-1]:.0f}% CPU)", flush=True)
                if background[-1] > QUIET_PERCENT:
                    print(f"bench: warning: {background[-1]:.0f}% of the CPUs are busy with "
                          "other work; this run's numbers will be noisy", file=sys.stderr)
                runs[name].append(_run_setup(name, settings, certs, work, logs / f"run{i + 1}"))
        results = {n: combine(n, [r for r, _ in rs], [s for _, s in rs])
                   for n, rs in runs.items()}
        samples = {n: [x for _, s in rs for x in s] for n, rs in runs.items()}
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; processes and namespaces cleaned up", file=sys.stderr)
        return 130

    table = (
        f"{args.repeat} run(s) per setup, {settings.duration:g}s each; latency: "
        f"{settings.size} B request/response at {settings.rate:g} req/s on "
        f"{settings.connections} connection(s)\n\n" + format_table(results)
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    m = _machine()
    record: dict[str, Any] = {
        "date": stamp,
        "machine": m,
        "versions": {**versions, "ambit": _git_revision()},
        "settings": {**dataclasses.asdict(settings), "repeat": args.repeat},
        # CPU used by other work right before each run (in run order): noise indicator.
        "background_cpu_percent": [round(b, 1) for b in background],
        "results": {k: v.to_json() for k, v in results.items()},
        "runs": {n: [r.to_json() for r, _ in rs] for n, rs in runs.items()},
    }
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "table.txt").write_text(table + "\n")
    (out / "latency-samples.json").write_text(json.dumps(samples) + "\n")
    write_plot(results, out / "bench.png", samples,
               title=f"ambit bench {stamp} - {m['cpu']} x{m['cpus']}, "
               f"{settings.rate:g} req/s, {settings.duration:g}s x {args.repeat}")
    print()
    print(table)
    print(f"\nresults: {out / 'results.json'}, plot: {out / 'bench.png'}")
    return 1 if any(r.errors for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

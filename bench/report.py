"""Pure result handling for the benchmark: percentiles, ratios, the text table and the plot.

Why a separate module: the numbers a reader compares (and the ratios to Envoy that the issue asks
for) must be computed the same way every run, and that logic is tested without namespaces,
proxies or root (tests/unit/test_bench_report.py). Nothing here touches the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Column order of the table; a setup that was not run is simply absent.
SETUPS: tuple[str, ...] = ("direct", "envoy", "envoy-hbone", "ambit", "ambit-ebpf",
                           "ambit-inpod")
# The ztunnel setups: the same ztunnels, captured by iptables TPROXY rules, by the agent's
# eBPF programs (bench/ebpf_node.py) or by the agent's rules inside each pod, the ztunnel
# serving the pod's listeners in its namespace (bench/inpod_node.py). Each gets its own ratio
# columns.
AMBITS: tuple[str, ...] = ("ambit", "ambit-ebpf", "ambit-inpod")
# The yardsticks: ambit is divided by each of these in its own ratio column.
ENVOYS: tuple[str, ...] = ("envoy", "envoy-hbone")
ROLES: tuple[str, ...] = ("client-node", "server-node")
# TLS 1.3 cipher suites by their IANA code (as tshark prints them from a ServerHello).
TLS13_SUITES = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks.

    This is the same definition as numpy's default, so numbers are comparable with other tools;
    written out here so the latency tool (run inside pod namespaces) has no numpy dependency.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(data[lo])
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def ratio(ambit: float | None, envoy: float | None) -> float | None:
    """ambit/envoy, or None when either side is missing or envoy is zero.

    The same direction for every row (ambit divided by envoy) keeps the column readable: for
    throughput above 1 is better than Envoy, for latency and memory below 1 is better.
    """
    if ambit is None or envoy is None or envoy == 0:
        return None
    return ambit / envoy


def cipher_name(code: str) -> str:
    """``0x1301`` (or ``4865``) -> ``TLS_AES_128_GCM_SHA256``; unknown codes stay as given."""
    try:
        value = int(code, 0)
    except ValueError:
        return code
    return TLS13_SUITES.get(value, code)


def parse_proc_stat_cpu(text: str, clock_ticks: int) -> tuple[float, float]:
    """(own utime+stime, reaped children's cutime+cstime) in seconds from ``/proc/<pid>/stat``.

    The command name (field 2) may hold spaces and parentheses, so fields are counted from the
    last ``)``: after it come state (field 3) ... utime (14), stime (15), cutime (16),
    cstime (17).
    """
    rest = text[text.rindex(")") + 2:].split()
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return (utime + stime) / clock_ticks, (cutime + cstime) / clock_ticks


def parse_snmp_retrans(text: str) -> int:
    """``RetransSegs`` from ``/proc/net/snmp`` (a header line and a value line per protocol)."""
    tcp = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    if len(tcp) < 2:
        raise ValueError("no Tcp lines in /proc/net/snmp")
    return int(dict(zip(tcp[0], tcp[1], strict=True))["RetransSegs"])


@dataclass
class SetupResult:
    """Everything measured through one setup (direct, envoy, envoy-hbone or ambit).

    Per-role dictionaries are keyed by the node the proxy runs on ("client-node",
    "server-node"). CPU seconds and the work they bought (bytes, requests, connections) are
    kept as sums, so combining runs and dividing gives CPU per unit over all runs.
    """

    name: str
    # Throughput phase: one iperf3 stream.
    throughput_gbps: float | None = None
    retransmits: int | None = None  # iperf3's count, sender side
    bytes_moved: int | None = None  # sent by iperf3 over the whole phase (slow start included)
    # Latency phase, 1 KiB at a fixed rate, timed from each request's scheduled send time.
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    achieved_rate: float | None = None
    late_sends: int | None = None
    requests: int | None = None  # sent over the whole phase (warm-up included)
    # The same requests timed from their actual send (coordinated omission), for comparison.
    from_send_p50_ms: float | None = None
    from_send_p99_ms: float | None = None
    # Connection-rate phase: one request/response per new TCP connection.
    conn_rate: float | None = None
    conn_p99_ms: float | None = None
    conns: int | None = None
    conn_errors: int | None = None
    # Many-connections phase (P5): many connections, each at a low rate.
    many_p50_ms: float | None = None
    many_p99_ms: float | None = None
    many_late_sends: int | None = None
    many_requests: int | None = None
    many_peak_rss_mib: dict[str, float] = field(default_factory=dict)
    # TCP segments retransmitted in all four namespaces, per phase (kernel counters).
    tcp_retrans: dict[str, int] = field(default_factory=dict)
    # utime+stime of each proxy process tree, per phase then role.
    cpu_s: dict[str, dict[str, float]] = field(default_factory=dict)
    # Peak resident memory of each proxy process in MiB over all phases.
    proxy_peak_rss_mib: dict[str, float] = field(default_factory=dict)
    # Resident memory once ready, before any traffic.
    idle_rss_mib: dict[str, float] = field(default_factory=dict)
    # TLS 1.3 suites seen in ServerHellos between the two proxies (measured, not configured).
    ciphers: list[str] = field(default_factory=list)
    # Why a measurement is missing (e.g. "ztunnel not runnable: ..."), shown under the table.
    errors: list[str] = field(default_factory=list)
    # With --repeat: how many runs were combined, and each run's throughput (spread in plot).
    runs: int = 1
    throughput_runs: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SetupResult:
        return cls(**dict(data))

    def cpu_total(self, phase: str) -> float | None:
        """CPU seconds of all proxies of this setup in ``phase`` (None: not measured)."""
        per_role = self.cpu_s.get(phase)
        return None if not per_role else sum(per_role.values())

    def cpu_per(self, phase: str) -> float | None:
        """Proxy CPU seconds per unit of work: per GB moved (throughput), per 1000 requests
        (latency, many) or per 1000 connections (connrate)."""
        cpu = self.cpu_total(phase)
        units = {
            "throughput": None if self.bytes_moved is None else self.bytes_moved / 1e9,
            "latency": None if self.requests is None else self.requests / 1000,
            "connrate": None if self.conns is None else self.conns / 1000,
            "many": None if self.many_requests is None else self.many_requests / 1000,
        }.get(phase)
        if cpu is None or not units:
            return None
        return cpu / units


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def _sum(values: Sequence[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _max_per_role(dicts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for role, v in d.items():
            out[role] = max(v, out.get(role, 0.0))
    return out


def combine(name: str, runs: Sequence[SetupResult],
            samples_ms: Sequence[Sequence[float]],
            many_samples_ms: Sequence[Sequence[float]] = ()) -> SetupResult:
    """Fold repeated runs of one setup into one result.

    Throughput and connection rate are the median run (one slow or fast run does not move
    them); latency percentiles are computed over the pooled samples of all runs, so p99 rests
    on every request sent rather than on a median of small-sample p99s; memory is the highest
    peak seen; counts and CPU seconds are summed, so CPU per unit is over all runs. Errors of
    any run are kept, and a metric only some runs measured is combined over those runs.
    """
    out = SetupResult(name, runs=len(runs))
    for r in runs:
        out.errors += r.errors
        for c in r.ciphers:
            if c not in out.ciphers:
                out.ciphers.append(c)
    tps = [r.throughput_gbps for r in runs if r.throughput_gbps is not None]
    if tps:
        out.throughput_gbps = median(tps)
        out.throughput_runs = list(tps)
    out.retransmits = _sum([r.retransmits for r in runs])
    out.bytes_moved = _sum([r.bytes_moved for r in runs])
    pooled = [x for run in samples_ms for x in run]
    if pooled:
        out.p50_ms = percentile(pooled, 50)
        out.p90_ms = percentile(pooled, 90)
        out.p99_ms = percentile(pooled, 99)
        out.max_ms = max(pooled)
    rates = [r.achieved_rate for r in runs if r.achieved_rate is not None]
    if rates:
        out.achieved_rate = sum(rates) / len(rates)
    out.late_sends = _sum([r.late_sends for r in runs])
    out.requests = _sum([r.requests for r in runs])
    for key in ("from_send_p50_ms", "from_send_p99_ms"):
        values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        if values:
            setattr(out, key, median(values))  # per-run percentiles: the median run's
    crates = [r.conn_rate for r in runs if r.conn_rate is not None]
    if crates:
        out.conn_rate = median(crates)
    cp99 = [r.conn_p99_ms for r in runs if r.conn_p99_ms is not None]
    if cp99:
        out.conn_p99_ms = median(cp99)
    out.conns = _sum([r.conns for r in runs])
    out.conn_errors = _sum([r.conn_errors for r in runs])
    many = [x for run in many_samples_ms for x in run]
    if many:
        out.many_p50_ms = percentile(many, 50)
        out.many_p99_ms = percentile(many, 99)
    out.many_late_sends = _sum([r.many_late_sends for r in runs])
    out.many_requests = _sum([r.many_requests for r in runs])
    for r in runs:
        for phase, n in r.tcp_retrans.items():
            out.tcp_retrans[phase] = out.tcp_retrans.get(phase, 0) + n
        for phase, per_role in r.cpu_s.items():
            mine = out.cpu_s.setdefault(phase, {})
            for role, sec in per_role.items():
                mine[role] = mine.get(role, 0.0) + sec
    out.proxy_peak_rss_mib = _max_per_role([r.proxy_peak_rss_mib for r in runs])
    out.idle_rss_mib = _max_per_role([r.idle_rss_mib for r in runs])
    out.many_peak_rss_mib = _max_per_role([r.many_peak_rss_mib for r in runs])
    return out


@dataclass(frozen=True)
class Row:
    """One table row: a label, a getter on SetupResult, a number format."""

    label: str
    key: str
    fmt: str
    better: str  # "higher", "lower" or "" (no ratio): what the ratio column means


ROWS: tuple[Row, ...] = (
    Row("P1 throughput, 1 stream (Gbit/s)", "throughput_gbps", "{:.2f}", "higher"),
    Row("   iperf3 retransmits", "retransmits", "{:.0f}", ""),
    Row("   TCP retransmits, all namespaces", "retr:throughput", "{:.0f}", ""),
    Row("P3 proxy CPU s per GB moved", "cpu_per:throughput", "{:.2f}", "lower"),
    Row("P2 p50 latency from schedule (ms)", "p50_ms", "{:.3f}", "lower"),
    Row("P2 p99 latency from schedule (ms)", "p99_ms", "{:.3f}", "lower"),
    Row("   max latency (ms)", "max_ms", "{:.3f}", "lower"),
    Row("   p99 if timed from the send (ms)", "from_send_p99_ms", "{:.3f}", ""),
    Row("   achieved rate (req/s)", "achieved_rate", "{:.0f}", "higher"),
    Row("   late sends (> 1 interval behind)", "late_sends", "{:.0f}", ""),
    Row("   TCP retransmits, all namespaces", "retr:latency", "{:.0f}", ""),
    Row("P3 proxy CPU s per 1000 requests", "cpu_per:latency", "{:.4f}", "lower"),
    Row("P4 new connections/s", "conn_rate", "{:.0f}", "higher"),
    Row("   p99 connect+request (ms)", "conn_p99_ms", "{:.2f}", "lower"),
    Row("   failed connections", "conn_errors", "{:.0f}", ""),
    Row("   proxy CPU s per 1000 connections", "cpu_per:connrate", "{:.3f}", "lower"),
    Row("P5 many conns: p50 from schedule (ms)", "many_p50_ms", "{:.3f}", "lower"),
    Row("P5 many conns: p99 from schedule (ms)", "many_p99_ms", "{:.3f}", "lower"),
    Row("   late sends", "many_late_sends", "{:.0f}", ""),
    Row("   TCP retransmits, all namespaces", "retr:many", "{:.0f}", ""),
    Row("P5 many conns: larger proxy RSS (MiB)", "maxrole:many_peak_rss_mib", "{:.1f}",
        "lower"),
    Row("P6 idle RSS, larger proxy (MiB)", "maxrole:idle_rss_mib", "{:.1f}", "lower"),
    Row("client-node proxy peak RSS (MiB)", "rss:client-node", "{:.1f}", "lower"),
    Row("server-node proxy peak RSS (MiB)", "rss:server-node", "{:.1f}", "lower"),
)


def row_value(result: SetupResult, key: str) -> float | None:
    """The number a row shows for one setup (None when not measured / not applicable)."""
    kind, _, arg = key.partition(":")
    if not arg:
        value = getattr(result, key)
        return None if value is None else float(value)
    if kind == "rss":
        return result.proxy_peak_rss_mib.get(arg)
    if kind == "maxrole":
        per_role: dict[str, float] = getattr(result, arg)
        return max(per_role.values()) if per_role else None
    if kind == "retr":
        n = result.tcp_retrans.get(arg)
        return None if n is None else float(n)
    if kind == "cpu_per":
        return result.cpu_per(arg)
    raise KeyError(key)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _short_cipher(names: Sequence[str]) -> str:
    if not names:
        return "-"
    return ",".join(n.removeprefix("TLS_").removesuffix("_SHA256").removesuffix("_SHA384")
                    for n in names)


def _render(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt_line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return [fmt_line(header), fmt_line(["-" * w for w in widths])] + [fmt_line(x) for x in lines]


def format_table(results: Mapping[str, SetupResult]) -> str:
    """A fixed-width text table: rows of metrics, columns per setup, then ambit divided by each
    Envoy setup that ran.

    Setups that were not run are left out; a ratio column appears only when both its Envoy
    setup and ambit ran. Errors recorded for a setup are listed under the table, so a missing
    number always comes with its reason.
    """
    cols = [s for s in SETUPS if s in results] + [s for s in results if s not in SETUPS]
    yardsticks = [(a, e) for a in AMBITS if a in results for e in ENVOYS if e in results]
    header = ["metric", *cols] + [f"{a}/{e}" for a, e in yardsticks]
    lines: list[list[str]] = []
    for row in ROWS:
        values = {c: row_value(results[c], row.key) for c in cols}
        if all(v is None for v in values.values()):
            continue
        line = [row.label] + [_cell(values[c], row.fmt) for c in cols]
        for a, e in yardsticks:
            r = ratio(values[a], values[e]) if row.better else None
            line.append("-" if r is None else f"{r:.2f}x")
        lines.append(line)
    if any(results[c].ciphers for c in cols):
        lines.append(["TLS 1.3 cipher between proxies (seen)"]
                     + [_short_cipher(results[c].ciphers) if c != "direct" else "-"
                        for c in cols] + ["" for _ in yardsticks])
    out = _render(header, lines)
    if yardsticks:
        out.append("")
        out.append("ambit*/envoy*: for throughput, rates above 1 is better; for latency, CPU and "
                   "memory below 1 is better.")
    notes = [f"{name}: {err}" for name, r in results.items() for err in r.errors]
    if notes:
        out.append("")
        out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def format_workers_table(gbps: Mapping[str, Mapping[int, float | None]]) -> str:
    """P7: aggregate iperf3 -P 4 throughput per setup at 1 and more proxy workers/threads.

    ``gbps[setup][n]`` is Gbit/s with n workers (ztunnel ``--workers``) or n Envoy worker
    threads (``--concurrency``); None means that combination did not run. The last column is
    the largest n over n = 1 for each setup: how throughput grows with workers.
    """
    ns = sorted({n for per in gbps.values() for n in per})
    header = ["P7 iperf3 -P 4 (Gbit/s)", *[f"N={n}" for n in ns]]
    if len(ns) > 1:
        header.append(f"N={ns[-1]}/N={ns[0]}")
    lines = []
    for setup in [s for s in SETUPS if s in gbps] + [s for s in gbps if s not in SETUPS]:
        per = gbps[setup]
        line = [setup] + [_cell(per.get(n), "{:.2f}") for n in ns]
        if len(ns) > 1:
            r = ratio(per.get(ns[-1]), per.get(ns[0]))
            line.append("-" if r is None else f"{r:.2f}x")
        lines.append(line)
    return "\n".join(_render(header, lines))


def _bars(ax: Any, cols: Sequence[str], series: Mapping[str, Sequence[float | None]],
          title: str, ylabel: str, fmt: str = "{:.2f}") -> None:
    """Grouped bars: one group per setup, one bar per series; missing values are left out."""
    n = max(1, len(series))
    width = 0.8 / n
    for j, (label, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(cols))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=label)
        for x, v in zip(xs, values, strict=True):
            if v is not None:
                ax.annotate(fmt.format(v), (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if n > 1:
        ax.legend(fontsize=7)


def write_plot(results: Mapping[str, SetupResult], path: Path,
               samples_ms: Mapping[str, Sequence[float]] | None = None,
               workers_gbps: Mapping[str, Mapping[int, float | None]] | None = None,
               title: str = "") -> None:
    """A PNG next to the table, one panel per goal: throughput, latency, CPU per GB and per
    1000 requests, connection rate, the many-connections run, memory, workers, latency CDF.

    matplotlib is imported here (Agg backend, no display) so the rest of the module stays
    importable without it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    cols = [s for s in SETUPS if s in results] + [s for s in results if s not in SETUPS]
    proxied = [c for c in cols if c != "direct"]
    colors = {"direct": "#7f7f7f", "envoy": "#1f77b4", "envoy-hbone": "#2ca02c",
              "ambit": "#d62728", "ambit-ebpf": "#ff7f0e",
              "ambit-inpod": "#9467bd"}
    fig, axes = plt.subplots(3, 3, figsize=(15, 12))

    ax = axes[0][0]
    tp = [results[c].throughput_gbps for c in cols]
    # Error bars: the slowest and fastest of the repeated runs around the median.
    lo = [(v or 0.0) - min(results[c].throughput_runs, default=v or 0.0)
          for c, v in zip(cols, tp, strict=True)]
    hi = [max(results[c].throughput_runs, default=v or 0.0) - (v or 0.0)
          for c, v in zip(cols, tp, strict=True)]
    ax.bar(cols, [v or 0.0 for v in tp], 0.6, yerr=[lo, hi], capsize=6,
           color=[colors.get(c, "#9467bd") for c in cols])
    for i, v in enumerate(tp):
        if v is not None:
            ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_title("P1 single-stream throughput (iperf3)", fontsize=10)
    ax.set_ylabel("Gbit/s")

    _bars(axes[0][1], cols, {"p50": [results[c].p50_ms for c in cols],
                             "p99": [results[c].p99_ms for c in cols]},
          "P2 1 KiB latency from scheduled send", "ms", "{:.3f}")
    _bars(axes[0][2], proxied, {"s per GB": [results[c].cpu_per("throughput") for c in proxied],
                                "s per 1000 req": [results[c].cpu_per("latency")
                                                   for c in proxied]},
          "P3 proxy CPU (both nodes) per unit of work", "CPU seconds")
    _bars(axes[1][0], cols, {"conn/s": [results[c].conn_rate for c in cols]},
          "P4 new connections per second", "connections/s", "{:.0f}")
    _bars(axes[1][1], cols, {"p50": [results[c].many_p50_ms for c in cols],
                             "p99": [results[c].many_p99_ms for c in cols]},
          "P5 many connections: latency from schedule", "ms", "{:.2f}")
    _bars(axes[1][2], proxied, {
        "idle (P6)": [row_value(results[c], "maxrole:idle_rss_mib") for c in proxied],
        "many conns (P5)": [row_value(results[c], "maxrole:many_peak_rss_mib")
                            for c in proxied],
        "peak, any phase": [max(results[c].proxy_peak_rss_mib.values(), default=None)
                            for c in proxied]},
        "proxy RSS, larger of the two", "MiB", "{:.0f}")

    ax = axes[2][0]
    if workers_gbps:
        wcols = [s for s in SETUPS if s in workers_gbps]
        ns = sorted({n for per in workers_gbps.values() for n in per})
        _bars(ax, wcols, {f"N={n}": [workers_gbps[c].get(n) for c in wcols] for n in ns},
              "P7 iperf3 -P 4 by workers/concurrency", "Gbit/s")
    else:
        ax.set_title("P7 workers: not run", fontsize=10)

    ax = axes[2][1]
    if samples_ms:
        for name in cols:
            data = sorted(samples_ms.get(name, ()))
            if not data:
                continue
            n = len(data)
            ax.plot(data, [(i + 1) / n for i in range(n)], label=name, color=colors.get(name))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    ax.set_title("P2 latency CDF (from scheduled send)", fontsize=10)
    ax.set_xlabel("round trip (ms, log)")
    ax.set_ylabel("fraction of requests")

    ax = axes[2][2]
    ax.axis("off")
    lines = [f"{c}: {', '.join(results[c].ciphers) or '-'}" for c in proxied]
    lines += ["", "late sends (latency phase):"]
    lines += [f"{c}: {results[c].late_sends}" for c in cols]
    lines += ["", "TCP retransmits (throughput / latency):"]
    lines += [f"{c}: {results[c].tcp_retrans.get('throughput', '-')} / "
              f"{results[c].tcp_retrans.get('latency', '-')}" for c in cols]
    ax.text(0.0, 1.0, "TLS 1.3 suite seen (ServerHello):\n" + "\n".join(lines),
            va="top", fontsize=8, family="monospace", transform=ax.transAxes)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

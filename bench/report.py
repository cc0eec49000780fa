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
SETUPS: tuple[str, ...] = ("direct", "envoy", "ambit")


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


@dataclass
class SetupResult:
    """Everything measured through one setup (direct, envoy or ambit)."""

    name: str
    throughput_gbps: float | None = None
    retransmits: int | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    achieved_rate: float | None = None
    late_sends: int | None = None
    # Peak resident memory of each proxy process in MiB, keyed by role ("client-node" ...).
    proxy_peak_rss_mib: dict[str, float] = field(default_factory=dict)
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


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def combine(name: str, runs: Sequence[SetupResult],
            samples_ms: Sequence[Sequence[float]]) -> SetupResult:
    """Fold repeated runs of one setup into one result.

    Throughput is the median run (one slow or fast run does not move it); latency percentiles
    are computed over the pooled samples of all runs, so p99 rests on every request sent rather
    than on a median of small-sample p99s; memory is the highest peak seen. Errors of any run
    are kept, and a metric only some runs measured is combined over those runs.
    """
    out = SetupResult(name, runs=len(runs))
    for r in runs:
        out.errors += r.errors
    tps = [r.throughput_gbps for r in runs if r.throughput_gbps is not None]
    if tps:
        out.throughput_gbps = median(tps)
        out.throughput_runs = list(tps)
    retr = [r.retransmits for r in runs if r.retransmits is not None]
    if retr:
        out.retransmits = sum(retr)
    pooled = [x for run in samples_ms for x in run]
    if pooled:
        out.p50_ms = percentile(pooled, 50)
        out.p90_ms = percentile(pooled, 90)
        out.p99_ms = percentile(pooled, 99)
        out.max_ms = max(pooled)
    rates = [r.achieved_rate for r in runs if r.achieved_rate is not None]
    if rates:
        out.achieved_rate = sum(rates) / len(rates)
    late = [r.late_sends for r in runs if r.late_sends is not None]
    if late:
        out.late_sends = sum(late)
    for r in runs:
        for role, mib in r.proxy_peak_rss_mib.items():
            out.proxy_peak_rss_mib[role] = max(mib, out.proxy_peak_rss_mib.get(role, 0.0))
    return out


@dataclass(frozen=True)
class Row:
    """One table row: a label, a getter on SetupResult, a number format."""

    label: str
    key: str
    fmt: str
    better: str  # "higher" or "lower": what the ratio column means for this row


ROWS: tuple[Row, ...] = (
    Row("throughput (Gbit/s)", "throughput_gbps", "{:.2f}", "higher"),
    Row("p50 latency (ms)", "p50_ms", "{:.3f}", "lower"),
    Row("p99 latency (ms)", "p99_ms", "{:.3f}", "lower"),
    Row("max latency (ms)", "max_ms", "{:.3f}", "lower"),
    Row("achieved rate (req/s)", "achieved_rate", "{:.0f}", "higher"),
    Row("client-node proxy peak RSS (MiB)", "rss:client-node", "{:.1f}", "lower"),
    Row("server-node proxy peak RSS (MiB)", "rss:server-node", "{:.1f}", "lower"),
)


def row_value(result: SetupResult, key: str) -> float | None:
    """The number a row shows for one setup (None when not measured / not applicable)."""
    if key.startswith("rss:"):
        return result.proxy_peak_rss_mib.get(key[4:])
    value = getattr(result, key)
    return None if value is None else float(value)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(results: Mapping[str, SetupResult]) -> str:
    """A fixed-width text table: rows of metrics, columns direct/envoy/ambit and ambit/envoy.

    Setups that were not run are left out; the ratio column appears only when both envoy and
    ambit ran. Errors recorded for a setup are listed under the table, so a missing number always
    comes with its reason.
    """
    cols = [s for s in SETUPS if s in results] + [s for s in results if s not in SETUPS]
    with_ratio = "envoy" in results and "ambit" in results
    header = ["metric", *cols] + (["ambit/envoy"] if with_ratio else [])
    lines: list[list[str]] = []
    for row in ROWS:
        values = {c: row_value(results[c], row.key) for c in cols}
        if all(v is None for v in values.values()):
            continue
        line = [row.label] + [_cell(values[c], row.fmt) for c in cols]
        if with_ratio:
            r = ratio(values["ambit"], values["envoy"])
            line.append("-" if r is None else f"{r:.2f}x")
        lines.append(line)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt_line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    out = [fmt_line(header), fmt_line(["-" * w for w in widths])]
    out += [fmt_line(line) for line in lines]
    if with_ratio:
        out.append("")
        out.append("ambit/envoy: for throughput and rate above 1 is better; "
                   "for latency and memory below 1 is better.")
    notes = [f"{name}: {err}" for name, r in results.items() for err in r.errors]
    if notes:
        out.append("")
        out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def write_plot(results: Mapping[str, SetupResult], path: Path,
               samples_ms: Mapping[str, Sequence[float]] | None = None, title: str = "") -> None:
    """A PNG next to the table: throughput bars, p50/p99 bars, memory bars, latency CDF.

    matplotlib is imported here (Agg backend, no display) so the rest of the module stays
    importable without it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    cols = [s for s in SETUPS if s in results] + [s for s in results if s not in SETUPS]
    colors = {"direct": "#7f7f7f", "envoy": "#1f77b4", "ambit": "#d62728"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax_tp, ax_lat, ax_mem, ax_cdf = axes[0][0], axes[0][1], axes[1][0], axes[1][1]

    tp = [results[c].throughput_gbps or 0.0 for c in cols]
    # Error bars: the slowest and fastest of the repeated runs around the median.
    spread = [[tp[i] - min(results[c].throughput_runs, default=tp[i]) for i, c in enumerate(cols)],
              [max(results[c].throughput_runs, default=tp[i]) - tp[i] for i, c in enumerate(cols)]]
    ax_tp.bar(cols, tp, 0.6, yerr=spread, capsize=6,
              color=[colors.get(c, "#2ca02c") for c in cols])
    ax_tp.set_title("single-stream throughput (iperf3)")
    ax_tp.set_ylabel("Gbit/s")
    for i, v in enumerate(tp):
        ax_tp.annotate(f"{v:.2f}", (i + 0.32, v), ha="left", va="bottom")

    ax_tp.set_xlim(-0.8, len(cols) - 0.2)
    width = 0.38
    xs = list(range(len(cols)))
    p50 = [results[c].p50_ms or 0.0 for c in cols]
    p99 = [results[c].p99_ms or 0.0 for c in cols]
    ax_lat.bar([x - width / 2 for x in xs], p50, width, label="p50", color="#9ecae1")
    ax_lat.bar([x + width / 2 for x in xs], p99, width, label="p99", color="#3182bd")
    ax_lat.set_xticks(xs, cols)
    ax_lat.set_title("1 KiB request/response latency")
    ax_lat.set_ylabel("ms")
    ax_lat.legend()

    roles = sorted({role for c in cols for role in results[c].proxy_peak_rss_mib})
    if roles:
        proxied = [c for c in cols if results[c].proxy_peak_rss_mib]
        pxs = list(range(len(proxied)))
        w = 0.8 / len(roles)
        for j, role in enumerate(roles):
            vals = [results[c].proxy_peak_rss_mib.get(role, 0.0) for c in proxied]
            ax_mem.bar([x - 0.4 + w * (j + 0.5) for x in pxs], vals, w, label=role)
        ax_mem.set_xticks(pxs, proxied)
        ax_mem.set_xlim(-0.8, len(proxied) - 0.2)
        ax_mem.legend(loc="lower right")
    ax_mem.set_title("proxy peak RSS")
    ax_mem.set_ylabel("MiB")

    if samples_ms:
        for name in cols:
            data = sorted(samples_ms.get(name, ()))
            if not data:
                continue
            n = len(data)
            ax_cdf.plot(data, [(i + 1) / n for i in range(n)], label=name,
                        color=colors.get(name))
        ax_cdf.set_xscale("log")
        ax_cdf.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax_cdf.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax_cdf.grid(True, which="major", alpha=0.3)
        ax_cdf.legend(loc="lower right")
    ax_cdf.set_title("latency CDF")
    ax_cdf.set_xlabel("round trip (ms, log)")
    ax_cdf.set_ylabel("fraction of requests")

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

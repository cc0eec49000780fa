"""Pod churn benchmark: does enrolling and removing a pod cost the same whatever the node holds?

Issue 19 item 4: in the dev cluster the agent's CPU per 20 pods added grew 0.5, 1.0, 1.45,
2.0 s and CNI ADD latency grew with the node's pod count. Here, in a 2-node dev cluster
(``ambit.dev.cluster.DevCluster``, real controller, agents, ztunnels and CNI) per redirect
mode, N mesh pods are added to node-1 back to back, then deleted back to back, for each N of
``--sizes`` (default 10, 100, 250: Kubernetes' default limit per node is 110, big nodes run
250). Measured per (mode, N):

* CNI ADD and DEL latency (p50, p99), timed around the runtime's plugin call;
* time to first successful connection: for up to ``--probes`` pods spread over the run, a
  client starts in the pod the moment its ADD returns and dials an echo server on node-2
  until it gets the answer (bash ``/dev/tcp``, so the client itself adds milliseconds only);
* CPU of node-1's agent and ztunnel per pod (``psutil`` cpu_times of their pids, children
  included: iptables-restore), for the add phase and the delete phase;
* their RSS with all N pods present.

The per-pod agent CPU at the largest N against the smallest is the number the issue asks to
keep within 1.5x. Results: a table (stdout and ``churn.txt``), ``churn.json`` and ``churn.png``
under ``--out`` (default ``bench/results``). Everything runs inside namespaces of clusters
created here and removed in a ``finally``, whatever happened; each (mode, N) is bounded by
``--budget`` seconds; sizes below ``--min-pods`` (50) are repeated until that many pods have
churned (CPU times tick in 10 ms) and reported as one. Run as root:
``python -m bench.churn [--modes ebpf,iptables] [--sizes 10,100,250]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.report import percentile

PORT = 8080
RESULTS = Path(__file__).parent / "results"


@dataclass
class ChurnResult:
    mode: str
    pods: int
    add_p50_ms: float = 0.0
    add_p99_ms: float = 0.0
    del_p50_ms: float = 0.0
    del_p99_ms: float = 0.0
    add_seconds: float = 0.0  # wall time of the add phase
    del_seconds: float = 0.0
    agent_cpu_add_ms: float = 0.0  # per pod
    agent_cpu_del_ms: float = 0.0
    ztunnel_cpu_add_ms: float = 0.0
    ztunnel_cpu_del_ms: float = 0.0
    agent_rss_mib: float = 0.0
    ztunnel_rss_mib: float = 0.0
    first_conn_p50_ms: float | None = None
    first_conn_max_ms: float | None = None
    probes_ok: int = 0
    probes: int = 0
    repeats: int = 1
    add_ms: list[float] = field(default_factory=list)
    del_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)

    @property
    def agent_cpu_ms(self) -> float:
        return self.agent_cpu_add_ms + self.agent_cpu_del_ms

    @property
    def ztunnel_cpu_ms(self) -> float:
        return self.ztunnel_cpu_add_ms + self.ztunnel_cpu_del_ms


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and of its children it has waited for (iptables-restore)."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def _probe(pod_netns_argv: list[str], ip: str) -> subprocess.Popen[str]:
    """A client that dials until the echo answers and prints the wall time it got it."""
    script = (f"for i in $(seq 500); do if {{ exec 3<>/dev/tcp/{ip}/{PORT}; }} 2>/dev/null; "
              "then echo first >&3; if read -r -t 5 line <&3 && [[ $line == *first* ]]; then "
              "echo $EPOCHREALTIME; exit 0; fi; exec 3<&-; fi; sleep 0.02; done; exit 1")
    return subprocess.Popen([*pod_netns_argv, "timeout", "30", "bash", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _check_budget(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"churn benchmark: {what} went over its time budget")


def churn_once(c: Any, mode: str, n: int, probes: int, server_ip: str, budget: float,
               tag: str) -> ChurnResult:
    """Add ``n`` pods to node-1 back to back, then delete them; measure."""
    from ambit.dev import netns

    node = c.node(1)
    agent_pid = c.process(f"agent/{node.name}").pid
    ztunnel_pid = c.process(f"ztunnel/{node.name}").pid
    res = ResultTimes()
    probe_at = ({round(i * (n - 1) / max(1, probes - 1)) for i in range(probes)}
                if probes else set())
    clients: list[tuple[float, subprocess.Popen[str]]] = []
    make_runner = c.runner

    def runner(nd: Any) -> Any:
        r = make_runner(nd)
        add, delete = r.add, r.delete

        def timed_add(rt: Any) -> Any:
            t0 = time.monotonic()
            out = add(rt)
            res.add.append(time.monotonic() - t0)
            if len(res.add) - 1 in probe_at:
                pod_netns = rt.netns_path.rsplit("/", 1)[-1]
                clients.append((time.time(), _probe(netns.ns_argv(pod_netns, []), server_ip)))
            return out

        def timed_delete(rt: Any) -> Any:
            t0 = time.monotonic()
            out = delete(rt)
            res.delete.append(time.monotonic() - t0)
            return out

        r.add = timed_add
        r.delete = timed_delete
        return r

    deadline = time.monotonic() + budget
    names = [f"{tag}{i}" for i in range(n)]
    out = ChurnResult(mode, n)
    c.runner = runner
    try:
        a0, z0, t0 = cpu_seconds(agent_pid), cpu_seconds(ztunnel_pid), time.monotonic()
        for name in names:
            c.add_pod(name, 1)
            _check_budget(deadline, f"{mode}, {n} pods: adding")
        a1, z1, t1 = cpu_seconds(agent_pid), cpu_seconds(ztunnel_pid), time.monotonic()
        out.agent_rss_mib, out.ztunnel_rss_mib = rss_mib(agent_pid), rss_mib(ztunnel_pid)
        first: list[float] = []
        for started, proc in clients:
            try:
                text, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                continue
            if proc.returncode == 0 and text.strip():
                first.append((float(text.strip().replace(",", ".")) - started) * 1000)
        # Deleting starts once the probes are done (they are not part of the delete phase).
        a2, z2, t2 = cpu_seconds(agent_pid), cpu_seconds(ztunnel_pid), time.monotonic()
        for name in names:
            c.delete_pod(name)
            _check_budget(deadline, f"{mode}, {n} pods: deleting")
        a3, z3, t3 = cpu_seconds(agent_pid), cpu_seconds(ztunnel_pid), time.monotonic()
    finally:
        c.runner = make_runner
        for _, proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        for name in names:  # a failed run leaves none of its pods behind
            if name in c.pods:
                try:
                    c.delete_pod(name)
                except Exception as e:
                    print(f"  cleanup: pod {name}: {e}", file=sys.stderr)
    add_ms = sorted(x * 1000 for x in res.add)
    del_ms = sorted(x * 1000 for x in res.delete)
    out.add_ms, out.del_ms = add_ms, del_ms
    out.add_p50_ms, out.add_p99_ms = percentile(add_ms, 50), percentile(add_ms, 99)
    out.del_p50_ms, out.del_p99_ms = percentile(del_ms, 50), percentile(del_ms, 99)
    out.add_seconds, out.del_seconds = t1 - t0, t3 - t2
    out.agent_cpu_add_ms = (a1 - a0) * 1000 / n
    out.agent_cpu_del_ms = (a3 - a2) * 1000 / n
    out.ztunnel_cpu_add_ms = (z1 - z0) * 1000 / n
    out.ztunnel_cpu_del_ms = (z3 - z2) * 1000 / n
    out.probes, out.probes_ok, out.first_ms = len(clients), len(first), first
    if first:
        out.first_conn_p50_ms = statistics.median(first)
        out.first_conn_max_ms = max(first)
    return out


@dataclass
class ResultTimes:
    add: list[float] = field(default_factory=list)
    delete: list[float] = field(default_factory=list)


def merge(runs: Sequence[ChurnResult]) -> ChurnResult:
    """Repeated runs of one size as one: CPU per pod over all pods, percentiles over all
    samples, wall times and RSS of the last run."""
    if len(runs) == 1:
        return runs[0]
    last = runs[-1]
    k = len(runs)
    out = ChurnResult(last.mode, last.pods, add_seconds=last.add_seconds,
                      del_seconds=last.del_seconds, agent_rss_mib=last.agent_rss_mib,
                      ztunnel_rss_mib=last.ztunnel_rss_mib, repeats=k)
    out.add_ms = sorted(x for r in runs for x in r.add_ms)
    out.del_ms = sorted(x for r in runs for x in r.del_ms)
    out.add_p50_ms, out.add_p99_ms = percentile(out.add_ms, 50), percentile(out.add_ms, 99)
    out.del_p50_ms, out.del_p99_ms = percentile(out.del_ms, 50), percentile(out.del_ms, 99)
    for name in ("agent_cpu_add_ms", "agent_cpu_del_ms", "ztunnel_cpu_add_ms",
                 "ztunnel_cpu_del_ms"):
        setattr(out, name, sum(getattr(r, name) for r in runs) / k)
    out.first_ms = [x for r in runs for x in r.first_ms]
    out.probes = sum(r.probes for r in runs)
    out.probes_ok = len(out.first_ms)
    if out.first_ms:
        out.first_conn_p50_ms = statistics.median(out.first_ms)
        out.first_conn_max_ms = max(out.first_ms)
    return out


def run_mode(mode: str, sizes: Sequence[int], probes: int, budget: float, root: Path,
             min_pods: int = 50) -> list[ChurnResult]:
    from ambit.dev.cluster import DevCluster

    name = f"cb{mode[:2]}{uuid.uuid4().hex[:4]}"
    # The cluster's directory is root/name, removed by ``down``.
    c = DevCluster(name, nodes=2, redirect_mode=mode, root=root, out=lambda _line: None)
    results = []
    try:
        c.up()
        c.set_namespace("default", ambient=True)
        server = c.add_pod("cbsrv", 2)
        c.start_echo(server.name, PORT)
        for size in sizes:
            # Small sizes are repeated until about ``min_pods`` pods have churned: CPU times
            # tick in 10 ms, so 10 pods alone would measure mostly rounding.
            runs = [churn_once(c, mode, size, min(probes, size), server.ip, budget,
                               f"c{size}r{k}p")
                    for k in range(max(1, -(-min_pods // size)))]
            r = merge(runs)
            print(f"  {mode} {size:>4} pods: " + row(r), flush=True)
            results.append(r)
    finally:
        c.down(quiet=True)
    return results


HEADER = ("mode      pods  ADD p50/p99 ms  DEL p50/p99 ms  agent CPU/pod ms (add+del)  "
          "ztunnel CPU/pod ms  RSS agent/zt MiB  1st conn p50/max ms")


def row(r: ChurnResult) -> str:
    first = ("-" if r.first_conn_p50_ms is None else
             f"{r.first_conn_p50_ms:.0f}/{r.first_conn_max_ms:.0f} ({r.probes_ok}/{r.probes})")
    return (f"{r.add_p50_ms:6.0f}/{r.add_p99_ms:<6.0f} {r.del_p50_ms:6.0f}/{r.del_p99_ms:<6.0f} "
            f"{r.agent_cpu_ms:7.1f} ({r.agent_cpu_add_ms:.1f}+{r.agent_cpu_del_ms:.1f})"
            f"{'':8} {r.ztunnel_cpu_ms:7.1f}{'':11} "
            f"{r.agent_rss_mib:5.0f}/{r.ztunnel_rss_mib:<5.0f}"
            f"{'':6} {first}")


def table(results: Sequence[ChurnResult]) -> str:
    lines = [HEADER]
    for r in results:
        lines.append(f"{r.mode:9} {r.pods:4}  {row(r)}"
                     + (f"  (x{r.repeats})" if r.repeats > 1 else ""))
    for mode in dict.fromkeys(r.mode for r in results):
        rs = sorted((r for r in results if r.mode == mode), key=lambda r: r.pods)
        if len(rs) >= 2 and rs[0].agent_cpu_ms > 0:
            lines.append(f"{mode}: agent CPU per pod at {rs[-1].pods} pods / at {rs[0].pods} "
                         f"pods = {rs[-1].agent_cpu_ms / rs[0].agent_cpu_ms:.2f}x "
                         "(target <= 1.5x)")
    return "\n".join(lines)


def write_plot(results: Sequence[ChurnResult], path: Path, title: str = "") -> None:
    """Per mode against pods per node: agent and ztunnel CPU per pod, ADD and DEL p50/p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ebpf": "#d62728", "iptables": "#1f77b4"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax_agent, ax_zt, ax_add, ax_del = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    for mode in dict.fromkeys(r.mode for r in results):
        rs = sorted((r for r in results if r.mode == mode), key=lambda r: r.pods)
        xs = [r.pods for r in rs]
        color = colors.get(mode, "#2ca02c")
        ax_agent.plot(xs, [r.agent_cpu_add_ms for r in rs], "o-", color=color,
                      label=f"{mode} add")
        ax_agent.plot(xs, [r.agent_cpu_del_ms for r in rs], "s--", color=color,
                      label=f"{mode} delete")
        ax_zt.plot(xs, [r.ztunnel_cpu_add_ms for r in rs], "o-", color=color,
                   label=f"{mode} add")
        ax_zt.plot(xs, [r.ztunnel_cpu_del_ms for r in rs], "s--", color=color,
                   label=f"{mode} delete")
        ax_add.plot(xs, [r.add_p50_ms for r in rs], "o-", color=color, label=f"{mode} p50")
        ax_add.plot(xs, [r.add_p99_ms for r in rs], "^:", color=color, label=f"{mode} p99")
        ax_del.plot(xs, [r.del_p50_ms for r in rs], "o-", color=color, label=f"{mode} p50")
        ax_del.plot(xs, [r.del_p99_ms for r in rs], "^:", color=color, label=f"{mode} p99")
    for ax, what, unit in ((ax_agent, "agent CPU per pod", "ms CPU"),
                           (ax_zt, "ztunnel CPU per pod", "ms CPU"),
                           (ax_add, "CNI ADD latency", "ms"),
                           (ax_del, "CNI DEL latency", "ms")):
        ax.set_title(what)
        ax.set_xlabel("pods added to the node back to back")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="ebpf,iptables")
    ap.add_argument("--sizes", default="10,100,250")
    ap.add_argument("--probes", type=int, default=10,
                    help="pods per run whose first connection is timed")
    ap.add_argument("--min-pods", type=int, default=50,
                    help="repeat smaller sizes until this many pods have churned")
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds allowed for one (mode, size) run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--label", default="", help="added to the output file names")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    if not sizes or min(sizes) < 1 or max(sizes) > 250:
        ap.error("--sizes: 1-250 pods per node (the node's /24 pod CIDR)")
    work = args.out / "work"
    results: list[ChurnResult] = []
    started = time.monotonic()
    for mode in modes:
        print(f"[churn] {mode}: sizes {', '.join(map(str, sizes))}", flush=True)
        results += run_mode(mode, sizes, args.probes, args.budget, work, args.min_pods)
    rev = commit()
    text = table(results)
    print(text)
    suffix = f"-{args.label}" if args.label else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"churn{suffix}.txt").write_text(f"commit {rev}\n{text}\n")
    doc: dict[str, Any] = {"commit": rev, "seconds": round(time.monotonic() - started, 1),
                           "results": [{**asdict(r), "agent_cpu_ms": r.agent_cpu_ms,
                                        "ztunnel_cpu_ms": r.ztunnel_cpu_ms} for r in results]}
    (args.out / f"churn{suffix}.json").write_text(json.dumps(doc, indent=1))
    write_plot(results, args.out / f"churn{suffix}.png",
               f"pod churn on one node (commit {rev})")
    print(f"[churn] wrote {args.out}/churn{suffix}.{{txt,json,png}} in "
          f"{time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Entry points of ``ambit agent run|uninstall|status``: flags to config, backend choice.

Why apart from ``agent.app``: the process core stays testable with any backend, while this
module picks the redirect mode the way the user asked (``auto`` says why it fell back) and keeps
heavy imports (gRPC, pyroute2) out of every other ``ambit`` command. bcc is never imported by the
agent at all: it runs in the eBPF loader process (``agent/capture/ebpf_loader.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from agent.capture.base import MODE_EBPF, MODE_IPTABLES
from agent.config import (
    DEFAULT_BPF_DIR,
    DEFAULT_RUN_DIR,
    MODE_AUTO,
    NODE_METRICS_PORT,
    REDIRECT_MODES,
    AgentConfig,
    AgentConfigError,
)

if TYPE_CHECKING:
    from agent.capture.base import CaptureBackend

log = logging.getLogger("agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("agent", help="the node agent: capture pods into the ztunnel",
                       description="Run or remove the node agent. It captures the traffic of "
                       "the node's mesh pods into the ztunnel (eBPF, or iptables TPROXY), "
                       "learns about pods from the `ambit-cni` plugin and the controller, and "
                       "serves the node metrics endpoint.")
    agent_sub = p.add_subparsers(dest="agent_command", required=True)
    run = agent_sub.add_parser("run", help="run the agent on this node")
    run.add_argument("--node", required=True, help="this node's name in the registry")
    run.add_argument("--controller", required=True, metavar="HOST:PORT",
                     help="the controller's gRPC address (port 15012)")
    run.add_argument("--node-token-file", type=Path,
                     help="node credential (`ambit node join`; service-account token in "
                     "Kubernetes)")
    run.add_argument("--ca-root-cert", type=Path,
                     help="mesh root that verifies the controller's TLS (plaintext without)")
    run.add_argument("--redirect-mode", choices=REDIRECT_MODES, default=MODE_AUTO,
                     help="auto (default): eBPF when the kernel allows, else iptables, saying "
                     "why")
    _paths(run)
    run.add_argument("--uplink", action="append", default=[],
                     help="the node's uplink interface(s) for inbound capture (default eth0)")
    run.add_argument("--exclude-cidr", action="append", default=[],
                     help="destinations a pod reaches without the ztunnel (eBPF mode)")
    run.add_argument("--metrics-host", default="0.0.0.0")
    run.add_argument("--metrics-port", type=int, default=NODE_METRICS_PORT,
                     help=f"node metrics endpoint (default {NODE_METRICS_PORT})")
    run.add_argument("--ztunnel-metrics-url", default="http://127.0.0.1:15020/metrics",
                     help="merged into the node metrics ('' to leave out)")
    run.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"])
    rm = agent_sub.add_parser("uninstall", help="remove every program, pinned map, rule and "
                              "route the agent created on this node")
    _paths(rm)
    rm.add_argument("--uplink", action="append", default=[])
    st = agent_sub.add_parser("status", help="what the agent captures, per pod")
    st.add_argument("--url", default=f"http://127.0.0.1:{NODE_METRICS_PORT}",
                    help="the agent's node endpoint")
    st.add_argument("--json", action="store_true")


def _paths(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                   help=f"sockets and the pod table (default {DEFAULT_RUN_DIR})")
    p.add_argument("--bpf-dir", type=Path, default=DEFAULT_BPF_DIR,
                   help=f"pinned eBPF maps (default {DEFAULT_BPF_DIR}, on a bpffs)")


def choose_backend(config: AgentConfig) -> tuple[CaptureBackend, str]:
    """The backend for ``--redirect-mode`` and, for auto, the reason for the choice."""
    from agent.capture.iptables_backend import IptablesCapture

    if config.redirect_mode == MODE_IPTABLES:
        return IptablesCapture(), "requested with --redirect-mode iptables"
    from agent.capture import ebpf

    reason = ebpf.ebpf_unavailable_reason()
    if reason is not None:
        if config.redirect_mode == MODE_EBPF:
            raise AgentConfigError(f"--redirect-mode ebpf: {reason}; fix that or use "
                                   "--redirect-mode iptables (or auto)")
        log.warning("eBPF capture is unavailable (%s); using iptables", reason)
        return IptablesCapture(), f"auto: eBPF unavailable ({reason})"
    backend = ebpf.EbpfCapture(config.bpf_dir, config.uplinks, config.exclude_cidrs)
    why = ("requested with --redirect-mode ebpf" if config.redirect_mode == MODE_EBPF
           else "auto: the kernel supports it")
    return backend, why


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = AgentConfig(
            node=args.node, controller_address=args.controller,
            node_token_file=args.node_token_file, ca_root_cert=args.ca_root_cert,
            redirect_mode=args.redirect_mode, run_dir=args.run_dir, bpf_dir=args.bpf_dir,
            uplinks=tuple(args.uplink) or ("eth0",), exclude_cidrs=tuple(args.exclude_cidr),
            metrics_host=args.metrics_host, metrics_port=args.metrics_port,
            ztunnel_metrics_url=args.ztunnel_metrics_url, log_level=args.log_level,
        ).validate()
        backend, why = choose_backend(config)
    except AgentConfigError as e:
        print(f"ambit agent: error: {e}", file=sys.stderr)
        return 2
    import uvloop

    from agent.app import Agent, serve
    from agent.capture.base import CaptureError

    try:
        uvloop.run(serve(Agent(config, backend, why)))
    except CaptureError as e:
        log.error("%s", e)
        return 1
    return 0


def uninstall(run_dir: Path, bpf_dir: Path, uplinks: tuple[str, ...]) -> list[str]:
    """Remove both modes' leftovers (whichever exist); returns what was done, for printing."""
    from agent.capture.iptables_backend import IptablesCapture

    done = []
    try:
        from agent.capture import ebpf

        ebpf.EbpfCapture(bpf_dir, uplinks).uninstall()
        done.append(f"eBPF programs, filters and pinned maps under {bpf_dir}")
    except ImportError as e:
        done.append(f"eBPF: skipped ({e})")
    IptablesCapture().uninstall()
    done.append("iptables chains and policy routing")
    for name in ("cni.sock", "ztunnel.sock", "pods.json", "pods.tmp", "pods.corrupt"):
        (run_dir / name).unlink(missing_ok=True)
    done.append(f"agent files in {run_dir}")
    return done


def _status(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(f"{args.url.rstrip('/')}/debug/pods", timeout=5) as r:
            doc = json.loads(r.read())
    except OSError as e:
        print(f"ambit agent status: cannot reach the agent at {args.url}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"node {doc['node']}: redirect mode {doc['redirectMode']} "
          f"({doc['redirectModeReason']}); {doc['ready']}")
    for key, value in sorted(doc.get("capture", {}).items()):
        print(f"  {key}: {value}")
    if doc.get("lastError"):
        print(f"  last reconcile error: {doc['lastError']}")
    print(f"{'POD':<32} {'IPS':<16} {'IFACE':<16} {'CAPTURED':<9} REASON")
    for p in doc["pods"]:
        flag = "yes" if p["captured"] else "no"
        if p["captured"] != p["shouldCapture"]:
            flag += "!"
        print(f"{p['pod']:<32} {','.join(p['ips']):<16} {p['hostIface']:<16} {flag:<9} "
              f"{p['reason']}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.agent_command == "run":
        return _run(args)
    if args.agent_command == "uninstall":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        for line in uninstall(args.run_dir, args.bpf_dir, tuple(args.uplink) or ("eth0",)):
            print(f"removed: {line}")
        return 0
    return _status(args)

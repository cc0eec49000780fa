"""Entry points of ``ambit agent run|uninstall|status|cni``: flags to config, backend choice.

Why apart from ``agent.app``: the process core stays testable with any backend, while this
module picks the redirect mode the way the user asked (``auto`` says why it fell back) and keeps
heavy imports (gRPC, pyroute2) out of every other ``ambit`` command. bcc is never imported by the
agent at all: it runs in the eBPF loader process (``agent/capture/ebpf_loader.py``).

``ambit agent cni install|uninstall`` are the DaemonSet's init step and the manual undo
(``agent/cni/installer.py``); ``ambit agent uninstall`` removes capture and, given the CNI
directories, the chain entry and the plugin binary too. ``add_parser`` registers each
subcommand with its handler (``set_defaults(func=...)``); ``ambit`` only calls it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from agent.capture.base import MODE_EBPF, MODE_INPOD, MODE_IPTABLES, CaptureError
from agent.cni.spec import DEFAULT_AGENT_SOCKET
from agent.config import (
    DEFAULT_BPF_DIR,
    DEFAULT_RUN_DIR,
    MODE_AUTO,
    REDIRECT_MODES,
    ZTUNNEL_METRICS_URL,
    AgentConfig,
    AgentConfigError,
    parse_uplinks,
)
from agent.uplinks import AUTO as UPLINKS_AUTO
from agent.ztunnel_link import DEFAULT_HOLD_SECONDS, PEER_CHECK_CMDLINE, PEER_CHECKS
from mesh.ports import NODE_METRICS_PORT

if TYPE_CHECKING:
    from agent.capture.base import CaptureBackend
    from agent.cni.installer import CniPaths
    from agent.k8s_owner import OwnerWatch
    from mesh.cli import SubParsers

log = logging.getLogger("agent")


def add_parser(sub: SubParsers) -> None:
    """Register ``ambit agent`` and its subcommands, each with its handler."""
    p = sub.add_parser("agent", help="the node agent: capture pods into the ztunnel",
                       description="Run or remove the node agent. It captures the traffic of "
                       "the node's mesh pods into the ztunnel (eBPF, or iptables TPROXY), "
                       "learns about pods from the `ambit-cni` plugin and the controller, and "
                       "serves the node metrics endpoint.")
    agent_sub = p.add_subparsers(dest="agent_command", required=True)
    run = agent_sub.add_parser("run", help="run the agent on this node")
    run.set_defaults(func=_run)
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
                     "why; inpod: rules inside each pod's network namespace, nothing on the "
                     "node, the client's IP kept (never chosen by auto)")
    _paths(run)
    run.add_argument("--uplink", action="append", default=[],
                     help="the node's uplink interface(s) for inbound capture: names, "
                     "comma-separated or repeated, and/or `auto` (every up Ethernet interface "
                     "with an IPv4 address that is not loopback, a bridge or a pod's veth; "
                     "re-resolved on every resync). Default eth0")
    run.add_argument("--exclude-cidr", action="append", default=[],
                     help="destinations a pod reaches without the ztunnel (eBPF mode)")
    run.add_argument("--metrics-host", default="0.0.0.0")
    run.add_argument("--metrics-port", type=int, default=NODE_METRICS_PORT,
                     help=f"node metrics endpoint (default {NODE_METRICS_PORT})")
    run.add_argument("--ztunnel-metrics-url", default=ZTUNNEL_METRICS_URL,
                     help="merged into the node metrics ('' to leave out)")
    run.add_argument("--socket-uid", type=int, action="append", default=[], metavar="UID",
                     help="a uid that may use the agent's sockets (cni.sock, ztunnel.sock) "
                     "besides root and the agent's own user (repeatable)")
    run.add_argument("--ztunnel-peer-check", choices=PEER_CHECKS, default=PEER_CHECK_CMDLINE,
                     help="cmdline (default): only an `ambit ztunnel` process (its /proc "
                     "command line) may register capture listeners on ztunnel.sock; off: any "
                     "allowed uid may")
    run.add_argument("--listener-hold", type=float, default=DEFAULT_HOLD_SECONDS,
                     metavar="SECONDS",
                     help="keep the ztunnel's capture listeners this long after it went, so "
                     "its successor takes them over and no queued connection is refused "
                     f"(default {DEFAULT_HOLD_SECONDS:g}; 0 lets them go at once)")
    run.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"])
    _cni_dirs(run, required=False)
    run.add_argument("--binary", type=Path,
                     help="keep this ambit-cni binary installed in --cni-bin-dir and chained "
                     "into the primary config of --cni-conf-dir while running (re-checked "
                     "every few seconds)")
    run.add_argument("--daemonset", metavar="NAME",
                     help="on SIGTERM, if DaemonSet $POD_NAMESPACE/NAME is being deleted "
                     "(404 or deletionTimestamp), remove the CNI chain, the plugin binary and "
                     "all capture from the node; otherwise leave them for the next agent")
    rm = agent_sub.add_parser("uninstall", help="remove every program, pinned map, rule and "
                              "route the agent created on this node (and, given the CNI "
                              "directories, the chain entry and the plugin binary)")
    rm.set_defaults(func=_uninstall)
    _paths(rm)
    rm.add_argument("--uplink", action="append", default=[],
                    help="ignored (capture is removed from every interface); kept for "
                    "compatibility")
    _cni_dirs(rm, required=False)
    cni = agent_sub.add_parser("cni", help="install or remove the ambit-cni plugin on this "
                               "node", description="Install the ambit-cni binary into the "
                               "host's CNI bin directory and chain it into the cluster's "
                               "primary CNI config (the DaemonSet's init step), or undo that.")
    cni.set_defaults(func=_cni)
    cni_sub = cni.add_subparsers(dest="cni_command", required=True)
    inst = cni_sub.add_parser("install", help="copy the binary, wait for the cluster's CNI "
                              "config, chain ambit-cni into it (idempotent)")
    _cni_dirs(inst, required=True)
    inst.add_argument("--binary", type=Path, required=True,
                      help="the ambit-cni binary to install (/opt/ambit/cni/ambit-cni in the "
                      "image)")
    inst.add_argument("--agent-socket", default=DEFAULT_AGENT_SOCKET,
                      help=f"the agent's socket, as the host sees it (default "
                      f"{DEFAULT_AGENT_SOCKET})")
    inst.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                      help="give up (exit 1) if no usable CNI config appears in time "
                      "(default: wait for ever, logging every 10 s)")
    un = cni_sub.add_parser("uninstall", help="remove ambit-cni from every CNI config (a "
                            ".conf we converted is restored) and remove the binary")
    _cni_dirs(un, required=True)
    st = agent_sub.add_parser("status", help="what the agent captures, per pod")
    st.set_defaults(func=_status)
    st.add_argument("--url", default=f"http://127.0.0.1:{NODE_METRICS_PORT}",
                    help="the agent's node endpoint")
    st.add_argument("--json", action="store_true")


def _paths(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                   help=f"sockets and the pod table (default {DEFAULT_RUN_DIR})")
    p.add_argument("--bpf-dir", type=Path, default=DEFAULT_BPF_DIR,
                   help=f"pinned eBPF maps (default {DEFAULT_BPF_DIR}, on a bpffs)")


def _cni_dirs(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--cni-bin-dir", type=Path, required=required,
                   help="the host's CNI plugin directory as mounted here (e.g. "
                   "/host/opt/cni/bin)")
    p.add_argument("--cni-conf-dir", type=Path, required=required,
                   help="the host's CNI config directory as mounted here (e.g. "
                   "/host/etc/cni/net.d)")


def choose_backend(config: AgentConfig,
                   uplinks: tuple[str, ...] | None = None) -> tuple[CaptureBackend, str]:
    """The backend for ``--redirect-mode`` and, for auto, the reason for the choice.
    ``uplinks`` are the resolved ``--uplink`` names (default: the explicit ones)."""
    from agent.capture.iptables_backend import IptablesCapture

    if config.redirect_mode == MODE_IPTABLES:
        return IptablesCapture(), "requested with --redirect-mode iptables"
    if config.redirect_mode == MODE_INPOD:
        from agent.capture.inpod import InpodCapture

        return InpodCapture(), "requested with --redirect-mode inpod"
    from agent.capture import ebpf, ebpf_support

    reason = ebpf_support.ebpf_unavailable_reason()
    if reason is not None:
        if config.redirect_mode == MODE_EBPF:
            raise AgentConfigError(f"--redirect-mode ebpf: {reason}; fix that or use "
                                   "--redirect-mode iptables (or auto)")
        log.warning("eBPF capture is unavailable (%s); using iptables", reason)
        return IptablesCapture(), f"auto: eBPF unavailable ({reason})"
    if uplinks is None:
        uplinks = tuple(u for u in config.uplinks if u != UPLINKS_AUTO)
    backend = ebpf.EbpfCapture(config.bpf_dir, uplinks, config.exclude_cidrs)
    why = ("requested with --redirect-mode ebpf" if config.redirect_mode == MODE_EBPF
           else "auto: the kernel supports it")
    return backend, why


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent import uplinks

    try:
        config = AgentConfig(
            node=args.node, controller_address=args.controller,
            node_token_file=args.node_token_file, ca_root_cert=args.ca_root_cert,
            redirect_mode=args.redirect_mode, run_dir=args.run_dir, bpf_dir=args.bpf_dir,
            uplinks=parse_uplinks(args.uplink), exclude_cidrs=tuple(args.exclude_cidr),
            metrics_host=args.metrics_host, metrics_port=args.metrics_port,
            ztunnel_metrics_url=args.ztunnel_metrics_url, log_level=args.log_level,
            cni_bin_dir=args.cni_bin_dir, cni_conf_dir=args.cni_conf_dir,
            cni_binary=args.binary, daemonset=args.daemonset,
            daemonset_namespace=os.environ.get("POD_NAMESPACE", ""),
            socket_uids=tuple(args.socket_uid), ztunnel_peer_check=args.ztunnel_peer_check,
            listener_hold=args.listener_hold,
        ).validate()
        links = uplinks.read_links() if config.uplinks_auto else []
        found = uplinks.resolve(config.uplinks, links)
        if config.uplinks_auto:
            log.info("uplinks (auto): %s; not uplinks: %s", ", ".join(found) or "none",
                     "; ".join(uplinks.describe(links)) or "-")
        owner = _owner(config)
        backend, why = choose_backend(config, found)
    except (AgentConfigError, uplinks.UplinkError) as e:
        print(f"ambit agent: error: {e}", file=sys.stderr)
        return 2
    import uvloop

    from agent.app import Agent, serve
    from agent.cni.installer import ChainWatcher

    paths = _cni_paths(config.cni_bin_dir, config.cni_conf_dir)
    watcher = (ChainWatcher(paths, config.cni_binary, str(config.cni_socket))
               if paths is not None and config.cni_binary is not None else None)

    def remove_install() -> list[str]:
        done, failed = uninstall(config.run_dir, config.bpf_dir, paths)
        if failed:
            raise CaptureError("; ".join(failed))
        return done

    agent = Agent(config, backend, why, initial_uplinks=found, cni=watcher, owner=owner,
                  remove_install=remove_install if owner is not None else None)
    try:
        uvloop.run(serve(agent))
    except CaptureError as e:
        log.error("%s", e)
        return 1
    return 0


def _owner(config: AgentConfig) -> OwnerWatch | None:
    """The DaemonSet check for ``--daemonset`` (in-cluster API credentials)."""
    if config.daemonset is None:
        return None
    from agent.k8s_owner import ApiConfigError, ApiTarget, DaemonSetClient, OwnerWatch

    try:
        target = ApiTarget.in_cluster()
    except ApiConfigError as e:
        raise AgentConfigError(f"--daemonset: {e}") from None
    return OwnerWatch(DaemonSetClient(target, config.daemonset_namespace, config.daemonset))


def _cni_paths(bin_dir: Path | None, conf_dir: Path | None) -> CniPaths | None:
    from agent.cni.installer import CniPaths

    if bin_dir is None or conf_dir is None:
        return None
    return CniPaths(bin_dir, conf_dir)


def uninstall(run_dir: Path, bpf_dir: Path,
              cni: CniPaths | None = None) -> tuple[list[str], list[str]]:
    """Remove Ambit from this node: the CNI chain entry and binary first (when ``cni`` is
    given: new pods must stop waiting for an agent that is going away), then both capture
    modes' leftovers (whichever exist), then the agent's files. Returns what was done and
    what failed, one line each; a failure does not stop the other steps."""
    from agent.capture.iptables_backend import IptablesCapture

    done: list[str] = []
    failed: list[str] = []
    if cni is not None:
        from agent.cni.installer import InstallError, remove_binary, remove_chain

        try:
            done += remove_chain(cni.conf_dir) or [f"no ambit-cni entry in {cni.conf_dir}"]
            done.append(remove_binary(cni.bin_dir) or f"no {cni.installed_binary}")
        except InstallError as e:
            failed.append(f"CNI: {e}")
    try:
        from agent.capture import ebpf

        ebpf.EbpfCapture(bpf_dir, ()).uninstall()
        done.append(f"eBPF programs, filters and pinned maps under {bpf_dir}")
    except ImportError as e:
        done.append(f"eBPF: skipped ({e})")
    except CaptureError as e:
        failed.append(f"eBPF: {e}")
    try:
        IptablesCapture().uninstall()
        done.append("iptables chains and policy routing")
    except CaptureError as e:
        failed.append(f"iptables: {e}")
    try:
        from agent.capture.inpod import uninstall_pods
        from agent.pods import PodTable

        table = PodTable(run_dir / "pods.json")
        table.load()
        cleaned = uninstall_pods([p.netns for p in table.pods.values()])
        if cleaned:
            done.append(f"in-pod rules of {len(cleaned)} pod(s)")
    except (CaptureError, OSError) as e:
        failed.append(f"inpod: {e}")
    for name in ("cni.sock", "ztunnel.sock", "pods.json", "pods.json.tmp", "pods.corrupt"):
        (run_dir / name).unlink(missing_ok=True)
    done.append(f"agent files in {run_dir}")
    return done, failed


def _cni(args: argparse.Namespace) -> int:
    from agent.cni.installer import CniPaths, InstallError, install
    from agent.cni.installer import uninstall as cni_uninstall

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = CniPaths(args.cni_bin_dir, args.cni_conf_dir)
    try:
        if args.cni_command == "install":
            if args.timeout is not None and args.timeout < 0:
                raise InstallError("--timeout: must be >= 0 seconds")
            lines = install(paths, args.binary, agent_socket=args.agent_socket,
                            timeout=args.timeout)
        else:
            lines = cni_uninstall(paths) or ["nothing to remove: no ambit-cni entry in "
                                             f"{paths.conf_dir}, no {paths.installed_binary}"]
    except InstallError as e:
        print(f"ambit agent cni {args.cni_command}: error: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


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
    from agent.status_view import agent_lines

    print("\n".join(agent_lines(doc)))
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.cni_bin_dir is None) != (args.cni_conf_dir is None):
        print("ambit agent uninstall: error: --cni-bin-dir and --cni-conf-dir go together",
              file=sys.stderr)
        return 2
    done, failed = uninstall(args.run_dir, args.bpf_dir,
                             _cni_paths(args.cni_bin_dir, args.cni_conf_dir))
    for line in done:
        print(f"removed: {line}")
    for line in failed:
        print(f"ambit agent uninstall: error: {line}", file=sys.stderr)
    return 1 if failed else 0

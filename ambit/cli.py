"""The ``ambit`` command: one entry point with a subcommand per component.

Argument errors and configuration errors exit with status 2 and one line saying what is wrong
and how to fix it; nothing prints a traceback at a user for a mistake in their input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import main as agent_main
from ambit import __version__, waypoint_cli
from ambit import registry_cli as registry_commands
from ambit.install import cli as install_cli
from controller import main as controller_main


class UsageError(Exception):
    """Bad input from the user: printed as ``ambit: error: ...`` with exit status 2."""


def _add_ztunnel(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ztunnel",
        help="run the per-node HBONE proxy",
        description="Run the ztunnel: the per-node proxy that carries mesh traffic over HBONE "
        "(HTTP/2 CONNECT in mutual TLS) and enforces L4 authorization. Flags override the "
        "settings of --config.",
    )
    p.add_argument("--config", type=Path, help="YAML file of ztunnel settings (see docs)")
    p.add_argument("--node", help="name of the node this ztunnel serves (required)")
    p.add_argument("--state", dest="state_file", type=Path,
                   help="workloads/services/policies file, hot-reloaded (docs/state-file.md)")
    p.add_argument("--identity-dir", type=Path,
                   help="directory of certificates: trust-bundle.pem, <ns>/<sa>/cert-chain.pem "
                   "and key.pem (create with `ambit dev certs`)")
    p.add_argument("--controller", dest="controller_address", metavar="HOST:PORT",
                   help="get the mesh state from this controller (instead of --state); also "
                   "the CA address when --node-token-file is given")
    p.add_argument("--ca-address", metavar="HOST:PORT",
                   help="mesh CA for workload certificates (default: --controller)")
    p.add_argument("--node-token-file", type=Path,
                   help="node credential for the CA (`ambit node join NODE` in embedded mode; "
                   "the service-account token in Kubernetes)")
    p.add_argument("--ca-root-cert", type=Path,
                   help="mesh root certificate that verifies the controller's TLS "
                   "(the controller writes it to DATA_DIR/trust-bundle.pem)")
    p.add_argument("--trust-domain", help="SPIFFE trust domain (default cluster.local)")
    p.add_argument("--inbound-bind", choices=["shared", "workload"],
                   help="shared: capture listeners on --bind-host (TPROXY/eBPF); workload: "
                   "15006/15008 on each local workload's IP (default shared)")
    p.add_argument("--bind-host", help="address of the capture listeners (default 0.0.0.0)")
    for name, default in (("outbound", 15001), ("inbound-plaintext", 15006), ("inbound", 15008),
                          ("socks5", 0), ("admin", 15000), ("metrics", 15020),
                          ("readiness", 15021)):
        p.add_argument(f"--{name}-port", type=int,
                       help=f"listener port, 0 disables (default {default})")
    p.add_argument("--socks5-host", help="address of the SOCKS5 listener (default 127.0.0.1)")
    p.add_argument("--admin-host", help="address of the admin listener (default 127.0.0.1)")
    p.add_argument("--stats-host", help="address of metrics/readiness (default 0.0.0.0)")
    p.add_argument("--no-transparent", dest="transparent", action="store_const", const=False,
                   help="do not set IP_TRANSPARENT on capture listeners")
    p.add_argument("--drain-seconds", type=float, help="drain deadline on SIGTERM (default 5)")
    p.add_argument("--agent-socket", type=Path,
                   help="the node agent's link socket (/var/run/ambit/ztunnel.sock): hand the "
                   "capture listeners to it, as eBPF redirect mode needs")
    p.add_argument("--access-log", help="'-' for stderr (default), '' to disable, or a file")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _add_dev(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dev", help="local development tools",
                       description="Tools for trying Ambit on one machine.")
    dsub = p.add_subparsers(dest="dev_command", metavar="COMMAND", required=True)
    c = dsub.add_parser(
        "certs",
        help="create a mesh root and workload certificates in an identity directory",
        description="Create (or reuse) a root CA in DIR and issue a certificate for each "
        "--identity NAMESPACE/SERVICEACCOUNT, in the layout `ambit ztunnel --identity-dir` reads.",
    )
    c.add_argument("--out", type=Path, required=True, help="identity directory to write")
    c.add_argument("--trust-domain", default="cluster.local")
    c.add_argument("--identity", action="append", default=[], metavar="NS/SA",
                   help="an identity to issue (repeatable)")
    c.add_argument("--ttl-hours", type=float, default=24.0, help="certificate lifetime")
    d = dsub.add_parser(
        "demo",
        help="run a two-node mesh in network namespaces and show it working (needs root)",
        description="Build a 2-node dev cluster from network namespaces (not connected to this "
        "machine's network): controller, a ztunnel and a node agent per node, pods wired by "
        "CNI. Show a cross-node HBONE call, a call denied by policy and the node metrics.",
    )
    d.add_argument("--keep", action="store_true", help="leave the mesh running at the end")
    d.add_argument("--workdir", type=Path,
                   help="where state and logs go (default /var/run/ambit-dev)")
    d.add_argument("--redirect-mode", choices=["auto", "ebpf", "iptables"], default="auto",
                   help="how the node agents capture pods (default auto: eBPF if possible)")
    d.add_argument("--cleanup", action="store_true",
                   help="remove what earlier `--keep` demos left running, then exit")
    from ambit.dev import cluster_cli

    cluster_cli.add_parser(dsub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambit", description="Ambit, a sidecarless service mesh for Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"ambit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_ztunnel(sub)
    _add_dev(sub)
    registry_commands.add_commands(sub)
    controller_main.add_parser(sub)
    agent_main.add_parser(sub)
    waypoint_cli.add_parser(sub)
    install_cli.add_parsers(sub)
    return parser


def _run_ztunnel(args: argparse.Namespace) -> int:
    from ztunnel.app import run
    from ztunnel.config import ConfigError, ZtunnelConfig

    overrides = {
        k: getattr(args, k)
        for k in ("node", "state_file", "identity_dir", "controller_address", "ca_address",
                  "node_token_file", "ca_root_cert", "trust_domain", "inbound_bind",
                  "bind_host", "outbound_port", "inbound_plaintext_port", "inbound_port",
                  "socks5_port", "socks5_host", "admin_host", "admin_port", "stats_host",
                  "metrics_port", "readiness_port", "transparent", "drain_seconds",
                  "agent_socket", "access_log", "log_level")
    }
    if overrides["controller_address"] and overrides["node_token_file"] \
            and not overrides["ca_address"]:
        overrides["ca_address"] = overrides["controller_address"]
    try:
        if args.config is not None:
            config = ZtunnelConfig.from_file(args.config, **overrides)
        else:
            config = ZtunnelConfig.from_mapping({}, **overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return run(config)


def _run_dev_certs(args: argparse.Namespace) -> int:
    import datetime as dt

    from controller.ca import (
        CertificateAuthority,
        write_identity,
        write_trust_bundle,
    )
    from mesh.spiffe import SpiffeId

    out: Path = args.out
    ca_key, ca_cert = out / "ca" / "root-key.pem", out / "ca" / "root-cert.pem"
    if ca_key.exists() and ca_cert.exists():
        ca = CertificateAuthority.load(ca_key.read_bytes(), ca_cert.read_bytes())
    else:
        ca = CertificateAuthority.generate(args.trust_domain)
        ca_key.parent.mkdir(parents=True, exist_ok=True)
        ca_key.write_bytes(ca.key_pem)
        ca_key.chmod(0o600)
        ca_cert.write_bytes(ca.root_pem)
    write_trust_bundle(out, ca)
    for text in args.identity:
        ns, _, sa = text.partition("/")
        if not ns or not sa or "/" in sa:
            raise UsageError(f"--identity {text!r}: expected NAMESPACE/SERVICEACCOUNT")
        ident = SpiffeId(args.trust_domain, ns, sa)
        write_identity(out, ident, ca.issue(ident, ttl=dt.timedelta(hours=args.ttl_hours)))
        print(f"issued {ident}")
    print(f"identity directory: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "ztunnel":
            return _run_ztunnel(args)
        if args.command == "dev" and args.dev_command == "certs":
            return _run_dev_certs(args)
        if args.command == "dev" and args.dev_command == "demo":
            from ambit.dev.demo import main as demo_main

            return demo_main(keep=args.keep, workdir=args.workdir, do_cleanup=args.cleanup,
                             redirect_mode=args.redirect_mode)
        if args.command == "dev" and args.dev_command == "cluster":
            from ambit.dev import cluster_cli

            return cluster_cli.run(args)
        if args.command == "controller":
            return controller_main.run(args)
        if args.command == "agent":
            return agent_main.run(args)
        if args.command == "waypoint":
            return waypoint_cli.run(args)
        if args.command in install_cli.COMMANDS:
            return install_cli.run(args)
        if args.command in registry_commands.COMMANDS:
            return registry_commands.run(args)
    except (UsageError, registry_commands.CommandError,
            controller_main.ControllerUsageError) as e:
        parser.exit(2, f"ambit: error: {e}\n")
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

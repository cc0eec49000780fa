"""``ambit dashboard``: its flags, and the handler that serves until interrupted.

Why apart from ``server``: ``ambit --help`` builds every command's parser, so this module
imports nothing heavy at module level; aiohttp and the gatherer load when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.cli import UsageError

if TYPE_CHECKING:
    from mesh.cli import SubParsers

DEFAULT_LISTEN = "127.0.0.1:15090"


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser(
        "dashboard", help="a live, read-only web view of the mesh",
        description="Serve a web page showing the mesh as it runs: workloads by namespace and "
        "node, traffic between them (mTLS, denials and the policy that denied them), "
        "waypoints, each node's agent and ztunnel, policies and routes. It reads what the "
        "controller, the node agents, the ztunnels and the waypoints already expose, and "
        "updates the page live. Binds to loopback unless told otherwise.")
    p.set_defaults(func=run)
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve the page (default {DEFAULT_LISTEN})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster", metavar="NAME",
                       help="a dev cluster (`ambit dev cluster up`, `make demo KEEP=1` is "
                       "'demo')")
    where.add_argument("--db", type=Path, help="an embedded registry (default $AMBIT_DB), "
                       "with its nodes given by --node")
    where.add_argument("--kubeconfig", metavar="PATH",
                       help="a Kubernetes cluster, read through its API server (the node "
                       "agents, waypoints and controller through its pod proxy, as ambit "
                       "status does)")
    p.add_argument("--context", metavar="NAME",
                   help="with --kubeconfig: the kubeconfig context (default: its current one)")
    p.add_argument("--cluster-root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--node", action="append", default=[], metavar="NAME=HOST",
                   help="with --db: a node whose agent (15022) and ztunnel admin (15000) "
                   "answer on HOST")
    p.add_argument("--controller", default="127.0.0.1", metavar="HOST",
                   help="with --db: the controller's monitoring address (port 15014)")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between gathers (default 1)")


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    host = host.strip("[]") or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise UsageError(f"--listen {text!r}: HOST must be an IP address") from None
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from ambit.dashboard import gather, server

    host, port = parse_listen(args.listen)
    if not 0.2 <= args.interval <= 60:
        raise UsageError(f"--interval {args.interval:g}: use 0.2 to 60 seconds")
    source: gather.Source
    if args.context and not args.kubeconfig:
        raise UsageError("--context goes with --kubeconfig PATH")
    if args.cluster:
        source = gather.DevClusterSource(args.cluster, args.cluster_root)
    elif args.kubeconfig:
        from ambit.dashboard.kube import KubernetesSource

        path = Path(args.kubeconfig).expanduser()
        if not path.is_file():
            raise UsageError(f"--kubeconfig {args.kubeconfig}: no such file")
        source = KubernetesSource(str(path), args.context)
    else:
        db = args.db or (Path(os.environ["AMBIT_DB"]) if os.environ.get("AMBIT_DB") else None)
        if db is None:
            raise UsageError("say what to show: --cluster NAME (a dev cluster), --kubeconfig "
                             "PATH (a Kubernetes cluster) or --db PATH --node NAME=HOST ... "
                             "(an embedded control plane)")
        nodes = {}
        for item in args.node:
            name, sep, addr = item.partition("=")
            if not sep or not name or not addr:
                raise UsageError(f"--node {item!r}: expected NAME=HOST")
            nodes[name] = addr
        source = gather.EmbeddedSource(db, nodes, args.controller)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    async def main() -> None:
        try:
            await server.serve(source, host, port, args.interval)
        finally:
            close = getattr(source, "close", None)  # the Kubernetes source's API client
            if close is not None:
                await close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        raise UsageError(f"cannot serve on {host}:{port}: {e}") from None
    return 0

"""``ambit waypoint ...``: the ``waypoint`` parser and the commands that manage waypoints
(apply, delete, list) in the embedded registry, a dev cluster or Kubernetes.

Why the parser is here and ``run`` is not: apply/delete/list drive the registry and the dev
cluster (``ambit.waypoint_manage``), which belong to the command line, while ``ambit waypoint
run`` is the waypoint runtime's own entry (a waypoint pod's container command), owned by
``waypoint/cli.py``; this module creates the ``waypoint`` parser and lets that module add
``run`` to it. ``ambit`` builds every command's parser at each start, so nothing heavy is
imported here: each handler imports ``waypoint_manage`` when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from waypoint import cli as waypoint_runtime

if TYPE_CHECKING:
    from mesh.cli import SubParsers


def add_parser(sub: SubParsers) -> None:
    """Register ``ambit waypoint`` and its subcommands, each with its handler."""
    p = sub.add_parser("waypoint", help="L7 waypoints (Envoy per service or namespace)",
                       description="Waypoints: Envoy proxies that apply L7 policy (HTTPRoute, "
                       "retries, faults, L7 authorization) to traffic bound for services that "
                       "use them.")
    wsub = p.add_subparsers(dest="waypoint_command", metavar="COMMAND", required=True)
    _add_apply(wsub)
    _add_delete(wsub)
    _add_list(wsub)
    waypoint_runtime.add_parser(wsub)


def _where_flags(p: argparse.ArgumentParser, kubernetes: bool = True) -> None:
    p.add_argument("--cluster", metavar="NAME",
                   help="a local dev cluster (`ambit dev cluster up`): also start/stop the "
                   "waypoint's pod there")
    p.add_argument("--db", type=Path, help="embedded registry (default $AMBIT_DB or "
                   "/var/lib/ambit/registry.db)")
    if kubernetes:
        p.add_argument("--kubeconfig", help="Kubernetes: create the Gateway in the API server "
                       "(also used when $KUBECONFIG is set and neither --db nor --cluster is)")


def _add_apply(wsub: SubParsers) -> None:
    a = wsub.add_parser(
        "apply", help="create (or update) a waypoint",
        description="Declare a waypoint: a Gateway API Gateway of class ambit-waypoint. In "
        "Kubernetes the controller runs it (Deployment + Service); in a dev cluster its pod is "
        "started here. Then label a Service or Namespace ambit.dev/use-waypoint=NAME.")
    a.set_defaults(func=_apply)
    a.add_argument("--for", dest="waypoint_for", default="service",
                   choices=["service", "workload", "all", "none"],
                   help="which traffic it serves (default service: traffic to service VIPs)")
    a.add_argument("-n", "--namespace", default="default")
    a.add_argument("--name", default="waypoint", help="the Gateway's name (default waypoint)")
    a.add_argument("--node", help="dev cluster: the node to run it on (default: least busy)")
    _where_flags(a)


def _add_delete(wsub: SubParsers) -> None:
    d = wsub.add_parser("delete", help="remove a waypoint")
    d.set_defaults(func=_delete)
    d.add_argument("-n", "--namespace", default="default")
    d.add_argument("--name", default="waypoint")
    _where_flags(d)


def _add_list(wsub: SubParsers) -> None:
    ls = wsub.add_parser("list", help="waypoints, their instances and bound services "
                         "(embedded registry or dev cluster)")
    ls.set_defaults(func=_list)
    _where_flags(ls, kubernetes=False)


def _out(line: str) -> None:
    print(line, flush=True)


def _reported(args: argparse.Namespace, action: Callable[[], object]) -> int:
    """Do ``action``; a ``ManageError`` is one line on stderr and exit status 2."""
    from ambit.waypoint_manage import ManageError

    try:
        action()
    except ManageError as e:
        print(f"ambit waypoint {args.waypoint_command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _apply(args: argparse.Namespace) -> int:
    from ambit import waypoint_manage as manage

    return _reported(args, lambda: manage.apply(
        args.namespace, args.name, args.waypoint_for, _out, cluster=args.cluster,
        node=args.node, db=args.db, kubeconfig=args.kubeconfig))


def _delete(args: argparse.Namespace) -> int:
    from ambit import waypoint_manage as manage

    return _reported(args, lambda: manage.delete(
        args.namespace, args.name, _out, cluster=args.cluster, db=args.db,
        kubeconfig=args.kubeconfig))


def _list(args: argparse.Namespace) -> int:
    from ambit import waypoint_manage as manage

    def show() -> None:
        for line in manage.list_lines(cluster=args.cluster, db=args.db):
            _out(line)

    return _reported(args, show)

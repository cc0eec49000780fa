"""The ``ambit dev cluster`` commands: up, down, status, pod add/delete, exec.

Kept apart from ``ambit.dev.cluster`` so that module stays a library (the e2e tests and the
demo drive it in-process) and this one only maps flags to calls and errors to exit codes.
``add_parser`` registers ``run`` as the handler of every ``ambit dev cluster`` command
(``set_defaults(func=run)``): they share its error handling and the loading of the cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from ambit.dev import netns
from ambit.dev.cluster import STATE_ROOT, ClusterError, DevCluster

if TYPE_CHECKING:
    from mesh.cli import SubParsers


def add_parser(dsub: SubParsers) -> None:
    """Register ``ambit dev cluster`` and its subcommands under ``ambit dev``."""
    p = dsub.add_parser(
        "cluster", help="a local multi-node mesh in network namespaces (needs root)",
        description="Build nodes and pods from network namespaces (never connected to this "
        "machine's network), each node running a ztunnel and a node agent, pods wired by the "
        "real CNI plugins with ambit-cni chained, and the controller in embedded mode.")
    p.set_defaults(func=run)
    csub = p.add_subparsers(dest="cluster_command", required=True)
    up = csub.add_parser("up", help="create the cluster and leave it running")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--redirect-mode", choices=["auto", "ebpf", "iptables", "inpod"],
                    default="auto")
    for name in ("down", "status"):
        csub.add_parser(name, help=f"{name} the cluster")
    pod = csub.add_parser("pod", help="add or delete a pod")
    psub = pod.add_subparsers(dest="pod_command", required=True)
    add = psub.add_parser("add", help="schedule and start a pod (CNI ADD)")
    add.add_argument("pod")
    add.add_argument("--node", required=True)
    add.add_argument("--namespace", default="default")
    add.add_argument("--service-account")
    add.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    add.add_argument("--echo", type=int, metavar="PORT",
                     help="run an echo server (python -m ambit.dev.echo) in it on PORT")
    rm = psub.add_parser("delete", help="stop a pod (CNI DEL)")
    rm.add_argument("pod")
    ex = csub.add_parser("exec", help="run a command inside a pod's network namespace")
    ex.add_argument("pod")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    for sp in (up, add, rm, ex, *(csub.choices[n] for n in ("down", "status"))):
        sp.add_argument("--name", default="dev", help="cluster name (default dev)")


def run(args: argparse.Namespace) -> int:
    """Do one ``ambit dev cluster`` command; the exit status (1 with one line on error)."""
    try:
        netns.require_root()
        cmd = args.cluster_command
        if cmd == "up":
            c = DevCluster(args.name, nodes=args.nodes, redirect_mode=args.redirect_mode)
            c.up()
            print()
            for line in c.status_lines():
                print(line)
            print(f"remove it with: ambit dev cluster down --name {args.name}")
            return 0
        if cmd == "down":
            if not (STATE_ROOT / args.name / "cluster.json").exists():
                # Nothing recorded, but namespaces may remain from a crash: remove those.
                DevCluster(args.name).down()
                return 0
            DevCluster.load(args.name).down()
            return 0
        c = DevCluster.load(args.name)
        if cmd == "status":
            for line in c.status_lines():
                print(line)
            return 0
        if cmd == "pod" and args.pod_command == "add":
            labels = {}
            for item in args.label:
                key, sep, value = item.partition("=")
                if not sep or not key:
                    raise ClusterError(f"--label {item!r}: expected KEY=VALUE")
                labels[key] = value
            pod = c.add_pod(args.pod, args.node, namespace=args.namespace,
                            service_account=args.service_account, labels=labels or None)
            print(f"pod {pod.namespace}/{pod.name}: {pod.ip} on {pod.node} "
                  f"(netns {pod.netns}, host interface {pod.host_iface})")
            if args.echo:
                c.start_echo(pod.name, args.echo)
                print(f"echo server on {pod.ip}:{args.echo}")
            return 0
        if cmd == "pod":
            c.delete_pod(args.pod)
            print(f"pod {args.pod} deleted")
            return 0
        argv = [a for a in args.argv if a != "--"] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise ClusterError("give a command after --, e.g. exec client -- ip addr")
        pod = c.pod(args.pod)
        sys.stdout.flush()
        os.execvp("ip", netns.ns_argv(pod.netns, argv))
    except (ClusterError, netns.NetnsError) as e:
        print(f"ambit dev cluster: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ambit dev cluster: interrupted", file=sys.stderr)
        return 130

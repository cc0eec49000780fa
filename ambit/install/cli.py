"""The ``ambit install``, ``ambit uninstall`` and ``ambit status`` subcommands: flags to calls.

Why here and not in ``ambit/cli.py``: the three share their connection flags and their error
handling (usage errors exit 2, a failure on the cluster exits 1, both with one line and no
traceback; Ctrl-C says what state was left), and the top-level parser only registers them.
Each parser's handler (``set_defaults(func=...)``) is its command wrapped in that shared
handling by ``_reported``; the install modules are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from agent.config import REDIRECT_MODES
from ambit.install.names import CONFIG_MAP, DATAPLANE_MODE_LABEL, NAMESPACE, NODE_DAEMONSET

if TYPE_CHECKING:
    from ambit.install.kube import Cluster
    from mesh.cli import Handler, SubParsers

__all__ = ["add_parsers"]

T = TypeVar("T")


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="kubeconfig to use (default: $KUBECONFIG, then ~/.kube/config, then "
                   "the in-cluster service account)")
    p.add_argument("--context", help="kubeconfig context (default: its current-context)")


def _manifests(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifests", type=Path, metavar="DIR",
                   help="the manifests directory (a kustomization with a resources list; "
                   "default: deploy/daemonset of this checkout, or /opt/ambit/deploy/daemonset "
                   "in the controller image)")


def add_parsers(sub: SubParsers) -> None:
    """Register ``ambit install``, ``uninstall`` and ``status``, each with its handler."""
    p = sub.add_parser(
        "install", help="install or upgrade Ambit on a Kubernetes cluster",
        description="Apply Ambit's manifests to the cluster with server-side apply (field "
        "manager `ambit`; running it again upgrades or changes settings, and changes nothing "
        f"when nothing differs), then wait until the controller and the {NODE_DAEMONSET} "
        "DaemonSet run. The GatewayClass for waypoints is created when the cluster serves the "
        "Gateway API. Needs cluster-admin rights.",
        epilog=f"Settings go into the ConfigMap {NAMESPACE}/{CONFIG_MAP}; changing one rolls "
        "the pods that read it. After installing, add a namespace to the mesh with: kubectl "
        f"label namespace NAME {DATAPLANE_MODE_LABEL}=ambient")
    p.set_defaults(func=_reported(_install))
    _connection(p)
    _manifests(p)
    p.add_argument("--image-prefix", metavar="PREFIX",
                   help="where the component images are: PREFIX + component + ':' + tag, e.g. "
                   "registry.example.com/ambit- gives registry.example.com/ambit-ztunnel:TAG "
                   "(default: the manifests', localhost/ambit-; `make images` builds them, "
                   "push them where the nodes can pull them)")
    p.add_argument("--tag", help="the tag of every component image (default: the manifests', "
                   "this version)")
    p.add_argument("--image", action="append", default=[], metavar="COMPONENT=IMAGE",
                   help="one component's image, over --image-prefix/--tag; components: "
                   "ztunnel, agent (also the install-cni init container), controller, waypoint "
                   "(the controller's --waypoint-image); repeatable")
    p.add_argument("--trust-domain", metavar="DOMAIN",
                   help="SPIFFE trust domain of workload identities "
                   "(default cluster.local)")
    p.add_argument("--redirect-mode", metavar="MODE",
                   help=f"how nodes capture pod traffic: {', '.join(REDIRECT_MODES)} (default "
                   "auto: eBPF where the kernel allows it, else iptables)")
    p.add_argument("--uplinks", metavar="LIST",
                   help="the nodes' uplink interfaces for inbound capture: auto (default) or "
                   "a comma-separated list such as eth0,eth1")
    p.add_argument("--dry-run", action="store_true",
                   help="print the manifests that would be applied and exit; contacts no "
                   "cluster (pipe into `kubectl apply --server-side -f -` if you prefer)")
    p.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml",
                   help="--dry-run output format (default yaml)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="wait until everything runs (default; --no-wait returns once applied)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait (default 300)")

    u = sub.add_parser(
        "uninstall", help="remove Ambit from a Kubernetes cluster",
        description=f"Remove everything Ambit added: the {NODE_DAEMONSET} DaemonSet first "
        "(its agents remove the CNI configuration and the capture from each node as they "
        "stop), then the controller and the rest of the manifests in reverse order, the "
        "waypoint objects the controller created in any namespace, the GatewayClass, the CRDs "
        f"(with every custom resource of theirs) and the namespace {NAMESPACE} last. Running "
        "it again finishes an interrupted uninstall.")
    u.set_defaults(func=_reported(_uninstall))
    _connection(u)
    _manifests(u)
    u.add_argument("--keep-crds", action="store_true",
                   help="keep Ambit's CRDs and the policies written with them")
    u.add_argument("--dry-run", action="store_true",
                   help="list what would be deleted (reads the cluster, changes nothing)")
    u.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for pods and the namespace to go (default 300)")

    s = sub.add_parser(
        "status", help="show whether Ambit runs and what each node captures",
        description="Show the controller (replicas, leader), the node DaemonSet and each of "
        "its pods with what the node's agent captures (read through the API server's pod "
        "proxy), the mesh namespaces and the waypoint GatewayClass. Exit status 0 when no "
        "problem is found, 1 otherwise.")
    s.set_defaults(func=_reported(_status))
    _connection(s)
    s.add_argument("--pods", action="store_true",
                   help="also list every pod each node agent knows and whether it is captured")
    s.add_argument("--json", action="store_true", help="print the status as JSON")


def _err(command: str, message: str, code: int) -> int:
    print(f"ambit {command}: error: {message}", file=sys.stderr, flush=True)
    return code


def _out(line: str) -> None:
    print(line, flush=True)


async def _with_cluster(args: argparse.Namespace,
                        action: Callable[[Cluster], Awaitable[T]]) -> T:
    from ambit.install.kube import Cluster, connect

    api = await connect(args.kubeconfig, args.context)
    try:
        return await action(Cluster(api))
    finally:
        await api.close()


def _reported(command: Handler) -> Handler:
    """``command`` with the error handling ``install``, ``uninstall`` and ``status`` share:
    a bad manifest or flag exits 2, a failure on the cluster 1, Ctrl-C 130 saying what was
    left; each with one line on stderr."""

    @functools.wraps(command)
    def handler(args: argparse.Namespace) -> int:
        from ambit.install.apply import InstallError
        from ambit.install.kube import ConnectError
        from ambit.install.render import RenderError
        from ambit.install.status import StatusError
        from ambit.install.uninstall import UninstallError

        name = str(args.command)
        try:
            return command(args)
        except RenderError as e:
            return _err(name, str(e), 2)
        except (InstallError, UninstallError, StatusError, ConnectError) as e:
            return _err(name, str(e), 1)
        except KeyboardInterrupt:
            what = {"install": "what was applied so far stays; run ambit install again to "
                               "finish",
                    "uninstall": "what is not deleted yet stays; run ambit uninstall again to "
                                 "finish"}.get(name, "")
            print(f"\nambit {name}: interrupted{'; ' + what if what else ''}", file=sys.stderr)
            return 130

    return handler


def _install(args: argparse.Namespace) -> int:
    from ambit.install.apply import install
    from ambit.install.images import ImageError, parse_image_flags
    from ambit.install.render import Overrides, render_dir, to_json, to_yaml

    if args.timeout <= 0:
        return _err("install", "--timeout must be more than 0 seconds", 2)
    try:
        per_component = parse_image_flags(args.image)
    except ImageError as e:
        return _err("install", str(e), 2)
    overrides = Overrides(images=per_component, image_prefix=args.image_prefix, tag=args.tag,
                          trust_domain=args.trust_domain, redirect_mode=args.redirect_mode,
                          uplinks=args.uplinks)
    rendered = render_dir(args.manifests, overrides)
    if args.dry_run:
        sys.stdout.write(to_json(rendered) + "\n" if args.output == "json" else to_yaml(rendered))
        return 0
    if args.output != "yaml":
        return _err("install", "-o/--output applies to --dry-run only", 2)

    async def go(cluster: Cluster) -> None:
        await install(cluster, rendered, wait=args.wait, wait_timeout=args.timeout, out=_out)

    asyncio.run(_with_cluster(args, go))
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from ambit.install.render import Overrides, render_dir
    from ambit.install.uninstall import uninstall

    if args.timeout <= 0:
        return _err("uninstall", "--timeout must be more than 0 seconds", 2)
    rendered = render_dir(args.manifests, Overrides())

    async def go(cluster: Cluster) -> None:
        await uninstall(cluster, rendered.manifests, keep_crds=args.keep_crds,
                        dry_run=args.dry_run, wait_timeout=args.timeout, out=_out)

    asyncio.run(_with_cluster(args, go))
    return 0


def _status(args: argparse.Namespace) -> int:
    from ambit.install.status import status

    async def go(cluster: Cluster) -> int:
        return await status(cluster, pods=args.pods, as_json=args.json, out=_out)

    return asyncio.run(_with_cluster(args, go))

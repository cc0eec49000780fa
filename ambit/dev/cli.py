"""``ambit dev ...``: the local development commands (certs, demo, and the ``cluster`` group
of ``cluster_cli``), each sub-parser with its handler.

Why apart from ``ambit/cli.py``: that module only assembles the top-level parser and calls the
handler a sub-parser registered (``set_defaults(func=...)``); the dev tools' flags and their
mapping to calls live with the dev tools. Handlers import what they run (the CA, the demo)
inside the function, so ``ambit --help`` and the other commands do not pay for them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ambit.dev import cluster_cli
from mesh.cli import UsageError

if TYPE_CHECKING:
    from mesh.cli import SubParsers


def add_parser(sub: SubParsers) -> None:
    """Register ``ambit dev`` and its subcommands, each with its handler."""
    p = sub.add_parser("dev", help="local development tools",
                       description="Tools for trying Ambit on one machine.")
    dsub = p.add_subparsers(dest="dev_command", metavar="COMMAND", required=True)
    c = dsub.add_parser(
        "certs",
        help="create a mesh root and workload certificates in an identity directory",
        description="Create (or reuse) a root CA in DIR and issue a certificate for each "
        "--identity NAMESPACE/SERVICEACCOUNT, in the layout `ambit ztunnel --identity-dir` reads.",
    )
    c.set_defaults(func=_certs)
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
    d.set_defaults(func=_demo)
    d.add_argument("--keep", action="store_true", help="leave the mesh running at the end")
    d.add_argument("--workdir", type=Path,
                   help="where state and logs go (default /var/run/ambit-dev)")
    d.add_argument("--redirect-mode", choices=["auto", "ebpf", "iptables", "inpod"],
                   default="inpod",
                   help="how the node agents capture pods (default inpod: rules inside each "
                   "pod, the server sees its client's IP; auto: eBPF if possible)")
    d.add_argument("--cleanup", action="store_true",
                   help="remove what earlier `--keep` demos left running, then exit")
    cluster_cli.add_parser(dsub)


def _certs(args: argparse.Namespace) -> int:
    """``ambit dev certs``: a root CA (created once) and a certificate per --identity."""
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


def _demo(args: argparse.Namespace) -> int:
    from ambit.dev.demo import main as demo_main

    return demo_main(keep=args.keep, workdir=args.workdir, do_cleanup=args.cleanup,
                     redirect_mode=args.redirect_mode)

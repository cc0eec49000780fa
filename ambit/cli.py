"""The ``ambit`` command: one entry point with a subcommand per component.

This module only assembles the parser and runs the handler the chosen sub-parser registered
(``set_defaults(func=...)``). Each component owns its sub-parser and handler (``ztunnel/cli.py``,
``controller/main.py``, ``agent/main.py``, ``waypoint/cli.py``), as do the command line's own
commands (``ambit/registry_cli.py``, ``ambit/waypoint_cli.py``, ``ambit/install/cli.py``,
``ambit/dev/cli.py``), so adding a command never touches a dispatch chain here. The parser of
every command is built at each start, ``ambit --help`` included: handlers import their runtime
modules (gRPC, Envoy protos, uvloop) inside the function, not at module level.

Argument errors and configuration errors exit with status 2 and one line saying what is wrong
and how to fix it; nothing prints a traceback at a user for a mistake in their input. A
component signals one by raising ``mesh.cli.UsageError`` (or a subclass), caught here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent import main as agent_main
from ambit import __version__, waypoint_cli
from ambit import registry_cli as registry_commands
from ambit.dashboard import cli as dashboard_cli
from ambit.dev import cli as dev_cli
from ambit.install import cli as install_cli
from controller import main as controller_main
from mesh.cli import Handler, UsageError
from ztunnel import cli as ztunnel_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambit", description="Ambit, a sidecarless service mesh for Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"ambit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ztunnel_cli.add_parser(sub)
    dev_cli.add_parser(sub)
    registry_commands.add_commands(sub)
    controller_main.add_parser(sub)
    agent_main.add_parser(sub)
    waypoint_cli.add_parser(sub)
    install_cli.add_parsers(sub)
    dashboard_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "func", None)
    if handler is None:
        parser.error(f"unknown command {args.command!r}")
    try:
        return handler(args)
    except UsageError as e:
        parser.exit(2, f"ambit: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())

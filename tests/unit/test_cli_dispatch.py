"""The ``ambit`` parser: every command has a handler, components' usage errors share one base,
and building the parser (``ambit --help``, ``ambit dev ...``) imports nothing heavy."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

from agent import main as agent_main
from ambit.cli import build_parser
from ambit.registry_cli import CommandError
from controller.main import ControllerUsageError
from mesh.cli import UsageError


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = (),
            inherited: bool = False) -> Iterator[tuple[tuple[str, ...], bool]]:
    """(command words, whether a handler is set on the way) for every runnable command."""
    has_func = inherited or "func" in parser._defaults
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, has_func
        return
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaves(child, (*path, name), has_func)


def test_every_command_registers_a_handler() -> None:
    leaves = dict(_leaves(build_parser()))
    assert ("ztunnel",) in leaves and ("waypoint", "run") in leaves
    assert ("dev", "cluster", "pod", "add") in leaves and ("agent", "cni", "install") in leaves
    assert [path for path, ok in leaves.items() if not ok] == []


def test_handlers_belong_to_their_component() -> None:
    parse = build_parser().parse_args
    assert parse(["ztunnel"]).func.__module__ == "ztunnel.cli"
    assert parse(["controller"]).func.__module__ == "controller.main"
    assert parse(["agent", "status"]).func is agent_main._status
    run = parse(["waypoint", "run", "--namespace", "n", "--gateway", "g", "--pod-name", "p",
                 "--pod-ip", "10.0.0.1", "--controller", "c:15012", "--token-file", "t"])
    assert run.func.__module__ == "waypoint.cli"
    assert parse(["waypoint", "list"]).func.__module__ == "ambit.waypoint_cli"
    assert parse(["dev", "certs", "--out", "x"]).func.__module__ == "ambit.dev.cli"


def test_usage_errors_share_the_base_ambit_catches() -> None:
    assert issubclass(CommandError, UsageError)
    assert issubclass(ControllerUsageError, UsageError)


HEAVY = ("grpc", "uvloop", "envoy", "google.protobuf", "kubernetes_asyncio", "pyroute2", "bcc",
         "cryptography")

PROBE = """
import contextlib
import io
import sys
from ambit.cli import build_parser
parser = build_parser()
for argv in (["ztunnel", "--node", "n"], ["controller"], ["agent", "status"], ["get"],
             ["waypoint", "list"], ["install", "--dry-run"], ["dev", "cluster", "status"],
             ["dev", "demo"], ["dev", "certs", "--out", "x"]):
    parser.parse_args(argv)
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    parser.parse_args(["--help"])
heavy = %r
print(" ".join(sorted(m for m in sys.modules
                      if any(m == h or m.startswith(h + ".") for h in heavy)
                      or m.endswith("_pb2") or m.endswith("_pb2_grpc"))))
"""


def test_building_the_parser_imports_nothing_heavy() -> None:
    """Every ``ambit`` start builds every command's parser: a module-level import of gRPC,
    the Envoy protos or uvloop in a component's CLI module would cost every command."""
    r = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,)], capture_output=True,
                       text=True, check=True)
    assert r.stdout.split() == []
